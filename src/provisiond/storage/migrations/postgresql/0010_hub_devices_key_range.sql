-- provisiond schema 10 (PostgreSQL): the hub devices lose their (hub, key) index. Every key starts
-- with "{hub}/" (the store refuses a write whose hub is not its key's prefix), so a hub's
-- identities are the key range ["{hub}/", "{hub}0") of the primary key, which the store's
-- queries and counts filtered on the hub now read (storage/_sql.py, filter_conditions). A new
-- identity writes one b-tree fewer; the (hub, status, key) and (hub, connection_state, key)
-- indexes stay for the registry's statistics and queries.

DROP INDEX IF EXISTS hub_devices_hub_idx;
