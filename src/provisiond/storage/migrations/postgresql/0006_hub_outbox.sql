-- provisiond schema 6 (PostgreSQL): the durable outbox of hub writes (hub/outbox.py), one item per
-- registration id (key folded), claimed by due time with a lease (Store.claim), and what the hub
-- writers share per hub (the write budget's pace, the figures).

CREATE TABLE hub_outbox (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    hub text,
    due text COLLATE "C",
    owner text
);
CREATE INDEX hub_outbox_hub_due_idx ON hub_outbox (hub, due, key);
CREATE INDEX hub_outbox_due_idx ON hub_outbox (due, key);

CREATE TABLE hub_writers (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    hub text
);
CREATE INDEX hub_writers_hub_idx ON hub_writers (hub, key);
