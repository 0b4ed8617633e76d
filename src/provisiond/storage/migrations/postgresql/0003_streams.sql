-- provisiond schema 3 (PostgreSQL): append-only streams (the built-in hubs' telemetry and queued
-- cloud-to-device messages), all in one table. Appends to one stream take a transaction-scoped
-- advisory lock, so seq values become visible in increasing order: a reader that has seen seq N
-- never finds a new entry at or below N later.

CREATE TABLE stream_entries (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream text COLLATE "C" NOT NULL,
    partition text COLLATE "C" NOT NULL,
    created text NOT NULL,
    doc bytea NOT NULL
);
CREATE INDEX stream_entries_stream_idx ON stream_entries (stream, seq);
CREATE INDEX stream_entries_partition_idx ON stream_entries (stream, partition, seq);
