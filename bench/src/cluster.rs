//! The system under test: a PostgreSQL (DATABASE_URL's, or a private one), a fresh database per
//! workload, jobwire-server processes built in the same profile as this binary, and worker
//! subprocesses (this binary's hidden `worker` command, see `crate::worker`).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use jobwire::Client;
use jobwire_server::embedded_pg::EmbeddedPostgres;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, BufReader as AsyncBufReader, Lines},
    process::{ChildStdin, ChildStdout},
};

use crate::worker::Handler;

/// Whether servers require API keys (the bench's `--api-keys`): each server's database then
/// gets an admin key before the server starts, which its clients and workers send.
static API_KEYS: AtomicBool = AtomicBool::new(false);

/// Makes every server started from now on require API keys.
pub fn require_api_keys() {
    API_KEYS.store(true, Ordering::Relaxed);
}

/// The server arguments of the bench's `--prune-after`: a retention short enough that the
/// pruner deletes finished jobs while a workload runs. Unset: the server's default retention,
/// which no workload outlasts.
static PRUNING: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Makes every server started from now on prune finished jobs `after` their end (at least a
/// second, the server's least retention), checking as often. Archived as they go (`archive`),
/// with event partitions of that span; or discarded, with event partitions of an hour so that
/// the events that count them outlast the workload.
pub fn prune_after(after: Duration, archive: bool) {
    let span = format!("{}ms", after.as_millis());
    let mut args = vec![
        "--retention".to_owned(),
        span.clone(),
        "--prune-interval".to_owned(),
        span.clone(),
        "--event-partition-interval".to_owned(),
    ];
    if archive {
        args.extend([span, "--archive".to_owned()]);
    } else {
        args.push("1h".to_owned());
    }
    let _ = PRUNING.set(args);
}

/// Whether servers prune (`--prune-after`).
pub fn pruning() -> bool {
    PRUNING.get().is_some()
}

/// How long a worker subprocess may take to drain and exit once told to stop.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(30);

/// Where databases come from.
pub enum Postgres {
    External(String),
    Private {
        pg: Option<EmbeddedPostgres>,
        _dir: tempfile::TempDir,
    },
}

impl Postgres {
    /// `DATABASE_URL` when set, otherwise a private cluster in a temporary directory.
    pub async fn start() -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok(Self::External(url)),
            _ => {
                let dir = tempfile::tempdir()?;
                let pg = EmbeddedPostgres::start(dir.path()).await?;
                Ok(Self::Private {
                    pg: Some(pg),
                    _dir: dir,
                })
            }
        }
    }

    fn admin_url(&self) -> anyhow::Result<String> {
        match self {
            Self::External(url) => Ok(url.clone()),
            Self::Private { pg: Some(pg), .. } => Ok(pg.admin_url()),
            Self::Private { pg: None, .. } => bail!("the private cluster has stopped"),
        }
    }

    /// A new, empty database for one workload.
    pub async fn fresh_database(&self, name: &str) -> anyhow::Result<String> {
        let admin = self.admin_url()?;
        let mut conn = PgConnection::connect(&admin).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        // As the peer scripts do before each workload: a checkpoint under way during a run
        // writes pages beside it, and after one starts, the first change of each page logs the
        // whole page. Starting every run just after one makes runs alike, and like the peer's.
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        Ok(match self {
            Self::External(url) => {
                let (base, _) = url.rsplit_once('/').context("DATABASE_URL has no path")?;
                let query = url
                    .split_once('?')
                    .map(|(_, q)| format!("?{q}"))
                    .unwrap_or_default();
                format!("{base}/{name}{query}")
            }
            Self::Private { pg: Some(pg), .. } => pg.database_url(name),
            Self::Private { pg: None, .. } => bail!("the private cluster has stopped"),
        })
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Self::Private { pg, .. } = &mut self
            && let Some(pg) = pg.take()
        {
            pg.stop().await?;
        }
        Ok(())
    }
}

/// A jobwire-server process, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    /// The key its clients send, when it requires keys.
    pub api_key: Option<String>,
}

/// The server binary next to this one (same profile).
fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("JOBWIRE_SERVER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("binary directory")?
        .join("jobwire-server");
    if !bin.exists() {
        bail!(
            "{} is missing: build it in the same profile (cargo build --release -p jobwire-server)",
            bin.display()
        );
    }
    Ok(bin)
}

/// An admin key of the default tenant, made in `database_url` with `jobwire-server keys create`
/// (an admin may also connect as a worker).
fn admin_key(database_url: &str) -> anyhow::Result<String> {
    let output = Command::new(server_binary()?)
        .args(["--database-url", database_url, "keys", "create"])
        .args([
            "--tenant",
            "default",
            "--role",
            "admin",
            "--name",
            "jobwire-bench",
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        bail!("jobwire-server keys create failed: {}", output.status);
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// The runtime threads of this process, which its worker subprocesses run with too (see the
/// bench's `--client-threads`).
/// The server's database flags: `database_url`, or with `JOBWIRE_BENCH_PGBOUNCER=<host>:<port>`
/// the same database through the PgBouncer (transaction pooling) listening there, with
/// `database_url` as the direct connection for LISTEN and migrations: what a pooler costs.
fn database_args(database_url: &str) -> anyhow::Result<Vec<String>> {
    let pooler = match std::env::var("JOBWIRE_BENCH_PGBOUNCER") {
        Ok(pooler) if !pooler.is_empty() => pooler,
        _ => return Ok(vec!["--database-url".into(), database_url.into()]),
    };
    let (host, port) = pooler
        .rsplit_once(':')
        .context("JOBWIRE_BENCH_PGBOUNCER is <host>:<port>")?;
    let mut pooled = url::Url::parse(database_url)?;
    pooled.set_host(Some(host))?;
    pooled
        .set_port(Some(port.parse()?))
        .map_err(|()| anyhow::anyhow!("{database_url} takes no port"))?;
    pooled.set_query(None);
    Ok(vec![
        "--database-url".into(),
        pooled.into(),
        "--database-pooling".into(),
        "transaction".into(),
        "--direct-database-url".into(),
        database_url.into(),
    ])
}

fn client_threads() -> usize {
    tokio::runtime::Handle::current().metrics().num_workers()
}

impl Server {
    pub fn start(database_url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_at("127.0.0.1:0", database_url, extra)
    }

    /// A server listening on `listen` (a replica restarted where it was).
    pub fn start_at(listen: &str, database_url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let api_key = if API_KEYS.load(Ordering::Relaxed) {
            Some(admin_key(database_url)?)
        } else {
            None
        };
        let mut child = Command::new(server_binary()?)
            .args(["--listen", listen])
            .args(database_args(database_url)?)
            // A workload that sets its own retention (SOAK) keeps it.
            .args(
                PRUNING
                    .get()
                    .filter(|_| !extra.contains(&"--retention"))
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("jobwire-server listening on ")
            .with_context(|| format!("unexpected first line from the server: {line:?}"))?;
        Ok(Self {
            url: format!("http://{addr}"),
            child,
            api_key,
        })
    }

    /// A client of this server, with its key when it requires one.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let mut builder = Client::builder(self.url.clone());
        if let Some(key) = &self.api_key {
            builder = builder.api_key(key.clone());
        }
        Ok(builder.connect().await?)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Crashes the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory so far, in MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.status_mib("VmHWM:")
    }

    /// Resident memory now, in MiB (VmRSS).
    pub fn rss_mib(&self) -> Option<f64> {
        self.status_mib("VmRSS:")
    }

    fn status_mib(&self, key: &str) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC channel to a server.
pub async fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// A worker subprocess serving one job type through the SDK; killed on drop.
pub struct WorkerProcess {
    child: tokio::process::Child,
    /// Held open while the worker should serve: end of file is its signal to drain. Kept out of
    /// `child`, whose `wait` would close it.
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
}

impl WorkerProcess {
    /// Starts `jobwire-bench worker` against `server` (with its key) with `slots` and `prefetch` and, when
    /// given, the SDK's progress interval (its default otherwise). It connects in the
    /// background; a workload that needs it connected waits for a warm-up job.
    pub fn start(
        server: &Server,
        handler: Handler,
        (slots, prefetch): (usize, usize),
        progress_interval: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let handler = clap::ValueEnum::to_possible_value(&handler)
            .context("handler name")?
            .get_name()
            .to_owned();
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("worker")
            .args(["--url", &server.url, "--handler", &handler])
            .args(["--concurrency", &slots.to_string()])
            .args(["--prefetch", &prefetch.to_string()])
            .args(["--client-threads", &client_threads().to_string()]);
        if let Some(interval) = progress_interval {
            command.args(["--progress-interval-ms", &interval.as_millis().to_string()]);
        }
        if let Some(key) = &server.api_key {
            command.env("JOBWIRE_API_KEY", key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
        })
    }

    /// `None` once the worker has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The worker's measurement lines (see `crate::worker`); there is one reader, so this
    /// succeeds once.
    pub fn lines(&mut self) -> anyhow::Result<Lines<AsyncBufReader<ChildStdout>>> {
        Ok(
            AsyncBufReader::new(self.stdout.take().context("the worker's stdout is taken")?)
                .lines(),
        )
    }

    /// Runs `work`, failing instead if the worker exits first (so a crashed worker ends the
    /// workload at once rather than at its timeout).
    pub async fn while_running<T>(
        &mut self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::select! {
            result = work => result,
            status = self.child.wait() => bail!("the worker exited early ({})", status?),
        }
    }

    /// Closes the worker's stdin, so it drains and exits; kills it if that takes longer than
    /// [`WORKER_STOP_GRACE`]. Fails when it did not exit cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(WORKER_STOP_GRACE, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the worker exited with {status}");
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("the worker did not stop within {WORKER_STOP_GRACE:?}")
            }
        }
    }
}
