-- The worker fleet, seen from every replica, and the thresholds of a queue's health.
--
-- `workers` holds one row per open worker stream, written by the replica serving it: inserted
-- at the hello, its heartbeat time moved on with each heartbeat, deleted when the stream
-- ends. ListWorkers reads it whichever replica a worker is connected to. A replica that dies
-- leaves its rows behind: they stop being listed once a lease duration passes without a
-- heartbeat, and are deleted when a worker of the tenant next connects.
CREATE TABLE workers (
    -- The stream (UUIDv7: ordered by connection time).
    id                 uuid PRIMARY KEY,
    tenant_id          text NOT NULL,
    -- `Hello.worker_id`: what DrainWorker names.
    worker_id          text NOT NULL,
    version            text NOT NULL DEFAULT '',
    host               text NOT NULL DEFAULT '',
    -- The replica serving the stream (`--replica-name`).
    replica            text NOT NULL,
    queues             text[] NOT NULL,
    job_types          text[] NOT NULL,
    slots              integer NOT NULL CHECK (slots >= 1),
    prefetch           integer NOT NULL CHECK (prefetch >= 0),
    connected_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    -- DrainWorker was called: the serving replica tells the worker (a NOTIFY wakes it; its
    -- next heartbeat reads this, should the notification be missed).
    drain_requested_at timestamptz
);

-- DrainWorker finds a tenant's streams by worker id; ListWorkers pages a tenant's by id.
CREATE INDEX workers_tenant_worker ON workers (tenant_id, worker_id);
CREATE INDEX workers_tenant_id ON workers (tenant_id, id);

GRANT SELECT, INSERT, UPDATE, DELETE ON workers TO jobwire_tenant;
ALTER TABLE workers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON workers TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));

-- A queue's health turns WARNING, then CRITICAL, once its oldest available job has waited
-- this long (NULL: never). Decided in the server (`domain::health`), not here.
ALTER TABLE queues
    ADD COLUMN warn_after_ms bigint CHECK (warn_after_ms > 0),
    ADD COLUMN critical_after_ms bigint CHECK (critical_after_ms > 0);
