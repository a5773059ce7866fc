-- ReplayJobs, idempotent per request: each request id's answer is kept, so a repeat (a
-- client retrying after a lost response) answers the same and replays nothing more.
CREATE TABLE replay_requests (
    tenant_id  text NOT NULL,
    request_id text NOT NULL,
    -- Jobs replayed, some of their ids, and whether the limit left matching jobs out.
    replayed   bigint NOT NULL DEFAULT 0,
    sample_ids uuid[] NOT NULL DEFAULT '{}',
    truncated  boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, request_id)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON replay_requests TO jobwire_tenant;
ALTER TABLE replay_requests ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON replay_requests TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
