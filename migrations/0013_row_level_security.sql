-- Row-level security: the second wall between tenants.
--
-- A request made for a tenant runs its statements in a transaction as the role
-- `jobwire_tenant` (neither superuser nor BYPASSRLS) with `jobwire.tenant` set to the tenant
-- (`SET LOCAL`, so it ends with the transaction). The policies below let that role see and
-- write only rows of that tenant, so a statement that forgets its tenant filter still cannot
-- read or change another tenant's rows. Without the setting every policy fails with an error
-- (`current_setting` without a default), never open.
--
-- The engine's batched statements that span tenants (claims, completions, progress, the
-- reaper, the scheduler, the event fanout) run as the server's login role, which owns the
-- tables and so is not subject to their policies: they name rows by id and fencing token,
-- handed to them by a tenant's authenticated session. See docs/architecture.md.
--
-- Roles belong to the cluster, not the database: every jobwire database of a cluster shares
-- `jobwire_tenant`. Creating it needs CREATEROLE; where the server's user lacks it, an
-- administrator runs `CREATE ROLE jobwire_tenant NOLOGIN; GRANT jobwire_tenant TO <user>;`
-- once, before the first start.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'jobwire_tenant') THEN
        BEGIN
            CREATE ROLE jobwire_tenant NOLOGIN NOSUPERUSER NOBYPASSRLS;
        EXCEPTION
            -- Another database's migration created it a moment ago.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'jobwire needs the role jobwire_tenant and % may not create it',
                    current_user
                    USING HINT = 'As a superuser: CREATE ROLE jobwire_tenant NOLOGIN; '
                        || 'GRANT jobwire_tenant TO ' || quote_ident(current_user) || ';';
        END;
    END IF;
    IF NOT pg_has_role(current_user, 'jobwire_tenant', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT jobwire_tenant TO %I', current_user);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO jobwire_tenant;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON jobs, job_attempts, job_events, queues, schedules, job_types, api_keys, audit_log
    TO jobwire_tenant;
GRANT SELECT ON job_attempt_history TO jobwire_tenant;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO jobwire_tenant;

-- A view reads its tables with its owner's rights unless told otherwise, which would step
-- around the policies.
ALTER VIEW job_attempt_history SET (security_invoker = true);

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_attempts ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE queues ENABLE ROW LEVEL SECURITY;
ALTER TABLE schedules ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_types ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_rows ON jobs TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON job_attempts TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON job_events TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON queues TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON schedules TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON job_types TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON api_keys TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
CREATE POLICY tenant_rows ON audit_log TO jobwire_tenant
    USING (tenant_id = current_setting('jobwire.tenant'))
    WITH CHECK (tenant_id = current_setting('jobwire.tenant'));
