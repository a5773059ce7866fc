//! Statements on the worker fleet: one row per open worker stream, written by the replica
//! serving it, so that every replica can list every worker and a drain asked on one replica
//! reaches the stream on another.
//!
//! A stream's row is upserted at its hello and with each heartbeat (one statement every
//! heartbeat interval per worker, never per job), and deleted when the stream ends. The leases
//! a worker holds are not written here: they are counted from the jobs it holds RUNNING when
//! the list is read, so the figure costs the hot path nothing and is never stale. Rows a dead
//! replica left behind drop out of every read once they go `live_within` without a heartbeat,
//! and are deleted when a worker of their tenant next connects.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Error, Result, Store, notify::send, query, query_as};
use crate::domain::TenantId;

/// What a stream's row says of it.
#[derive(Debug, Clone)]
pub struct WorkerRecord {
    /// The stream (UUIDv7, so ids sort by connection time).
    pub id: Uuid,
    pub tenant: TenantId,
    pub worker_id: String,
    pub version: String,
    pub host: String,
    pub replica: String,
    pub queues: Vec<String>,
    pub job_types: Vec<String>,
    pub slots: i32,
    pub prefetch: i32,
}

/// A stream as ListWorkers shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerView {
    pub id: Uuid,
    pub worker_id: String,
    pub version: String,
    pub host: String,
    pub replica: String,
    pub queues: Vec<String>,
    pub job_types: Vec<String>,
    pub slots: i32,
    pub prefetch: i32,
    pub connected_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub draining: bool,
    /// RUNNING jobs leased in the worker's name when read.
    pub leases_held: i64,
}

/// The read behind ListWorkers and DrainWorker's answer: a tenant's live streams with the
/// leases held in each worker's name. `$1` tenant, `$2` live window (ms), `$3` page cursor,
/// `$4` limit, `$5` only these stream ids (NULL: all).
const VIEW_SQL: &str = "\
    SELECT w.id, w.worker_id, w.version, w.host, w.replica, w.queues, w.job_types, w.slots, \
           w.prefetch, w.connected_at, w.heartbeat_at, \
           w.drain_requested_at IS NOT NULL AS draining, \
           coalesce(h.held, 0) AS leases_held \
    FROM workers w \
    LEFT JOIN ( \
        SELECT lease_owner, count(*) AS held FROM jobs \
        WHERE tenant_id = $1 AND state = 'running' GROUP BY lease_owner \
    ) h ON h.lease_owner = w.worker_id \
    WHERE w.tenant_id = $1 \
      AND w.heartbeat_at > now() - $2 * interval '1 millisecond' \
      AND ($3::uuid IS NULL OR w.id > $3) \
      AND ($5::uuid[] IS NULL OR w.id = ANY($5)) \
    ORDER BY w.id LIMIT $4";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a stream as alive now (its hello, or a heartbeat), and says whether a drain was
    /// asked for it. With `prune_within`, first deletes the tenant's rows that went that long
    /// without a heartbeat: streams of a replica that died.
    pub async fn record_worker(
        &self,
        worker: &WorkerRecord,
        prune_within: Option<Duration>,
    ) -> Result<bool> {
        let mut tx = self.tenant_transaction(&worker.tenant).await?;
        if let Some(within) = prune_within {
            query(
                "DELETE FROM workers WHERE tenant_id = $1 \
                   AND heartbeat_at < now() - $2 * interval '1 millisecond'",
            )
            .bind(worker.tenant.as_str())
            .bind(millis(within))
            .execute(&mut *tx)
            .await?;
        }
        let (drain,): (bool,) = query_as(
            "INSERT INTO workers (id, tenant_id, worker_id, version, host, replica, queues, \
                 job_types, slots, prefetch) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now() \
             RETURNING drain_requested_at IS NOT NULL",
        )
        .bind(worker.id)
        .bind(worker.tenant.as_str())
        .bind(&worker.worker_id)
        .bind(&worker.version)
        .bind(&worker.host)
        .bind(&worker.replica)
        .bind(&worker.queues)
        .bind(&worker.job_types)
        .bind(worker.slots)
        .bind(worker.prefetch)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(drain)
    }

    /// Forgets a stream that ended.
    pub async fn forget_worker(&self, tenant: &TenantId, id: Uuid) -> Result<()> {
        self.as_tenant(tenant, async |conn| {
            query("DELETE FROM workers WHERE tenant_id = $1 AND id = $2")
                .bind(tenant.as_str())
                .bind(id)
                .execute(conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// A tenant's streams heard from within `live_within`, by id after `after`, at most
    /// `limit`.
    pub async fn list_workers(
        &self,
        tenant: &TenantId,
        live_within: Duration,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<WorkerView>> {
        self.as_tenant(tenant, async |conn| {
            Ok(query_as::<WorkerView>(VIEW_SQL)
                .bind(tenant.as_str())
                .bind(millis(live_within))
                .bind(after)
                .bind(limit)
                .bind(None::<Vec<Uuid>>)
                .fetch_all(conn)
                .await?)
        })
        .await
    }

    /// Asks every live stream of `worker_id` in the tenant to drain, and tells the replicas
    /// (the one serving each stream tells its worker). The request stays on the row, so a
    /// replica that missed the notification reads it at the stream's next heartbeat. Returns
    /// the streams asked; [`Error::NotFound`] when none is live.
    pub async fn request_drain(
        &self,
        tenant: &TenantId,
        worker_id: &str,
        live_within: Duration,
    ) -> Result<Vec<WorkerView>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE workers SET drain_requested_at = coalesce(drain_requested_at, now()) \
                 WHERE tenant_id = $1 AND worker_id = $2 \
                   AND heartbeat_at > now() - $3 * interval '1 millisecond' \
                 RETURNING id \
             ), wake AS ( \
                 SELECT {drain} FROM (SELECT 1 FROM upd LIMIT 1) one \
             ) \
             SELECT array_agg(upd.id) FROM upd, (SELECT count(*) FROM wake) w",
            drain = send::drain("$1", "$2"),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let (ids,): (Option<Vec<Uuid>>,) = query_as(sql)
            .bind(tenant.as_str())
            .bind(worker_id)
            .bind(millis(live_within))
            .fetch_one(&mut *tx)
            .await?;
        let ids = ids.filter(|ids| !ids.is_empty()).ok_or(Error::NotFound)?;
        let views = query_as::<WorkerView>(VIEW_SQL)
            .bind(tenant.as_str())
            .bind(millis(live_within))
            .bind(None::<Uuid>)
            .bind(i64::try_from(ids.len()).unwrap_or(i64::MAX))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(views)
    }
}
