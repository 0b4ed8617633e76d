-- provisiond schema 4 (SQLite): the built-in hubs' identity registry and shared access policies.
-- hub_devices gains the index columns the registry filters on (IoT Hub's device statistics and
-- the common query conditions), filled from the documents already stored; a new table keeps each
-- built-in hub's shared access policies (iothubowner, service, ...), keyed "{hubHostName}/{keyName}"
-- lower-cased.

ALTER TABLE hub_devices ADD COLUMN status text;
ALTER TABLE hub_devices ADD COLUMN connection_state text;
UPDATE hub_devices SET
    status = coalesce(json_extract(CAST(doc AS TEXT), '$.status'), 'enabled'),
    connection_state = coalesce(json_extract(CAST(doc AS TEXT), '$.connectionState'), 'Disconnected');
CREATE INDEX hub_devices_status_idx ON hub_devices (hub, status, key);
CREATE INDEX hub_devices_connection_state_idx ON hub_devices (hub, connection_state, key);

CREATE TABLE hub_access_policies (
    key text PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc blob NOT NULL,
    hub text
);
CREATE INDEX hub_access_policies_hub_idx ON hub_access_policies (hub, key);
