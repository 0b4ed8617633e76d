-- provisiond schema 9 (SQLite): the registration records' group index holds only the records of
-- group devices. Its one query (a group's devices: enrollment_group_id = ?, then key order) never
-- asks for a record without a group, and SQLite uses a partial index WHERE x IS NOT NULL for
-- x = ?; an individual enrollment's registration no longer writes an entry to it.

DROP INDEX IF EXISTS registrations_enrollment_group_id_idx;
CREATE INDEX registrations_enrollment_group_id_idx ON registrations (enrollment_group_id, key)
    WHERE enrollment_group_id IS NOT NULL;
