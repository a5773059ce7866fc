//! Statements of the scheduler's pass over jobs waiting PENDING for their dependencies or their
//! children: reading those whose dependencies or children have moved far enough to decide, and
//! applying what `domain::waits` decided; and of its search for the unfinished children of
//! parents that ended CANCELLED or FAILED, which it cancels.

use uuid::Uuid;

use super::{Result, Store, Term, notify::send, query_as};
use crate::domain::{
    JobState,
    waits::{Broken, WaitEnd, Waiting},
};

/// A waiting job whose dependencies may let it go, as read for the decision.
#[derive(Debug, Clone)]
pub struct WaitingJob {
    pub tenant: String,
    pub id: Uuid,
    pub waiting: Waiting,
}

#[derive(sqlx::FromRow)]
struct WaitingRow {
    tenant_id: String,
    id: Uuid,
    run_regardless: bool,
    open: i64,
    broken_id: Option<Uuid>,
    broken_type: Option<String>,
    broken_state: Option<JobState>,
    broken_why: Option<String>,
}

impl Store {
    /// Up to `limit` PENDING jobs whose dependencies have all ended, or (unless they run
    /// regardless) of which one ended without succeeding. A dependency no longer stored (pruned
    /// long after it ended) counts as ended well. A job waiting for its children counts an
    /// unfinished child as open (one is enough to wait on), and however its children ended it
    /// runs again to aggregate them.
    pub async fn decidable_waits(&self, term: Term, limit: i64) -> Result<Vec<WaitingJob>> {
        let sql = static_sql!(
            "WITH waiting AS ( \
                 SELECT tenant_id, id, depends_on, run_regardless, awaiting_children FROM jobs \
                 WHERE state = 'pending' AND (depends_on IS NOT NULL OR awaiting_children) \
                   AND {fence} \
             ), deps AS ( \
                 SELECT w.id AS waiter, t.id, t.job_type, t.state, t.finished_at, \
                        coalesce(t.cancel_reason, t.last_error->>'message', '') AS why \
                 FROM waiting w CROSS JOIN LATERAL unnest(w.depends_on) AS d(id) \
                 JOIN jobs t ON t.tenant_id = w.tenant_id AND t.id = d.id \
             ), tally AS ( \
                 SELECT w.tenant_id, w.id, \
                        w.run_regardless OR w.awaiting_children AS run_regardless, \
                        count(d.id) FILTER (WHERE d.state NOT IN \
                            ('succeeded', 'failed', 'cancelled')) \
                        + CASE WHEN w.awaiting_children AND EXISTS ( \
                              SELECT 1 FROM jobs c \
                              WHERE c.tenant_id = w.tenant_id AND c.parent_id = w.id \
                                AND c.state NOT IN ('succeeded', 'failed', 'cancelled')) \
                               THEN 1 ELSE 0 END AS open, \
                        (array_agg(d.id ORDER BY d.finished_at, d.id) \
                            FILTER (WHERE d.state IN ('failed', 'cancelled')))[1] AS broken_id \
                 FROM waiting w LEFT JOIN deps d ON d.waiter = w.id \
                 GROUP BY w.tenant_id, w.id, w.run_regardless, w.awaiting_children \
             ) \
             SELECT t.tenant_id, t.id, t.run_regardless, t.open, t.broken_id, \
                    b.job_type AS broken_type, \
                    b.state AS broken_state, b.why AS broken_why \
             FROM tally t LEFT JOIN deps b ON b.waiter = t.id AND b.id = t.broken_id \
             WHERE t.open = 0 OR (t.broken_id IS NOT NULL AND NOT t.run_regardless) \
             LIMIT $2",
            fence = leader_fence!("$1"),
        );
        let rows: Vec<WaitingRow> = self
            .pooled(async |c| Ok(query_as(sql).bind(term.0).bind(limit).fetch_all(c).await?))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| WaitingJob {
                tenant: r.tenant_id,
                id: r.id,
                waiting: Waiting {
                    run_regardless: r.run_regardless,
                    open: r.open,
                    broken: r.broken_id.map(|id| Broken {
                        id,
                        job_type: r.broken_type.unwrap_or_default(),
                        state: r.broken_state.unwrap_or(JobState::Failed),
                        why: r.broken_why.unwrap_or_default(),
                    }),
                },
            })
            .collect())
    }

    /// Applies decisions on waiting jobs: a released job becomes AVAILABLE (SCHEDULED while its
    /// run_at is ahead), a cancelled one CANCELLED with its reason, each with its event; jobs
    /// no longer PENDING (cancelled meanwhile) are left alone. A parent released from its wait
    /// for its children is marked so for its next lease. Returns how many changed.
    pub async fn end_waits(&self, term: Term, ends: &[(String, Uuid, WaitEnd)]) -> Result<u64> {
        let sql = static_sql!(
            "WITH d AS ( \
                 SELECT * FROM unnest($2::text[], $3::uuid[], $4::text[]) \
                     AS d(tenant_id, id, cancel) \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = CASE WHEN d.cancel IS NOT NULL THEN 'cancelled'::job_state \
                                  WHEN j.run_at > now() THEN 'scheduled'::job_state \
                                  ELSE 'available'::job_state END, \
                     cancel_reason = d.cancel, \
                     finished_at = CASE WHEN d.cancel IS NOT NULL THEN now() END, \
                     awaiting_children = false, \
                     children_ended = j.awaiting_children AND d.cancel IS NULL, \
                     updated_at = now() \
                 FROM d WHERE j.tenant_id = d.tenant_id AND j.id = d.id \
                   AND j.state = 'pending' AND {fence} \
                 RETURNING j.id, j.tenant_id, j.queue, j.state, j.attempt, d.cancel, \
                           j.children_ended \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', coalesce(cancel, \
                            CASE WHEN children_ended THEN 'children ended' \
                                 ELSE 'dependencies succeeded' END)) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM (SELECT DISTINCT tenant_id, queue FROM upd \
                                     WHERE state = 'available') q \
                 UNION ALL \
                 SELECT {due} FROM (SELECT 1 FROM upd WHERE state = 'scheduled' LIMIT 1) s \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)",
            fence = leader_fence!("$1"),
            work = send::work("tenant_id", "queue"),
            due = send::due(),
        );
        let mut tenants = Vec::with_capacity(ends.len());
        let mut ids = Vec::with_capacity(ends.len());
        let mut cancels = Vec::with_capacity(ends.len());
        for (tenant, id, end) in ends {
            match end {
                WaitEnd::Wait => continue,
                WaitEnd::Release => cancels.push(None),
                WaitEnd::Cancel(reason) => cancels.push(Some(reason.clone())),
            }
            tenants.push(tenant.clone());
            ids.push(*id);
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let (changed, _woken): (i64, i64) = self
            .pooled(async |c| {
                Ok(query_as(sql)
                    .bind(term.0)
                    .bind(&tenants)
                    .bind(&ids)
                    .bind(&cancels)
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        Ok(u64::try_from(changed).unwrap_or(0))
    }
}

/// A child not yet ended whose parent ended CANCELLED or FAILED.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub tenant: String,
    pub id: Uuid,
    pub parent: Broken,
}

#[derive(sqlx::FromRow)]
struct OrphanRow {
    tenant_id: String,
    id: Uuid,
    parent_id: Uuid,
    parent_type: String,
    parent_state: JobState,
    why: String,
}

#[derive(sqlx::FromRow)]
struct CancelledRow {
    tenant_id: String,
    queue: String,
    job_type: String,
}

impl Store {
    /// Up to `limit` children not yet ended (nor asked to stop) whose parent ended CANCELLED
    /// or FAILED. Only unfinished children are indexed, so the search reads those alone.
    pub async fn orphaned_children(&self, term: Term, limit: i64) -> Result<Vec<Orphan>> {
        let sql = static_sql!(
            "SELECT c.tenant_id, c.id, p.id AS parent_id, p.job_type AS parent_type, \
                    p.state AS parent_state, \
                    coalesce(p.cancel_reason, p.last_error->>'message', '') AS why \
             FROM jobs c JOIN jobs p ON p.tenant_id = c.tenant_id AND p.id = c.parent_id \
             WHERE c.parent_id IS NOT NULL \
               AND c.state NOT IN ('succeeded', 'failed', 'cancelled') \
               AND c.cancel_requested_at IS NULL \
               AND p.state IN ('cancelled', 'failed') AND {fence} \
             LIMIT $2",
            fence = leader_fence!("$1"),
        );
        let rows: Vec<OrphanRow> = self
            .pooled(async |c| Ok(query_as(sql).bind(term.0).bind(limit).fetch_all(c).await?))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Orphan {
                tenant: r.tenant_id,
                id: r.id,
                parent: Broken {
                    id: r.parent_id,
                    job_type: r.parent_type,
                    state: r.parent_state,
                    why: r.why,
                },
            })
            .collect())
    }

    /// Cancels children with the reasons given: a queued child becomes CANCELLED at once; a
    /// running one is asked to stop, as CancelJob asks, and ends CANCELLED when its worker
    /// stops it (or its lease lapses). Each with its event; children that ended meanwhile are
    /// left alone. Returns how many changed.
    pub async fn cancel_orphans(
        &self,
        term: Term,
        orphans: &[(String, Uuid, String)],
    ) -> Result<u64> {
        if orphans.is_empty() {
            return Ok(0);
        }
        let sql = static_sql!(
            "WITH d AS ( \
                 SELECT * FROM unnest($2::text[], $3::uuid[], $4::text[]) \
                     AS d(tenant_id, id, reason) \
             ), queued AS ( \
                 UPDATE jobs j SET state = 'cancelled', cancel_reason = d.reason, \
                        finished_at = now(), updated_at = now() \
                 FROM d WHERE j.tenant_id = d.tenant_id AND j.id = d.id \
                   AND j.state IN ('awaiting_approval', 'pending', 'scheduled', 'available', \
                                   'retrying', 'paused') AND {fence} \
                 RETURNING j.tenant_id, j.id, j.queue, j.job_type, j.state, j.attempt, d.reason \
             ), running AS ( \
                 UPDATE jobs j SET cancel_requested_at = now(), cancel_reason = d.reason, \
                        updated_at = now() \
                 FROM d WHERE j.tenant_id = d.tenant_id AND j.id = d.id \
                   AND j.state = 'running' AND j.cancel_requested_at IS NULL AND {fence} \
                 RETURNING j.tenant_id, j.id, j.attempt, d.reason \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', reason) \
                 FROM queued \
                 UNION ALL \
                 SELECT tenant_id, id, 'stop_requested', NULL, attempt, \
                        jsonb_build_object('target', 'cancelled', 'reason', reason) \
                 FROM running \
             ), wake AS ( \
                 SELECT {stop} FROM running \
             ) \
             SELECT tenant_id, queue, job_type FROM queued \
             UNION ALL \
             SELECT r.tenant_id, '', '' FROM running r \
             CROSS JOIN (SELECT count(*) FROM wake) w",
            fence = leader_fence!("$1"),
            stop = send::stop("tenant_id", "id", "attempt", "'cancel'"),
        );
        let rows: Vec<CancelledRow> = self
            .pooled(async |c| {
                Ok(query_as(sql)
                    .bind(term.0)
                    .bind(orphans.iter().map(|o| o.0.clone()).collect::<Vec<_>>())
                    .bind(orphans.iter().map(|o| o.1).collect::<Vec<_>>())
                    .bind(orphans.iter().map(|o| o.2.clone()).collect::<Vec<_>>())
                    .fetch_all(c)
                    .await?)
            })
            .await?;
        for row in rows.iter().filter(|r| !r.queue.is_empty()) {
            crate::metrics::cancelled((&row.tenant_id, &row.queue, &row.job_type));
        }
        Ok(u64::try_from(rows.len()).unwrap_or(0))
    }
}
