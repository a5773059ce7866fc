-- An attempt's row is now written once, when the attempt ends, by the statement that settles
-- its job (the running attempt lives in the job's row: attempt, lease_owner,
-- attempt_started_at). That statement has just updated the job under its row lock, so the
-- foreign key's per-row check (a SELECT ... FOR KEY SHARE on jobs for every attempt written)
-- guards nothing there, and cost a fifth of the completion statement. Jobs are never deleted
-- today; whatever deletes them later (retention) deletes their attempts in the same statement.
ALTER TABLE job_attempts DROP CONSTRAINT job_attempts_job_id_fkey;
