//! API keys: who may call, for which tenant, in which roles.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Error, Result, Store, query_as, query_scalar};
use crate::domain::TenantId;

/// A key as stored: everything but its secret, of which only the digest is kept.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub secret_sha256: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub rate_per_second: Option<f64>,
    pub rate_burst: Option<i32>,
    /// Streams open at once on each replica; `None`: the server's default.
    pub max_streams: Option<i32>,
}

/// A key to create; its secret's digest is computed by the caller, which alone sees the secret.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: Uuid,
    pub tenant: TenantId,
    pub name: String,
    pub roles: Vec<String>,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Calls per second and burst, both or neither.
    pub rate: Option<(f64, i32)>,
    pub max_streams: Option<i32>,
}

const COLUMNS: &str = "id, tenant_id, name, roles, secret_sha256, created_at, expires_at, \
    revoked_at, rate_per_second, rate_burst, max_streams";

impl Store {
    pub async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKeyRow> {
        let sql = static_sql!(
            "INSERT INTO api_keys (id, tenant_id, name, roles, secret_sha256, expires_at, \
                                   rate_per_second, rate_burst, max_streams) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
        );
        let mut tx = self.tenant_transaction(&key.tenant).await?;
        let out = query_as(sql)
            .bind(key.id)
            .bind(key.tenant.as_str())
            .bind(&key.name)
            .bind(&key.roles)
            .bind(&key.secret_sha256)
            .bind(key.expires_at)
            .bind(key.rate.map(|(rate, _)| rate))
            .bind(key.rate.map(|(_, burst)| burst))
            .bind(key.max_streams)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Any tenant's key by its id, for authenticating a request.
    pub async fn api_key(&self, id: Uuid) -> Result<Option<ApiKeyRow>> {
        let sql = static_sql!("SELECT {COLUMNS} FROM api_keys WHERE id = $1");
        self.pooled(async |c| Ok(query_as(sql).bind(id).fetch_optional(c).await?))
            .await
    }

    /// Whether any key exists: with none, a server on a loopback address may run open.
    pub async fn any_api_keys(&self) -> Result<bool> {
        self.pooled(async |c| {
            Ok(query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
                .fetch_one(c)
                .await?)
        })
        .await
    }

    /// A tenant's keys, oldest first, after `after` (the paging cursor), at most `limit`.
    pub async fn list_api_keys(
        &self,
        tenant: &TenantId,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ApiKeyRow>> {
        let sql = static_sql!(
            "SELECT {COLUMNS} FROM api_keys \
             WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) \
             ORDER BY id LIMIT $3"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as(sql)
            .bind(tenant.as_str())
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Revokes a tenant's key; revoking it again changes nothing. [`Error::NotFound`] when the
    /// tenant has no such key.
    pub async fn revoke_api_key(&self, tenant: &TenantId, id: Uuid) -> Result<ApiKeyRow> {
        let sql = static_sql!(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) \
             WHERE tenant_id = $1 AND id = $2 RETURNING {COLUMNS}"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let revoked = query_as(sql)
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound)?;
        tx.commit().await?;
        Ok(revoked)
    }
}
