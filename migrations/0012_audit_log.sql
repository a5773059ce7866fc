-- What was done to a tenant's jobs, queues, schedules, job types and keys, by whom: one row per
-- administrative call that succeeded, written before its answer goes out.
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    -- The acting key; NULL for a call to a server running without keys.
    key_id    uuid,
    key_name  text NOT NULL,
    -- The RPC, `Service/Method`.
    method    text NOT NULL,
    -- The request as JSON, its payloads, descriptor sets and other bytes left out.
    request   jsonb NOT NULL
);

CREATE INDEX audit_log_tenant ON audit_log (tenant_id, id);
