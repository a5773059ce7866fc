//! Statements of the leader-only loops: promoting due jobs, and keeping the planner's
//! statistics of the busy tables current. (Lapsed leases are read and ended by `attempts`.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{Result, Store, notify::send, query, query_as};

/// The failure kind of a job failed by its approval timeout.
pub const APPROVAL_TIMEOUT_KIND: &str = "approval_timeout";

impl Store {
    /// Makes up to `limit` SCHEDULED or RETRYING jobs whose time has come AVAILABLE, and wakes
    /// the dispatchers of their queues. Returns how many were promoted.
    pub async fn promote_due(&self, term: Term, limit: i64) -> Result<u64> {
        let sql = static_sql!(
            "WITH due AS ( \
                 SELECT tenant_id, id FROM jobs \
                 WHERE state IN ('scheduled', 'retrying') AND run_at <= now() \
                   AND {fence} \
                 ORDER BY run_at LIMIT $1 \
                 FOR UPDATE SKIP LOCKED \
             ), upd AS ( \
                 UPDATE jobs j SET state = 'available', updated_at = now() \
                 FROM due d WHERE j.tenant_id = d.tenant_id AND j.id = d.id \
                 RETURNING j.id, j.tenant_id, j.queue, j.attempt \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt) \
                 SELECT tenant_id, id, 'state', 'available', attempt FROM upd \
             ), wake AS ( \
                 SELECT {work} \
                 FROM (SELECT DISTINCT tenant_id, queue FROM upd) q \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)",
            work = send::work("tenant_id", "queue"),
            fence = leader_fence!("$2"),
        );
        let (n, _woken): (i64, i64) = self
            .pooled(async |c| Ok(query_as(sql).bind(limit).bind(term.0).fetch_one(c).await?))
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Ends up to `limit` approvals whose time is up: each job becomes CANCELLED (as a
    /// rejection) or FAILED (error kind `approval_timeout`), as it was enqueued to, with its
    /// event. Returns how many ended.
    pub async fn expire_approvals(&self, term: Term, limit: i64) -> Result<u64> {
        let sql = static_sql!(
            "WITH due AS ( \
                 SELECT tenant_id, id FROM jobs \
                 WHERE state = 'awaiting_approval' AND approval_deadline <= now() AND {fence} \
                 ORDER BY approval_deadline LIMIT $1 \
                 FOR UPDATE SKIP LOCKED \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = CASE WHEN approval_timeout_fails THEN 'failed'::job_state \
                                  ELSE 'cancelled'::job_state END, \
                     cancel_reason = CASE WHEN approval_timeout_fails THEN NULL \
                                          ELSE {reason} END, \
                     last_error = CASE WHEN approval_timeout_fails THEN jsonb_build_object( \
                         'message', {reason}, 'kind', '{APPROVAL_TIMEOUT_KIND}', \
                         'retryable', false, 'attempt', attempt, 'occurred_at', now()) \
                         ELSE last_error END, \
                     finished_at = now(), updated_at = now() \
                 FROM due d WHERE j.tenant_id = d.tenant_id AND j.id = d.id \
                 RETURNING j.id, j.tenant_id, j.state, j.attempt, {reason} AS reason \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        CASE WHEN state = 'failed' THEN jsonb_build_object('reason', reason, \
                                 'error', jsonb_build_object('message', reason, \
                                     'kind', '{APPROVAL_TIMEOUT_KIND}', 'retryable', false, \
                                     'attempt', attempt, 'occurred_at', now())) \
                             ELSE jsonb_build_object('reason', reason) END \
                 FROM upd \
             ) \
             SELECT count(*) FROM upd",
            fence = leader_fence!("$2"),
            reason = "'approval timed out after ' || \
                      (date_trunc('second', now() - j.created_at))::text",
        );
        let (n,): (i64,) = self
            .pooled(async |c| Ok(query_as(sql).bind(limit).bind(term.0).fetch_one(c).await?))
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The earliest time the scheduler has work: a run_at among SCHEDULED and RETRYING jobs, or
    /// an approval deadline, so it can sleep until exactly then.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        let (at,): (Option<DateTime<Utc>>,) = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT least( \
                         (SELECT min(run_at) FROM jobs WHERE state IN ('scheduled', 'retrying')), \
                         (SELECT min(approval_deadline) FROM jobs \
                          WHERE state = 'awaiting_approval' AND approval_deadline IS NOT NULL), \
                         (SELECT min(signal_deadline) FROM jobs \
                          WHERE state = 'pending' AND signal_deadline IS NOT NULL))",
                )
                .fetch_one(c)
                .await?)
            })
            .await?;
        Ok(at)
    }
}

/// A term of leadership: the fencing token every leader statement carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term(pub i64);

/// Leadership held, as [`Store::hold_leadership`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub term: Term,
    /// The previous holder's application name, when this call took leadership over from
    /// another replica (whose sessions left idle in a transaction its successor ends).
    pub taken_from: Option<String>,
}

impl Store {
    /// Takes leadership for `ttl` if it is free or expired, or renews it if `holder` holds it
    /// under `term`. `None` when another replica holds it.
    pub async fn hold_leadership(
        &self,
        holder: &str,
        app: &str,
        term: Option<Term>,
        ttl: Duration,
    ) -> Result<Option<Held>> {
        let row: Option<(i64, Option<String>)> = self
            .pooled(async |c| {
                Ok(query_as(
                    "WITH prev AS (SELECT holder, holder_app FROM leader) \
             INSERT INTO leader AS l (id, holder, holder_app, term, expires_at) \
             VALUES (true, $1, $2, 1, clock_timestamp() + $4 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET \
                 holder = EXCLUDED.holder, holder_app = EXCLUDED.holder_app, \
                 term = CASE WHEN l.holder = EXCLUDED.holder AND l.term = $3 THEN l.term \
                             ELSE l.term + 1 END, \
                 expires_at = EXCLUDED.expires_at \
             WHERE (l.holder = EXCLUDED.holder AND l.term = $3) OR l.expires_at < now() \
             RETURNING l.term, \
                 (SELECT holder_app FROM prev WHERE prev.holder IS DISTINCT FROM $1) AS taken_from",
                )
                .bind(holder)
                .bind(app)
                .bind(term.map_or(0, |t| t.0))
                .bind(super::leases::millis(ttl))
                .fetch_optional(c)
                .await?)
            })
            .await?;
        Ok(row.map(|(term, taken_from)| Held {
            term: Term(term),
            taken_from,
        }))
    }

    /// Gives leadership up at once (on shutdown), so a successor need not wait for it to
    /// expire.
    pub async fn release_leadership(&self, holder: &str, term: Term) -> Result<()> {
        self.pooled(async |c| {
            Ok(
                query("UPDATE leader SET expires_at = now() WHERE holder = $1 AND term = $2")
                    .bind(holder)
                    .bind(term.0)
                    .execute(c)
                    .await?,
            )
        })
        .await?;
        Ok(())
    }

    /// Ends the sessions of `app` left idle in a transaction: a stalled replica's, holding the
    /// locks of a transaction it cannot finish. Returns how many.
    pub async fn end_stalled_sessions(&self, app: &str) -> Result<i64> {
        let (ended,): (i64,) = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database() \
               AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()) t",
                )
                .bind(app)
                .fetch_one(c)
                .await?)
            })
            .await?;
        Ok(ended)
    }

    /// The application name this server's connections carry.
    pub fn application_name(&self) -> String {
        self.pool
            .connect_options()
            .get_application_name()
            .unwrap_or_default()
            .to_owned()
    }
}

/// A tenth of the default sample: the plans at stake turn on the table's size and rough
/// selectivities, not fine histograms, and the full sample costs many times the CPU of this one
/// on a table being filled. Autovacuum's own analyze later takes the full sample.
const ANALYZE_TARGET: &str = "SET LOCAL default_statistics_target = 10";

/// Below this many pages a table is cheap to scan whatever the plan, so it is left alone.
const ANALYZE_MIN_PAGES: i64 = 32;

impl Store {
    /// Analyzes each busy table that has at least doubled since its statistics were taken.
    ///
    /// Plans are cached per connection and made from the table's size at the time. One made
    /// while `jobs` was small (a fresh deployment, or any table before autovacuum's first
    /// analyze, up to a minute away) hash-joins a sequential scan of it, and keeps doing so as
    /// it grows: every completion then scans the whole table, a cost that grows with each job
    /// enqueued. An ANALYZE invalidates those plans on every connection, so they are made again
    /// from the table's real size. SKIP_LOCKED: a table autovacuum is working on is skipped, and
    /// tried again on the next pass. Returns the tables analyzed.
    pub async fn analyze_outgrown(&self) -> Result<Vec<String>> {
        // The event log's partitions are analyzed each on its own (the partitioned table has no
        // rows of its own to measure): the one being written is the one that outgrows its
        // statistics, and the planner reads each partition's. Each statement is built by
        // format('%I') from a name in the catalog.
        let outgrown: Vec<(String, String)> = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT c.relname::text, format('ANALYZE (SKIP_LOCKED) %I', c.relname) \
             FROM pg_class c \
             WHERE (c.oid IN ('jobs'::regclass, 'job_attempts'::regclass) \
                    OR c.oid IN (SELECT inhrelid FROM pg_inherits \
                                 WHERE inhparent = 'job_events'::regclass)) \
               AND pg_relation_size(c.oid) / current_setting('block_size')::int8 \
                   >= greatest(2 * c.relpages::int8, $1)",
                )
                .bind(ANALYZE_MIN_PAGES)
                .fetch_all(c)
                .await?)
            })
            .await?;
        let mut analyzed = Vec::new();
        for (table, analyze) in outgrown {
            let mut tx = self.begin().await?;
            query(ANALYZE_TARGET).execute(&mut *tx).await?;
            query(AssertSqlSafe(analyze)).execute(&mut *tx).await?;
            tx.commit().await?;
            analyzed.push(table);
        }
        Ok(analyzed)
    }
}
