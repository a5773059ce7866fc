//! What the bench reads back from a workload's database: the jobs table is the truth about what
//! finished, and the event log about what watchers should have seen. Each workload has a fresh
//! database, so every row in it is the workload's.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::bail;
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

use crate::clock;

/// How often [`Ledger::wait_until_settled`] looks: the Graphile peer's `waitDb` interval, so
/// both sides see completion with the same granularity.
const POLL: Duration = Duration::from_millis(10);

/// The queue of the finished jobs [`Ledger::seed_expired`] makes, which the counts of the
/// workload's jobs leave out.
const EXPIRED_QUEUE: &str = "bench.expired";

/// One connection to a workload's database.
pub struct Ledger {
    conn: PgConnection,
}

impl Ledger {
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            conn: PgConnection::connect(database_url).await?,
        })
    }

    /// Waits until no job is waiting or running, and returns when that was seen. Call it once
    /// every job is enqueued, or it may return between two enqueues.
    ///
    /// The query walks the partial indexes of waiting and running jobs rather than counting the
    /// table: each `EXISTS` stops at the first job it finds, so a poll stays cheap however many
    /// jobs there are, where a count would read them all.
    pub async fn wait_until_settled(&mut self) -> anyhow::Result<Instant> {
        loop {
            let busy: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'available') \
                     OR EXISTS (SELECT 1 FROM jobs WHERE state = 'running') \
                     OR EXISTS (SELECT 1 FROM jobs WHERE state IN ('scheduled', 'retrying'))",
            )
            .fetch_one(&mut self.conn)
            .await?;
            if !busy {
                return Ok(Instant::now());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The workload's jobs per state.
    pub async fn states(&mut self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state::text, count(*) FROM jobs WHERE queue <> $1 GROUP BY state",
        )
        .bind(EXPIRED_QUEUE)
        .fetch_all(&mut self.conn)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Copies one of the workload's jobs `n` times into a queue of its own, each SUCCEEDED an
    /// hour ago: a backlog the pruner works through while the workload runs, as a server
    /// past its retention prunes old jobs while new ones run.
    pub async fn seed_expired(&mut self, n: usize) -> anyhow::Result<()> {
        let fixed = ["id", "queue", "state", "finished_at", "idempotency_key"];
        let columns: String = sqlx::query_scalar(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = 'jobs'::regclass AND attnum > 0 AND NOT attisdropped \
               AND attname <> ALL($1)",
        )
        .bind(&fixed[..])
        .fetch_one(&mut self.conn)
        .await?;
        // Column names quoted by the catalog; the rest are constants. The pruner goes through
        // the queues the `queues` table lists, which enqueues fill.
        let copy = format!(
            "INSERT INTO queues (tenant_id, name) \
             SELECT tenant_id, '{EXPIRED_QUEUE}' FROM jobs LIMIT 1 ON CONFLICT DO NOTHING; \
             INSERT INTO jobs ({fixed}, {columns}) \
             SELECT gen_random_uuid(), '{EXPIRED_QUEUE}', 'succeeded', \
                    now() - interval '1 hour', NULL, {columns} \
             FROM (SELECT * FROM jobs LIMIT 1) one, generate_series(1, {n})",
            fixed = fixed.join(", "),
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(copy))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    /// How many of [`Ledger::seed_expired`]'s jobs are left.
    pub async fn expired_left(&mut self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = $1")
                .bind(EXPIRED_QUEUE)
                .fetch_one(&mut self.conn)
                .await?,
        )
    }

    /// Fails unless the database holds exactly `jobs` jobs, all succeeded: in `jobs`, or, once
    /// pruned (the bench's `--prune-after`), in `jobs_archive`, or else known by the event of
    /// their end (`--prune-discard`, whose event partitions outlast the workload). Returns how
    /// many of them were pruned.
    pub async fn ensure_succeeded(&mut self, jobs: usize) -> anyhow::Result<i64> {
        // One statement, so one snapshot: the pruner moves jobs between the tables meanwhile.
        let rows: Vec<(bool, String, i64)> = sqlx::query_as(
            "SELECT false, state::text, count(*) FROM jobs WHERE queue <> $1 GROUP BY state \
             UNION ALL \
             SELECT true, state::text, count(*) FROM jobs_archive WHERE queue <> $1 \
             GROUP BY state \
             UNION ALL \
             SELECT true, e.state::text, count(DISTINCT e.job_id) FROM job_events e \
             WHERE e.kind = 'state' AND e.state IN ('succeeded', 'failed', 'cancelled') \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = e.job_id) \
               AND NOT EXISTS (SELECT 1 FROM jobs_archive a WHERE a.id = e.job_id) \
             GROUP BY e.state",
        )
        .bind(EXPIRED_QUEUE)
        .fetch_all(&mut self.conn)
        .await?;
        let mut states = BTreeMap::<String, i64>::new();
        let mut pruned_jobs = 0;
        for (pruned, state, count) in rows {
            if pruned {
                pruned_jobs += count;
            }
            *states.entry(state).or_default() += count;
        }
        let succeeded = states.get("succeeded").copied().unwrap_or_default();
        if states.len() != 1 || usize::try_from(succeeded)? != jobs {
            bail!("expected {jobs} succeeded jobs, the database has {states:?}");
        }
        Ok(pruned_jobs)
    }

    /// For each stored progress event, the time from the report (the `unix_nanos` under `key` in
    /// its data) to the statement that stored it (its `created_at`, the moment its row was
    /// written): how long a report took to reach the database, batching included.
    pub async fn progress_to_statement(&mut self, key: &str) -> anyhow::Result<Vec<Duration>> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT (data->'data'->>$1)::float8::int8, \
                    (extract(epoch FROM created_at) * 1e9)::int8 \
             FROM job_events WHERE kind = 'progress'",
        )
        .bind(key)
        .fetch_all(&mut self.conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(sent, started)| clock::between(sent, started))
            .collect())
    }

    /// The sizes of the tables a job leaves rows in, with their indexes, dead tuples and
    /// autovacuum runs; the event log summed over its partitions.
    pub async fn sizes(&mut self) -> anyhow::Result<Sizes> {
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "WITH rels AS ( \
                 SELECT 'jobs' AS name, 'jobs'::regclass AS rel \
                 UNION ALL SELECT 'job_attempts', 'job_attempts'::regclass \
                 UNION ALL SELECT 'job_events', inhrelid::regclass FROM pg_inherits \
                     WHERE inhparent = 'job_events'::regclass \
             ) \
             SELECT r.name, sum(pg_relation_size(r.rel))::int8, sum(pg_indexes_size(r.rel))::int8, \
                    coalesce(sum(s.n_dead_tup), 0)::int8, \
                    coalesce(sum(s.autovacuum_count), 0)::int8 \
             FROM rels r LEFT JOIN pg_stat_user_tables s ON s.relid = r.rel \
             GROUP BY r.name",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let mut sizes = Sizes::default();
        for (name, table, indexes, dead_tuples, autovacuums) in rows {
            let size = TableSize {
                table,
                indexes,
                dead_tuples,
                autovacuums,
            };
            match name.as_str() {
                "jobs" => sizes.jobs = size,
                "job_attempts" => sizes.attempts = size,
                _ => sizes.events = size,
            }
        }
        sizes.event_partitions = sqlx::query_scalar(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'job_events'::regclass",
        )
        .fetch_one(&mut self.conn)
        .await?;
        Ok(sizes)
    }

    /// Progress events stored, per job id.
    pub async fn progress_events(&mut self) -> anyhow::Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT job_id::text, count(*) FROM job_events WHERE kind = 'progress' \
             GROUP BY job_id",
        )
        .fetch_all(&mut self.conn)
        .await?;
        Ok(rows.into_iter().collect())
    }
}

/// One table's size and upkeep, in bytes and counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableSize {
    pub table: i64,
    pub indexes: i64,
    pub dead_tuples: i64,
    /// Autovacuum runs since the statistics were reset (the database's creation).
    pub autovacuums: i64,
}

/// The tables a job leaves rows in, as [`Ledger::sizes`] reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sizes {
    pub jobs: TableSize,
    pub events: TableSize,
    pub attempts: TableSize,
    pub event_partitions: i64,
}

impl Sizes {
    /// Tables and indexes together, in bytes.
    pub fn total(&self) -> i64 {
        [self.jobs, self.events, self.attempts]
            .iter()
            .map(|t| t.table + t.indexes)
            .sum()
    }

    /// Adds each figure to a JSON object, sizes in bytes.
    pub fn write_to(&self, object: &mut serde_json::Map<String, serde_json::Value>) {
        for (name, size) in [
            ("jobs", self.jobs),
            ("events", self.events),
            ("attempts", self.attempts),
        ] {
            object.insert(format!("{name}_table_bytes"), size.table.into());
            object.insert(format!("{name}_index_bytes"), size.indexes.into());
            object.insert(format!("{name}_dead_tuples"), size.dead_tuples.into());
            object.insert(format!("{name}_autovacuums"), size.autovacuums.into());
        }
        object.insert("event_partitions".into(), self.event_partitions.into());
    }
}
