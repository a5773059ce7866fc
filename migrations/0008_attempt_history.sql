-- Every attempt of every job, as one relation. A job's row describes its latest attempt (number,
-- worker, start, and its end once the job has succeeded); `job_attempts` holds a row for each
-- attempt that ended otherwise (a failure, a lapsed lease, a cancel or a pause), written by the
-- statement that ended it. The running attempt, and since this migration the attempt that
-- succeeded, are read from the job's row instead: a success writes no attempt row, which was
-- about 6 % of W1's drain (docs/performance.md). A succeeded job never runs again (RetryJob
-- takes failed and cancelled jobs only), so its row keeps describing that attempt.
--
-- Rows written for successes before this migration are read as they are. A row still 'running'
-- can only come from a server older than migration 0005, which wrote one at each claim; it is
-- left out, and the attempt is read from its job's row like any running or succeeded one.
CREATE VIEW job_attempt_history AS
SELECT job_id, attempt, tenant_id, worker_id, started_at, finished_at, outcome, error
FROM job_attempts
WHERE outcome <> 'running'
UNION ALL
SELECT j.id, j.attempt, j.tenant_id, coalesce(j.lease_owner, ''),
       coalesce(j.attempt_started_at, j.updated_at),
       CASE WHEN j.state = 'succeeded' THEN j.finished_at END,
       CASE WHEN j.state = 'succeeded' THEN 'succeeded' ELSE 'running' END::attempt_outcome,
       NULL::jsonb
FROM jobs j
WHERE j.state IN ('running', 'succeeded')
  AND NOT EXISTS (SELECT 1 FROM job_attempts a
                  WHERE a.job_id = j.id AND a.attempt = j.attempt AND a.outcome <> 'running');
