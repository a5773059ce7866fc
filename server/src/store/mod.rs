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
mod signals;
mod stale;
mod tenancy;
mod waits;
mod workers;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{
    Connection, FromRow, PgConnection, PgPool, Postgres, SqlSafeStr, Transaction,
    migrate::Migrator,
    postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow},
    query::{Query, QueryAs, QueryScalar},
};

use crate::config::Pooling;
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
pub use rows::{
    AttemptRow, ErrorRecord, EventRow, JobRow, LeaseSignals, LeasedRow, ProgressOrigin, SignalWait,
};
pub use schedules::{
    CatchUpPolicy, DueSchedule, Firing, JobTemplate, NewSchedule, OverlapPolicy, ScheduleRow,
    ScheduleSpec, ScheduleUpdate,
};
pub use signals::{MAX_SIGNALS_PER_JOB, NewSignal, Signalled};
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
    /// The parent named for children is a job of the tenant, but not running that attempt;
    /// nothing was written.
    #[error("job {} is not running attempt {}", .0.job_id, .0.attempt)]
    StaleParent(crate::domain::LeaseRef),
    /// The parent named for children is no job of the tenant; nothing was written.
    #[error("job {0} is no job of this tenant")]
    UnknownParent(crate::domain::JobId),
    /// The job has ended (in this state): it takes no signal.
    #[error("the job has ended {0:?}")]
    Ended(crate::domain::JobState),
    /// The job holds this many signals already, the most it may.
    #[error("the job holds {0} signals, the most a job may")]
    TooManySignals(i64),
}

impl Error {
    /// True when the same statement may succeed if tried again: the connection dropped, the pool
    /// was momentarily exhausted, the database is restarting or failing over to a standby, or a
    /// serialization conflict.
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
                    // A standby that is not promoted yet: during a failover a proxy may send
                    // connections to it moments before it takes writes.
                    || code == "25006"
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

/// The schema this server needs, applied at start-up.
static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Set once any store of this process connects through a transaction pooler; from then on every
/// statement of the process is prepared unnamed (see [`query`]). Process-wide because sqlx
/// decides a statement's name from the query value, built before it meets a connection; a
/// store connected directly in the same process then also prepares unnamed, which costs it a
/// parse per statement, never correctness.
static UNNAMED_STATEMENTS: AtomicBool = AtomicBool::new(false);

/// sqlx names and caches a statement it prepares unless told the statement is not
/// `persistent`; lowering `statement_cache_capacity` to 0 still names each statement
/// (`sqlx_s_<n>`, counted per client connection) and never closes it. Behind a transaction
/// pooler the next transaction of this connection may run on another server connection, where
/// that name is missing, or already taken by another client's statement of the same number.
/// An unnamed statement lives until the next Parse of its server connection, which is always
/// this statement's own Bind because every statement runs in a transaction (see
/// [`Store::pinned`]).
fn persistent() -> bool {
    !UNNAMED_STATEMENTS.load(Ordering::Relaxed)
}

/// `sqlx::query`, prepared as [`persistent`] says.
pub(crate) fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).persistent(persistent())
}

/// `sqlx::query_as`, prepared as [`persistent`] says.
pub(crate) fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(persistent())
}

/// `sqlx::query_scalar`, prepared as [`persistent`] says.
pub(crate) fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(persistent())
}

/// The schema's own types, which sqlx looks up by oid the first time a statement of a
/// connection uses them.
const ENUM_TYPES: [&str; 4] = [
    "job_state",
    "attempt_outcome",
    "overlap_policy",
    "catch_up_policy",
];

/// Teaches a new connection the schema's own types (and their arrays) before any statement
/// uses them. sqlx 0.9 looks an unknown type up with a simple-protocol query between the Parse
/// of a statement and its Bind, and a simple query ends the unnamed statement: the first
/// unnamed statement of a connection to meet a type fails ("unnamed prepared statement does
/// not exist"). Prepared here once as a named statement, deallocated in the same transaction
/// so that no other client of the pooler's server connection meets its name. Types the
/// database does not have yet (a schema still to migrate) are skipped.
async fn learn_enum_types(conn: &mut PgConnection) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    let present: Vec<String> =
        sqlx::query_scalar("SELECT typname::text FROM pg_type WHERE typname = ANY($1)")
            .bind(ENUM_TYPES)
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
    if !present.is_empty() {
        let columns: Vec<String> = present
            .iter()
            .map(|t| format!("NULL::{t}, NULL::{t}[]"))
            .collect();
        let sql = format!("SELECT {}", columns.join(", "));
        // Built from the fixed names above, never from input.
        use sqlx::Executor as _;
        (&mut *tx)
            .prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql)))
            .await?;
        (&mut *tx).execute("DEALLOCATE ALL").await?;
    }
    tx.commit().await
}

/// Where and how the store reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct Database {
    /// The connections of the pool: PostgreSQL itself, or a pooler in front of it.
    pub url: String,
    /// How `url`'s connections keep their session.
    pub pooling: Pooling,
    /// A connection to PostgreSQL itself, for what needs one session throughout: LISTEN and
    /// the migrations' advisory lock.
    pub direct_url: Option<String>,
}

impl Database {
    /// PostgreSQL at `url`, directly.
    pub fn direct(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            pooling: Pooling::Session,
            direct_url: None,
        }
    }
}

/// A handle on the database: a connection pool plus the statements of the submodules.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Up to half the pool, kept warm for the engine's statements.
    hot: Arc<HotConnections>,
    /// How the pool's connections keep their session: behind a transaction pooler each
    /// statement runs in a transaction, so that its Parse and its Bind meet one server
    /// connection.
    pooling: Pooling,
    /// Where the notification listener connects; `None` when only a transaction pooler is
    /// known, and notifications are off.
    listen: Option<PgPool>,
}

impl Store {
    /// Connects to PostgreSQL at `url` directly and applies pending migrations, so a fresh
    /// database is ready to serve. A store that writes events then makes the event log's
    /// partitions ahead ([`Store::ensure_event_partitions`], as the server does at start): the
    /// migration's own cover only its first seconds.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        Self::connect_to(&Database::direct(url), max_connections).await
    }

    /// Connects to `database` and applies pending migrations over a session; behind a
    /// transaction pooler with no direct connection, checks instead that none is pending.
    pub async fn connect_to(database: &Database, max_connections: u32) -> Result<Self> {
        let database_pooling = database.pooling;
        let options: PgConnectOptions = database.url.parse()?;
        let options = options.application_name(&format!("jobwire-server/{}", std::process::id()));
        let options = match database.pooling {
            // The connections use generic plans (see the module's opening).
            Pooling::Session => options.options([("plan_cache_mode", "force_generic_plan")]),
            // A transaction pooler forwards only the startup parameters it tracks (PgBouncer
            // refuses the rest unless told to ignore them), and a session setting would
            // reach whichever server connection it lands on. Unnamed statements are planned
            // for their parameters, each time.
            Pooling::Transaction => {
                UNNAMED_STATEMENTS.store(true, Ordering::Relaxed);
                options.extra_float_digits(None).statement_cache_capacity(0)
            }
        };
        // Migrated before the pool connects: its connections learn the schema's types as
        // they connect.
        let direct = match &database.direct_url {
            Some(url) => {
                let options: PgConnectOptions = url.parse()?;
                let options =
                    options.application_name(&format!("jobwire-server/{}", std::process::id()));
                let direct = PgPoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await?;
                MIGRATOR.run(&direct).await?;
                Some(direct)
            }
            None => None,
        };
        let pool = PgPoolOptions::new()
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if database_pooling == Pooling::Transaction {
                        learn_enum_types(conn).await?;
                    }
                    Ok(())
                })
            })
            // A connection an abandoned begin left in a transaction is closed, not reused.
            .after_release(|conn, _| Box::pin(stale::check_on_release(conn)))
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
            .connect_with(options)
            .await?;
        let listen = match direct {
            Some(direct) => Some(direct),
            None if database.pooling == Pooling::Session => Some(pool.clone()),
            None => None,
        };
        let hot = HotConnections::new(usize::try_from(max_connections / 2).unwrap_or(1).max(1));
        let store = Self {
            pool,
            hot: Arc::new(hot),
            pooling: database.pooling,
            listen,
        };
        if database.direct_url.is_none() {
            store.migrate().await?;
        }
        store
            .pooled(async |c| events::check_event_numbering(c).await)
            .await?;
        store.check_tenant_role().await?;
        Ok(store)
    }

    /// Applies pending migrations over a session (sqlx holds an advisory lock across them, so
    /// replicas starting together apply each once). With only a transaction pooler there is
    /// no session to hold the lock: the schema must be current already, or start-up fails
    /// naming what is missing and how to apply it.
    async fn migrate(&self) -> Result<()> {
        if let Some(session) = &self.listen {
            MIGRATOR.run(session).await?;
            return Ok(());
        }
        let applied: Vec<i64> = self
            .pooled(async |c| {
                Ok(query_scalar(
                    "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
                )
                .fetch_all(c)
                .await
                .or_else(|error| match &error {
                    // No table yet: nothing applied.
                    sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                        Ok(Vec::new())
                    }
                    _ => Err(error),
                })?)
            })
            .await?;
        let missing: Vec<String> = MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .map(|m| format!("{:04}_{}", m.version, m.description))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Misconfigured(format!(
                "the schema lacks migrations {}, which need a direct connection to apply (with \
                 --database-pooling transaction, DATABASE_URL is a pooler): give \
                 --direct-database-url (JOBWIRE_DIRECT_DATABASE_URL), or start once with \
                 DATABASE_URL pointing at PostgreSQL itself",
                missing.join(", ")
            )))
        }
    }

    /// Closes every connection, once the statements running have finished.
    pub async fn close(&self) {
        self.hot.clear();
        self.pool.close().await;
        if let Some(listen) = &self.listen {
            listen.close().await;
        }
    }

    /// Runs `statement` on `conn` so that all of it meets one server connection: as it is
    /// when a connection is a session, in a transaction of its own behind a transaction
    /// pooler (which lends a server connection from `BEGIN` to `COMMIT`). Statements that
    /// open their own transaction then open a savepoint in this one.
    async fn pinned<T>(
        &self,
        conn: &mut PgConnection,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        match self.pooling {
            Pooling::Session => statement(conn).await,
            Pooling::Transaction => {
                let mut tx = stale::guard(conn.begin()).await?;
                let out = statement(&mut tx).await?;
                tx.commit().await?;
                Ok(out)
            }
        }
    }

    /// A transaction on a pooled connection, begun under [`stale::guard`].
    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(stale::guard(self.pool.begin()).await?)
    }

    /// Runs one statement on a pooled connection (see [`Store::pinned`]).
    async fn pooled<T>(
        &self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.pool.acquire().await?;
        self.pinned(&mut conn, statement).await
    }

    /// Runs one of the engine's statements on a warm connection (see [`hot`]).
    async fn hot<T>(
        &self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        self.hot
            .run(&self.pool, async |c| self.pinned(c, statement).await)
            .await
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
        self.pooled(async |c| {
            query("SELECT 1").execute(c).await?;
            Ok(())
        })
        .await
    }
}
