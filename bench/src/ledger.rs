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

    /// Jobs per state.
    pub async fn states(&mut self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state::text, count(*) FROM jobs GROUP BY state")
                .fetch_all(&mut self.conn)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Fails unless the database holds exactly `jobs` jobs, all succeeded.
    pub async fn ensure_succeeded(&mut self, jobs: usize) -> anyhow::Result<()> {
        let states = self.states().await?;
        let succeeded = states.get("succeeded").copied().unwrap_or_default();
        if states.len() != 1 || usize::try_from(succeeded)? != jobs {
            bail!("expected {jobs} succeeded jobs, the database has {states:?}");
        }
        Ok(())
    }

    /// For each stored progress event, the time from the report (the `unix_nanos` under `key` in
    /// its data) to the start of the statement that stored it (its `created_at`, the statement's
    /// `now()`): how long a report took to reach the database, batching included.
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
