//! The end-to-end test harness: real PostgreSQL, the real server binary, real processes.
//!
//! DESIGN.md asks the tests to prove the invariants against what operators run, so nothing here
//! is a fake: [`test_db`] creates a real database, [`ServerProcess`] runs the real
//! `jobwire-server` binary, and [`ChildProcess`] runs any other binary (test workers) so that a
//! test can SIGKILL it. Tests wait on observable state with [`eventually`], never on wall time.
//!
//! Conventions:
//! - `DATABASE_URL` set: each test database is created on that server (its user needs
//!   CREATEDB). Unset: on a private cluster in `JOBWIRE_TEST_PG_DIR`, by default
//!   `<target dir>/jobwire-test-pg`, started through [`EmbeddedPostgres`] and shared by every
//!   test process of a run (its file lock and reuse make that safe). It is left running for the
//!   next test binary; `scripts/test` stops it and removes it after the run.
//! - The server binary is `JOBWIRE_SERVER_BIN`, by default `jobwire-server` in the profile
//!   directory of the running test (`target/debug`). Cargo does not build a dependency's
//!   binaries for tests, so `cargo build -p jobwire-server` must come first; `scripts/test`
//!   does it.
//! - Child processes inherit the environment (`RUST_LOG` included). Their stdout and stderr go
//!   to files in a temporary directory; a process dropped while its test panics prints its
//!   stderr tail.
//!
//! [`jobs`] holds the job types that the tests and the test worker binary share.

pub mod grpcurl;
pub mod jobs;
pub mod workers;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use jobwire_server::embedded_pg::EmbeddedPostgres;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tempfile::TempDir;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// What the server prints on stdout, followed by its address, once it accepts connections.
const READY_PREFIX: &str = "jobwire-server listening on ";

/// How long a server may take to print its ready line: generous, for a loaded CI machine that
/// also runs migrations on a fresh database.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`ServerProcess::restart`] retries while the old port is not yet free.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process may take to exit after SIGTERM (a graceful drain) before the test fails.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many stderr lines a process prints when it is dropped during a failing test.
const TAIL_ON_PANIC: usize = 60;

/// Where test databases are created: resolved once per test process.
static DATABASE_SERVER: OnceCell<DatabaseServer> = OnceCell::const_new();

/// The PostgreSQL server that holds the test databases.
enum DatabaseServer {
    /// `DATABASE_URL`: an existing server; the URL's own database serves for administration.
    External(url::Url),
    /// The private cluster of this run.
    Private(EmbeddedPostgres),
}

impl DatabaseServer {
    async fn get() -> &'static Self {
        DATABASE_SERVER
            .get_or_init(|| async {
                match std::env::var("DATABASE_URL") {
                    Ok(url) if !url.is_empty() => Self::External(
                        url::Url::parse(&url)
                            .unwrap_or_else(|e| panic!("DATABASE_URL {url:?} is not a URL: {e}")),
                    ),
                    _ => {
                        let dir = private_cluster_dir();
                        let pg = EmbeddedPostgres::start(&dir).await.unwrap_or_else(|e| {
                            panic!(
                                "starting the test cluster in {}: {:#}",
                                dir.display(),
                                anyhow::Error::from(e)
                            )
                        });
                        Self::Private(pg)
                    }
                }
            })
            .await
    }

    fn admin_url(&self) -> String {
        match self {
            Self::External(url) => url.to_string(),
            Self::Private(pg) => pg.admin_url(),
        }
    }

    fn database_url(&self, name: &str) -> String {
        match self {
            Self::External(url) => {
                let mut url = url.clone();
                url.set_path(&format!("/{name}"));
                url.to_string()
            }
            Self::Private(pg) => pg.database_url(name),
        }
    }
}

fn private_cluster_dir() -> PathBuf {
    match std::env::var_os("JOBWIRE_TEST_PG_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => match profile_dir().parent() {
            Some(target) => target.join("jobwire-test-pg"),
            None => panic!(
                "the profile directory {} has no parent",
                profile_dir().display()
            ),
        },
    }
}

/// The directory of the build profile the running test came from (`target/debug`): test
/// executables live in its `deps/` subdirectory.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the test executable's directory");
    match dir.file_name().and_then(|name| name.to_str()) {
        Some("deps" | "examples") => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// A database of one's own for one test, dropped when the value is.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    name: String,
    /// Where to connect to drop it.
    admin_url: String,
}

/// Creates a fresh, empty database for one test.
pub async fn test_db() -> TestDb {
    let server = DatabaseServer::get().await;
    let name = format!("jobwire_t_{}", Uuid::now_v7().simple());
    let admin_url = server.admin_url();
    admin_execute(&admin_url, &format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    TestDb {
        url: server.database_url(&name),
        name,
        admin_url,
    }
}

impl TestDb {
    /// The database's connection URL, for `--database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A small pool on the database, for the test's own assertions.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    /// Drops the database, best effort: a leftover one costs disk, not correctness. It runs on
    /// a thread of its own with its own runtime, because `Drop` cannot await and may run inside
    /// or outside the test's runtime.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let outcome = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(admin_execute(&admin_url, &sql))
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: dropping test database {}: {e}", self.name),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

/// Runs one statement on its own connection to the administration database.
async fn admin_execute(admin_url: &str, sql: &str) -> Result<(), String> {
    let mut conn = PgConnection::connect(admin_url)
        .await
        .map_err(|e| format!("connecting to {admin_url}: {e}"))?;
    sqlx::query(AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    conn.close().await.map_err(|e| e.to_string())
}

/// A running `jobwire-server` process on a loopback port, killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    process: ChildProcess,
    addr: SocketAddr,
    /// Every argument but `--listen`, kept for [`ServerProcess::restart`].
    args: Vec<String>,
    /// Stderr of the runs before the last restart, so a tail spans restarts.
    earlier_stderr: String,
}

impl ServerProcess {
    /// Starts the server on `db` with a free port, and waits until it accepts connections.
    /// `extra_args` follow the harness's own `--listen` and `--database-url`.
    pub async fn start(db: &TestDb, extra_args: &[&str]) -> Self {
        let mut args = vec!["--database-url", db.url()];
        args.extend_from_slice(extra_args);
        Self::start_with_args(&args).await
    }

    /// Starts the server with exactly `args` after the harness's `--listen`, for tests that
    /// bring their own database settings (a dedicated cluster, or the embedded default).
    pub async fn start_with_args(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        let (process, addr) = match spawn_server("127.0.0.1:0", &args).await {
            Ok(started) => started,
            Err(failure) => panic!("{failure}"),
        };
        Self {
            process,
            addr,
            args,
            earlier_stderr: String::new(),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a gRPC client connects to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Crashes the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.process.kill()
    }

    /// Asks the server to shut down gracefully (SIGTERM) and returns how it exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate().await
    }

    /// Starts the server again with the same arguments on the same port (killing it first if
    /// it still runs), retrying briefly while the old socket still holds the port.
    pub async fn restart(&mut self) {
        self.process.kill();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let mut run_stderr = vec![self.process.stderr()];
        let process = loop {
            match spawn_server(&listen, &self.args).await {
                Ok((process, _)) => break process,
                Err(failure) if failure.port_in_use() && Instant::now() < deadline => {
                    run_stderr.push(failure.stderr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(failure) => panic!("restarting the server on {listen}: {failure}"),
            }
        };
        self.earlier_stderr.push_str(&run_stderr.concat());
        self.earlier_stderr.push_str("--- restarted ---\n");
        self.process = process;
    }

    /// The last `n` lines the server wrote to stderr, across restarts.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(
            &format!("{}{}", self.earlier_stderr, self.process.stderr()),
            n,
        )
    }
}

/// Why a server did not come up.
struct StartFailure {
    reason: String,
    stderr: String,
}

impl StartFailure {
    /// Whether the server gave up because its port was still taken.
    fn port_in_use(&self) -> bool {
        let stderr = self.stderr.to_ascii_lowercase();
        stderr.contains("address already in use") || stderr.contains("addrinuse")
    }
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; its stderr ends with:\n{}",
            self.reason,
            tail(&self.stderr, TAIL_ON_PANIC)
        )
    }
}

/// Spawns the server listening on `listen` and waits for its ready line.
async fn spawn_server(
    listen: &str,
    args: &[String],
) -> Result<(ChildProcess, SocketAddr), StartFailure> {
    let bin = server_binary();
    let mut all_args = vec!["--listen", listen];
    all_args.extend(args.iter().map(String::as_str));
    // An empty DATABASE_URL counts as unset, so the test's own never leaks into a server that
    // was meant to use the embedded default.
    let mut process = ChildProcess::spawn(&bin, &all_args, &[("DATABASE_URL", "")]);
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(addr) = ready_address(&process.stdout()) {
            return Ok((process, addr));
        }
        if let Some(status) = process.try_status() {
            return Err(StartFailure {
                reason: format!("{} exited before it was ready ({status})", bin.display()),
                stderr: process.stderr(),
            });
        }
        if Instant::now() >= deadline {
            process.kill();
            return Err(StartFailure {
                reason: format!(
                    "{} printed no `{READY_PREFIX}<addr>` line within {READY_TIMEOUT:?}",
                    bin.display()
                ),
                stderr: process.stderr(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The address in the server's ready line, once that line is complete.
fn ready_address(stdout: &str) -> Option<SocketAddr> {
    let complete = &stdout[..stdout.rfind('\n')?];
    complete
        .lines()
        .find_map(|line| line.strip_prefix(READY_PREFIX))
        .map(|addr| {
            addr.trim()
                .parse()
                .unwrap_or_else(|e| panic!("bad address in ready line {addr:?}: {e}"))
        })
}

fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("JOBWIRE_SERVER_BIN").filter(|bin| !bin.is_empty()) {
        return PathBuf::from(bin);
    }
    let bin = profile_dir().join("jobwire-server");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p jobwire-server` first (scripts/test does this)",
        bin.display()
    );
    bin
}

/// Any child process a test starts (a test worker, a client): output captured to files,
/// SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    /// The program, for messages.
    program: PathBuf,
    /// How it exited, once reaped.
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// Holds the output files; removed on drop.
    _logs: TempDir,
}

impl ChildProcess {
    /// Spawns `path` with `args`, the test's environment plus `envs`, and no stdin.
    pub fn spawn(path: impl AsRef<Path>, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let program = path.as_ref().to_path_buf();
        let logs = tempfile::Builder::new()
            .prefix("jobwire-test-proc-")
            .tempdir()
            .expect("a temp dir for process output");
        let stdout_path = logs.path().join("stdout.log");
        let stderr_path = logs.path().join("stderr.log");
        let create = |path: &Path| {
            fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()))
        };
        let child = Command::new(&program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(create(&stdout_path))
            .stderr(create(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        Self {
            child,
            program,
            status: None,
            stdout_path,
            stderr_path,
            _logs: logs,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process exited, if it has; never blocks.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.program.display()));
        }
        self.status
    }

    /// Crashes the process (SIGKILL) and reaps it. A no-op on a process already reaped.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        // Fails only when the process already exited, which `wait` then reports.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("reaping {}: {e}", self.program.display()));
        self.status = Some(status);
        status
    }

    /// Asks the process to stop gracefully (SIGTERM) and waits for it to exit, failing the test
    /// if it takes longer than a minute.
    pub async fn terminate(&mut self) -> ExitStatus {
        if self.try_status().is_none() {
            self.signal(Signal::SIGTERM);
        }
        self.wait(TERMINATE_TIMEOUT).await
    }

    /// Sends `signal` to the process (SIGSTOP and SIGCONT make a hung peer, for example).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_status().is_some() {
            return;
        }
        let pid = i32::try_from(self.pid()).expect("a pid fits in i32");
        signal::kill(Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("sending {signal} to {}: {e}", self.program.display()));
    }

    /// Waits for the process to exit by itself, failing the test (with its stderr tail) after
    /// `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} (pid {}) to exit", self.program.display(), self.pid());
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; its stderr ends with:\n{}",
                    self.stderr_tail(TAIL_ON_PANIC)
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(&self.stderr(), n)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}) stderr, last {TAIL_ON_PANIC} lines ---\n{}",
                self.program.display(),
                self.pid(),
                self.stderr_tail(TAIL_ON_PANIC)
            );
        }
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut tail = lines[lines.len().saturating_sub(n)..].join("\n");
    tail.push('\n');
    tail
}

/// Polls `f` until it returns `Some`, backing off from 5 ms to 100 ms, and panics naming
/// `what` after `timeout`. For awaiting observable state (a row, a process exit, a port), never
/// for asserting how long something takes.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends the test's own `tracing` output to the test writer (shown for failing tests),
/// filtered by `RUST_LOG` (default `info`). Safe to call from every test.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Fails only if another subscriber is installed already, which is as good.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
