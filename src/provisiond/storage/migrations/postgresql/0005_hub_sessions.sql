-- provisiond schema 5 (PostgreSQL): the built-in hubs' persistent MQTT sessions (clean
-- session 0), one per device identity, keyed "{hubHostName}/{deviceId}" as the identities are.
-- The document holds the session's subscriptions (service/hub_sessions.py). The processes' signals
-- (Stream.HUB_SIGNALS) live in stream_entries (schema 3) and need no table of their own.

CREATE TABLE hub_sessions (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL
);
