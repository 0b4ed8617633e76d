-- provisiond schema 1 (PostgreSQL). Run by the migration runner in one transaction,
-- under pg_advisory_xact_lock. Keys use the "C" collation so that key order (and keyset
-- paging) is UTF-8 byte order whatever the database locale, the same order as SQLite's.

CREATE TABLE enrollments (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    device_id text,
    provisioning_status text,
    attestation_type text,
    iot_hub_host_name text
);
CREATE INDEX enrollments_device_id_idx ON enrollments (device_id, key);
CREATE INDEX enrollments_provisioning_status_idx ON enrollments (provisioning_status, key);
CREATE INDEX enrollments_attestation_type_idx ON enrollments (attestation_type, key);
CREATE INDEX enrollments_iot_hub_host_name_idx ON enrollments (iot_hub_host_name, key);

CREATE TABLE enrollment_groups (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    provisioning_status text,
    attestation_type text,
    iot_hub_host_name text
);
CREATE INDEX enrollment_groups_provisioning_status_idx ON enrollment_groups (provisioning_status, key);
CREATE INDEX enrollment_groups_attestation_type_idx ON enrollment_groups (attestation_type, key);
CREATE INDEX enrollment_groups_iot_hub_host_name_idx ON enrollment_groups (iot_hub_host_name, key);

CREATE TABLE registrations (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    device_id text,
    status text,
    assigned_hub text,
    enrollment_group_id text,
    operation_id text
);
CREATE INDEX registrations_device_id_idx ON registrations (device_id, key);
CREATE INDEX registrations_status_idx ON registrations (status, key);
CREATE INDEX registrations_assigned_hub_idx ON registrations (assigned_hub, key);
CREATE INDEX registrations_enrollment_group_id_idx ON registrations (enrollment_group_id, key);
CREATE INDEX registrations_operation_id_idx ON registrations (operation_id, key);

CREATE TABLE linked_hubs (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL
);

CREATE TABLE ca_certificates (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL
);

CREATE TABLE access_policies (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL
);

CREATE TABLE hub_devices (
    key text COLLATE "C" PRIMARY KEY,
    id text NOT NULL,
    etag text NOT NULL,
    created text NOT NULL,
    updated text NOT NULL,
    doc bytea NOT NULL,
    hub text
);
CREATE INDEX hub_devices_hub_idx ON hub_devices (hub, key);

CREATE TABLE settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
