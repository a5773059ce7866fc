//! The `jobwire` command-line tool run as an operator runs it: the real binary against a real
//! server on real PostgreSQL, one test per command group. Each checks what a person reads, the
//! `--json` a script parses, and the exit codes (not found, invalid input, refused, a failed or
//! cancelled job's watch); `jobs watch` runs both without a terminal (plain lines) and under a
//! pseudo-terminal, where its progress bar must be seen to move.
//!
//! The jobs run on an SDK worker inside the test, serving the job types of
//! `proto/jobwire/tests/v1/codegen.proto`, which it registers with their schemas as it
//! connects (so the tool can send them JSON). Its `media.thumbnail` handler reports progress
//! tile by tile; with a `gated://` URL it waits for the test between tiles, so the test
//! advances the job only once it has seen the bar draw the previous tile: no sleeping.

mod support;

use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobwire::{HandlerError, JobContext, LogLevel, Progress, Worker};
use jobwire_proto::v1::{self as pb, job_type_service_client::JobTypeServiceClient};
use jobwire_tests::{
    ChildProcess, ServerProcess,
    codegen::{Ping, Purge, Thumbnail, ThumbnailResult},
    eventually, test_db,
};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long anything awaited may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// The exit codes the tool documents (cli/src/error.rs).
const INVALID_INPUT: i32 = 2;
const NOT_FOUND: i32 = 3;
const UNAVAILABLE: i32 = 4;
const REFUSED: i32 = 5;
const JOB_FAILED: i32 = 6;
const JOB_CANCELLED: i32 = 7;

/// An id no job has.
const NO_SUCH_JOB: &str = "01900000-0000-7000-8000-000000000000";

/// The `jobwire` binary, next to the server binary in the profile directory of this test (a
/// workspace member's binary: `cargo build -p jobwire-cli`, or `--workspace`, builds it).
fn cli_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("JOBWIRE_CLI_BIN").filter(|bin| !bin.is_empty()) {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the test executable's directory");
    let profile = match dir.file_name().and_then(|name| name.to_str()) {
        Some("deps") => dir.parent().unwrap_or(dir),
        _ => dir,
    };
    let bin = profile.join("jobwire");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p jobwire-cli` first (scripts/test builds the workspace)",
        bin.display()
    );
    bin
}

/// How one run of the tool ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Stdout parsed as one JSON value.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// Fails the test unless the run exited with `code`.
    #[track_caller]
    fn expect(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code of {self:?}");
        self
    }
}

/// Runs `jobwire` with `args` and the extra environment `envs`, to its end.
async fn jobwire_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut process = ChildProcess::spawn(cli_binary(), args, envs);
    let status = process.wait(WAIT).await;
    Run {
        code: status
            .code()
            .expect("the tool exited by itself, not by a signal"),
        stdout: process.stdout(),
        stderr: process.stderr(),
    }
}

/// Runs `jobwire --url URL args...`.
async fn jobwire(server: &ServerProcess, args: &[&str]) -> Run {
    let url = server.url();
    let mut all = vec!["--url", url.as_str()];
    all.extend_from_slice(args);
    jobwire_env(&all, &[]).await
}

/// The test worker: serves the three codegen job types from queues `media` and `default`.
/// `media.thumbnail` reports `width` tiles of progress (stage `render`, a log line each) and
/// fails fatally for a negative width; with a `gated://` URL it takes a permit of `gate`
/// before each tile after the first.
struct TestWorker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), jobwire::Error>>,
    gate: Arc<Semaphore>,
}

impl TestWorker {
    fn spawn(url: String) -> Self {
        let gate = Arc::new(Semaphore::new(0));
        let handler_gate = Arc::clone(&gate);
        let worker = Worker::builder(url)
            .worker_id("cli-test-worker")
            .queues(["media", "default"])
            .register::<Thumbnail, _, _>(move |ctx: JobContext, job: Thumbnail| {
                let gate = Arc::clone(&handler_gate);
                async move { thumbnail(ctx, job, gate).await }
            })
            .register::<Ping, _, _>(|_ctx: JobContext, _job: Ping| async move { Ok(()) })
            .register::<Purge, _, _>(|_ctx: JobContext, _job: Purge| async move { Ok(()) })
            .build()
            .expect("the worker builds");
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
        Self { stop, task, gate }
    }

    /// Starts the worker and waits until its three job types are registered.
    async fn start(server: &ServerProcess) -> Self {
        let worker = Self::spawn(server.url());
        let url = server.url();
        eventually("the worker's job types registered", WAIT, || async {
            let mut types = JobTypeServiceClient::new(support::channel(&url).await);
            let listed = types
                .list_job_types(pb::ListJobTypesRequest::default())
                .await
                .ok()?
                .into_inner();
            (listed.job_types.len() == 3).then_some(())
        })
        .await;
        worker
    }

    /// Waits for the worker's run to return by itself (a drain the server asked for).
    async fn ended(self) {
        let _guard = self.stop.drop_guard();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker's run returned")
            .expect("the worker task")
            .expect("the worker drained");
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the worker task")
            .expect("the worker drains");
    }
}

async fn thumbnail(
    ctx: JobContext,
    job: Thumbnail,
    gate: Arc<Semaphore>,
) -> Result<ThumbnailResult, HandlerError> {
    if job.width < 0 {
        ctx.log(LogLevel::Error, "refusing a negative width");
        return Err(HandlerError::fatal("width must be positive").with_kind("bad_input"));
    }
    let tiles = job.width as u64;
    for tile in 1..=tiles {
        if tile > 1 && job.url.starts_with("gated://") {
            gate.acquire()
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))?
                .forget();
        }
        ctx.progress(
            Progress::items(tile, tiles)
                .stage("render")
                .message(format!("tile {tile}")),
        );
        ctx.log(LogLevel::Info, format!("rendered tile {tile}"));
    }
    Ok(ThumbnailResult {
        url: job.url,
        width: job.width,
    })
}

/// The id of the job in an enqueue's `--json` output.
#[track_caller]
fn job_id(run: &Run) -> String {
    run.json()["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job id in {run:?}"))
        .to_owned()
}

#[tokio::test]
async fn jobs_enqueue_list_get_watch_and_control() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = TestWorker::start(&server).await;

    // Enqueue as JSON: the type's default queue, a label; the answer as proto JSON.
    let enqueued = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            r#"{"url": "plain://a.png", "width": 2}"#,
            "--label",
            "team=media",
            "--json",
        ],
    )
    .await
    .expect(0);
    let created = enqueued.json();
    assert_eq!(created["created"], true, "{created}");
    assert_eq!(created["job"]["jobType"], "media.thumbnail");
    assert_eq!(created["job"]["queue"], "media");
    let ok = job_id(&enqueued);

    // Watched without a terminal: one plain line per event, the outcome last.
    let watched = jobwire(&server, &["jobs", "watch", &ok]).await.expect(0);
    let lines: Vec<&str> = watched.stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("progress [render] 2/2 100% tile 2")),
        "{watched:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("log INFO rendered tile 2")),
        "{watched:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("RUNNING attempt 1 on cli-test-worker")),
        "{watched:?}"
    );
    let outcome = lines.last().expect("an outcome line");
    assert!(outcome.contains("SUCCEEDED"), "{watched:?}");
    assert!(outcome.contains(r#""url":"plain://a.png""#), "{watched:?}");

    // (Progress is coalesced on its way, so the last report is the one sure to be there.)
    // With --json: one JobEvent per line, in order, the terminal change last.
    let watched = jobwire(&server, &["jobs", "watch", &ok, "--json"])
        .await
        .expect(0);
    let events: Vec<Value> = watched
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON event per line"))
        .collect();
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| {
            e["sequence"]
                .as_str()
                .expect("sequence")
                .parse()
                .expect("int64")
        })
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    assert!(events.iter().any(|e| e["progress"]["itemsDone"] == "2"));
    let last = events.last().expect("events");
    assert_eq!(
        last["stateChanged"]["state"], "JOB_STATE_SUCCEEDED",
        "{last}"
    );

    // Get, for people and as JSON: attempts, payload rendered through the type's schema.
    let got = jobwire(&server, &["jobs", "get", &ok]).await.expect(0);
    for expected in [
        "SUCCEEDED",
        "media.thumbnail (version 1)",
        "team=media",
        "attempts:",
    ] {
        assert!(got.stdout.contains(expected), "{expected}: {got:?}");
    }
    let got = jobwire(&server, &["jobs", "get", &ok, "--json"])
        .await
        .expect(0)
        .json();
    let job = &got["job"];
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(job["attempts"][0]["outcome"], "ATTEMPT_OUTCOME_SUCCEEDED");
    assert_eq!(
        job["payload"]["@type"],
        "type.googleapis.com/jobwire.tests.v1.Thumbnail"
    );
    assert_eq!(job["payload"]["url"], "plain://a.png");
    assert_eq!(job["resultJson"]["width"], 2.0);

    // A job that fails: its watch exits 6 with the error; get shows the attempt's error.
    let failing = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            r#"{"url": "plain://b.png", "width": -1}"#,
            "--json",
        ],
    )
    .await
    .expect(0);
    let failed = job_id(&failing);
    let watched = jobwire(&server, &["jobs", "watch", &failed])
        .await
        .expect(JOB_FAILED);
    let outcome = watched.stdout.lines().last().unwrap_or_default().to_owned();
    assert!(outcome.contains("FAILED"), "{watched:?}");
    assert!(
        outcome.contains("width must be positive [bad_input] (not retryable)"),
        "{watched:?}"
    );
    assert!(
        watched
            .stdout
            .contains("log ERROR refusing a negative width")
    );
    let got = jobwire(&server, &["jobs", "get", &failed]).await.expect(0);
    assert!(got.stdout.contains("width must be positive"), "{got:?}");

    // Listing: by state, by label (the server filters), a page at a time.
    let listed = jobwire(&server, &["jobs", "list", "--state", "failed", "--json"])
        .await
        .expect(0)
        .json();
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [failed.as_str()]);
    let listed = jobwire(&server, &["jobs", "list", "--label", "team=media"])
        .await
        .expect(0);
    assert!(listed.stdout.starts_with("ID"), "{listed:?}");
    assert!(listed.stdout.contains(&ok) && !listed.stdout.contains(&failed));
    let first = jobwire(&server, &["jobs", "list", "--page-size", "1", "--json"])
        .await
        .expect(0)
        .json();
    let token = first["nextPageToken"].as_str().expect("a next page token");
    let second = jobwire(
        &server,
        &[
            "jobs",
            "list",
            "--page-size",
            "1",
            "--page-token",
            token,
            "--json",
        ],
    )
    .await
    .expect(0)
    .json();
    assert_ne!(first["jobs"][0]["id"], second["jobs"][0]["id"]);
    let paged = jobwire(&server, &["jobs", "list", "--page-size", "1"])
        .await
        .expect(0);
    assert!(
        paged.stdout.contains("next page: --page-token "),
        "{paged:?}"
    );

    // Approval: a rejected job's watch exits 7; an approved one runs.
    let rejected = purge(&server, "/tmp/a").await;
    let run = jobwire(
        &server,
        &["jobs", "reject", &rejected, "--reason", "not today"],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("CANCELLED"), "{run:?}");
    let watched = jobwire(&server, &["jobs", "watch", &rejected])
        .await
        .expect(JOB_CANCELLED);
    // Who rejected it: on a server running open, nobody named.
    assert!(
        watched
            .stdout
            .contains("not today by (no key: server open)"),
        "{watched:?}"
    );
    let approved = purge(&server, "/tmp/b").await;
    jobwire(
        &server,
        &["jobs", "approve", &approved, "--comment", "checked"],
    )
    .await
    .expect(0);
    jobwire(&server, &["jobs", "watch", &approved])
        .await
        .expect(0);

    // Pause and resume a job that waits; cancel it; a finished job cannot be cancelled.
    let later = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.ping",
            "--json-payload",
            "{}",
            "--delay",
            "1h",
            "--json",
        ],
    )
    .await
    .expect(0);
    let later = job_id(&later);
    let run = jobwire(&server, &["jobs", "pause", &later, "--reason", "hold"])
        .await
        .expect(0);
    assert!(run.stdout.contains("PAUSED"), "{run:?}");
    let run = jobwire(&server, &["jobs", "resume", &later, "--json"])
        .await
        .expect(0);
    assert_ne!(run.json()["job"]["state"], "JOB_STATE_PAUSED");
    let run = jobwire(&server, &["jobs", "cancel", &ok, "--reason", "too late"])
        .await
        .expect(INVALID_INPUT);
    assert!(run.stderr.contains("FAILED_PRECONDITION"), "{run:?}");
    let run = jobwire(&server, &["jobs", "retry", &rejected])
        .await
        .expect(0);
    assert!(run.stdout.contains(&format!("job {rejected}:")), "{run:?}");

    // Not found, and invalid input: the server's field names reach stderr.
    let run = jobwire(&server, &["jobs", "get", NO_SUCH_JOB])
        .await
        .expect(NOT_FOUND);
    assert!(run.stderr.contains("NOT_FOUND"), "{run:?}");
    jobwire(&server, &["jobs", "watch", NO_SUCH_JOB])
        .await
        .expect(NOT_FOUND);
    let run = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            r#"{"wdth": 3}"#,
        ],
    )
    .await
    .expect(INVALID_INPUT);
    assert!(run.stderr.contains("wdth"), "{run:?}");
    let run = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            "not json",
        ],
    )
    .await
    .expect(INVALID_INPUT);
    assert!(run.stderr.contains("not valid JSON"), "{run:?}");
    jobwire(&server, &["jobs", "enqueue", "media.thumbnail"])
        .await
        .expect(INVALID_INPUT);

    worker.stop().await;
}

/// Enqueues a `media.purge` job, which awaits approval; returns its id.
async fn purge(server: &ServerProcess, path: &str) -> String {
    let payload = format!(r#"{{"path": "{path}"}}"#);
    let run = jobwire(
        server,
        &[
            "jobs",
            "enqueue",
            "media.purge",
            "--json-payload",
            &payload,
            "--json",
        ],
    )
    .await
    .expect(0);
    assert_eq!(run.json()["job"]["state"], "JOB_STATE_AWAITING_APPROVAL");
    job_id(&run)
}

/// A child process on a pseudo-terminal: everything it writes is collected from the master
/// side by a reader thread, which ends when the child and its terminal close.
struct OnTerminal {
    child: std::process::Child,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OnTerminal {
    fn spawn(args: &[&str]) -> Self {
        let size = nix::pty::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("a pseudo-terminal");
        let terminal = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("a terminal fd"));
        let child = Command::new(cli_binary())
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(terminal(&pty.slave))
            .stdout(terminal(&pty.slave))
            .stderr(terminal(&pty.slave))
            .spawn()
            .expect("the tool starts");
        // Only the child holds the terminal now, so the master reads EOF (EIO) when it exits.
        drop(pty.slave);
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        let mut master = std::fs::File::from(pty.master);
        let reader = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read @ 1..) = master.read(&mut buffer) {
                sink.lock()
                    .expect("output lock")
                    .extend_from_slice(&buffer[..read]);
            }
        });
        Self {
            child,
            output,
            reader: Some(reader),
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output lock")).into_owned()
    }

    /// Waits until the output holds `text`, and returns where it first appears.
    async fn wait_for(&self, text: &str) -> usize {
        eventually(&format!("{text:?} on the terminal"), WAIT, || async {
            self.output().find(text)
        })
        .await
    }

    /// Waits for the exit code, then for the last output.
    async fn exit_code(&mut self) -> i32 {
        let child = &mut self.child;
        let status = eventually("the tool to exit", WAIT, || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the reader thread");
        }
        status.code().expect("an exit code")
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- jobwire on the terminal wrote ---\n{:?}", self.output());
        }
    }
}

#[tokio::test]
async fn jobs_watch_on_a_terminal_draws_a_progress_bar_that_moves() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = TestWorker::start(&server).await;
    let run = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            r#"{"url": "gated://c.png", "width": 3}"#,
            "--json",
        ],
    )
    .await
    .expect(0);
    let id = job_id(&run);

    let url = server.url();
    let mut terminal = OnTerminal::spawn(&["--url", &url, "jobs", "watch", &id]);
    terminal.wait_for("watching job").await;
    // The handler waits for a permit before each tile after the first: the test lets the job
    // go on only once the bar has drawn the tile before.
    let first = terminal.wait_for("] 1/3 33% tile 1").await;
    worker.gate.add_permits(1);
    let second = terminal.wait_for("] 2/3 67% tile 2").await;
    worker.gate.add_permits(1);
    let outcome = terminal.wait_for("SUCCEEDED attempt 1").await;
    assert_eq!(terminal.exit_code().await, 0, "{:?}", terminal.output());
    assert!(
        first < second && second < outcome,
        "{:?}",
        terminal.output()
    );
    let output = terminal.output();
    assert!(output.contains("[render] "), "{output:?}");
    assert!(output.contains("INFO rendered tile 2"), "{output:?}");

    // A job that fails, watched on a terminal: the outcome and exit code 6.
    let run = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.thumbnail",
            "--json-payload",
            r#"{"url": "plain://d.png", "width": -2}"#,
            "--json",
        ],
    )
    .await
    .expect(0);
    let id = job_id(&run);
    let mut terminal = OnTerminal::spawn(&["--url", &url, "jobs", "watch", &id]);
    terminal.wait_for("FAILED attempt 1").await;
    assert_eq!(terminal.exit_code().await, JOB_FAILED);
    drop(terminal);
    worker.stop().await;
}

#[tokio::test]
async fn queues_with_api_keys() {
    let db = test_db().await;
    let admin = ServerProcess::api_key(&db, "acme", &["admin"]).await;
    let viewer = ServerProcess::api_key(&db, "acme", &["viewer"]).await;
    let server = ServerProcess::start(&db, &[]).await;

    // No key: refused.
    let run = jobwire(&server, &["queues", "list"]).await.expect(REFUSED);
    assert!(run.stderr.contains("UNAUTHENTICATED"), "{run:?}");

    // Limits set before the first job, with the key as an option.
    let run = jobwire(
        &server,
        &[
            "--api-key",
            &admin,
            "queues",
            "set",
            "media",
            "--concurrency",
            "2",
            "--rate",
            "600/m",
            "--burst",
            "5",
            "--create",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("10/s (burst 5)"), "{run:?}");

    // The key from the environment, as a script would pass it.
    let url = server.url();
    let as_admin = |args: &'static [&'static str]| {
        let url = url.clone();
        let admin = admin.clone();
        async move {
            let mut all = vec!["--url", url.as_str()];
            all.extend_from_slice(args);
            jobwire_env(&all, &[("JOBWIRE_API_KEY", &admin)]).await
        }
    };
    let queue = as_admin(&["queues", "get", "media", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(queue["name"], "media");
    assert_eq!(queue["concurrencyLimit"], 2);
    assert_eq!(queue["rateLimit"]["perSecond"], 10.0);

    let run = as_admin(&["queues", "pause", "media", "--reason", "upgrade"])
        .await
        .expect(0);
    assert!(run.stdout.contains("upgrade"), "{run:?}");

    // A viewer reads but may not steer.
    let run = jobwire(&server, &["--api-key", &viewer, "queues", "list"])
        .await
        .expect(0);
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("media"))
        .unwrap_or_else(|| panic!("no media row: {run:?}"));
    assert!(row.contains("paused"), "{row}");
    let run = jobwire(
        &server,
        &["--api-key", &viewer, "queues", "resume", "media"],
    )
    .await
    .expect(REFUSED);
    assert!(run.stderr.contains("PERMISSION_DENIED"), "{run:?}");
    let listed = jobwire(&server, &["--api-key", &viewer, "queues", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed["queues"][0]["paused"], true, "{listed}");

    as_admin(&["queues", "resume", "media"]).await.expect(0);
    let queue = as_admin(&[
        "queues",
        "set",
        "media",
        "--concurrency",
        "none",
        "--rate",
        "none",
        "--json",
    ])
    .await
    .expect(0)
    .json();
    assert!(queue.get("concurrencyLimit").is_none(), "{queue}");
    assert!(queue.get("rateLimit").is_none(), "{queue}");
    assert_eq!(queue.get("paused"), None, "{queue}");

    // Not found, and invalid input caught by the tool or by the server.
    as_admin(&["queues", "get", "nosuch"])
        .await
        .expect(NOT_FOUND);
    as_admin(&["queues", "set", "media", "--rate", "fast"])
        .await
        .expect(INVALID_INPUT);
    as_admin(&["queues", "set", "media"])
        .await
        .expect(INVALID_INPUT);
    let run = as_admin(&["queues", "set", "media", "--concurrency", "0"])
        .await
        .expect(INVALID_INPUT);
    assert!(run.stderr.contains("concurrency_limit"), "{run:?}");

    // Health thresholds: set, shown, judged; refused out of range.
    let queue = as_admin(&[
        "queues",
        "set",
        "media",
        "--warn-after",
        "5m",
        "--critical-after",
        "1h",
        "--json",
    ])
    .await
    .expect(0)
    .json();
    assert_eq!(queue["warnAfter"], "300s", "{queue}");
    assert_eq!(queue["criticalAfter"], "3600s", "{queue}");
    assert_eq!(queue["stats"]["health"], "QUEUE_HEALTH_OK", "{queue}");
    let run = as_admin(&["queues", "get", "media"]).await.expect(0);
    assert!(run.stdout.contains("health"), "{run:?}");
    assert!(run.stdout.contains("warn after"), "{run:?}");
    let run = as_admin(&["queues", "list"]).await.expect(0);
    assert!(run.stdout.contains("HEALTH"), "{run:?}");
    assert!(run.stdout.contains("BACKLOG"), "{run:?}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("media"))
        .unwrap_or_else(|| panic!("no media row: {run:?}"));
    assert!(row.contains("ok"), "{row}");
    let run = as_admin(&["queues", "set", "media", "--warn-after", "100ms"])
        .await
        .expect(INVALID_INPUT);
    assert!(run.stderr.contains("warn_after"), "{run:?}");
    as_admin(&["queues", "set", "media", "--warn-after", "soon"])
        .await
        .expect(INVALID_INPUT);

    // Retention of finished jobs: set and shown, then back to the server's default; refused
    // out of range.
    let queue = as_admin(&["queues", "set", "media", "--retention", "7d", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(queue["retention"], "604800s", "{queue}");
    let run = as_admin(&["queues", "get", "media"]).await.expect(0);
    assert!(run.stdout.contains("retention"), "{run:?}");
    let queue = as_admin(&["queues", "set", "media", "--retention", "none", "--json"])
        .await
        .expect(0)
        .json();
    assert!(queue.get("retention").is_none(), "{queue}");
    let run = as_admin(&["queues", "set", "media", "--retention", "100ms"])
        .await
        .expect(INVALID_INPUT);
    assert!(run.stderr.contains("retention"), "{run:?}");
}

#[tokio::test]
async fn workers_list_and_drain() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let run = jobwire(&server, &["workers", "list"]).await.expect(0);
    assert!(run.stdout.contains("no worker is connected"), "{run:?}");

    let worker = TestWorker::start(&server).await;
    let listed = jobwire(&server, &["workers", "list", "--json"])
        .await
        .expect(0)
        .json();
    let workers = listed["workers"].as_array().expect("a list of workers");
    assert_eq!(workers.len(), 1, "{listed}");
    assert_eq!(workers[0]["workerId"], "cli-test-worker", "{listed}");
    assert_eq!(workers[0]["slots"], 10, "{listed}");
    assert_eq!(workers[0]["freeSlots"], 10, "{listed}");
    assert!(
        workers[0]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("jobwire-rust/")),
        "{listed}"
    );
    let run = jobwire(&server, &["workers", "list"]).await.expect(0);
    assert!(run.stdout.contains("WORKER ID"), "{run:?}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("cli-test-worker"))
        .unwrap_or_else(|| panic!("no worker row: {run:?}"));
    assert!(row.contains("serving") && row.contains("10/10"), "{row}");

    // Not found, and invalid input.
    let run = jobwire(&server, &["workers", "drain", "nosuch"])
        .await
        .expect(NOT_FOUND);
    assert!(run.stderr.contains("nosuch"), "{run:?}");
    jobwire(&server, &["workers", "drain", ""])
        .await
        .expect(INVALID_INPUT);

    // A drain: the worker's run returns by itself.
    let run = jobwire(&server, &["workers", "drain", "cli-test-worker"])
        .await
        .expect(0);
    assert!(run.stdout.contains("draining 1 stream"), "{run:?}");
    worker.ended().await;
    eventually("the drained worker gone", WAIT, || async {
        let listed = jobwire(&server, &["workers", "list", "--json"])
            .await
            .json();
        listed["workers"]
            .as_array()
            .is_none_or(Vec::is_empty)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn schedules_create_update_trigger_and_delete() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = TestWorker::start(&server).await;

    let create = [
        "schedules",
        "create",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--time-zone",
        "Europe/Berlin",
        "--type",
        "media.ping",
        "--json-payload",
        r#"{"note": "n"}"#,
        "--label",
        "k=v",
        "--overlap",
        "skip",
    ];
    let run = jobwire(&server, &create).await.expect(0);
    for expected in [
        "nightly",
        "0 3 * * *",
        "Europe/Berlin",
        "SKIP",
        "k=v",
        r#""note":"n""#,
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
    let run = jobwire(&server, &create).await.expect(INVALID_INPUT);
    assert!(run.stderr.contains("ALREADY_EXISTS"), "{run:?}");

    let listed = jobwire(&server, &["schedules", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed["schedules"][0]["name"], "nightly");
    assert_eq!(listed["schedules"][0]["job"]["payload"]["note"], "n");
    let run = jobwire(&server, &["schedules", "list"]).await.expect(0);
    assert!(run.stdout.contains("Europe/Berlin"), "{run:?}");

    // An update changes what it names and keeps the rest of the template.
    jobwire(
        &server,
        &[
            "schedules",
            "update",
            "nightly",
            "--cron",
            "30 4 * * *",
            "--queue",
            "media",
        ],
    )
    .await
    .expect(0);
    let schedule = jobwire(&server, &["schedules", "get", "nightly", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(schedule["cron"], "30 4 * * *");
    assert_eq!(schedule["timeZone"], "Europe/Berlin");
    assert_eq!(schedule["job"]["queue"], "media");
    assert_eq!(schedule["job"]["labels"]["k"], "v");
    assert_eq!(schedule["job"]["payload"]["note"], "n");

    let run = jobwire(&server, &["schedules", "pause", "nightly"])
        .await
        .expect(0);
    assert!(run.stdout.contains("paused:"), "{run:?}");
    let paused = jobwire(&server, &["schedules", "get", "nightly", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(paused["paused"], true);
    jobwire(&server, &["schedules", "resume", "nightly"])
        .await
        .expect(0);

    // A trigger makes a job now, which the worker runs.
    let run = jobwire(&server, &["schedules", "trigger", "nightly", "--json"])
        .await
        .expect(0);
    let id = job_id(&run);
    assert_eq!(run.json()["job"]["queue"], "media");
    jobwire(&server, &["jobs", "watch", &id]).await.expect(0);

    jobwire(&server, &["schedules", "update", "nightly"])
        .await
        .expect(INVALID_INPUT);
    let run = jobwire(
        &server,
        &[
            "schedules",
            "create",
            "broken",
            "--cron",
            "every day",
            "--type",
            "media.ping",
            "--json-payload",
            "{}",
        ],
    )
    .await
    .expect(INVALID_INPUT);
    assert!(run.stderr.contains("cron"), "{run:?}");

    jobwire(&server, &["schedules", "delete", "nightly"])
        .await
        .expect(0);
    jobwire(&server, &["schedules", "get", "nightly"])
        .await
        .expect(NOT_FOUND);
    worker.stop().await;
}

/// Registers a second version of `media.ping` with an example payload, as a deployment's
/// registration step would.
async fn register_ping_example(url: &str) {
    let mut types = JobTypeServiceClient::new(support::channel(url).await);
    let current = types
        .get_job_type(pb::GetJobTypeRequest {
            name: "media.ping".into(),
            view: pb::JobTypeView::Full as i32,
            ..Default::default()
        })
        .await
        .expect("media.ping")
        .into_inner()
        .job_type
        .expect("a job type");
    let mut note = prost_types::Struct::default();
    note.fields.insert(
        "note".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("hello".into())),
        },
    );
    types
        .register_job_type(pb::RegisterJobTypeRequest {
            job_type: Some(pb::JobType {
                examples: vec![pb::ExamplePayload {
                    slug: "hello".into(),
                    name: "Say hello".into(),
                    payload: Some(note),
                }],
                ..current
            }),
        })
        .await
        .expect("a new version with an example");
}

#[tokio::test]
async fn types_list_get_and_examples() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = TestWorker::start(&server).await;
    register_ping_example(&server.url()).await;

    let run = jobwire(&server, &["types", "list"]).await.expect(0);
    for name in ["media.thumbnail", "media.ping", "media.purge"] {
        assert!(run.stdout.contains(name), "{name}: {run:?}");
    }
    let listed = jobwire(&server, &["types", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed["jobTypes"].as_array().map(Vec::len), Some(3));

    // The payload's fields as a schema a person reads, with the defaults.
    let run = jobwire(&server, &["types", "get", "media.thumbnail"])
        .await
        .expect(0);
    let field = |name: &str| {
        run.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} field: {run:?}"))
            .to_owned()
    };
    assert!(
        run.stdout
            .contains("payload fields (jobwire.tests.v1.Thumbnail)")
    );
    assert!(field("url").contains("string"), "{run:?}");
    assert!(field("budget").contains("google.protobuf.Duration"));
    assert!(field("keep_aspect").contains("bool"));
    assert!(field("queue:").contains("media"));
    assert!(field("max").contains('4'), "{run:?}");

    // Examples, and an enqueue by example.
    let run = jobwire(&server, &["types", "get", "media.ping"])
        .await
        .expect(0);
    assert!(run.stdout.contains("2 (latest)"), "{run:?}");
    let example = run
        .stdout
        .lines()
        .find(|l| l.starts_with("hello"))
        .unwrap_or_else(|| panic!("no example row: {run:?}"));
    assert!(example.contains("Say hello") && example.contains(r#"{"note":"hello"}"#));
    let old = jobwire(
        &server,
        &["types", "get", "media.ping", "--version", "1", "--json"],
    )
    .await
    .expect(0)
    .json();
    assert_eq!(old["jobType"]["version"], 1);
    assert!(old["jobType"].get("examples").is_none(), "{old}");

    let run = jobwire(
        &server,
        &[
            "jobs",
            "enqueue",
            "media.ping",
            "--example",
            "hello",
            "--json",
        ],
    )
    .await
    .expect(0);
    assert_eq!(run.json()["job"]["payloadJson"]["note"], "hello");
    jobwire(&server, &["jobs", "watch", &job_id(&run)])
        .await
        .expect(0);

    jobwire(&server, &["types", "get", "nosuch"])
        .await
        .expect(NOT_FOUND);
    let run = jobwire(
        &server,
        &["jobs", "enqueue", "media.ping", "--example", "nosuch"],
    )
    .await
    .expect(INVALID_INPUT);
    assert!(run.stderr.contains("nosuch"), "{run:?}");
    worker.stop().await;
}

#[tokio::test]
async fn completions_help_and_connection_failures() {
    let run = jobwire_env(&["completions", "bash"], &[]).await.expect(0);
    assert!(run.stdout.contains("_jobwire()"), "{run:?}");
    assert!(run.stdout.contains("schedules"));
    let run = jobwire_env(&["completions", "zsh"], &[]).await.expect(0);
    assert!(run.stdout.starts_with("#compdef jobwire"), "{run:?}");
    let run = jobwire_env(&["completions", "fish"], &[]).await.expect(0);
    assert!(run.stdout.contains("complete -c jobwire"), "{run:?}");
    jobwire_env(&["completions", "tcsh"], &[])
        .await
        .expect(INVALID_INPUT);

    // --help documents the examples and the exit codes.
    let run = jobwire_env(&["--help"], &[]).await.expect(0);
    for expected in [
        "Examples:",
        "Exit codes:",
        "6  jobs watch: the job ended FAILED",
        "JOBWIRE_URL",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {run:?}");
    }
    let run = jobwire_env(&["jobs", "--help"], &[]).await.expect(0);
    assert!(run.stdout.contains("jobwire jobs watch ID"), "{run:?}");
    // The key's value is never shown, even when it is set in the environment.
    let run = jobwire_env(&["--help"], &[("JOBWIRE_API_KEY", "jw_secret")])
        .await
        .expect(0);
    assert!(!run.stdout.contains("jw_secret"), "{run:?}");

    // No server there: unavailable. A TLS file that cannot be read: invalid input.
    let run = jobwire_env(&["--url", "http://127.0.0.1:1", "queues", "list"], &[])
        .await
        .expect(UNAVAILABLE);
    assert!(run.stderr.contains("cannot reach the server"), "{run:?}");
    jobwire_env(
        &[
            "--url",
            "https://127.0.0.1:1",
            "--ca-cert",
            "/nonexistent/ca.pem",
            "queues",
            "list",
        ],
        &[],
    )
    .await
    .expect(INVALID_INPUT);
    jobwire_env(&["jobs", "list", "--state", "exploded"], &[])
        .await
        .expect(INVALID_INPUT);
}
