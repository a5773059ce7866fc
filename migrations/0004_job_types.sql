-- The job type registry: each version of a job type with its schema (a serialized
-- FileDescriptorSet), defaults and example payloads. Versions are immutable.

CREATE TABLE job_types (
    tenant_id      text NOT NULL,
    name           text NOT NULL,
    version        integer NOT NULL CHECK (version >= 1),
    payload_type   text NOT NULL,
    output_type    text NOT NULL,
    descriptor_set bytea NOT NULL,
    -- {"queue", "priority", "retry_policy": {...}, "timeout_ms"}, each optional.
    defaults       jsonb NOT NULL DEFAULT '{}',
    -- [{"slug", "name", "payload": <JSON>}]
    examples       jsonb NOT NULL DEFAULT '[]',
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name, version)
);

ALTER TABLE jobs ADD COLUMN job_type_version integer;
