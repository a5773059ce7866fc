-- Scheduling and flow control: queues as persisted objects (pause, global concurrency and rate
-- limits), and cron schedules run by one replica at a time.

CREATE TABLE queues (
    tenant_id         text NOT NULL,
    name              text NOT NULL,
    paused_at         timestamptz,
    pause_reason      text,
    -- At most this many of the queue's jobs RUNNING at once, over every replica.
    concurrency_limit integer CHECK (concurrency_limit >= 1),
    -- A token bucket: refilled at rate_per_second up to rate_burst; a started job takes a token.
    rate_per_second   double precision CHECK (rate_per_second > 0),
    rate_burst        integer CHECK (rate_burst >= 1),
    rate_tokens       double precision NOT NULL DEFAULT 0,
    rate_refilled_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name),
    CHECK ((rate_per_second IS NULL) = (rate_burst IS NULL))
);

INSERT INTO queues (tenant_id, name) SELECT DISTINCT tenant_id, queue FROM jobs;

-- Counts per state (GetQueue), the running count a concurrency limit is checked against, and
-- jobs finished recently (throughput). AVAILABLE jobs are left out: jobs_claim counts those,
-- and an index matching the claim's equality filters would tempt the planner away from
-- jobs_claim's dispatch order into reading and sorting every available job of the queue.
CREATE INDEX jobs_queue_state ON jobs (tenant_id, queue, state, finished_at)
    WHERE state <> 'available';

CREATE TYPE overlap_policy AS ENUM ('allow', 'skip', 'cancel_previous');
CREATE TYPE catch_up_policy AS ENUM ('once', 'skip', 'all');

CREATE TABLE schedules (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    name             text NOT NULL,
    description      text NOT NULL DEFAULT '',
    cron             text NOT NULL,
    time_zone        text NOT NULL,
    -- The job template.
    job_type         text NOT NULL,
    payload_type     text NOT NULL,
    payload          bytea NOT NULL,
    queue            text NOT NULL,
    priority         smallint NOT NULL CHECK (priority BETWEEN 0 AND 100),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    retry_initial_ms bigint NOT NULL CHECK (retry_initial_ms >= 0),
    retry_max_ms     bigint NOT NULL CHECK (retry_max_ms >= 0),
    retry_multiplier double precision NOT NULL CHECK (retry_multiplier >= 1),
    retry_jitter     double precision NOT NULL CHECK (retry_jitter BETWEEN 0 AND 1),
    labels           jsonb NOT NULL DEFAULT '{}',
    timeout_ms       bigint CHECK (timeout_ms > 0),
    overlap_policy   overlap_policy NOT NULL,
    catch_up_policy  catch_up_policy NOT NULL,
    max_catch_up     integer NOT NULL CHECK (max_catch_up BETWEEN 1 AND 1000),
    misfire_grace_ms bigint NOT NULL CHECK (misfire_grace_ms >= 0),
    paused           boolean NOT NULL DEFAULT false,
    -- The next tick; NULL while paused.
    next_run_at      timestamptz,
    last_run_at      timestamptz,
    last_job_id      uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    CHECK (paused = (next_run_at IS NULL))
);

-- The cron loop reads due schedules in tick order.
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE next_run_at IS NOT NULL;

ALTER TABLE jobs
    ADD COLUMN schedule_id uuid,
    ADD COLUMN schedule_tick timestamptz;

-- Each tick of a schedule creates its job at most once, whichever replica ran it.
CREATE UNIQUE INDEX jobs_schedule_tick ON jobs (schedule_id, schedule_tick)
    WHERE schedule_tick IS NOT NULL;
