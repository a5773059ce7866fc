//! Statements of the leader-only loops: promoting due jobs, and keeping the planner's
//! statistics of the busy tables current. (Lapsed leases are read and ended by `attempts`.)

use chrono::{DateTime, Utc};

use super::{JOBS_CHANNEL, Result, Store};

impl Store {
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
