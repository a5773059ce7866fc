//! The store: every SQL statement jobwire runs, and nothing else.
//!
//! Each function is one statement, named for the operation, taking any executor so callers can
//! compose transactions. A state change and the event row describing it are written by the same
//! statement (data-modifying CTEs), so they commit together. Updates of leased jobs are guarded
//! by the expected state and the attempt (fencing token), so a late message from a lost worker
//! matches no row and changes nothing. Batches travel as arrays (`UNNEST`), one round trip each.
//!
//! An update of rows a CTE picked (claim, reaper, scheduler) names them with
//! `j.id = ANY(ARRAY(SELECT id FROM picked))`, not a join. The connections use generic plans,
//! which estimate a `LIMIT $n` at a tenth of the rows it limits: with statistics of many
//! available jobs a join with the picked rows is planned as a hash join over a sequential scan
//! of `jobs`, which makes even a small claim cost as much as reading the table. An array is
//! estimated at ten elements, and read through the primary key at any table size.

/// SQL assembled once, on first use, from compile-time constants (column lists, channel names,
/// shared expressions), never from input; the result is a `&'static str` sqlx accepts as safe.
macro_rules! static_sql {
    ($($arg:tt)*) => {{
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!($($arg)*));
        SQL.as_str()
    }};
}

/// The condition every statement of a leader-only loop adds: the term it acts under is still
/// the leader's and unexpired. `$term` names the statement's parameter holding it.
macro_rules! leader_fence {
    ($term:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM leader WHERE term = ",
            $term,
            " AND expires_at > now())"
        )
    };
}

mod api_keys;
mod attempts;
mod audit;
mod events;
mod hot;
mod job_types;
mod jobs;
mod leases;
mod maintenance;
mod notify;
mod queues;
mod replays;
mod retention;
mod rows;
mod schedules;
mod tenancy;
mod waits;
mod workers;

use std::{sync::Arc, time::Duration};

use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use hot::HotConnections;

pub use api_keys::{ApiKeyRow, NewApiKey};
pub use attempts::{AttemptEnd, Guard, LapsedAttempt, Resend, RunningAttempt};
pub use audit::{AuditRow, NewAuditEntry};
pub use events::{EventFilter, LAST_EVENT_NUMBER, OpenTransaction, SnapshotXids};
pub use job_types::{Example, JobTypeRow, NewJobType, TypeDefaults};
pub use jobs::{EnqueueOutcome, Enqueued, Handoff, ListFilter, Listed, NewJob};
pub use leases::Worker;
pub use leases::{Checkpoint, LogBatch, ProgressUpdate, Renewed, SettleResult, StopKind};
pub use maintenance::{Held, Term};
pub use notify::{Heard, Listener, Notification};
pub use queues::QueueDepthRow;
pub use queues::{HeldBack, LimitedClaim, QueueRow, QueueUpdate, QueueView};
pub use replays::{Replay, ReplayFilter, Replayable, Replayed};
pub use retention::{Archive, EventPartition, Pruned, QueueRetention};
pub use rows::{AttemptRow, ErrorRecord, EventRow, JobRow, LeasedRow, ProgressOrigin};
pub use schedules::{
    CatchUpPolicy, DueSchedule, Firing, JobTemplate, NewSchedule, OverlapPolicy, ScheduleRow,
    ScheduleSpec, ScheduleUpdate,
};
pub use tenancy::TENANT_ROLE;
pub use workers::{WorkerRecord, WorkerView};

/// What can go wrong in the store. Callers decide retries with [`Error::is_transient`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored row is invalid: {0}")]
    Corrupt(String),
    #[error("the database is set up in a way jobwire cannot serve: {0}")]
    Misconfigured(String),
    /// A batch's job `index` reuses the idempotency key of `existing`, a job of another job
    /// type or payload; nothing of the batch was written.
    #[error(
        "job {index} reuses the idempotency key of job {existing}, of another job type or payload"
    )]
    KeyReused {
        index: usize,
        existing: crate::domain::JobId,
    },
    /// A replay's payload change does not fit job `id`; nothing was replayed.
    #[error("the payload change does not fit job {id}: {why}")]
    Refused {
        id: crate::domain::JobId,
        why: String,
    },
    /// Job `index` of a batch depends on `id` (at `position` of its `depends_on`), which is no
    /// job of the tenant; nothing was written.
    #[error("job {index} depends on {id}, which is no job of this tenant")]
    UnknownDependency {
        index: usize,
        position: usize,
        id: crate::domain::JobId,
    },
}

impl Error {
    /// True when the same statement may succeed if tried again: the connection dropped, the pool
    /// was momentarily exhausted, the database is restarting, or a serialization conflict.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(sqlx::Error::Io(_))
            | Error::Database(sqlx::Error::PoolTimedOut)
            | Error::Database(sqlx::Error::Protocol(_)) => true,
            Error::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "40001"
                    || code == "40P01"
                    || code == "53300"
            }),
            _ => false,
        }
    }
}

impl Error {
    /// True when no pooled connection came free in time: the database is up, this server is
    /// busy.
    pub fn is_pool_exhausted(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::PoolTimedOut))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long a pooled connection may sit idle and still be used without a test first (HikariCP's
/// `aliveBypassWindowMs` makes the same trade at 500 ms).
const IDLE_BEFORE_PING: Duration = Duration::from_millis(500);

/// A handle on the database: a connection pool plus the statements of the submodules.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Up to half the pool, kept warm for the engine's statements.
    hot: Arc<HotConnections>,
}

impl Store {
    /// Connects and applies pending migrations, so a fresh database is ready to serve. A store
    /// that writes events then makes the event log's partitions ahead
    /// ([`Store::ensure_event_partitions`], as the server does at start): the migration's own
    /// cover only its first seconds.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx tests a connection (a Sync and its ReadyForQuery, one round trip to the
            // backend) as it returns to the pool, and by default again as it leaves: the second
            // test sits on every statement's path. A connection that came back healthy moments
            // ago is used as it is; one idle long enough for the server or the network to have
            // dropped it is tested first. A connection the database dropped within that window
            // fails one statement (UNAVAILABLE to its caller) and is then discarded.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            // The pid tells an operator (and the failover tests) which replica holds which
            // session, such as the one holding the leader lock.
            .connect_with(
                options
                    .application_name(&format!("jobwire-server/{}", std::process::id()))
                    .options([("plan_cache_mode", "force_generic_plan")]),
            )
            .await?;
        sqlx::migrate!("../migrations").run(&pool).await?;
        events::check_event_numbering(&pool).await?;
        let hot = HotConnections::new(usize::try_from(max_connections / 2).unwrap_or(1).max(1));
        let store = Self {
            pool,
            hot: Arc::new(hot),
        };
        store.check_tenant_role().await?;
        Ok(store)
    }

    /// Closes every connection, once the statements running have finished.
    pub async fn close(&self) {
        self.hot.clear();
        self.pool.close().await;
    }

    /// Runs one of the engine's statements on a warm connection (see [`hot`]).
    async fn hot<T>(
        &self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.hot.run(&self.pool, statement).await
    }

    /// The pool's connections idle and in use; those waiting for the engine's next statement
    /// (see [`hot`]) count as idle.
    pub fn pool_use(&self) -> (usize, usize) {
        let open = usize::try_from(self.pool.size()).unwrap_or(usize::MAX);
        let idle = (self.pool.num_idle() + self.hot.idle_len()).min(open);
        (idle, open - idle)
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
