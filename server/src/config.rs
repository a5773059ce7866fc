//! Server configuration, from flags and environment variables.
//!
//! Validated once at start-up so the engine can trust every value it reads.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{api::auth::Role, engine::pruner::PrunerConfig, store::Archive};
use jobwire_proto::limits::MAX_PAYLOAD_BYTES;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How the connections of DATABASE_URL keep their PostgreSQL session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pooling {
    /// A connection is one session while it is open: direct, or a pooler in session mode.
    Session,
    /// A pooler lends a server connection per transaction (PgBouncer pool_mode=transaction).
    Transaction,
}

/// jobwire-server: a durable job queue served over gRPC, backed by PostgreSQL.
#[derive(Debug, Clone, Parser)]
#[command(name = "jobwire-server", version, about)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve gRPC on.
    ///
    /// Port 0 picks a free port; the chosen address is printed on stdout once the server
    /// answers health checks.
    #[arg(long, env = "JOBWIRE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Serve Prometheus metrics on this address, at `/metrics` (default: none).
    ///
    /// Plain HTTP, without authentication: bind it to an address only the scraper reaches.
    /// docs/operations.md ("Metrics") lists every metric.
    #[arg(long, env = "JOBWIRE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317` (default:
    /// no export).
    ///
    /// Spans of enqueues, claims and settles are children of the trace context (`traceparent`
    /// metadata) each job was enqueued with.
    #[arg(long, env = "JOBWIRE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// This replica's name, shown with each worker connected to it (ListWorkers).
    ///
    /// Default: `<hostname>:<port>`, the host and the port it serves on.
    #[arg(long, env = "JOBWIRE_REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// Serve without API keys on a non-loopback address.
    ///
    /// Until the first API key exists, a server on a loopback address serves every call open
    /// (with a warning); on any other address it refuses to start unless this is given. Once
    /// a key exists, every call needs one, whatever this says.
    #[arg(long, env = "JOBWIRE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// PostgreSQL to use (default: a private cluster in --data-dir).
    ///
    /// Without it the server starts a private PostgreSQL cluster of its own in --data-dir,
    /// from the machine's PostgreSQL server binaries, and stops it on exit.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// How DATABASE_URL's connections keep their session.
    ///
    /// `session`: each connection is one PostgreSQL session for as long as it is open (a direct
    /// connection, or a pooler in session mode). `transaction`: a pooler hands each transaction
    /// whichever server connection is free (PgBouncer's pool_mode=transaction); the server then
    /// runs every statement in a transaction of its own with unnamed prepared statements, sends
    /// no session settings, and takes LISTEN and migrations to --direct-database-url. Without
    /// that, notifications are off: work, stops and drains are found by polling
    /// (--poll-interval and the workers' heartbeats), and the schema must already be migrated.
    #[arg(
        long,
        env = "JOBWIRE_DATABASE_POOLING",
        value_enum,
        default_value = "session"
    )]
    pub database_pooling: Pooling,

    /// A direct connection to PostgreSQL for LISTEN and migrations, bypassing a pooler.
    ///
    /// What needs one session for its whole life: the connection listening for notifications,
    /// and the migrations (under their advisory lock). Default: DATABASE_URL itself with
    /// `--database-pooling session`; none with `transaction`.
    #[arg(long, env = "JOBWIRE_DIRECT_DATABASE_URL", hide_env_values = true)]
    pub direct_database_url: Option<String>,

    /// Where the private PostgreSQL cluster lives when no DATABASE_URL is given.
    #[arg(long, env = "JOBWIRE_DATA_DIR", default_value = ".jobwire")]
    pub data_dir: PathBuf,

    /// Log format on stderr.
    ///
    /// The level comes from RUST_LOG (default `info`, with PostgreSQL's notices at `warn`).
    #[arg(long, env = "JOBWIRE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How long a lease lasts without a heartbeat before its job is retried elsewhere.
    #[arg(long, env = "JOBWIRE_LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    pub lease_duration: Duration,

    /// How often workers heartbeat; at most a third of the lease duration.
    #[arg(long, env = "JOBWIRE_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,

    /// Safety-net poll for work when no notification arrives.
    ///
    /// It is also the longest the scheduler sleeps between looks for due jobs.
    #[arg(long, env = "JOBWIRE_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub poll_interval: Duration,

    /// How often watch streams look for new events while anyone watches.
    #[arg(long, env = "JOBWIRE_WATCH_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "5ms")]
    pub watch_poll_interval: Duration,

    /// When to log a transaction that holds watch delivery up.
    ///
    /// How long watch delivery may be held up by a transaction in progress (an event number it
    /// holds, or a replica's first horizon it delays) before the server logs which transaction,
    /// and again each time as long again passes.
    #[arg(long, env = "JOBWIRE_WATCH_STALL_WARNING", value_parser = humantime::parse_duration, default_value = "10s")]
    pub watch_stall_warning: Duration,

    /// How long an event may wait for a slow watch stream.
    ///
    /// How long an event may wait for a watch stream to take it before the stream counts as
    /// fallen behind: it is then ended with RESOURCE_EXHAUSTED naming the sequence to resume
    /// after. Bursts that a stream keeps up with wait whole, however many events they hold.
    #[arg(long, env = "JOBWIRE_WATCH_LAG_LIMIT", value_parser = humantime::parse_duration, default_value = "15s")]
    pub watch_lag_limit: Duration,

    /// Open watch streams allowed per client connection.
    ///
    /// Watch streams (WatchJob and WatchJobs) one client connection may hold open at once;
    /// beyond it a new one is refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "JOBWIRE_MAX_WATCHES_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_watches_per_connection: usize,

    /// How long a worker has to stop a job it was told to stop.
    ///
    /// How long a worker has to stop a running job after a cancel or a pause (or past its
    /// timeout) before its lease is no longer renewed.
    #[arg(long, env = "JOBWIRE_STOP_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub stop_grace: Duration,

    /// How long leadership lasts without a renewal.
    ///
    /// The leader renews it every third of this: a leader that stalls loses the role this long
    /// after its last renewal, at most, and another replica takes the singleton loops (reaper,
    /// timers, cron) over.
    #[arg(long, env = "JOBWIRE_LEADER_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub leader_ttl: Duration,

    /// How often the leader looks for lapsed leases.
    #[arg(long, env = "JOBWIRE_REAP_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub reap_interval: Duration,

    /// How long finished jobs are kept, in queues that set no retention of their own.
    ///
    /// A job that SUCCEEDED, FAILED or was CANCELLED this long ago is pruned by the leader,
    /// with its attempts; its idempotency key is free again. Queues set their own with
    /// UpdateQueue (`jobwire queues set NAME --retention 7d`). Events are kept as long as the
    /// longest retention of any queue. See docs/operations.md, retention.
    #[arg(long, env = "JOBWIRE_RETENTION", value_parser = humantime::parse_duration, default_value = "30days")]
    pub retention: Duration,

    /// Copy pruned jobs, attempts and events to the archive tables first.
    ///
    /// `jobs_archive`, `job_attempts_archive` and `job_events_archive`, in the same
    /// transaction as the pruning; nothing prunes the archive itself.
    #[arg(long, env = "JOBWIRE_ARCHIVE")]
    pub archive: bool,

    /// How often the leader prunes finished jobs past their retention.
    #[arg(long, env = "JOBWIRE_PRUNE_INTERVAL", value_parser = humantime::parse_duration, default_value = "1m")]
    pub prune_interval: Duration,

    /// The span of time each partition of the event log covers.
    ///
    /// Old events go by dropping whole partitions once every event in one is older than the
    /// longest retention, so events outlive that retention by up to one span. Every read of
    /// the log visits each partition's index, so fewer, longer spans keep the watchers' reads
    /// cheap (a week: five or six partitions at the default retention). Partitions are made
    /// ahead of time (three spans, and at least three prune intervals).
    #[arg(long, env = "JOBWIRE_EVENT_PARTITION_INTERVAL", value_parser = humantime::parse_duration, default_value = "7days")]
    pub event_partition_interval: Duration,

    /// Largest payload, result or checkpoint accepted, in bytes.
    ///
    /// At most 1 MiB, the protocol's own limit.
    #[arg(long, env = "JOBWIRE_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Streams (worker connections, WatchJob, WatchJobs) one API key may hold open at once on
    /// this replica, unless the key sets its own limit: a client that leaks streams is refused
    /// more (RESOURCE_EXHAUSTED) before it exhausts the replica for other keys.
    #[arg(long, env = "JOBWIRE_MAX_STREAMS_PER_KEY", default_value_t = 1000)]
    pub max_streams_per_key: u32,

    /// Size of the PostgreSQL connection pool.
    ///
    /// The engine's batch statements (claims, settles, progress, enqueues, event reads) reuse
    /// the connections they used last, newest first, and keep up to half of the pool idle
    /// between them, so that they run on warm connections.
    #[arg(long, env = "JOBWIRE_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// Threads of the async runtime (default: one per core).
    ///
    /// On a host it shares with PostgreSQL or busy neighbours, fewer threads wake each other
    /// less, which can help closed-loop callers of single enqueues but delivers a burst of
    /// progress reports later: a setting to measure per host; see `docs/performance.md`.
    #[arg(long, env = "JOBWIRE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// How long in-flight work may take to finish on SIGTERM.
    ///
    /// After it the server stops anyway, whatever is still in flight.
    #[arg(long, env = "JOBWIRE_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub shutdown_timeout: Duration,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    ///
    /// The server's certificate first, then any intermediates. With it every connection is
    /// TLS and plaintext clients are refused; clients trust the issuing CA (grpcurl `-cacert`,
    /// the SDKs' TLS settings).
    #[arg(long, env = "JOBWIRE_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "JOBWIRE_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates issued by this CA (PEM): mutual TLS.
    ///
    /// A client that presents no certificate, or one this CA did not sign, is refused during
    /// the handshake. Needs --tls-cert and --tls-key.
    #[arg(long, env = "JOBWIRE_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
}

/// What to do instead of serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Make, list and revoke API keys, in the database the server would use.
    ///
    /// This is how the first admin key of a deployment is made; after it, admins can use
    /// ApiKeyService. It takes the same --database-url (or --data-dir) as the server.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Make a key: its secret goes to stdout, once, and its details to stderr.
    ///
    /// Example: `KEY=$(jobwire-server keys create --tenant acme --role admin)`, then send
    /// `authorization: Bearer $KEY`.
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// A role the key holds (repeat for more).
        #[arg(long = "role", value_enum, required = true)]
        roles: Vec<Role>,
        /// Who the key is for, as logs show it.
        #[arg(long, default_value = "made by jobwire-server keys create")]
        name: String,
        /// How long the key lasts (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Calls a second the key may make on each replica (default: no limit).
        #[arg(long)]
        rate: Option<f64>,
        /// Calls the key may make at once after a quiet spell (default: the rate rounded up).
        #[arg(long, requires = "rate")]
        burst: Option<i32>,
        /// Streams (worker connections, watches) the key may hold open at once on each
        /// replica (default: the server's --max-streams-per-key).
        #[arg(long)]
        max_streams: Option<i32>,
    },
    /// List a tenant's keys (never their secrets).
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a key: calls with it are refused within seconds on every replica.
    Revoke {
        #[arg(long)]
        tenant: String,
        /// The key's id (the UUID in `jw_<id>_...`, as `keys list` shows it).
        id: uuid::Uuid,
    },
}

/// Concurrent calls (streams included) on one client connection. Dashboards multiplex many
/// watch streams over one connection; hyper's default of 200 would leave their unary calls
/// waiting for a free stream.
pub const MAX_STREAMS_PER_CONNECTION: usize = 2048;

/// The shortest and longest retention of finished jobs, for the server's default and each
/// queue's own: under a second is no retention at all, and beyond ten years is forever.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// More runtime threads than this is a typo, not a tuning.
const MAX_WORKER_THREADS: usize = 1024;

/// A setting that cannot work, named for the flag.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

impl Config {
    /// The pruner's settings.
    pub fn pruner(&self) -> PrunerConfig {
        PrunerConfig {
            default_retention: self.retention,
            archive: if self.archive {
                Archive::Keep
            } else {
                Archive::Discard
            },
            interval: self.prune_interval,
            partition_interval: self.event_partition_interval,
        }
    }

    /// Checks the relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |flag, message: &str| {
            Err(ConfigError {
                flag,
                message: message.to_owned(),
            })
        };
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return fail(
                "otlp-endpoint",
                "must be an http:// or https:// URL, such as http://127.0.0.1:4317",
            );
        }
        if self.lease_duration < Duration::from_millis(100) {
            return fail("lease-duration", "must be at least 100ms");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 3 > self.lease_duration {
            return fail(
                "heartbeat-interval",
                "must be positive and at most a third of --lease-duration",
            );
        }
        if self.poll_interval < Duration::from_millis(10) {
            return fail("poll-interval", "must be at least 10ms");
        }
        if self.watch_poll_interval < Duration::from_millis(1) {
            return fail("watch-poll-interval", "must be at least 1ms");
        }
        if self.watch_stall_warning < Duration::from_millis(100) {
            return fail("watch-stall-warning", "must be at least 100ms");
        }
        if self.watch_lag_limit < Duration::from_millis(100) {
            return fail("watch-lag-limit", "must be at least 100ms");
        }
        if !(1..=MAX_STREAMS_PER_CONNECTION).contains(&self.max_watches_per_connection) {
            return fail(
                "max-watches-per-connection",
                &format!(
                    "must be between 1 and {MAX_STREAMS_PER_CONNECTION}, the streams a \
                     connection may hold in all"
                ),
            );
        }
        if !(Duration::from_millis(300)..=Duration::from_secs(600)).contains(&self.leader_ttl) {
            return fail("leader-ttl", "must be between 300ms and 10m");
        }
        if self.reap_interval < Duration::from_millis(10) {
            return fail("reap-interval", "must be at least 10ms");
        }
        if !(MIN_RETENTION..=MAX_RETENTION).contains(&self.retention) {
            return fail("retention", "must be between 1s and 3650days");
        }
        if self.prune_interval < Duration::from_millis(100) {
            return fail("prune-interval", "must be at least 100ms");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(31 * 24 * 3600))
            .contains(&self.event_partition_interval)
        {
            return fail("event-partition-interval", "must be between 1s and 31days");
        }
        if self.max_streams_per_key == 0 {
            return fail("max-streams-per-key", "must be at least 1");
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > MAX_PAYLOAD_BYTES {
            return fail(
                "max-payload-bytes",
                &format!(
                    "must be between 1 and {MAX_PAYLOAD_BYTES}: every message the protocol \
                     sends must fit its 4 MiB budget"
                ),
            );
        }
        if self.db_max_connections < 4 {
            return fail("db-max-connections", "must be at least 4");
        }
        if self
            .worker_threads
            .is_some_and(|n| n == 0 || n > MAX_WORKER_THREADS)
        {
            return fail(
                "worker-threads",
                &format!("must be between 1 and {MAX_WORKER_THREADS}"),
            );
        }
        if self.database_pooling == Pooling::Transaction
            && self.database_url.as_deref().is_none_or(str::is_empty)
        {
            return fail(
                "database-pooling",
                "transaction needs a DATABASE_URL (the pooler's); the private cluster has none",
            );
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return fail("tls-cert", "needs --tls-key, the certificate's key"),
            (None, Some(_)) => return fail("tls-key", "needs --tls-cert, the key's certificate"),
            (None, None) if self.tls_client_ca.is_some() => {
                return fail(
                    "tls-client-ca",
                    "needs --tls-cert and --tls-key: client certificates are checked only on TLS",
                );
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(args: &[&str]) -> Result<(), ConfigError> {
        let mut all = vec!["jobwire-server"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("flags parse").validate()
    }

    #[test]
    fn tls_flags_come_together() {
        assert!(validate(&[]).is_ok());
        assert!(validate(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_ok());
        assert!(
            validate(&[
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--tls-client-ca",
                "ca.pem"
            ])
            .is_ok()
        );
        let flag = |args: &[&str]| validate(args).expect_err("refused").flag;
        assert_eq!(flag(&["--tls-cert", "c.pem"]), "tls-cert");
        assert_eq!(flag(&["--tls-key", "k.pem"]), "tls-key");
        assert_eq!(flag(&["--tls-client-ca", "ca.pem"]), "tls-client-ca");
    }
}
