//! Statements of the scheduler's pass over jobs waiting PENDING for their dependencies: reading
//! those whose dependencies have moved far enough to decide, and applying what
//! `domain::waits` decided.

use uuid::Uuid;

use super::{Result, Store, Term, notify::send, query_as};
use crate::domain::{
    JobState,
    waits::{Broken, WaitEnd, Waiting},
};

/// A waiting job whose dependencies may let it go, as read for the decision.
#[derive(Debug, Clone)]
pub struct WaitingJob {
    pub id: Uuid,
    pub waiting: Waiting,
}

#[derive(sqlx::FromRow)]
struct WaitingRow {
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
    /// long after it ended) counts as ended well.
    pub async fn decidable_waits(&self, term: Term, limit: i64) -> Result<Vec<WaitingJob>> {
        let sql = static_sql!(
            "WITH waiting AS ( \
                 SELECT id, depends_on, run_regardless FROM jobs \
                 WHERE state = 'pending' AND depends_on IS NOT NULL AND {fence} \
             ), deps AS ( \
                 SELECT w.id AS waiter, t.id, t.job_type, t.state, t.finished_at, \
                        coalesce(t.cancel_reason, t.last_error->>'message', '') AS why \
                 FROM waiting w CROSS JOIN LATERAL unnest(w.depends_on) AS d(id) \
                 JOIN jobs t ON t.id = d.id \
             ), tally AS ( \
                 SELECT w.id, w.run_regardless, \
                        count(d.id) FILTER (WHERE d.state NOT IN \
                            ('succeeded', 'failed', 'cancelled')) AS open, \
                        (array_agg(d.id ORDER BY d.finished_at, d.id) \
                            FILTER (WHERE d.state IN ('failed', 'cancelled')))[1] AS broken_id \
                 FROM waiting w LEFT JOIN deps d ON d.waiter = w.id \
                 GROUP BY w.id, w.run_regardless \
             ) \
             SELECT t.id, t.run_regardless, t.open, t.broken_id, b.job_type AS broken_type, \
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
    /// no longer PENDING (cancelled meanwhile) are left alone. Returns how many changed.
    pub async fn end_waits(&self, term: Term, ends: &[(Uuid, WaitEnd)]) -> Result<u64> {
        let sql = static_sql!(
            "WITH d AS ( \
                 SELECT * FROM unnest($2::uuid[], $3::text[]) AS d(id, cancel) \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = CASE WHEN d.cancel IS NOT NULL THEN 'cancelled'::job_state \
                                  WHEN j.run_at > now() THEN 'scheduled'::job_state \
                                  ELSE 'available'::job_state END, \
                     cancel_reason = d.cancel, \
                     finished_at = CASE WHEN d.cancel IS NOT NULL THEN now() END, \
                     updated_at = now() \
                 FROM d WHERE j.id = d.id AND j.state = 'pending' AND {fence} \
                 RETURNING j.id, j.tenant_id, j.queue, j.state, j.attempt, d.cancel \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', coalesce(cancel, 'dependencies succeeded')) \
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
        let mut ids = Vec::with_capacity(ends.len());
        let mut cancels = Vec::with_capacity(ends.len());
        for (id, end) in ends {
            match end {
                WaitEnd::Wait => continue,
                WaitEnd::Release => cancels.push(None),
                WaitEnd::Cancel(reason) => cancels.push(Some(reason.clone())),
            }
            ids.push(*id);
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let (changed, _woken): (i64, i64) = self
            .pooled(async |c| {
                Ok(query_as(sql)
                    .bind(term.0)
                    .bind(&ids)
                    .bind(&cancels)
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        Ok(u64::try_from(changed).unwrap_or(0))
    }
}
