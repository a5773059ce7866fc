//! Statements on queues: their settings and figures, and the claim of a queue whose starts are
//! limited.
//!
//! A limited queue's claims are serialized on its row (`FOR UPDATE`): under READ COMMITTED each
//! later statement of the transaction sees every claim committed before the lock was granted,
//! so the running count and the token bucket it reads are exact, on every replica. Unlimited
//! queues never touch the row and keep the single-statement claim.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{
    Error, Result, Store,
    leases::{self, Worker, claim_statement},
    notify::send,
    query, query_as,
    rows::LeasedRow,
};
use crate::domain::{JobState, QueueName, TenantId, health::HealthThresholds};

/// The columns of [`QueueRow`].
const QUEUE_COLUMNS: &str = "q.name, q.paused_at, q.pause_reason, q.concurrency_limit, \
    q.rate_per_second, q.rate_burst, q.warn_after_ms, q.critical_after_ms, q.retention_ms, \
    q.created_at, q.updated_at";

/// A queue's settings.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueRow {
    pub name: String,
    pub paused_at: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    pub concurrency_limit: Option<i32>,
    pub rate_per_second: Option<f64>,
    pub rate_burst: Option<i32>,
    /// Health thresholds: the oldest available job's wait at which the queue turns WARNING,
    /// and CRITICAL.
    pub warn_after_ms: Option<i64>,
    pub critical_after_ms: Option<i64>,
    /// How long finished jobs are kept; `None`: the server's default.
    pub retention_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl QueueRow {
    /// The health thresholds, as the domain judges them.
    pub fn thresholds(&self) -> HealthThresholds {
        let duration = |ms: Option<i64>| {
            ms.and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis)
        };
        HealthThresholds {
            warn_after: duration(self.warn_after_ms),
            critical_after: duration(self.critical_after_ms),
        }
    }
}

/// A queue's settings with its figures, read together.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueView {
    #[sqlx(flatten)]
    pub queue: QueueRow,
    /// Jobs per state, as two arrays of equal length (NULL when the queue has no jobs).
    pub states: Option<Vec<JobState>>,
    pub counts: Option<Vec<i64>>,
    /// When the oldest AVAILABLE job became due.
    pub oldest_available: Option<DateTime<Utc>>,
    pub finished_last_minute: i64,
    /// The database's clock when the figures were read, to age `oldest_available` by.
    pub read_at: DateTime<Utc>,
}

/// A change of a queue's settings; `None` leaves a setting as it is, `Some(None)` removes it.
#[derive(Debug, Clone, Default)]
pub struct QueueUpdate {
    pub concurrency_limit: Option<Option<i32>>,
    /// Jobs per second and burst.
    pub rate_limit: Option<Option<(f64, i32)>>,
    /// Health thresholds, in milliseconds.
    pub warn_after_ms: Option<Option<i64>>,
    pub critical_after_ms: Option<Option<i64>>,
    /// Retention of finished jobs, in milliseconds.
    pub retention_ms: Option<Option<i64>>,
}

/// Why a limited claim came back with fewer jobs than asked, though more may be waiting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeldBack {
    /// The queue is paused: nothing starts until it is resumed (which notifies).
    Paused,
    /// The queue's running jobs reached its concurrency limit.
    Concurrency,
    /// The token bucket is empty; the next token comes after this long.
    Rate(Duration),
}

/// The jobs a limited claim leased, and what held it back.
#[derive(Debug)]
pub struct LimitedClaim {
    pub rows: Vec<LeasedRow>,
    pub held_back: Option<HeldBack>,
}

#[derive(sqlx::FromRow)]
struct LimitRow {
    paused: bool,
    concurrency_limit: Option<i32>,
    rate_per_second: Option<f64>,
    rate_burst: Option<i32>,
    rate_tokens: f64,
    /// Seconds since the bucket was last refilled.
    elapsed_s: f64,
    /// When the row was read under lock: the bucket's new refill time. The wall clock, not the
    /// transaction's start, which may precede the previous holder's refill.
    read_at: DateTime<Utc>,
}

/// The longest a claim held back by a rate limit asks to wait before the next try.
const MAX_RATE_WAIT: Duration = Duration::from_secs(3600);

/// One queue's non-terminal jobs per state and its oldest available job, for the metrics.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueDepthRow {
    pub tenant_id: String,
    pub queue: String,
    /// Non-terminal states holding jobs, beside [`counts`](Self::counts); empty when none do.
    pub states: Vec<JobState>,
    pub counts: Vec<i64>,
    /// Seconds the oldest AVAILABLE job has been due; 0 when none is.
    pub oldest_available_s: f64,
}

impl Store {
    /// Every queue's non-terminal jobs per state, of every tenant, for the metrics sampler.
    /// Terminal jobs are left out: they only grow until pruned, and counting them would scan
    /// them all each time; the counters tell how many ended. Each state's count is a range of
    /// `jobs_queue_state` (or of `jobs_claim`, for AVAILABLE jobs), so the read costs what the
    /// queues hold, not what they have ever held.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepthRow>> {
        self.pooled(async |c| {
            Ok(query_as::<QueueDepthRow>(
                "SELECT q.tenant_id, q.name AS queue, \
                 coalesce(st.states, '{}') AS states, coalesce(st.counts, '{}') AS counts, \
                 coalesce(extract(epoch FROM greatest(interval '0', now() - ( \
                     SELECT min(run_at) FROM jobs \
                     WHERE tenant_id = q.tenant_id AND queue = q.name AND state = 'available' \
                 ))), 0)::float8 AS oldest_available_s \
             FROM queues q \
             CROSS JOIN LATERAL ( \
                 SELECT array_agg(state) AS states, array_agg(n) AS counts \
                 FROM ( \
                     SELECT state, count(*) AS n FROM jobs \
                     WHERE tenant_id = q.tenant_id AND queue = q.name \
                       AND state IN ('awaiting_approval', 'pending', 'scheduled', 'running', \
                                     'retrying', 'paused') \
                     GROUP BY state \
                     UNION ALL \
                     SELECT 'available', count(*) FROM jobs \
                     WHERE tenant_id = q.tenant_id AND queue = q.name AND state = 'available' \
                     HAVING count(*) > 0 \
                 ) c \
             ) st",
            )
            .fetch_all(c)
            .await?)
        })
        .await
    }

    /// One queue with its figures.
    pub async fn get_queue(&self, tenant: &TenantId, name: &QueueName) -> Result<QueueView> {
        self.queue_views(tenant, Some(name), None, 1)
            .await?
            .pop()
            .ok_or(Error::NotFound)
    }

    /// Queues by name after `after`, at most `limit`, with their figures.
    pub async fn list_queues(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<QueueView>> {
        self.queue_views(tenant, None, after, limit).await
    }

    async fn queue_views(
        &self,
        tenant: &TenantId,
        name: Option<&QueueName>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<QueueView>> {
        let sql = static_sql!(
            "SELECT {QUEUE_COLUMNS}, st.states, st.counts, \
                 (SELECT min(run_at) FROM jobs \
                  WHERE tenant_id = q.tenant_id AND queue = q.name AND state = 'available') \
                     AS oldest_available, \
                 (SELECT count(*) FROM jobs \
                  WHERE tenant_id = q.tenant_id AND queue = q.name \
                    AND state IN ('succeeded', 'failed') \
                    AND finished_at > now() - interval '60 seconds') AS finished_last_minute, \
                 now() AS read_at \
             FROM queues q \
             CROSS JOIN LATERAL ( \
                 SELECT array_agg(state ORDER BY state) AS states, \
                        array_agg(n ORDER BY state) AS counts \
                 FROM ( \
                     SELECT state, count(*) AS n FROM jobs \
                     WHERE tenant_id = q.tenant_id AND queue = q.name \
                       AND state <> 'available' GROUP BY state \
                     UNION ALL \
                     SELECT 'available', count(*) FROM jobs \
                     WHERE tenant_id = q.tenant_id AND queue = q.name \
                       AND state = 'available' HAVING count(*) > 0 \
                 ) c \
             ) st \
             WHERE q.tenant_id = $1 AND ($2::text IS NULL OR q.name = $2) \
               AND ($3::text IS NULL OR q.name > $3) \
             ORDER BY q.name LIMIT $4"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<QueueView>(sql)
            .bind(tenant.as_str())
            .bind(name.map(QueueName::as_str))
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Changes a queue's limits, health thresholds and retention, creating the queue first when `create` is set. A new rate
    /// limit starts with a full bucket. Every replica is told to re-read which queues are
    /// limited; prefetching workers are asked for their queued leases of the queue only when a
    /// limit is tightened (set where there was none, or lowered): under a raised limit the
    /// leases they hold were claimed under a stricter one.
    pub async fn update_queue(
        &self,
        tenant: &TenantId,
        name: &QueueName,
        update: &QueueUpdate,
        create: bool,
    ) -> Result<QueueRow> {
        let sql = static_sql!(
            "WITH ins AS ( \
                 INSERT INTO queues (tenant_id, name) SELECT $1, $2 WHERE $3 \
                 ON CONFLICT DO NOTHING \
             ), old AS ( \
                 SELECT q.concurrency_limit AS was_limit, q.rate_per_second AS was_rate \
                 FROM queues q WHERE q.tenant_id = $1 AND q.name = $2 FOR UPDATE \
             ), upd AS ( \
                 UPDATE queues q SET \
                     concurrency_limit = CASE WHEN $4 THEN $5 ELSE q.concurrency_limit END, \
                     rate_per_second = CASE WHEN $6 THEN $7 ELSE q.rate_per_second END, \
                     rate_burst = CASE WHEN $6 THEN $8 ELSE q.rate_burst END, \
                     rate_tokens = CASE WHEN $6 THEN coalesce($8, 0) ELSE q.rate_tokens END, \
                     rate_refilled_at = CASE WHEN $6 THEN now() ELSE q.rate_refilled_at END, \
                     warn_after_ms = CASE WHEN $9 THEN $10 ELSE q.warn_after_ms END, \
                     critical_after_ms = CASE WHEN $11 THEN $12 ELSE q.critical_after_ms END, \
                     retention_ms = CASE WHEN $13 THEN $14 ELSE q.retention_ms END, \
                     updated_at = now() \
                 FROM old WHERE q.tenant_id = $1 AND q.name = $2 \
                 RETURNING {QUEUE_COLUMNS}, old.was_limit, old.was_rate \
             ), wake AS ( \
                 SELECT {changed} FROM upd \
                 UNION ALL \
                 SELECT {hold} FROM upd \
                 WHERE upd.concurrency_limit < upd.was_limit \
                    OR (upd.concurrency_limit IS NOT NULL AND upd.was_limit IS NULL) \
                    OR upd.rate_per_second < upd.was_rate \
                    OR (upd.rate_per_second IS NOT NULL AND upd.was_rate IS NULL) \
             ) \
             SELECT upd.* FROM upd, (SELECT count(*) FROM wake) w",
            changed = send::queue_changed("$1", "$2"),
            hold = send::queue_hold("$1", "$2"),
        );
        // A queue created by this very statement is invisible to its UPDATE (one snapshot), so
        // a creating call that found nothing to update runs once more. The UPDATE reads `old`,
        // so the row is locked, and its previous limits read, before it changes: a concurrent
        // change is waited for and compared against.
        let mut tx = self.tenant_transaction(tenant).await?;
        for _ in 0..2 {
            let row = query_as::<QueueRow>(sql)
                .bind(tenant.as_str())
                .bind(name.as_str())
                .bind(create)
                .bind(update.concurrency_limit.is_some())
                .bind(update.concurrency_limit.flatten())
                .bind(update.rate_limit.is_some())
                .bind(update.rate_limit.flatten().map(|(rate, _)| rate))
                .bind(update.rate_limit.flatten().map(|(_, burst)| burst))
                .bind(update.warn_after_ms.is_some())
                .bind(update.warn_after_ms.flatten())
                .bind(update.critical_after_ms.is_some())
                .bind(update.critical_after_ms.flatten())
                .bind(update.retention_ms.is_some())
                .bind(update.retention_ms.flatten())
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                tx.commit().await?;
                return Ok(row);
            }
            if !create {
                break;
            }
        }
        Err(Error::NotFound)
    }

    /// Pauses a queue (keeping the first pause time when already paused) and tells every
    /// replica. Claims that began before the pause committed may still start their jobs; none
    /// that begins after does.
    pub async fn pause_queue(
        &self,
        tenant: &TenantId,
        name: &QueueName,
        reason: &str,
    ) -> Result<QueueRow> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE queues q SET paused_at = coalesce(q.paused_at, now()), \
                        pause_reason = $3, updated_at = now() \
                 WHERE q.tenant_id = $1 AND q.name = $2 \
                 RETURNING {QUEUE_COLUMNS} \
             ), wake AS ( \
                 SELECT {changed} FROM upd \
                 UNION ALL \
                 SELECT {hold} FROM upd \
             ) \
             SELECT upd.* FROM upd, (SELECT count(*) FROM wake) w",
            changed = send::queue_changed("$1", "$2"),
            hold = send::queue_hold("$1", "$2"),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let row = query_as::<QueueRow>(sql)
            .bind(tenant.as_str())
            .bind(name.as_str())
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound)?;
        tx.commit().await?;
        Ok(row)
    }

    /// Resumes a queue and wakes the dispatchers of every replica for it.
    pub async fn resume_queue(&self, tenant: &TenantId, name: &QueueName) -> Result<QueueRow> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE queues q SET paused_at = NULL, pause_reason = NULL, updated_at = now() \
                 WHERE q.tenant_id = $1 AND q.name = $2 \
                 RETURNING {QUEUE_COLUMNS} \
             ), wake AS ( \
                 SELECT {changed} FROM upd \
                 UNION ALL \
                 SELECT {work} FROM upd \
             ) \
             SELECT upd.* FROM upd, (SELECT count(*) FROM wake) w",
            work = send::work("$1", "$2"),
            changed = send::queue_changed("$1", "$2"),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let row = query_as::<QueueRow>(sql)
            .bind(tenant.as_str())
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound)?;
        tx.commit().await?;
        Ok(row)
    }

    /// Creates the queues a worker serves, so they are listed (and can be limited) before
    /// their first job.
    pub async fn ensure_queues(&self, tenant: &TenantId, names: &[QueueName]) -> Result<()> {
        let names: Vec<&str> = names.iter().map(QueueName::as_str).collect();
        let mut tx = self.tenant_transaction(tenant).await?;
        query(
            "INSERT INTO queues (tenant_id, name) \
             SELECT $1, n FROM unnest($2::text[]) AS n ORDER BY n \
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(&names)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every queue with a concurrency or rate limit, of every tenant: the dispatcher claims
    /// these through [`claim_limited`](Self::claim_limited).
    pub async fn limited_queues(&self) -> Result<Vec<(TenantId, QueueName)>> {
        let rows: Vec<(String, String)> = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT tenant_id, name FROM queues \
             WHERE concurrency_limit IS NOT NULL OR rate_per_second IS NOT NULL",
                )
                .fetch_all(c)
                .await?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(t, q)| (TenantId::new_unchecked(&t), QueueName::new_unchecked(&q)))
            .collect())
    }

    /// Leases up to `limit` jobs of one queue within its limits: the queue row is locked, the
    /// running jobs counted and the token bucket refilled, then at most what both allow is
    /// claimed and the tokens taken, all in one transaction. A queue without limits (they were
    /// just removed) is claimed up to `limit`.
    pub async fn claim_limited(
        &self,
        tenant: &TenantId,
        queue: &QueueName,
        job_types: &[String],
        limit: i64,
        worker: &Worker<'_>,
    ) -> Result<LimitedClaim> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let row: Option<LimitRow> = query_as(
            "SELECT paused_at IS NOT NULL AS paused, concurrency_limit, rate_per_second, \
                    rate_burst, rate_tokens, clock_timestamp() AS read_at, \
                    greatest(0, extract(epoch FROM clock_timestamp() \
                        - coalesce(rate_refilled_at, clock_timestamp())))::float8 AS elapsed_s \
             FROM queues WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
        )
        .bind(tenant.as_str())
        .bind(queue.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(LimitedClaim {
                rows: Vec::new(),
                held_back: None,
            });
        };
        if row.paused {
            return Ok(LimitedClaim {
                rows: Vec::new(),
                held_back: Some(HeldBack::Paused),
            });
        }
        let mut allowed = limit;
        if let Some(max) = row.concurrency_limit {
            let (running,): (i64,) = query_as(
                "SELECT count(*) FROM jobs \
                 WHERE tenant_id = $1 AND queue = $2 AND state = 'running'",
            )
            .bind(tenant.as_str())
            .bind(queue.as_str())
            .fetch_one(&mut *tx)
            .await?;
            allowed = allowed.min((i64::from(max) - running).max(0));
        }
        // (rate, tokens after the refill)
        let bucket = row
            .rate_per_second
            .zip(row.rate_burst)
            .map(|(rate, burst)| {
                let tokens = (row.rate_tokens + row.elapsed_s * rate).min(f64::from(burst));
                (rate, tokens)
            });
        // Whole tokens only: a fraction of a token starts no job.
        let whole_tokens = bucket.map(|(_, tokens)| tokens.floor() as i64);
        if let Some(whole) = whole_tokens {
            allowed = allowed.min(whole);
        }
        let rows = if allowed > 0 {
            let queues = std::slice::from_ref(queue);
            claim_statement(&mut *tx, tenant, queues, job_types, allowed, worker, true).await?
        } else {
            Vec::new()
        };
        let claimed = rows.len() as i64;
        if let Some((_, tokens)) = bucket {
            query(
                "UPDATE queues SET rate_tokens = $3, rate_refilled_at = $4 \
                 WHERE tenant_id = $1 AND name = $2",
            )
            .bind(tenant.as_str())
            .bind(queue.as_str())
            .bind(tokens - claimed as f64)
            .bind(row.read_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        leases::claimed(&rows);
        // Fewer rows than allowed means the queue ran dry: only new work can help. A full claim
        // needs nothing. Otherwise a limit stopped the claim short.
        let held_back = if claimed < allowed || claimed >= limit {
            None
        } else {
            match bucket {
                Some((rate, tokens)) if whole_tokens == Some(allowed) => {
                    let missing = (1.0 - (tokens - claimed as f64)).max(0.0);
                    // Past the cap the dispatcher's poll comes first anyway; a wait too long to
                    // represent is capped rather than allowed to panic after the commit.
                    let wait = Duration::try_from_secs_f64(missing / rate)
                        .map_or(MAX_RATE_WAIT, |wait| wait.min(MAX_RATE_WAIT));
                    Some(HeldBack::Rate(wait))
                }
                _ => Some(HeldBack::Concurrency),
            }
        };
        Ok(LimitedClaim { rows, held_back })
    }
}
