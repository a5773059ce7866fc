-- Approval timeouts, and retry rules by failure kind.

-- While AWAITING_APPROVAL: when the leader's scheduler ends the wait (NULL: never), and how:
-- FAILED when true, CANCELLED (as a rejection) when false.
ALTER TABLE jobs ADD COLUMN approval_deadline timestamptz;
ALTER TABLE jobs ADD COLUMN approval_timeout_fails boolean NOT NULL DEFAULT false;
-- RetryPolicy.by_kind as the server keeps it: [{"kind": .., "never": .., "backoff_ms": ..}]
-- (NULL: no rules). Read with the attempt's other facts when an attempt fails.
ALTER TABLE jobs ADD COLUMN retry_rules jsonb;

-- The scheduler finds the approvals whose time is up, and sleeps until the next.
CREATE INDEX jobs_approval_deadline ON jobs (approval_deadline)
    WHERE state = 'awaiting_approval' AND approval_deadline IS NOT NULL;
