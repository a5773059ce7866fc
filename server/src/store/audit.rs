//! The audit log: administrative calls that succeeded, with their actor.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Result, Store, query, query_as};
use crate::domain::TenantId;

/// One audited call.
#[derive(Debug, Clone)]
pub struct NewAuditEntry {
    pub tenant: TenantId,
    pub key_id: Option<Uuid>,
    pub key_name: String,
    pub method: String,
    pub request: serde_json::Value,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub key_id: Option<Uuid>,
    pub key_name: String,
    pub method: String,
    pub request: Json<serde_json::Value>,
}

impl Store {
    pub async fn record_audit(&self, entry: &NewAuditEntry) -> Result<()> {
        let mut tx = self.tenant_transaction(&entry.tenant).await?;
        query(
            "INSERT INTO audit_log (tenant_id, key_id, key_name, method, request) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(entry.tenant.as_str())
        .bind(entry.key_id)
        .bind(&entry.key_name)
        .bind(&entry.method)
        .bind(Json(&entry.request))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A tenant's audit entries, newest first, before `before` (the paging cursor).
    pub async fn list_audit(
        &self,
        tenant: &TenantId,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRow>> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as(
            "SELECT id, at, key_id, key_name, method, request FROM audit_log \
             WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }
}
