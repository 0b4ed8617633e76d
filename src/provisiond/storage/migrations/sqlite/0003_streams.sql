-- provisiond schema 3 (SQLite): append-only streams (the built-in hubs' telemetry and queued
-- cloud-to-device messages), all in one table. seq is AUTOINCREMENT: never reused, increasing in
-- commit order (SQLite has one writer at a time), so a reader that has seen seq N never finds a
-- new entry at or below N later.

CREATE TABLE stream_entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream text NOT NULL,
    partition text NOT NULL,
    created text NOT NULL,
    doc blob NOT NULL
);
CREATE INDEX stream_entries_stream_idx ON stream_entries (stream, seq);
CREATE INDEX stream_entries_partition_idx ON stream_entries (stream, partition, seq);
