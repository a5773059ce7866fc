//! A private PostgreSQL cluster run from the machine's own PostgreSQL binaries.
//!
//! jobwire keeps all of its state in PostgreSQL. So that `jobwire-server` runs with no setup, and
//! so that the end-to-end tests need no database server of their own, this module runs a cluster
//! of its own in a data directory: `initdb` once, `pg_ctl start` as a daemon, one database per
//! name asked for. It is the server's embedded default and the test harness's private cluster;
//! production points `--database-url` at a real PostgreSQL instead.
//!
//! What it guarantees:
//! - **No collision** with any other PostgreSQL on the machine: the cluster listens on no TCP
//!   port at all, only on a Unix socket in a directory of its own.
//! - **Durability stays PostgreSQL's default** (fsync and synchronous commit on), so invariant 1
//!   of docs/architecture.md holds on the embedded cluster as on any other.
//! - **The cluster outlives its starter.** It is a daemon (`pg_ctl start`): a killed server
//!   leaves it running and the next start reuses it, so a crash of jobwire is never a crash of
//!   its database. Concurrent starters (test processes of one run, a restarted server) agree
//!   through an exclusive lock on `<data_dir>/lock`, held while initialising or starting.
//! - **It stops only by its own pid** (from `postmaster.pid`), never by process name, so it can
//!   never stop somebody else's PostgreSQL.
//!
//! PostgreSQL refuses to run as root. When we are root, the cluster's directories are handed to
//! the `postgres` user and `initdb` / `pg_ctl` run as that user; we never create users.
//!
//! Layout of `<data_dir>`: `pgdata/` (the cluster), `run/` (the socket directory, unless its path
//! is too long for a Unix socket: then `/tmp/jobwire-pg-<hash>`), `postgres.log`, `lock`.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The port number of the cluster. It names the socket file (`.s.PGSQL.5432`) and nothing else:
/// the cluster listens on no TCP port, and its socket directory is its own.
const PORT: u16 = 5432;

/// Longest path of a Unix socket that PostgreSQL accepts: `sun_path` is 108 bytes on Linux,
/// including the terminating NUL.
const SOCKET_PATH_MAX: usize = 107;

/// How long `pg_ctl start -w` may wait for the cluster to accept connections (crash recovery
/// after an unclean stop can take a while).
const START_TIMEOUT_SECS: u32 = 60;

/// How long a start waits for a cluster that another process is starting or stopping.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `stop` waits for the postmaster to finish a fast shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Interval between two looks at `postmaster.pid` while waiting for a state change.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Where Debian installs each PostgreSQL major version, `<root>/<version>/bin`.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// The database superuser that `initdb` creates and every URL of this module names.
const SUPERUSER: &str = "postgres";

/// The OS user PostgreSQL runs as when we are root.
const OS_USER: &str = "postgres";

/// Settings file written into the cluster at every start and included by `postgresql.conf`, so
/// the socket directory follows the data directory and no setting needs shell quoting.
const SETTINGS_FILE: &str = "jobwire.conf";

/// Why the embedded cluster could not be started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    /// No directory holds `initdb`, `pg_ctl` and `postgres` together.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH nor under \
         {DEBIAN_PG_ROOT}/*/bin: install the Debian package postgresql (apt-get install \
         postgresql) or put initdb/pg_ctl on PATH"
    )]
    BinariesNotFound,

    /// We are root, and PostgreSQL refuses to run as root, but there is no user to run it as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `{OS_USER}` user \
         to run it as: run jobwire as a non-root user, or install the Debian package postgresql \
         (which creates that user)"
    )]
    NoPostgresUser,

    /// We are root and have no tool to run a command as the `postgres` user.
    #[error(
        "running as root, but neither setpriv nor runuser is on PATH to run PostgreSQL as the \
         `{OS_USER}` user: install the Debian package util-linux"
    )]
    NoUserSwitchTool,

    /// The `postgres` user could not reach the data directory through its parents.
    #[error(
        "the `{OS_USER}` user cannot reach {path}: every parent directory of the data directory \
         must be searchable by it (chmod o+x), or choose a data directory elsewhere"
    )]
    Unreachable {
        /// The first parent directory the `postgres` user cannot search.
        path: PathBuf,
    },

    /// The short socket directory under /tmp exists but belongs to another user.
    #[error("socket directory {path} exists but belongs to another user (uid {owner})")]
    ForeignSocketDir {
        /// The socket directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
    },

    /// Another server holds the data directory.
    #[error(
        "the data directory {path} is in use by another jobwire-server ({holder}): stop that \
         server, give this one a data directory of its own (--data-dir), or point both at one \
         PostgreSQL (--database-url) to run them side by side"
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// What the holder wrote into the lock file (its pid).
        holder: String,
    },

    /// A file system operation failed.
    #[error("{action} {path}")]
    Io {
        /// What we were doing, as a verb phrase.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A PostgreSQL command ran and failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line, for the operator to rerun.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// Its output, and the tail of the server log where that explains more.
        output: String,
    },

    /// `postmaster.pid` could not be understood.
    #[error("{path} is malformed")]
    BadPidFile {
        /// The file.
        path: PathBuf,
    },

    /// Signalling the postmaster failed.
    #[error("sending {signal} to the postmaster (pid {pid})")]
    Signal {
        /// The signal.
        signal: Signal,
        /// The postmaster's pid.
        pid: i32,
        /// The underlying error.
        #[source]
        source: Errno,
    },

    /// The postmaster did not exit within [`STOP_TIMEOUT`] after a fast shutdown request.
    #[error("the postmaster (pid {pid}) did not stop within {timeout:?}")]
    StopTimeout {
        /// The postmaster's pid.
        pid: i32,
        /// How long we waited.
        timeout: Duration,
    },

    /// Creating a database, or connecting to do so, failed.
    #[error("creating database {name}")]
    Database {
        /// The database asked for.
        name: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// The blocking start-up task panicked or was cancelled.
    #[error("the start-up task did not finish")]
    Task(#[from] tokio::task::JoinError),
}

/// A server's hold on a data directory, for as long as it serves: one data directory, one
/// server. A second server started on it (a replica meant to be started with its own
/// `--data-dir`, or an accidental second start) is refused rather than allowed to adopt the
/// cluster, which it would stop under the first when it exited.
#[derive(Debug)]
pub struct DataDirClaim {
    /// Holds the exclusive lock on `<data_dir>/server.lock`; the operating system releases it
    /// when the process ends, however it ends.
    _file: fs::File,
}

impl DataDirClaim {
    /// Takes the data directory for this process, creating it if needed.
    pub fn take(data_dir: &Path) -> Result<Self, EmbeddedPgError> {
        create_dir(data_dir, 0o755)?;
        let path = data_dir.join("server.lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(EmbeddedPgError::InUse {
                    path: data_dir.to_path_buf(),
                    holder: holder.trim().to_owned(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(EmbeddedPgError::Io {
                    action: "locking",
                    path,
                    source,
                });
            }
        }
        // Who holds it, for the message a second server prints.
        file.set_len(0).map_err(io_error("writing", &path))?;
        write!(file, "pid {}", std::process::id()).map_err(io_error("writing", &path))?;
        Ok(Self { _file: file })
    }
}

/// A running private cluster.
///
/// Dropping this handle leaves the cluster running on purpose: it is a daemon shared by whoever
/// starts on the same data directory. Call [`EmbeddedPostgres::stop`] to stop it.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    /// The directory everything of this cluster lives in.
    data_dir: PathBuf,
    /// The directory of the socket the cluster listens on, as the postmaster reported it, so a
    /// reused cluster is reached where it really listens.
    socket_dir: PathBuf,
    /// The port number in the socket file's name.
    port: u16,
    /// The postmaster's pid when this handle was made.
    pid: i32,
}

impl EmbeddedPostgres {
    /// Starts the cluster in `data_dir`, initialising it first if needed, or reuses it when it
    /// is already running. Returns once it accepts connections.
    pub async fn start(data_dir: &Path) -> Result<Self, EmbeddedPgError> {
        let data_dir = std::path::absolute(data_dir).map_err(|source| EmbeddedPgError::Io {
            action: "resolving",
            path: data_dir.to_path_buf(),
            source,
        })?;
        tokio::task::spawn_blocking(move || start_blocking(data_dir)).await?
    }

    /// Creates the database `name` unless it exists. Safe to race with other callers.
    pub async fn ensure_database(&self, name: &str) -> Result<(), EmbeddedPgError> {
        let failed = |source| EmbeddedPgError::Database {
            name: name.to_owned(),
            source,
        };
        let mut conn = PgConnection::connect(&self.admin_url())
            .await
            .map_err(failed)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .map_err(failed)?;
        if !exists {
            let create = format!("CREATE DATABASE {}", quote_ident(name));
            match sqlx::query(AssertSqlSafe(create)).execute(&mut conn).await {
                Ok(_) => {}
                // Another caller created it between our check and our CREATE.
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
                Err(source) => return Err(failed(source)),
            }
        }
        conn.close().await.map_err(failed)
    }

    /// A connection URL for database `dbname` on this cluster's Unix socket.
    pub fn database_url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{}?host={}&port={}",
            percent_encode(dbname, false),
            percent_encode(&self.socket_dir.to_string_lossy(), true),
            self.port
        )
    }

    /// A connection URL for the `postgres` maintenance database, for creating and dropping
    /// databases.
    pub fn admin_url(&self) -> String {
        self.database_url("postgres")
    }

    /// The postmaster's pid when this handle was made.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The data directory this cluster was started on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Crashes the cluster, as a power cut or the OOM killer would: SIGKILL to the postmaster
    /// and every server process (its process group, as `pg_ctl` makes it a session leader), no
    /// shutdown checkpoint. Returns once they are all dead, so that the next
    /// [`EmbeddedPostgres::start`] runs crash recovery instead of finding a dying cluster. For
    /// tests of durability (invariant 1 of docs/architecture.md).
    pub async fn kill(self) -> Result<(), EmbeddedPgError> {
        let pid = self.pid;
        let target = Pid::from_raw(pid);
        let sent = if nix::unistd::getpgid(Some(target)) == Ok(target) {
            signal::killpg(target, Signal::SIGKILL)
        } else {
            signal::kill(target, Signal::SIGKILL)
        };
        match sent {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(source) => {
                return Err(EmbeddedPgError::Signal {
                    signal: Signal::SIGKILL,
                    pid,
                    source,
                });
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while group_alive(pid) {
            if Instant::now() >= deadline {
                return Err(EmbeddedPgError::StopTimeout {
                    pid,
                    timeout: STOP_TIMEOUT,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    /// Stops the cluster with a fast shutdown (SIGINT to the postmaster named in
    /// `postmaster.pid`: sessions are ended, committed work is safe) and waits until it is gone.
    pub async fn stop(self) -> Result<(), EmbeddedPgError> {
        let pgdata = self.data_dir.join("pgdata");
        let Some(postmaster) = Postmaster::read(&pgdata)? else {
            return Ok(());
        };
        let pid = postmaster.pid;
        match signal::kill(Pid::from_raw(pid), Signal::SIGINT) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(()),
            Err(source) => {
                return Err(EmbeddedPgError::Signal {
                    signal: Signal::SIGINT,
                    pid,
                    source,
                });
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        // Gone means: the postmaster removed its pid file (a clean exit), or the process no
        // longer exists (a zombie waiting for its reaper still counts as existing, hence both).
        while postmaster_pid_file(&pgdata).exists() && process_exists(pid) {
            if Instant::now() >= deadline {
                return Err(EmbeddedPgError::StopTimeout {
                    pid,
                    timeout: STOP_TIMEOUT,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        if !postmaster.socket_dir.starts_with(&self.data_dir) {
            // Best effort: the short directory under /tmp is empty now, and a leftover one is
            // harmless (the next start on this data directory reuses it).
            let _ = fs::remove_dir(&postmaster.socket_dir);
        }
        Ok(())
    }
}

/// The paths of one cluster, all derived from its data directory.
struct Layout {
    data_dir: PathBuf,
    /// The cluster proper.
    pgdata: PathBuf,
    /// Where `initdb` runs before the result is renamed to `pgdata`, so an interrupted
    /// initialisation never looks like a cluster.
    pgdata_staging: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    lock_file: PathBuf,
}

impl Layout {
    fn new(data_dir: PathBuf) -> Self {
        Self {
            pgdata: data_dir.join("pgdata"),
            pgdata_staging: data_dir.join("pgdata.init"),
            socket_dir: socket_dir_for(&data_dir),
            log_file: data_dir.join("postgres.log"),
            lock_file: data_dir.join("lock"),
            data_dir,
        }
    }
}

/// `<data_dir>/run` when a socket path in it fits in `sun_path`, else a short directory under
/// /tmp named by a stable hash of the data directory.
fn socket_dir_for(data_dir: &Path) -> PathBuf {
    let preferred = data_dir.join("run");
    let socket_file_len = format!("/.s.PGSQL.{PORT}").len();
    if preferred.as_os_str().len() + socket_file_len <= SOCKET_PATH_MAX {
        preferred
    } else {
        PathBuf::from(format!(
            "/tmp/jobwire-pg-{:016x}",
            fnv1a(data_dir.as_os_str().as_encoded_bytes())
        ))
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across Rust releases, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn start_blocking(data_dir: PathBuf) -> Result<EmbeddedPostgres, EmbeddedPgError> {
    let layout = Layout::new(data_dir);
    create_dir(&layout.data_dir, 0o755)?;
    let run_as = RunAs::for_current_user()?;
    run_as.adopt(&layout.data_dir)?;
    run_as.check_reachable(&layout.data_dir)?;

    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&layout.lock_file)
        .map_err(io_error("opening", &layout.lock_file))?;
    lock.lock()
        .map_err(io_error("locking", &layout.lock_file))?;

    let pgdata_version = fs::read_to_string(layout.pgdata.join("PG_VERSION")).ok();
    let binaries = PgBinaries::find(pgdata_version.as_deref().map(str::trim))?;
    if pgdata_version.is_none() {
        tracing::info!(pgdata = %layout.pgdata.display(), "initialising a PostgreSQL cluster");
        init_cluster(&layout, &binaries, &run_as)?;
    }
    let postmaster = start_or_reuse(&layout, &binaries, &run_as)?;
    drop(lock);

    Ok(EmbeddedPostgres {
        data_dir: layout.data_dir,
        socket_dir: postmaster.socket_dir,
        port: postmaster.port,
        pid: postmaster.pid,
    })
}

/// Runs `initdb` into the staging directory and moves the result into place.
fn init_cluster(
    layout: &Layout,
    binaries: &PgBinaries,
    run_as: &RunAs,
) -> Result<(), EmbeddedPgError> {
    let staging = &layout.pgdata_staging;
    if staging.exists() {
        fs::remove_dir_all(staging).map_err(io_error("removing", staging))?;
    }
    create_dir(staging, 0o700)?;
    run_as.adopt(staging)?;
    let mut initdb = run_as.command(&binaries.initdb);
    initdb
        .arg("-D")
        .arg(staging)
        .args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ])
        .current_dir(&layout.data_dir);
    run(&mut initdb, None)?;

    let conf = staging.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(io_error("opening", &conf))?;
    let include = format!(
        "\n# Added by jobwire: the settings it writes at every start.\n\
         include_if_exists = '{SETTINGS_FILE}'"
    );
    writeln!(file, "{include}").map_err(io_error("writing", &conf))?;
    fs::rename(staging, &layout.pgdata).map_err(io_error("renaming", staging))
}

/// Reuses the running cluster, waiting out a start or stop in progress, or starts it.
fn start_or_reuse(
    layout: &Layout,
    binaries: &PgBinaries,
    run_as: &RunAs,
) -> Result<Postmaster, EmbeddedPgError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if let Some(pm) = Postmaster::read(&layout.pgdata)?
            && process_exists(pm.pid)
        {
            if is_zombie(pm.pid) {
                // The postmaster died and its adoptive parent has not reaped it yet. PostgreSQL
                // takes any existing pid for a live postmaster and would refuse to start, so its
                // stale lock files go. Safe: a zombie never runs again, and PostgreSQL still
                // refuses to start while orphaned server processes hold its shared memory.
                for path in [postmaster_pid_file(&layout.pgdata), pm.socket_lock_file()] {
                    match fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(io_error("removing the stale", &path)(e));
                        }
                        _ => {}
                    }
                }
            } else if pm.status == PostmasterStatus::Ready && pm.accepts_connections() {
                let socket_dir = pm.socket_dir.display();
                tracing::info!(pid = pm.pid, %socket_dir, "reusing the running PostgreSQL cluster");
                return Ok(pm);
            } else if matches!(
                pm.status,
                PostmasterStatus::Starting | PostmasterStatus::Stopping
            ) && Instant::now() < deadline
            {
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            // Otherwise (ready yet unreachable, or stuck) PostgreSQL judges whether the pid
            // file is stale; if it is not, the start fails with PostgreSQL's own explanation.
        }
        return start_cluster(layout, binaries, run_as);
    }
}

/// Starts the cluster as a daemon with `pg_ctl start -w`.
fn start_cluster(
    layout: &Layout,
    binaries: &PgBinaries,
    run_as: &RunAs,
) -> Result<Postmaster, EmbeddedPgError> {
    prepare_socket_dir(&layout.socket_dir, run_as)?;
    write_settings(layout, run_as)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&layout.log_file)
        .map_err(io_error("creating", &layout.log_file))?;
    run_as.adopt(&layout.log_file)?;

    let mut pg_ctl = run_as.command(&binaries.pg_ctl);
    pg_ctl
        .arg("-D")
        .arg(&layout.pgdata)
        .arg("-l")
        .arg(&layout.log_file)
        .args(["-w", "-t", &START_TIMEOUT_SECS.to_string(), "start"])
        .current_dir(&layout.data_dir);
    let (pgdata, log) = (layout.pgdata.display(), layout.log_file.display());
    tracing::info!(%pgdata, %log, "starting the PostgreSQL cluster");
    run(&mut pg_ctl, Some(&layout.log_file))?;

    Postmaster::read(&layout.pgdata)?.ok_or_else(|| EmbeddedPgError::BadPidFile {
        path: postmaster_pid_file(&layout.pgdata),
    })
}

/// Creates the socket directory, private to the cluster's user.
fn prepare_socket_dir(dir: &Path, run_as: &RunAs) -> Result<(), EmbeddedPgError> {
    create_dir(dir, 0o700)?;
    let owner = fs::metadata(dir)
        .map_err(io_error("inspecting", dir))?
        .uid();
    // A directory under /tmp may have been made by somebody else to catch our socket.
    if owner != run_as.uid() && owner != nix::unistd::geteuid().as_raw() {
        return Err(EmbeddedPgError::ForeignSocketDir {
            path: dir.to_path_buf(),
            owner,
        });
    }
    run_as.adopt(dir)
}

/// Writes the settings that depend on where the cluster lives, before each start.
fn write_settings(layout: &Layout, run_as: &RunAs) -> Result<(), EmbeddedPgError> {
    let path = layout.pgdata.join(SETTINGS_FILE);
    let settings = format!(
        "# Written by jobwire at every start of this cluster; edits are overwritten.\n\
         listen_addresses = ''\n\
         unix_socket_directories = '{}'\n\
         port = {PORT}\n\
         max_connections = 200\n\
         shared_buffers = '128MB'\n",
        quote_setting(&layout.socket_dir.to_string_lossy())
    );
    fs::write(&path, settings).map_err(io_error("writing", &path))?;
    run_as.adopt(&path)
}

/// Runs a command to completion and fails with its output (and the log's tail) if it fails.
fn run(command: &mut Command, log_file: Option<&Path>) -> Result<(), EmbeddedPgError> {
    let line = command_line(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_error("running", Path::new(command.get_program())))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if let Some(log) = log_file.and_then(|path| fs::read_to_string(path).ok()) {
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        text.push_str("\nend of the server log:\n");
        text.push_str(&tail.join("\n"));
    }
    Err(EmbeddedPgError::CommandFailed {
        command: line,
        status: output.status,
        output: text.trim_end().to_owned(),
    })
}

fn command_line(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// The user that runs PostgreSQL's programs.
enum RunAs {
    /// We are not root: PostgreSQL runs as us.
    CurrentUser,
    /// We are root: PostgreSQL runs as the `postgres` user, started through `switch`.
    Postgres { user: User, switch: UserSwitch },
}

/// A tool that runs a command as another user.
enum UserSwitch {
    /// util-linux `setpriv`: a plain exec, no PAM session, no extra process.
    Setpriv(PathBuf),
    /// util-linux `runuser`, where setpriv is missing.
    Runuser(PathBuf),
}

impl RunAs {
    fn for_current_user() -> Result<Self, EmbeddedPgError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self::CurrentUser);
        }
        let user = User::from_name(OS_USER)
            .ok()
            .flatten()
            .ok_or(EmbeddedPgError::NoPostgresUser)?;
        let switch = if let Some(path) = find_on_path("setpriv") {
            UserSwitch::Setpriv(path)
        } else if let Some(path) = find_on_path("runuser") {
            UserSwitch::Runuser(path)
        } else {
            return Err(EmbeddedPgError::NoUserSwitchTool);
        };
        Ok(Self::Postgres { user, switch })
    }

    fn uid(&self) -> u32 {
        match self {
            Self::CurrentUser => nix::unistd::geteuid().as_raw(),
            Self::Postgres { user, .. } => user.uid.as_raw(),
        }
    }

    /// A command running `program` as this user.
    fn command(&self, program: &Path) -> Command {
        match self {
            Self::CurrentUser => Command::new(program),
            Self::Postgres {
                user,
                switch: UserSwitch::Setpriv(setpriv),
            } => {
                let mut command = Command::new(setpriv);
                command
                    .arg(format!("--reuid={}", user.uid))
                    .arg(format!("--regid={}", user.gid))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                command
            }
            Self::Postgres {
                user,
                switch: UserSwitch::Runuser(runuser),
            } => {
                let mut command = Command::new(runuser);
                command.arg("-u").arg(&user.name).arg("--").arg(program);
                command
            }
        }
    }

    /// Hands `path` to this user, so PostgreSQL can use what we created as root.
    fn adopt(&self, path: &Path) -> Result<(), EmbeddedPgError> {
        match self {
            Self::CurrentUser => Ok(()),
            Self::Postgres { user, .. } => {
                std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(io_error("handing to the postgres user", path))
            }
        }
    }

    /// Fails early, with the directory to fix, when this user could not reach `dir`: otherwise
    /// initdb would fail with a bare "Permission denied".
    fn check_reachable(&self, dir: &Path) -> Result<(), EmbeddedPgError> {
        let Self::Postgres { user, .. } = self else {
            return Ok(());
        };
        for ancestor in dir.ancestors().skip(1) {
            let meta = fs::metadata(ancestor).map_err(io_error("inspecting", ancestor))?;
            let mode = meta.permissions().mode();
            let searchable = if meta.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !searchable {
                return Err(EmbeddedPgError::Unreachable {
                    path: ancestor.to_path_buf(),
                });
            }
        }
        Ok(())
    }
}

/// The PostgreSQL programs this module runs. `pg_ctl` finds `postgres` beside itself.
struct PgBinaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

impl PgBinaries {
    /// Finds a directory holding `initdb`, `pg_ctl` and `postgres`: the one of the data
    /// directory's major version if it is installed (a cluster only runs on its own major), then
    /// the first on PATH, then the highest version under /usr/lib/postgresql.
    fn find(cluster_major: Option<&str>) -> Result<Self, EmbeddedPgError> {
        let debian = debian_bin_dirs();
        let of_cluster = cluster_major.and_then(|major| {
            debian
                .iter()
                .find(|(version, _)| version.to_string() == major)
                .map(|(_, dir)| dir.clone())
        });
        let on_path = || path_dirs().find(|dir| has_server_binaries(dir));
        let dir = of_cluster
            .or_else(on_path)
            .or_else(|| debian.first().map(|(_, dir)| dir.clone()))
            .ok_or(EmbeddedPgError::BinariesNotFound)?;
        Ok(Self {
            initdb: dir.join("initdb"),
            pg_ctl: dir.join("pg_ctl"),
        })
    }
}

/// A PostgreSQL version as Debian names its directories: `15`, or `9.6` before version 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PgVersion {
    major: u32,
    minor: Option<u32>,
}

impl std::fmt::Display for PgVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.minor {
            Some(minor) => write!(f, "{}.{minor}", self.major),
            None => write!(f, "{}", self.major),
        }
    }
}

/// `/usr/lib/postgresql/<version>/bin` directories with the server binaries, highest first.
fn debian_bin_dirs() -> Vec<(PgVersion, PathBuf)> {
    let Ok(entries) = fs::read_dir(DEBIAN_PG_ROOT) else {
        return Vec::new();
    };
    let mut dirs: Vec<(PgVersion, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            let (major, minor) = match name.split_once('.') {
                Some((major, minor)) => (major.parse().ok()?, Some(minor.parse().ok()?)),
                None => (name.parse().ok()?, None),
            };
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((PgVersion { major, minor }, bin))
        })
        .collect();
    dirs.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    dirs
}

fn path_dirs() -> impl Iterator<Item = PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    path_dirs()
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|name| is_executable(&dir.join(name)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// What the postmaster says about itself in `postmaster.pid`.
#[derive(Debug)]
struct Postmaster {
    pid: i32,
    port: u16,
    socket_dir: PathBuf,
    status: PostmasterStatus,
}

/// Line 8 of `postmaster.pid`.
#[derive(Debug, PartialEq, Eq)]
enum PostmasterStatus {
    Starting,
    Ready,
    Stopping,
    /// A status this module does not act on (`standby`), or none written yet.
    Other,
}

impl Postmaster {
    /// Reads `<pgdata>/postmaster.pid`; `None` when there is none (the cluster is not running).
    fn read(pgdata: &Path) -> Result<Option<Self>, EmbeddedPgError> {
        let path = postmaster_pid_file(pgdata);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(EmbeddedPgError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        let lines: Vec<&str> = text.lines().collect();
        let field = |n: usize| lines.get(n - 1).map(|line| line.trim());
        let parsed = (|| {
            Some(Self {
                pid: field(1)?.parse().ok()?,
                port: field(4)?.parse().ok()?,
                socket_dir: PathBuf::from(field(5)?),
                status: match field(8) {
                    Some("starting") => PostmasterStatus::Starting,
                    Some("ready") => PostmasterStatus::Ready,
                    Some("stopping") => PostmasterStatus::Stopping,
                    _ => PostmasterStatus::Other,
                },
            })
        })();
        parsed.map(Some).ok_or(EmbeddedPgError::BadPidFile { path })
    }

    /// Whether something accepts connections on the socket, which a stale pid file after a
    /// reboot (its pid now another process's) cannot fake.
    fn accepts_connections(&self) -> bool {
        UnixStream::connect(self.socket_dir.join(format!(".s.PGSQL.{}", self.port))).is_ok()
    }

    /// The lock file beside the socket, which names the postmaster's pid too.
    fn socket_lock_file(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port))
    }
}

fn postmaster_pid_file(pgdata: &Path) -> PathBuf {
    pgdata.join("postmaster.pid")
}

/// Whether the process has exited but not been reaped by its parent (state `Z` in
/// `/proc/<pid>/stat`, the field after the parenthesised command name).
fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Whether any process of process group `pgid` still runs (zombies do not: they have released
/// everything, shared memory included).
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return process_exists(pgid) && !is_zombie(pgid);
    };
    entries.filter_map(Result::ok).any(|entry| {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // After the command name: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|pgrp| pgrp.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

/// Whether a process with this pid exists (EPERM: it exists but is not ours to signal).
fn process_exists(pid: i32) -> bool {
    !matches!(signal::kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn create_dir(path: &Path, mode: u32) -> Result<(), EmbeddedPgError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_error("creating", path))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedPgError {
    let path = path.to_path_buf();
    move |source| EmbeddedPgError::Io {
        action,
        path,
        source,
    }
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Escapes the inside of a single-quoted `postgresql.conf` string.
fn quote_setting(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when `keep_slash`),
/// so any directory or database name survives the URL.
fn percent_encode(value: &str, keep_slash: bool) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && byte == b'/')
        {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stops a test's cluster even when the test fails, so no daemon outlives its temp dir.
    struct StopOnDrop(PathBuf);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            if let Ok(Some(pm)) = Postmaster::read(&self.0.join("pgdata")) {
                let _ = signal::kill(Pid::from_raw(pm.pid), Signal::SIGINT);
            }
        }
    }

    async fn select_one(url: &str) -> i32 {
        let mut conn = PgConnection::connect(url).await.expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .expect("SELECT 1");
        conn.close().await.expect("close");
        one
    }

    #[tokio::test]
    async fn starts_reuses_stops_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _guard = StopOnDrop(dir.path().to_path_buf());

        let pg = EmbeddedPostgres::start(dir.path()).await.expect("start");
        assert_eq!(select_one(&pg.admin_url()).await, 1);
        pg.ensure_database("jobwire").await.expect("create");
        pg.ensure_database("jobwire").await.expect("create again");
        assert_eq!(select_one(&pg.database_url("jobwire")).await, 1);

        let again = EmbeddedPostgres::start(dir.path()).await.expect("reuse");
        assert_eq!(again.pid(), pg.pid(), "a running cluster is reused");

        pg.stop().await.expect("stop");
        // The pid file goes at a clean exit; the process itself may linger as a zombie until
        // its adoptive parent reaps it, so its pid proves nothing here.
        assert!(
            Postmaster::read(&dir.path().join("pgdata"))
                .expect("read")
                .is_none()
        );

        let restarted = EmbeddedPostgres::start(dir.path()).await.expect("restart");
        assert_ne!(restarted.pid(), again.pid());
        assert_eq!(select_one(&restarted.database_url("jobwire")).await, 1);
        restarted.stop().await.expect("stop again");
    }

    #[tokio::test]
    async fn concurrent_starters_share_one_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _guard = StopOnDrop(dir.path().to_path_buf());

        let (a, b) = tokio::join!(
            EmbeddedPostgres::start(dir.path()),
            EmbeddedPostgres::start(dir.path())
        );
        let (a, b) = (a.expect("first"), b.expect("second"));
        assert_eq!(a.pid(), b.pid());
        let (x, y) = tokio::join!(a.ensure_database("same"), b.ensure_database("same"));
        x.expect("first create");
        y.expect("second create");
        a.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn long_data_dir_gets_a_short_socket_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let long = dir.path().join("d".repeat(100));
        let _guard = StopOnDrop(long.clone());

        let pg = EmbeddedPostgres::start(&long).await.expect("start");
        assert!(
            pg.admin_url().contains("host=/tmp/jobwire-pg-"),
            "{}",
            pg.admin_url()
        );
        assert_eq!(select_one(&pg.admin_url()).await, 1);
        pg.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn recovers_from_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _guard = StopOnDrop(dir.path().to_path_buf());

        let pg = EmbeddedPostgres::start(dir.path()).await.expect("start");
        pg.ensure_database("jobwire").await.expect("create");
        let mut conn = PgConnection::connect(&pg.database_url("jobwire"))
            .await
            .expect("connect");
        sqlx::query("CREATE TABLE kept (n int)")
            .execute(&mut conn)
            .await
            .expect("create table");
        sqlx::query("INSERT INTO kept VALUES (42)")
            .execute(&mut conn)
            .await
            .expect("insert");
        let crashed = pg.pid();
        pg.kill().await.expect("kill");

        let pg = EmbeddedPostgres::start(dir.path())
            .await
            .expect("start after crash");
        assert_ne!(pg.pid(), crashed);
        let mut conn = PgConnection::connect(&pg.database_url("jobwire"))
            .await
            .expect("reconnect");
        let n: i32 = sqlx::query_scalar("SELECT n FROM kept")
            .fetch_one(&mut conn)
            .await
            .expect("committed row survives the crash");
        assert_eq!(n, 42);
        pg.stop().await.expect("stop");
    }

    #[test]
    fn missing_binaries_say_what_to_install() {
        let message = EmbeddedPgError::BinariesNotFound.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("initdb/pg_ctl on PATH"), "{message}");
    }

    #[test]
    fn urls_encode_odd_names() {
        let pg = EmbeddedPostgres {
            data_dir: PathBuf::from("/d"),
            socket_dir: PathBuf::from("/a dir/with&odd=chars"),
            port: PORT,
            pid: 1,
        };
        assert_eq!(
            pg.database_url("my db"),
            "postgres://postgres@localhost/my%20db?host=/a%20dir/with%26odd%3Dchars&port=5432"
        );
    }
}
