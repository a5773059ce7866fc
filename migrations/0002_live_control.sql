-- Live control and observation: progress, checkpoints, stop requests (cancel, pause) of running
-- jobs, per-attempt timeouts, and the index watchers replay events from.

ALTER TYPE attempt_outcome ADD VALUE 'paused';
ALTER TYPE attempt_outcome ADD VALUE 'timed_out';

ALTER TABLE jobs
    -- The latest progress, as the API's Progress message in JSON.
    ADD COLUMN progress jsonb,
    -- Where the current attempt's progress started ({"fraction", "at", "attempt"}), so the
    -- server can derive an ETA from the rate since.
    ADD COLUMN progress_origin jsonb,
    ADD COLUMN checkpoint bytea,
    ADD COLUMN timeout_ms bigint CHECK (timeout_ms > 0),
    ADD COLUMN attempt_started_at timestamptz,
    -- A stop of the running attempt was asked for; the worker is told, and the job settles as
    -- CANCELLED or PAUSED when it stops (or when its lease lapses).
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN pause_requested_at timestamptz,
    ADD COLUMN pause_reason text;

-- WatchJobs replays a tenant's events in sequence order.
CREATE INDEX job_events_tenant_seq ON job_events (tenant_id, seq);
