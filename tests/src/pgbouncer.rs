//! A real PgBouncer in transaction pooling mode in front of the test PostgreSQL, for running the
//! server as it is deployed behind one.
//!
//! Each [`PgBouncer`] is a process of its own on a free loopback port, with its configuration in
//! a temporary directory, forwarding every database name to the server that holds the test
//! databases (`DATABASE_URL`'s, or the private cluster's socket): a test's database is reached
//! through it by the same name. It is killed when dropped. The binary is `pgbouncer` on `PATH`
//! or in `/usr/sbin` (Debian's package, which `scripts/install-tools.sh` installs).
//!
//! With `JOBWIRE_TEST_POOLER=pgbouncer` in the environment, or after
//! [`route_servers_through_pgbouncer`], every [`ServerProcess::start`](crate::ServerProcess::start)
//! puts a PgBouncer of its own between its server and the test database
//! (`--database-pooling transaction`, and a direct connection for LISTEN and migrations), so
//! any test file runs through one unchanged: `tests/pgbouncer.rs` runs the lifecycle and watch
//! tests so.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use crate::{ChildProcess, eventually};

/// How long PgBouncer may take to accept connections once started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Server connections per database: fewer than a server's pool has connections (20 by
/// default), so that its statements take turns on them, as behind a pooler in production, and
/// a statement that depended on meeting the server connection its previous one used would fail.
const POOL_SIZE: u32 = 4;

/// Set before any test runs to route every server the harness starts through a PgBouncer.
static ROUTED: AtomicBool = AtomicBool::new(false);

/// From now on every server [`crate::ServerProcess::start`] starts reaches its database through
/// a PgBouncer of its own. Called from a test binary's initializer, before any test runs.
pub fn route_servers_through_pgbouncer() {
    ROUTED.store(true, Ordering::SeqCst);
}

/// Whether servers are routed through PgBouncer: by [`route_servers_through_pgbouncer`] or
/// `JOBWIRE_TEST_POOLER=pgbouncer`.
pub fn servers_routed_through_pgbouncer() -> bool {
    ROUTED.load(Ordering::SeqCst)
        || std::env::var("JOBWIRE_TEST_POOLER").is_ok_and(|pooler| pooler == "pgbouncer")
}

/// A PgBouncer process in transaction pooling mode, killed when dropped.
#[derive(Debug)]
pub struct PgBouncer {
    process: ChildProcess,
    port: u16,
    /// The test database server's user (and password, if any), which PgBouncer passes on.
    user: String,
    password: Option<String>,
    /// Holds the configuration and log; removed on drop.
    dir: TempDir,
}

impl PgBouncer {
    /// Starts a PgBouncer in front of the server holding `database_url`'s database (any
    /// database of that server is reachable through it), and waits until it accepts
    /// connections.
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(database_url, POOL_SIZE, "").await
    }

    /// As [`PgBouncer::start`], lending `pool_size` server connections per database and
    /// ignoring the startup parameters listed in `ignore_startup_parameters` (comma-separated;
    /// PgBouncer refuses a connection that sends one it neither tracks nor ignores).
    pub async fn start_with(
        database_url: &str,
        pool_size: u32,
        ignore_startup_parameters: &str,
    ) -> Self {
        let upstream = Upstream::parse(database_url);
        let dir = tempfile::Builder::new()
            .prefix("jobwire-test-pgbouncer-")
            .tempdir()
            .expect("a temp dir for pgbouncer");
        let port = free_port();
        // PgBouncer passes the client's password on (auth_type trust still wants the user in
        // the auth file, and uses its password towards the server).
        let password = upstream.password.clone().unwrap_or_default();
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!(
                "\"{}\" \"{}\"\n",
                upstream.user.replace('"', "\"\""),
                password.replace('"', "\"\"")
            ),
        )
        .expect("writing pgbouncer's auth file");
        let ini = format!(
            "[databases]\n\
             * = host={host} port={upstream_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = transaction\n\
             max_client_conn = 1000\n\
             default_pool_size = {pool_size}\n\
             ignore_startup_parameters = {ignore_startup_parameters}\n\
             logfile = {log}\n\
             admin_users = {user}\n",
            host = upstream.host,
            upstream_port = upstream.port,
            auth = dir.path().join("userlist.txt").display(),
            log = dir.path().join("pgbouncer.log").display(),
            user = upstream.user,
        );
        let ini_path = dir.path().join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).expect("writing pgbouncer.ini");
        let ini_arg = ini_path.to_string_lossy().into_owned();
        // PgBouncer refuses to run as root; as root (a container, CI) it runs as the user the
        // PostgreSQL packages make, which then needs its directory.
        let mut args = vec![ini_arg.as_str()];
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("running as root, pgbouncer needs the user postgres to run as");
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))
                .expect("handing pgbouncer's directory to postgres");
            args.extend(["-u", "postgres"]);
        }
        let mut process = ChildProcess::spawn(pgbouncer_binary(), &args, &[]);
        let log = dir.path().join("pgbouncer.log");
        eventually("pgbouncer to accept connections", START_TIMEOUT, || {
            if let Some(status) = process.try_status() {
                panic!(
                    "pgbouncer exited ({status}); its log:\n{}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default(),
                    process.stderr()
                );
            }
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            async move { up.then_some(()) }
        })
        .await;
        Self {
            process,
            port,
            user: upstream.user,
            password: upstream.password,
            dir,
        }
    }

    /// The URL of database `name` through this PgBouncer.
    pub fn url(&self, name: &str) -> String {
        let mut url = url::Url::parse("postgres://127.0.0.1").expect("a base URL");
        url.set_port(Some(self.port)).expect("a port");
        url.set_username(&self.user).expect("a user");
        url.set_password(self.password.as_deref())
            .expect("a password");
        url.set_path(&format!("/{name}"));
        url.to_string()
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    /// PgBouncer's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Where the test databases live, as PgBouncer needs it.
struct Upstream {
    /// A host name, an address, or a socket directory.
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
}

impl Upstream {
    fn parse(database_url: &str) -> Self {
        let url = url::Url::parse(database_url)
            .unwrap_or_else(|e| panic!("{database_url:?} is not a URL: {e}"));
        let query = |key: &str| {
            url.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let host = query("host")
            .or_else(|| url.host_str().map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned());
        let port = query("port")
            .and_then(|port| port.parse().ok())
            .or(url.port())
            .unwrap_or(5432);
        let user = match url.username() {
            "" => "postgres".to_owned(),
            user => user.to_owned(),
        };
        Self {
            host,
            port,
            user,
            password: url.password().map(str::to_owned),
        }
    }
}

fn pgbouncer_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pgbouncer"))
            .find(|bin| bin.is_file())
    });
    let bin = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"));
    assert!(
        bin.is_file(),
        "pgbouncer is not installed: run scripts/install-tools.sh (it installs Debian's \
         pgbouncer package)"
    );
    bin
}

/// A loopback port free at the moment; PgBouncer binds it right after.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}
