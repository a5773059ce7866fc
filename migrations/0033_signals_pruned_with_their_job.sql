-- A job's signals are deleted with it by the pruner's own statement, for the jobs that hold
-- signals (`has_signals`), rather than by a cascading foreign key: the key's trigger ran a
-- DELETE on job_signals for every pruned job, about half of a pruning batch's time, and was
-- consulted on every update of a job. Nothing is left dangling without it: SignalJob stores a
-- signal only under its job's row lock, after seeing the job unfinished, and only the pruner
-- deletes jobs, under the same lock.
ALTER TABLE job_signals DROP CONSTRAINT job_signals_tenant_id_job_id_fkey;
