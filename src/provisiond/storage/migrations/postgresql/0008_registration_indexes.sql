-- provisiond schema 8 (PostgreSQL): the registration records keep one secondary index, the one their
-- only query needs (a group's devices: enrollment_group_id, then key order). Every registration
-- writes a record, and each index cost that write an insert; the columns stay, so a query's
-- further conditions (status, deviceId, assignedHub) still filter within the group.

DROP INDEX IF EXISTS registrations_device_id_idx;
DROP INDEX IF EXISTS registrations_status_idx;
DROP INDEX IF EXISTS registrations_assigned_hub_idx;
DROP INDEX IF EXISTS registrations_operation_id_idx;
