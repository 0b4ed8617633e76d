-- provisiond schema 2 (SQLite): pending TPM challenges, one per registration id (key folded).
-- The document holds the challenged EK/SRK, the pending HMAC key, its expiry and whether a
-- register already used it; single use is enforced by conditional writes on the etag.

CREATE TABLE tpm_challenges (
    key text PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc blob NOT NULL
);
