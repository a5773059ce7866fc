//! Statements made for one tenant run under row-level security (migration 0013), the second
//! wall between tenants after each statement's own `tenant_id` filter.
//!
//! Such a statement runs in a transaction that first becomes the role `jobwire_tenant` and sets
//! `jobwire.tenant`, both `LOCAL` so they end with it; the policies then hide and refuse every
//! row of another tenant, whatever the statement says. The three steps travel in one round trip
//! (a simple-protocol `BEGIN` with the two settings), so a scoped statement costs two round
//! trips more than a bare one: the `BEGIN` and the `COMMIT`.
//!
//! The engine's statements that act on leases already handed out (settles, progress, renewals,
//! the reaper, the scheduler, the event fanout) run as the server's own role, which owns the
//! tables and so passes the policies: they name rows by id and fencing token and may span
//! tenants in one batch.

use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Transaction};

use crate::domain::TenantId;

use super::{Result, Store, query_as};

/// The role tenant statements act as; created by migration 0013.
pub const TENANT_ROLE: &str = "jobwire_tenant";

/// The `BEGIN` that scopes a transaction to `tenant`. Tenant names are validated to letters,
/// digits and `.`, `_`, `-`, `:` before they reach the store; the quoting still doubles any `'`
/// so no name can end the literal.
fn begin_scoped(tenant: &TenantId) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!(
        "BEGIN; SET LOCAL ROLE {TENANT_ROLE}; \
         SELECT set_config('jobwire.tenant', '{}', true)",
        tenant.as_str().replace('\'', "''")
    ))
}

/// Runs `statement` on `conn` in a transaction scoped to `tenant`, committing when it succeeds.
pub(super) async fn scoped<T>(
    conn: &mut PgConnection,
    tenant: &TenantId,
    statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let mut tx = super::stale::guard(conn.begin_with(begin_scoped(tenant))).await?;
    let out = statement(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

impl Store {
    /// A transaction scoped to `tenant`, for statements of several steps. Public so the tests
    /// can show what the policies alone allow.
    pub async fn tenant_transaction(
        &self,
        tenant: &TenantId,
    ) -> Result<Transaction<'static, Postgres>> {
        Ok(super::stale::guard(self.pool.begin_with(begin_scoped(tenant))).await?)
    }

    /// Runs one statement for `tenant` on a pooled connection.
    pub(super) async fn as_tenant<T>(
        &self,
        tenant: &TenantId,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.pool.acquire().await?;
        scoped(&mut conn, tenant, statement).await
    }

    /// Runs one of the engine's statements for `tenant` on a warm connection.
    pub(super) async fn hot_as_tenant<T>(
        &self,
        tenant: &TenantId,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        // Scoped statements run in a transaction already, which pins them behind a pooler.
        self.hot
            .run(&self.pool, async |c| scoped(c, tenant, statement).await)
            .await
    }

    /// Fails start-up when this server's role cannot act as [`TENANT_ROLE`] (it was created
    /// by someone else and not granted), rather than failing every request later.
    pub(super) async fn check_tenant_role(&self) -> Result<()> {
        let (member,): (bool,) = self
            .pooled(async |c| {
                Ok(query_as("SELECT pg_has_role($1, 'MEMBER')")
                    .bind(TENANT_ROLE)
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        if member {
            Ok(())
        } else {
            Err(super::Error::Misconfigured(format!(
                "the database role of this server may not act as {TENANT_ROLE}; as a \
                 superuser run: GRANT {TENANT_ROLE} TO <the server's user>"
            )))
        }
    }
}
