//! Statements of the leader-only loops: reaping lapsed leases, promoting due jobs, and keeping
//! the planner's statistics of the busy tables current.

use chrono::{DateTime, Utc};

use super::{
    DUE_CHANNEL, JOBS_CHANNEL, Result, Store,
    leases::{ATTEMPT_UPSERT, BACKOFF_MS},
};

impl Store {
    /// Ends up to `limit` attempts whose lease lapsed (the worker stopped heartbeating, or would
    /// not stop after a cancel, a pause or its timeout): a cancelled job ends CANCELLED, a paused
    /// one PAUSED; any other is retried with its backoff, or FAILED when no attempt is left
    /// (invariant 2: never RUNNING forever). Returns how many were reaped.
    pub async fn reap_expired(&self, limit: i64) -> Result<u64> {
        let sql = static_sql!(
            "WITH expired AS ( \
                 SELECT tenant_id, id FROM jobs \
                 WHERE state = 'running' AND lease_expires_at < now() \
                 ORDER BY lease_expires_at LIMIT $1 \
                 FOR UPDATE SKIP LOCKED \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = CASE \
                         WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'::job_state \
                         WHEN j.pause_requested_at IS NOT NULL THEN 'paused'::job_state \
                         WHEN j.attempt - j.attempt_base >= j.max_attempts \
                             THEN 'failed'::job_state \
                         ELSE 'retrying'::job_state END, \
                     run_at = CASE \
                         WHEN j.cancel_requested_at IS NOT NULL \
                           OR j.pause_requested_at IS NOT NULL \
                           OR j.attempt - j.attempt_base >= j.max_attempts THEN j.run_at \
                         ELSE now() + ({BACKOFF_MS}) * interval '1 millisecond' END, \
                     attempt_base = CASE WHEN j.cancel_requested_at IS NULL \
                                          AND j.pause_requested_at IS NOT NULL \
                                         THEN j.attempt_base + 1 ELSE j.attempt_base END, \
                     last_error = CASE \
                         WHEN j.cancel_requested_at IS NOT NULL \
                           OR j.pause_requested_at IS NOT NULL THEN j.last_error \
                         ELSE jsonb_build_object( \
                         'message', CASE WHEN j.timeout_ms IS NOT NULL AND j.attempt_started_at \
                                         + j.timeout_ms * interval '1 millisecond' < now() \
                                    THEN 'timed out after ' || j.timeout_ms || ' ms; worker ' \
                                         || coalesce(j.lease_owner, '?') || ' did not stop' \
                                    ELSE 'lease expired: worker ' || coalesce(j.lease_owner, '?') \
                                         || ' stopped heartbeating' END, \
                         'kind', CASE WHEN j.timeout_ms IS NOT NULL AND j.attempt_started_at \
                                      + j.timeout_ms * interval '1 millisecond' < now() \
                                 THEN 'timeout' ELSE 'lease_expired' END, \
                         'retryable', true, 'attempt', j.attempt, 'occurred_at', now()) END, \
                     lease_expires_at = NULL, pause_requested_at = NULL, \
                     finished_at = CASE \
                         WHEN j.cancel_requested_at IS NOT NULL THEN now() \
                         WHEN j.pause_requested_at IS NOT NULL THEN NULL \
                         WHEN j.attempt - j.attempt_base >= j.max_attempts THEN now() END, \
                     updated_at = now() \
                 FROM expired x WHERE j.tenant_id = x.tenant_id AND j.id = x.id \
                 RETURNING j.id, j.tenant_id, j.attempt, j.state, j.last_error, j.cancel_reason, \
                           j.pause_reason, j.lease_owner, j.attempt_started_at \
             ), att AS ( \
                 INSERT INTO job_attempts AS a (job_id, attempt, tenant_id, worker_id, \
                                                started_at, finished_at, outcome, error) \
                 SELECT id, attempt, tenant_id, coalesce(lease_owner, ''), \
                        coalesce(attempt_started_at, now()), now(), \
                        CASE \
                            WHEN state = 'cancelled' THEN 'cancelled'::attempt_outcome \
                            WHEN state = 'paused' THEN 'paused'::attempt_outcome \
                            WHEN last_error->>'kind' = 'timeout' \
                                THEN 'timed_out'::attempt_outcome \
                            ELSE 'lease_expired'::attempt_outcome END, \
                        CASE WHEN state IN ('cancelled', 'paused') THEN NULL \
                             ELSE last_error END \
                 FROM upd \
                 {ATTEMPT_UPSERT} \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        CASE state WHEN 'cancelled' THEN jsonb_build_object('reason', cancel_reason) \
                                   WHEN 'paused' THEN jsonb_build_object('reason', pause_reason) \
                                   ELSE jsonb_build_object('error', last_error) END \
                 FROM upd \
             ), wake AS ( \
                 SELECT pg_notify('{DUE_CHANNEL}', '') \
                 FROM (SELECT 1 FROM upd WHERE state = 'retrying' LIMIT 1) d \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)"
        );
        let (n, _woken): (i64, i64) = sqlx::query_as(sql)
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Makes up to `limit` SCHEDULED or RETRYING jobs whose time has come AVAILABLE, and wakes
    /// the dispatchers of their queues. Returns how many were promoted.
    pub async fn promote_due(&self, limit: i64) -> Result<u64> {
        let sql = static_sql!(
            "WITH due AS ( \
                 SELECT tenant_id, id FROM jobs \
                 WHERE state IN ('scheduled', 'retrying') AND run_at <= now() \
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
                 SELECT pg_notify('{JOBS_CHANNEL}', tenant_id || '/' || queue) \
                 FROM (SELECT DISTINCT tenant_id, queue FROM upd) q \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)"
        );
        let (n, _woken): (i64, i64) = sqlx::query_as(sql)
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The earliest run_at among SCHEDULED and RETRYING jobs, so the scheduler can sleep until
    /// exactly then.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        let (at,): (Option<DateTime<Utc>>,) =
            sqlx::query_as("SELECT min(run_at) FROM jobs WHERE state IN ('scheduled', 'retrying')")
                .fetch_one(&self.pool)
                .await?;
        Ok(at)
    }
}

/// The advisory lock that elects the replica running the singleton loops. It lives on a
/// connection of its own: PostgreSQL releases it the moment that session ends, so a replica
/// that dies hands leadership over as soon as its connection drops.
#[derive(Debug)]
pub struct LeaderLock {
    conn: sqlx::PgConnection,
}

/// Any 64-bit constant works; this one spells "jobwire" in ASCII.
const LEADER_LOCK_KEY: i64 = 0x006a_6f62_7769_7265;

impl Store {
    /// Opens the dedicated connection on which leadership is held.
    pub async fn leader_lock(&self) -> Result<LeaderLock> {
        use sqlx::Connection;
        let options = (*self.pool.connect_options()).clone();
        let conn = sqlx::PgConnection::connect_with(&options).await?;
        Ok(LeaderLock { conn })
    }
}

impl LeaderLock {
    /// Takes the lock if no other session holds it.
    pub async fn try_acquire(&mut self) -> Result<bool> {
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK_KEY)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(got)
    }

    /// Proves the session (and so the lock) is still alive.
    pub async fn check(&mut self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&mut self.conn).await?;
        Ok(())
    }

    /// Gives the lock up at once, so another replica need not wait for the connection to drop.
    pub async fn release(mut self) -> Result<()> {
        use sqlx::Connection;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LEADER_LOCK_KEY)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await?;
        Ok(())
    }
}

impl Store {
    /// A listener on the channels where enqueues announce work and stop requests travel.
    pub async fn listener(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([
                JOBS_CHANNEL,
                super::CONTROL_CHANNEL,
                super::QUEUES_CHANNEL,
                super::QUEUE_HOLDS_CHANNEL,
                super::DUE_CHANNEL,
            ])
            .await?;
        Ok(listener)
    }
}

/// The tables the hot statements read by key, each with its ANALYZE statement.
const ANALYZED: [(&str, &str); 3] = [
    ("jobs", "ANALYZE (SKIP_LOCKED) jobs"),
    ("job_events", "ANALYZE (SKIP_LOCKED) job_events"),
    ("job_attempts", "ANALYZE (SKIP_LOCKED) job_attempts"),
];

/// A tenth of the default sample: the plans at stake turn on the table's size and rough
/// selectivities, not fine histograms, and the full sample took 175 ms of CPU per ANALYZE of
/// `jobs` while W1 enqueued (15 ms with this one). Autovacuum's own analyze later takes the full
/// sample.
const ANALYZE_TARGET: &str = "SET LOCAL default_statistics_target = 10";

/// Below this many pages a table is cheap to scan whatever the plan, so it is left alone.
const ANALYZE_MIN_PAGES: i64 = 32;

impl Store {
    /// Analyzes each busy table that has at least doubled since its statistics were taken.
    ///
    /// Plans are cached per connection and made from the table's size at the time. One made
    /// while `jobs` was small (a fresh deployment, or any table before autovacuum's first
    /// analyze, up to a minute away) hash-joins a sequential scan of it, and keeps doing so as
    /// it grows: in W3, whose table grows from empty, 1,597 completions scanning the whole table
    /// took 6.1 s of a 12 s run. An ANALYZE invalidates those plans on every connection, so they
    /// are made again from the table's real size. SKIP_LOCKED: a table autovacuum is working on
    /// is skipped, and tried again on the next pass. Returns the tables analyzed.
    pub async fn analyze_outgrown(&self) -> Result<Vec<&'static str>> {
        let outgrown: Vec<(String,)> = sqlx::query_as(
            "SELECT relname::text FROM pg_class \
             WHERE oid IN ('jobs'::regclass, 'job_events'::regclass, 'job_attempts'::regclass) \
               AND pg_relation_size(oid) / current_setting('block_size')::int8 \
                   >= greatest(2 * relpages::int8, $1)",
        )
        .bind(ANALYZE_MIN_PAGES)
        .fetch_all(&self.pool)
        .await?;
        let mut analyzed = Vec::new();
        for (table, analyze) in ANALYZED {
            if outgrown.iter().any(|(name,)| name == table) {
                let mut tx = self.pool.begin().await?;
                sqlx::query(ANALYZE_TARGET).execute(&mut *tx).await?;
                sqlx::query(analyze).execute(&mut *tx).await?;
                tx.commit().await?;
                analyzed.push(table);
            }
        }
        Ok(analyzed)
    }
}
