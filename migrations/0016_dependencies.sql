-- Dependencies between jobs.
--
-- A job enqueued with `depends_on` waits PENDING until the jobs it names have ended; the
-- leader's scheduler then makes it AVAILABLE (or SCHEDULED), or CANCELLED when one failed and
-- it did not ask to run regardless. The decision is made in Rust (domain::waits) and applied by
-- the store; this migration only keeps what it needs.

-- The jobs this job waits for (NULL: none). An array on the row rather than a table of edges:
-- the scheduler reads the waiting jobs and their dependencies, never "who waits for X", and a
-- worker's lease carries the ids with no join on the claim.
ALTER TABLE jobs ADD COLUMN depends_on uuid[];
-- DependencyFailure RUN: run once every dependency has ended, however it ended.
ALTER TABLE jobs ADD COLUMN run_regardless boolean NOT NULL DEFAULT false;
-- Another job waits for this one: its ending wakes the scheduler.
ALTER TABLE jobs ADD COLUMN waited_on boolean NOT NULL DEFAULT false;

-- The scheduler reads the waiting jobs on each pass.
CREATE INDEX jobs_pending ON jobs (updated_at) WHERE state = 'pending';

-- The ending of a job others wait for wakes the leader's scheduler, whatever path ended it (a
-- settle, a cancel, the reaper, a rejection): one wake-up, not a decision, so a path added later
-- cannot forget it. The scheduler's periodic pass covers a wake-up lost with a connection.
-- The WHEN clause keeps the trigger from running for jobs nobody waits for.
CREATE FUNCTION jobwire_wake_waiters() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobwire_due', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_wake_waiters AFTER UPDATE OF state ON jobs FOR EACH ROW
    WHEN (NEW.waited_on AND NEW.state IN ('succeeded', 'failed', 'cancelled')
          AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION jobwire_wake_waiters();
