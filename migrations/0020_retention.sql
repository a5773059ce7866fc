-- Retention: finished jobs are pruned once their queue's retention has passed (the leader's
-- pruner, in small batches), optionally archived first; the event log is partitioned by time,
-- so that old events go by dropping whole partitions rather than by DELETE.

-- A queue's retention of its finished jobs; NULL: the server's --retention.
ALTER TABLE queues ADD COLUMN retention_ms bigint CHECK (retention_ms > 0);

-- The pruner finds a queue's finished jobs past its retention in finishing order.
-- (jobs_queue_state, on (tenant_id, queue, state, finished_at), serves it already.)

-- The partitions of the event log, each with the end of its range.
CREATE FUNCTION jobwire_event_partitions()
RETURNS TABLE (name text, upper_bound timestamptz, detach_pending boolean)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text,
           substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz,
           i.inhdetachpending
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'job_events'::regclass
$$;

-- Makes the partition of the event log for [lower, upper), named for its start (UTC). It is
-- made apart and then attached, which locks the log only against other DDL (ATTACH takes SHARE
-- UPDATE EXCLUSIVE on the parent), never against the writers and readers of events, which
-- CREATE TABLE ... PARTITION OF would hold back. It carries the parent's policy as well, though
-- only the parent is granted to the tenant role.
CREATE FUNCTION jobwire_add_event_partition(lower timestamptz, upper timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'job_events_p' || to_char(lower AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE job_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   name);
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', name);
    EXECUTE format('CREATE POLICY tenant_rows ON %I TO jobwire_tenant '
                   'USING (tenant_id = current_setting(''jobwire.tenant'')) '
                   'WITH CHECK (tenant_id = current_setting(''jobwire.tenant''))', name);
    EXECUTE format('ALTER TABLE job_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, lower, upper);
    RETURN name;
END
$$;

-- Makes partitions of `step` from the end of the last one until one reaches past `until`, each
-- ending on a multiple of `step` since the epoch (a day's partitions run from midnight UTC).
-- When the last one ended in the past (no server ran for a while), one partition covers the
-- gap up to now. Returns how many it made. Callers serialize on an advisory lock.
CREATE FUNCTION jobwire_ensure_event_partitions(step interval, until timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    step_s double precision := extract(epoch FROM step);
    hi timestamptz;
    next_hi timestamptz;
    made integer := 0;
BEGIN
    SELECT max(upper_bound) INTO hi FROM jobwire_event_partitions();
    IF hi IS NULL THEN
        hi := clock_timestamp();
    END IF;
    WHILE hi < until LOOP
        next_hi := to_timestamp((floor(extract(epoch FROM greatest(hi, clock_timestamp()))
                                       / step_s) + 1) * step_s);
        PERFORM jobwire_add_event_partition(hi, next_hi);
        hi := next_hi;
        made := made + 1;
    END LOOP;
    RETURN made;
END
$$;

-- The event log, partitioned by range of `created_at`.
--
-- `created_at` now defaults to clock_timestamp(), the moment the row is written, where it was
-- the transaction's start: numbers and times then rise together (to within the few
-- microseconds between taking a number and reading the clock), so a partition holds one run of
-- numbers and dropping the oldest ones leaves every event above a single number, the log's
-- horizon below. A primary key of a partitioned table must include the partition key, hence
-- (seq, created_at); `seq` alone stays unique, being drawn from one sequence.
--
-- The existing table becomes the first partition, from the beginning of time to now; a
-- partition for the next ten seconds follows, and the server makes the rest, ahead of time, at
-- start and on the leader (`--event-partition-interval`). Converting takes a lock that holds
-- event writers back while it runs, and builds the new key's index on the existing rows: on
-- a large log, run it when quiet.
DO $$
DECLARE
    cutoff timestamptz := clock_timestamp();
    last_number bigint := pg_sequence_last_value('job_events_seq_seq'::regclass);
BEGIN
    ALTER TABLE job_events RENAME TO job_events_p_before;
    ALTER INDEX job_events_job RENAME TO job_events_p_before_job;
    ALTER INDEX job_events_tenant_seq RENAME TO job_events_p_before_tenant_seq;
    ALTER TABLE job_events_p_before DROP CONSTRAINT job_events_pkey;
    -- Drops the sequence job_events_seq_seq, which the new table's identity recreates.
    ALTER TABLE job_events_p_before ALTER COLUMN seq DROP IDENTITY;
    ALTER TABLE job_events_p_before ALTER COLUMN created_at SET DEFAULT clock_timestamp();

    CREATE TABLE job_events (
        seq        bigint GENERATED ALWAYS AS IDENTITY (CACHE 1),
        tenant_id  text NOT NULL,
        job_id     uuid NOT NULL,
        kind       text NOT NULL,
        state      job_state,
        attempt    integer NOT NULL,
        data       jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (seq, created_at)
    ) PARTITION BY RANGE (created_at);
    CREATE INDEX job_events_job ON job_events (job_id, seq);
    CREATE INDEX job_events_tenant_seq ON job_events (tenant_id, seq);
    IF last_number IS NOT NULL THEN
        PERFORM setval(pg_get_serial_sequence('job_events', 'seq'), last_number);
    END IF;

    EXECUTE format('ALTER TABLE job_events ATTACH PARTITION job_events_p_before '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', cutoff);
    -- Partitions are reached through the parent only, whose grants and policy hold for them.
    REVOKE ALL ON job_events_p_before FROM jobwire_tenant;
    PERFORM jobwire_add_event_partition(cutoff, cutoff + interval '10 seconds');
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON job_events TO jobwire_tenant;
ALTER TABLE job_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON job_events TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));

-- Every event numbered up to `pruned_through` may have been dropped with its partition; every
-- event after it is kept. A watcher resuming from an older number is told so (OUT_OF_RANGE)
-- instead of receiving a history with a hole in it. Raised before a partition is detached.
CREATE TABLE event_log (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO event_log DEFAULT VALUES;
GRANT SELECT ON event_log TO jobwire_tenant;

-- Archives: where pruned jobs, their attempts and their events go first when the server runs
-- with --archive. The rows are written by column name, so a migration that adds a column to
-- jobs, job_attempts or job_events adds it here too (tests/retention.rs checks that it did).
-- Nothing prunes them: exporting and truncating them is the operator's.
CREATE TABLE jobs_archive (LIKE jobs INCLUDING DEFAULTS);
ALTER TABLE jobs_archive ADD COLUMN archived_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX jobs_archive_tenant_id ON jobs_archive (tenant_id, id);
CREATE TABLE job_attempts_archive (LIKE job_attempts INCLUDING DEFAULTS);
ALTER TABLE job_attempts_archive ADD COLUMN archived_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX job_attempts_archive_job ON job_attempts_archive (job_id, attempt);
CREATE TABLE job_events_archive (
    seq        bigint NOT NULL,
    tenant_id  text NOT NULL,
    job_id     uuid NOT NULL,
    kind       text NOT NULL,
    state      job_state,
    attempt    integer NOT NULL,
    data       jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_archive_job ON job_events_archive (job_id, seq);

GRANT SELECT, INSERT, UPDATE, DELETE ON jobs_archive, job_attempts_archive, job_events_archive
    TO jobwire_tenant;
ALTER TABLE jobs_archive ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_attempts_archive ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_events_archive ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON jobs_archive TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON job_attempts_archive TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON job_events_archive TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
