-- Signals: SignalJob delivers a named signal with a payload to a job that has not ended. A
-- handler waits for one with `wait_signal(name, timeout)`: when the job holds no such signal
-- yet, its attempt ends SUSPENDED (uncounted) and the job waits PENDING, holding no worker,
-- until the signal arrives or the timeout passes; the leader's scheduler then makes it
-- AVAILABLE, and its next lease carries every signal the job received. All of it is rows, so a
-- wait outlives any worker or server restart.

-- The signals of a job, in the order received. They go with their job when it is pruned.
CREATE TABLE job_signals (
    tenant_id    text NOT NULL,
    job_id       uuid NOT NULL,
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    name         text NOT NULL,
    payload_type text NOT NULL DEFAULT '',
    payload      bytea NOT NULL DEFAULT '',
    -- The sender's SignalJob request id, when it gave one: a repeat stores nothing more.
    request_id   text,
    actor        jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, job_id, seq),
    FOREIGN KEY (tenant_id, job_id) REFERENCES jobs (tenant_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX job_signals_request ON job_signals (tenant_id, job_id, request_id)
    WHERE request_id IS NOT NULL;

GRANT SELECT, INSERT, UPDATE, DELETE ON job_signals TO jobwire_tenant;
ALTER TABLE job_signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON job_signals TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));

-- The job holds signals: its claim reads them for the lease (the claim of a job without reads
-- nothing more).
ALTER TABLE jobs ADD COLUMN has_signals boolean NOT NULL DEFAULT false;
-- While PENDING for a signal: its name, how many of that name the handler needs (its wait is
-- for the n-th), and when the wait times out (NULL: never).
ALTER TABLE jobs ADD COLUMN awaiting_signal text;
ALTER TABLE jobs ADD COLUMN awaiting_signal_count integer;
ALTER TABLE jobs ADD COLUMN signal_deadline timestamptz;
-- The wait the next attempt resumes from timed out ({"name", "count"}, as waited for);
-- cleared as that attempt ends.
ALTER TABLE jobs ADD COLUMN signal_timed_out jsonb;

-- The archive keeps every column of the jobs it holds (migration 0020).
ALTER TABLE jobs_archive ADD COLUMN has_signals boolean NOT NULL DEFAULT false,
    ADD COLUMN awaiting_signal text,
    ADD COLUMN awaiting_signal_count integer,
    ADD COLUMN signal_deadline timestamptz,
    ADD COLUMN signal_timed_out jsonb;
