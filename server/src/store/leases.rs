//! Statements on leased jobs: claim, renew, release, and settle (complete or fail).
//!
//! Every statement after the claim is guarded by `state = 'running' AND attempt = $token`, so a
//! message carrying a stale fencing token matches no row and changes nothing (invariant 2).

use std::time::Duration;

use sqlx::{PgExecutor, Postgres, postgres::PgArguments, query::QueryAs};
use uuid::Uuid;

use super::{
    Result, Store, jobs, query_as,
    rows::{JOB_COLUMNS, LeasedRow},
};
use crate::{
    domain::{JobId, JobState, LeaseRef, QueueName, TenantId},
    metrics,
    telemetry::{self, Step},
};

/// The end of an attempt is its row's insert: a running attempt lives in its job's row
/// (`attempt`, `lease_owner`, `attempt_started_at`), so a job costs one attempt write, not an
/// insert at the claim and an update at the end, and a success costs none (the job's row keeps
/// describing it: see `job_attempt_history`). A row already there (written at the claim by a
/// server from before this change) is completed instead. Refers to the new row as `a`.
pub(super) const ATTEMPT_UPSERT: &str = "ON CONFLICT (job_id, attempt) DO UPDATE SET \
     finished_at = EXCLUDED.finished_at, outcome = EXCLUDED.outcome, error = EXCLUDED.error \
     WHERE a.outcome = 'running'";

/// How an unmatched input's attempt had already ended (a success is read from its job's row),
/// by primary key only for the inputs the update did not match: a join of the whole input
/// against `job_attempts` was planned as a sequential scan of that ever-growing table (the
/// planner guesses 100 `UNNEST` rows).
pub(super) const PRIOR_OUTCOME: &str = "CASE WHEN upd.id IS NULL THEN ( \
     SELECT p.outcome FROM job_attempt_history p \
     WHERE p.job_id = i.id AND p.attempt = i.attempt AND p.tenant_id = i.tenant_id) END";

/// Matches a job `j` to an input row `i` naming a running attempt: the fence of invariant 2.
/// Only the tenant and the id, the primary key, serve as index conditions. Attempt and state are
/// compared as one row with IS NOT DISTINCT FROM (both columns are NOT NULL, so it is plain
/// equality), which no index serves. As separate equalities they let the planner, working from
/// statistics taken before a burst of leases (few running jobs), walk `jobs_queue_state` by
/// tenant and state for every input row, through every running and recently settled entry; a
/// generic plan keeps that choice for the connection's life, and a large completion batch then
/// takes a walk of that index per job instead of a key lookup.
///
/// The state compared is the input's own [`RUNNING`] column, of a MATERIALIZED input, not a
/// constant: a constant is pushed down as a filter on `jobs`, whose selectivity comes from the
/// same stale statistics: jobs analyzed while available and since started would be estimated
/// as a handful of running rows, and a batch of progress reports would scan every job once per
/// report.
pub(super) const LEASE_MATCH: &str = "j.tenant_id = i.tenant_id AND j.id = i.id \
     AND (j.attempt, j.state) IS NOT DISTINCT FROM (i.attempt, i.state)";

/// The input column [`LEASE_MATCH`] compares a job's state with.
pub(super) const RUNNING: &str = "'running'::job_state AS state";

/// A report about one running attempt: its tenant and lease are a batch statement's first
/// three inputs.
trait Leased {
    fn tenant(&self) -> &TenantId;
    fn lease(&self) -> LeaseRef;
}

macro_rules! leased {
    ($($report:ty),*) => {$(
        impl Leased for $report {
            fn tenant(&self) -> &TenantId {
                &self.tenant
            }
            fn lease(&self) -> LeaseRef {
                self.lease
            }
        }
    )*};
}
leased!(ProgressUpdate, LogBatch, Checkpoint);

/// Binds `$1` tenants, `$2` job ids and `$3` attempts, the input [`LEASE_MATCH`] compares, for
/// the statements that settle or report on a batch of running attempts.
fn bind_leases<'q, O, T: Leased>(
    query: QueryAs<'q, Postgres, O, PgArguments>,
    reports: &[T],
) -> QueryAs<'q, Postgres, O, PgArguments> {
    query
        .bind(
            reports
                .iter()
                .map(|r| r.tenant().as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(
            reports
                .iter()
                .map(|r| r.lease().job_id.0)
                .collect::<Vec<_>>(),
        )
        .bind(
            reports
                .iter()
                .map(|r| r.lease().attempt)
                .collect::<Vec<_>>(),
        )
}

/// What became of one completion or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleResult {
    /// Recorded; the job is now in this state.
    Applied(JobState),
    /// The same lease was already settled (a resent message); nothing changed.
    AlreadySettled,
    /// The token is not the job's running attempt, or the job does not exist in the tenant.
    Stale,
    /// A result after the attempt's deadline: the attempt timed out, so it is refused.
    Late,
}

/// A stop asked of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum StopKind {
    Cancel,
    Pause,
}

/// A lease a heartbeat renewed, and the stop asked of it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub lease: LeaseRef,
    pub stop: Option<StopKind>,
    /// How long the attempt has until its deadline, if it has one (zero when past it).
    pub deadline_in: Option<Duration>,
}

/// The latest progress of a running attempt, as the API's Progress message in JSON, with the
/// fraction the ETA is computed from.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub progress: serde_json::Value,
    /// The completed fraction the progress implies, if any.
    pub fraction: Option<f64>,
}

/// Log lines of a running attempt, each as `{"level", "message", "time"}`.
#[derive(Debug, Clone)]
pub struct LogBatch {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub lines: Vec<serde_json::Value>,
}

/// A checkpoint of a running attempt.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub data: Vec<u8>,
}

/// Records a committed claim's leases in the metrics.
pub(super) fn claimed(rows: &[LeasedRow]) {
    metrics::claim_batch(rows.len());
    metrics::started(
        rows.iter()
            .map(|r| (jobs::series(&r.job), jobs::start_delay(&r.job))),
    );
    telemetry::steps(Step::Claim, rows.iter().map(|r| jobs::job_step(&r.job)));
}

impl Store {
    /// Leases up to `limit` available jobs of the tenant's `queues` and `job_types` to `worker`,
    /// highest priority first, oldest first among equals. Queues that are paused or limited are
    /// skipped: [`claim_limited`](Self::claim_limited) serves those.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        queues: &[QueueName],
        job_types: &[String],
        limit: i64,
        worker: &Worker<'_>,
    ) -> Result<Vec<LeasedRow>> {
        let rows = self
            .hot_as_tenant(tenant, async |c| {
                claim_statement(c, tenant, queues, job_types, limit, worker, false).await
            })
            .await?;
        claimed(&rows);
        Ok(rows)
    }

    /// Extends the listed leases, and names `worker` their owner (a reconnected worker adopts
    /// its leases again). Returns the leases renewed, each with the stop asked of it if any, so
    /// a stop whose notification was missed is still delivered. A lease whose stop was asked
    /// more than `grace` ago, or whose attempt ran `grace` past its timeout, is not renewed: an
    /// unresponsive handler cannot keep a cancelled, paused or timed-out job past its lease.
    pub async fn renew(
        &self,
        tenant: &TenantId,
        leases: &[LeaseRef],
        worker: &str,
        lease: Duration,
        grace: Duration,
    ) -> Result<Vec<Renewed>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT $1::text AS tenant_id, t.*, {RUNNING} \
                 FROM UNNEST($2::uuid[], $3::int4[]) AS t(id, attempt) \
             ) \
             UPDATE jobs j SET lease_expires_at = now() + $5 * interval '1 millisecond', \
                    lease_owner = $4 \
             FROM input i \
             WHERE {LEASE_MATCH} \
               AND coalesce(j.cancel_requested_at, j.pause_requested_at, 'infinity') \
                   > now() - $6 * interval '1 millisecond' \
               AND (j.timeout_ms IS NULL OR j.attempt_started_at \
                    + (j.timeout_ms + $6) * interval '1 millisecond' > now()) \
             RETURNING j.id, j.attempt, \
                 CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancel' \
                      WHEN j.pause_requested_at IS NOT NULL THEN 'pause' END, \
                 greatest(0, (extract(epoch FROM j.attempt_started_at - now()) * 1000)::int8 \
                     + j.timeout_ms)"
        );
        let query = query_as(sql)
            .bind(tenant.as_str())
            .bind(leases.iter().map(|l| l.job_id.0).collect::<Vec<_>>())
            .bind(leases.iter().map(|l| l.attempt).collect::<Vec<_>>())
            .bind(worker)
            .bind(millis(lease))
            .bind(millis(grace));
        let rows: Vec<(Uuid, i32, Option<StopKind>, Option<i64>)> =
            self.hot(async |c| Ok(query.fetch_all(c).await?)).await?;
        Ok(rows
            .into_iter()
            .map(|(id, attempt, stop, deadline_in)| Renewed {
                lease: LeaseRef {
                    job_id: JobId(id),
                    attempt,
                },
                stop,
                deadline_in: deadline_in
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map(Duration::from_millis),
            })
            .collect())
    }
}

/// Which inputs of a guarded batch matched a running attempt, in input order.
#[derive(sqlx::FromRow)]
struct MatchedRow {
    matched: bool,
}

fn matched(rows: Vec<MatchedRow>) -> Vec<bool> {
    rows.into_iter().map(|r| r.matched).collect()
}

impl Store {
    /// Stores the latest progress of running attempts and writes one progress event each.
    /// The first report of an attempt becomes its ETA origin. Returns, per input, whether its
    /// lease was current.
    pub async fn record_progress_many(&self, updates: &[ProgressUpdate]) -> Result<Vec<bool>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[], $4::jsonb[], \
                                      $5::float8[]) WITH ORDINALITY \
                 AS t(tenant_id, id, attempt, progress, fraction, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     progress = CASE \
                         WHEN i.fraction > 0 AND i.fraction < 1 \
                          AND (j.progress_origin->>'attempt')::int = j.attempt \
                          AND i.fraction > (j.progress_origin->>'fraction')::float8 \
                         THEN i.progress || jsonb_build_object('eta', now() \
                             + (now() - (j.progress_origin->>'at')::timestamptz) \
                             * ((1 - i.fraction) \
                                / (i.fraction - (j.progress_origin->>'fraction')::float8))) \
                         ELSE i.progress END, \
                     progress_origin = CASE \
                         WHEN i.fraction IS NULL THEN j.progress_origin \
                         WHEN j.progress_origin IS NULL \
                           OR (j.progress_origin->>'attempt')::int <> j.attempt \
                         THEN jsonb_build_object('fraction', i.fraction, 'at', now(), \
                                                 'attempt', j.attempt) \
                         ELSE j.progress_origin END \
                 FROM input i \
                 WHERE {LEASE_MATCH} \
                 RETURNING j.id, j.tenant_id, j.attempt, j.progress \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
                 SELECT tenant_id, id, 'progress', attempt, progress FROM upd \
             ) \
             SELECT upd.id IS NOT NULL AS matched FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt \
             ORDER BY i.ord"
        );
        let query = bind_leases(query_as(sql), updates)
            .bind(
                updates
                    .iter()
                    .map(|u| u.progress.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(updates.iter().map(|u| u.fraction).collect::<Vec<_>>());
        let rows: Vec<MatchedRow> = self.hot(async |c| Ok(query.fetch_all(c).await?)).await?;
        Ok(matched(rows))
    }

    /// Appends log lines of running attempts as events. The job row is locked first so that,
    /// like every other event of the job, they are numbered in commit order.
    pub async fn record_logs_many(&self, batches: &[LogBatch]) -> Result<Vec<bool>> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch_index = Vec::new();
        let mut lines = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            for line in &batch.lines {
                batch_index.push(i64::try_from(i + 1).unwrap_or(i64::MAX));
                lines.push(line.clone());
            }
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[]) WITH ORDINALITY \
                 AS t(tenant_id, id, attempt, ord) \
             ), line AS ( \
                 SELECT * FROM UNNEST($4::int8[], $5::jsonb[]) WITH ORDINALITY \
                 AS l(batch, data, n) \
             ), locked AS ( \
                 SELECT j.id, j.tenant_id, j.attempt, i.ord FROM jobs j \
                 JOIN input i ON {LEASE_MATCH} \
                 FOR UPDATE OF j \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
                 SELECT k.tenant_id, k.id, 'log', k.attempt, l.data \
                 FROM locked k JOIN line l ON l.batch = k.ord ORDER BY k.ord, l.n \
             ) \
             SELECT EXISTS (SELECT 1 FROM locked k WHERE k.ord = i.ord) AS matched \
             FROM input i ORDER BY i.ord"
        );
        let query = bind_leases(query_as(sql), batches)
            .bind(batch_index)
            .bind(lines);
        let rows: Vec<MatchedRow> = self.hot(async |c| Ok(query.fetch_all(c).await?)).await?;
        Ok(matched(rows))
    }

    /// Stores the checkpoints of running attempts, for their job's next attempt.
    pub async fn save_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<Vec<bool>> {
        if checkpoints.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[], $4::bytea[]) \
                 WITH ORDINALITY AS t(tenant_id, id, attempt, data, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET checkpoint = i.data FROM input i \
                 WHERE {LEASE_MATCH} \
                 RETURNING j.id, j.attempt \
             ) \
             SELECT upd.id IS NOT NULL AS matched FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt \
             ORDER BY i.ord"
        );
        let query = bind_leases(query_as(sql), checkpoints).bind(
            checkpoints
                .iter()
                .map(|c| c.data.clone())
                .collect::<Vec<_>>(),
        );
        let rows: Vec<MatchedRow> = self.hot(async |c| Ok(query.fetch_all(c).await?)).await?;
        Ok(matched(rows))
    }
}

/// Who a claim leases to, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Worker<'a> {
    pub id: &'a str,
    pub lease: Duration,
    /// The worker says when its handlers start; otherwise an attempt counts as started at its
    /// claim.
    pub reports_started: bool,
}

/// The signals of each claimed job `upd`, as [`LeaseSignals`](super::rows::LeaseSignals)
/// reads them; read only for a job that holds some.
const LEASE_SIGNALS: &str = "LEFT JOIN LATERAL ( \
     SELECT array_agg(s.name ORDER BY s.seq) AS signal_names, \
            array_agg(s.payload_type ORDER BY s.seq) AS signal_types, \
            array_agg(s.payload ORDER BY s.seq) AS signal_payloads, \
            array_agg(s.created_at ORDER BY s.seq) AS signal_times \
     FROM job_signals s \
     WHERE upd.has_signals AND s.tenant_id = upd.tenant_id AND s.job_id = upd.id) sg ON true";

/// The claim statement. Pick with `FOR UPDATE SKIP LOCKED` (replicas never pick the same row),
/// bump the attempt (the new fencing token), open the attempt row and write the event. Each
/// queue is read on its own (`LATERAL`), so the `jobs_claim` index delivers rows in dispatch
/// order: a `queue = ANY` filter would read and sort every available job on each claim.
/// Unless `limits_checked`, queues that are paused or limited are left out.
pub(super) async fn claim_statement(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    queues: &[QueueName],
    job_types: &[String],
    limit: i64,
    worker: &Worker<'_>,
    limits_checked: bool,
) -> Result<Vec<LeasedRow>> {
    let sql = static_sql!(
        "WITH picked AS ( \
             SELECT c.id FROM ( \
                 SELECT u.queue FROM unnest($2::text[]) AS u(queue) \
                 WHERE $7 OR NOT EXISTS ( \
                     SELECT 1 FROM queues s WHERE s.tenant_id = $1 AND s.name = u.queue \
                       AND (s.paused_at IS NOT NULL OR s.concurrency_limit IS NOT NULL \
                            OR s.rate_per_second IS NOT NULL)) \
             ) q \
             CROSS JOIN LATERAL ( \
                 SELECT id, priority, run_at FROM jobs \
                 WHERE tenant_id = $1 AND state = 'available' AND queue = q.queue \
                   AND job_type = ANY($3) \
                 ORDER BY priority DESC, run_at, id \
                 LIMIT $4 \
                 FOR UPDATE SKIP LOCKED \
             ) c \
             ORDER BY c.priority DESC, c.run_at, c.id \
             LIMIT $4 \
         ), upd AS ( \
             UPDATE jobs j SET state = 'running', attempt = j.attempt + 1, \
                    lease_owner = $5, lease_expires_at = now() + $6 * interval '1 millisecond', \
                    started_at = coalesce(j.started_at, now()), \
                    attempt_started_at = now(), updated_at = now(), \
                    handler_started_at = CASE WHEN $8 THEN NULL ELSE now() END \
             WHERE j.tenant_id = $1 AND j.id = ANY(ARRAY(SELECT id FROM picked)) \
             RETURNING j.* \
         ), ev AS ( \
             INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
             SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('worker', $5) \
             FROM upd \
         ) \
         SELECT {JOB_COLUMNS}, checkpoint, sg.* FROM upd {LEASE_SIGNALS} \
         ORDER BY priority DESC, run_at, id"
    );
    let queues: Vec<&str> = queues.iter().map(QueueName::as_str).collect();
    Ok(query_as::<LeasedRow>(sql)
        .bind(tenant.as_str())
        .bind(&queues)
        .bind(job_types)
        .bind(limit)
        .bind(worker.id)
        .bind(millis(worker.lease))
        .bind(limits_checked)
        .bind(worker.reports_started)
        .fetch_all(db)
        .await?)
}

/// Durations as whole milliseconds for SQL intervals, saturating rather than wrapping.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
