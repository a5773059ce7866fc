-- Fan-out and fan-in: a running job enqueues children (EnqueueJobs with its lease as parent),
-- then its handler returns "wait for children" (CompleteJob.wait_for_children). The attempt
-- ends SUSPENDED, uncounted, the job waits PENDING, and the leader's scheduler makes it
-- AVAILABLE again once every child has ended; its next attempt is told so and reads the
-- children's results. The decision is made in Rust (domain::waits), applied by the store.

-- The job whose running attempt enqueued this one (NULL: none). No foreign key: retention
-- prunes each job on its own schedule, a parent possibly before its children.
ALTER TABLE jobs ADD COLUMN parent_id uuid;
-- PENDING until every child has ended.
ALTER TABLE jobs ADD COLUMN awaiting_children boolean NOT NULL DEFAULT false;
-- The next attempt resumes the job after its wait for its children (Lease.children_ended);
-- cleared as that attempt ends.
ALTER TABLE jobs ADD COLUMN children_ended boolean NOT NULL DEFAULT false;

-- A parent's children, for GetJob's counts and ListJobs by parent.
CREATE INDEX jobs_parent ON jobs (tenant_id, parent_id) WHERE parent_id IS NOT NULL;
-- The children that have not ended: the scheduler's test of a parent's wait, and its search
-- for children of parents that ended CANCELLED or FAILED, read only these.
CREATE INDEX jobs_open_children ON jobs (tenant_id, parent_id)
    WHERE parent_id IS NOT NULL AND state NOT IN ('succeeded', 'failed', 'cancelled');

-- The archive keeps every column of the jobs it holds (migration 0020).
ALTER TABLE jobs_archive ADD COLUMN parent_id uuid,
    ADD COLUMN awaiting_children boolean NOT NULL DEFAULT false,
    ADD COLUMN children_ended boolean NOT NULL DEFAULT false;

-- An attempt whose handler returned to wait for its children: it does not count against
-- max_attempts (the job runs again to aggregate, not to retry).
ALTER TYPE attempt_outcome ADD VALUE 'suspended';
