-- The durable state of jobwire: jobs, their attempts, and the event log watchers read.
-- Every row carries its tenant, so no query can reach across tenants by accident.

CREATE TYPE job_state AS ENUM (
    'awaiting_approval', 'pending', 'scheduled', 'available', 'running',
    'retrying', 'paused', 'succeeded', 'failed', 'cancelled'
);

CREATE TYPE attempt_outcome AS ENUM (
    'running', 'succeeded', 'failed', 'lease_expired', 'cancelled'
);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    queue            text NOT NULL,
    job_type         text NOT NULL,
    payload_type     text NOT NULL,
    payload          bytea NOT NULL,
    priority         smallint NOT NULL CHECK (priority BETWEEN 0 AND 100),
    state            job_state NOT NULL,
    -- Attempts started so far; the running attempt's number is the lease's fencing token.
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Attempts allowed by the retry policy, counted from attempt_base.
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    -- Attempts spent before the last RetryJob, which grants a fresh set without reusing
    -- fencing tokens.
    attempt_base     integer NOT NULL DEFAULT 0,
    retry_initial_ms bigint NOT NULL CHECK (retry_initial_ms >= 0),
    retry_max_ms     bigint NOT NULL CHECK (retry_max_ms >= 0),
    retry_multiplier double precision NOT NULL CHECK (retry_multiplier >= 1),
    retry_jitter     double precision NOT NULL CHECK (retry_jitter BETWEEN 0 AND 1),
    run_at           timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    result_type      text,
    result           bytea,
    last_error       jsonb,
    idempotency_key  text,
    labels           jsonb NOT NULL DEFAULT '{}',
    cancel_reason    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CHECK ((state = 'running') = (lease_expires_at IS NOT NULL))
);

-- Invariant 4: one job per idempotency key and tenant while the job is retained.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim query walks this index in dispatch order.
CREATE INDEX jobs_claim ON jobs (tenant_id, queue, priority DESC, run_at, id)
    WHERE state = 'available';
-- The scheduler promotes due SCHEDULED and RETRYING jobs in run_at order.
CREATE INDEX jobs_due ON jobs (run_at) WHERE state IN ('scheduled', 'retrying');
-- The reaper finds lapsed leases.
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'running';
-- ListJobs pages newest first within a tenant.
CREATE INDEX jobs_tenant_id ON jobs (tenant_id, id DESC);

CREATE TABLE job_attempts (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    tenant_id   text NOT NULL,
    worker_id   text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     attempt_outcome NOT NULL DEFAULT 'running',
    error       jsonb,
    PRIMARY KEY (job_id, attempt)
);

-- One row per state transition (and, later, per progress report or log line), written in the
-- same transaction as the change it describes. `seq` orders every event of the system.
CREATE TABLE job_events (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text NOT NULL,
    job_id     uuid NOT NULL,
    kind       text NOT NULL,
    state      job_state,
    attempt    integer NOT NULL,
    data       jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX job_events_job ON job_events (job_id, seq);
