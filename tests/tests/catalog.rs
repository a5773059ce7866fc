//! The seeds' catalog (`examples/catalog`) served end to end: the real server, an in-process
//! worker built with `register_all` on a temporary cache, and a local HTTP server in the test
//! that serves a 2 MiB file in timed chunks (with a Content-Length) and 404 for anything else.
//!
//! It shows that a `download.fetch` streams the file into the cache while its progress reaches
//! a watcher, that the seed's idempotency key folds a second enqueue of the same payload into
//! the first job, that `download.verify` passes the right digest and fails the wrong one for
//! good, that `download.cleanup` removes an old unreferenced file and keeps a referenced one,
//! that a 404 fails a fetch without retries, that a chain fetch -> verify -> apply enqueued at
//! once with `depends_on` runs in order, and a wrong digest cancels the apply naming the
//! verify, and that the stand-ins only plan. Every job type
//! is declared only in `catalog.proto`: the worker registers the eleven with their schemas and
//! defaults when it connects, and the jobs here, enqueued without a queue or priority, take
//! them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jobwire::{Client, Error, JobEventKind, JobFailure, JobState, JobType, Worker};
use jobwire_catalog::{CATALOG, QUEUES, idempotency_key, pb, plan::PLAN_ONLY_NOTE};
use jobwire_proto::v1::{self as api, job_type_service_client::JobTypeServiceClient};
use jobwire_tests::{ServerProcess, TestDb, eventually, test_db};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// The served file: big enough to arrive in several frames.
const FILE_LEN: usize = 2 * 1024 * 1024;
/// The file goes out in this many chunks...
const CHUNKS: usize = 8;
/// ...this far apart, so the transfer spans several of the worker's 100 ms progress intervals.
const CHUNK_PAUSE: Duration = Duration::from_millis(60);
const FILE_PATH: &str = "/artifact.bin";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The served file's bytes: a fixed, non-repeating-looking pattern.
fn file_bytes() -> Bytes {
    (0..FILE_LEN)
        .map(|i| u8::try_from((i * 31 + i / 251) % 251).expect("below 251"))
        .collect::<Vec<u8>>()
        .into()
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Starts the test's HTTP server on a free loopback port; it runs until the test ends.
async fn serve_files(file: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let file = file.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, file.clone()));
                // A fetch that gives up mid-body ends its connection; nothing to report.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The file at [`FILE_PATH`], in [`CHUNKS`] timed chunks behind a Content-Length; 404 elsewhere.
async fn respond(request: Request<Incoming>, file: Bytes) -> Result<Response<Body>, Infallible> {
    if request.uri().path() != FILE_PATH {
        let body = Full::new(Bytes::from_static(b"not found")).boxed_unsync();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let len = file.len();
    let chunk = len.div_ceil(CHUNKS);
    let chunks = futures::stream::iter(0..CHUNKS).then(move |i| {
        let file = file.clone();
        async move {
            if i > 0 {
                tokio::time::sleep(CHUNK_PAUSE).await;
            }
            Ok::<_, Infallible>(Frame::data(
                file.slice(i * chunk..((i + 1) * chunk).min(len)),
            ))
        }
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(CONTENT_LENGTH, len.into());
    Ok(response)
}

/// The job types in the server's registry (the latest version of each), as
/// `JobTypeService/ListJobTypes` lists them.
async fn registered_types(url: &str) -> Vec<api::JobType> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    JobTypeServiceClient::new(channel)
        .list_job_types(api::ListJobTypesRequest::default())
        .await
        .expect("list job types")
        .into_inner()
        .job_types
}

/// A server, a catalog worker on a temporary cache, a client, and the HTTP file server.
struct Setup {
    client: Client,
    /// What the registry listed once the worker had connected: its eleven types.
    registered: Vec<api::JobType>,
    cache: TempDir,
    files: SocketAddr,
    file: Bytes,
    stop: CancellationToken,
    worker: JoinHandle<Result<(), Error>>,
    _server: ServerProcess,
    _db: TestDb,
}

impl Setup {
    async fn start() -> Self {
        jobwire_tests::init_tracing();
        let db = test_db().await;
        let server = ServerProcess::start(&db, &[]).await;
        let client = Client::connect(server.url()).await.expect("client");
        let cache = tempfile::tempdir().expect("cache dir");
        let worker = jobwire_catalog::register_all(
            Worker::builder(server.url())
                .worker_id("catalog")
                .concurrency(4)
                .drain_timeout(Duration::from_secs(5)),
            cache.path().to_path_buf(),
        )
        .build()
        .expect("worker builds");
        let stop = CancellationToken::new();
        let worker = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
        // The worker registers its types when it connects; from then on an enqueue that leaves
        // the queue or priority unset takes the type's defaults. The database is the test's own,
        // so whatever is listed, the worker registered.
        let registered = eventually("the catalog worker's types registered", WAIT, || async {
            let types = registered_types(&server.url()).await;
            (types.len() >= CATALOG.len()).then_some(types)
        })
        .await;
        let file = file_bytes();
        let files = serve_files(file.clone()).await;
        Self {
            client,
            registered,
            cache,
            files,
            file,
            stop,
            worker,
            _server: server,
            _db: db,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.files)
    }

    fn fetch(&self, path: &str, name: &str) -> pb::DownloadFetch {
        pb::DownloadFetch {
            software_id: 7,
            source_url: self.url(path),
            target_filename: name.to_owned(),
            checksum_sha256: String::new(),
            allow_untrusted_source: true,
        }
    }

    /// Drains the worker, which must end cleanly.
    async fn stop(self) {
        self.stop.cancel();
        self.worker
            .await
            .expect("the worker task panicked")
            .expect("the worker drained");
    }
}

/// How a job that was expected to fail ended.
fn failure<T: std::fmt::Debug>(outcome: Result<T, Error>) -> JobFailure {
    match outcome {
        Err(Error::JobFailed(failure)) => *failure,
        other => panic!("expected a failed job, got {other:?}"),
    }
}

/// Whether the cache holds a fetch's leftover `.part` file.
fn has_part_files(cache: &Path) -> bool {
    std::fs::read_dir(cache)
        .expect("cache listing")
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().ends_with(".part"))
}

#[tokio::test]
async fn a_fetch_streams_progress_then_verifies_against_its_digest() {
    let setup = Setup::start().await;
    let client = &setup.client;
    let fetch = setup.fetch(FILE_PATH, "artifact.bin");
    let key = idempotency_key(&fetch);
    let handle = client
        .enqueue(fetch.clone())
        .idempotency_key(key.clone())
        .await
        .expect("fetch enqueued");
    // The type's registered defaults, from its option in catalog.proto.
    let job = handle.get().await.expect("job");
    assert_eq!(job.queue(), "downloads");
    assert_eq!(job.priority(), 70);

    // The seed's idempotency: the same payload, enqueued again, is the same job.
    let again = client
        .enqueue(fetch)
        .idempotency_key(key)
        .send_detailed()
        .await
        .expect("enqueued again");
    assert!(!again.created(), "the second enqueue made a new job");
    assert_eq!(again.handle().id(), handle.id());

    let mut events = handle.watch();
    let mut fractions = Vec::new();
    let mut end = None;
    while let Some(event) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the fetch's events kept coming")
    {
        let event = event.expect("watch event");
        if let JobEventKind::Progress(progress) = event.kind() {
            fractions.push(
                progress
                    .fraction()
                    .expect("a known length gives a fraction"),
            );
        }
        if event.is_terminal() {
            end = event.state();
            break;
        }
    }
    assert_eq!(end, Some(JobState::Succeeded), "the fetch ended {end:?}");
    println!("progress fractions seen by the watcher: {fractions:?}");
    let mut distinct = fractions.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "at least two different progress values reached the watcher: {fractions:?}"
    );
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {fractions:?}"
    );
    assert!(
        distinct.windows(2).all(|w| w[0] < w[1]),
        "each new value is larger: {fractions:?}"
    );
    assert_eq!(
        fractions.last(),
        Some(&1.0),
        "the last report is the whole file"
    );

    let output = handle.wait().await.expect("the fetch's output");
    let expected = sha256_hex(&setup.file);
    assert_eq!(output.size_bytes, FILE_LEN as u64);
    assert_eq!(output.sha256, expected);
    assert_eq!(output.software_id, 7);
    let on_disk = std::fs::metadata(&output.path).expect("the fetched file exists");
    assert_eq!(on_disk.len(), FILE_LEN as u64);
    assert!(Path::new(&output.path).starts_with(setup.cache.path().canonicalize().expect("cache")));
    assert_eq!(
        std::fs::read(&output.path).expect("read back"),
        setup.file.as_ref()
    );
    assert!(
        !has_part_files(setup.cache.path()),
        "no partial file is left"
    );

    // The right digest verifies.
    let verified = client
        .enqueue(pb::DownloadVerify {
            download_task_id: handle.id().to_string(),
            artifact_path: output.path.clone(),
            checksum_sha256: expected.to_uppercase(),
            domain: "127.0.0.1".into(),
        })
        .await
        .expect("verify enqueued")
        .wait()
        .await
        .expect("the right digest verifies");
    assert!(verified.verified);
    assert_eq!(verified.sha256, expected);
    assert_eq!(verified.size_bytes, FILE_LEN as u64);
    assert_eq!(verified.domain, "127.0.0.1");

    // A wrong one fails the job at once: no retry can change the bytes.
    let wrong = "0".repeat(64);
    let mismatch = failure(
        client
            .enqueue(pb::DownloadVerify {
                download_task_id: handle.id().to_string(),
                artifact_path: "artifact.bin".into(),
                checksum_sha256: wrong.clone(),
                domain: String::new(),
            })
            .await
            .expect("verify enqueued")
            .wait()
            .await,
    );
    assert_eq!(mismatch.state(), JobState::Failed);
    assert_eq!(mismatch.attempt(), 1, "not retried");
    let error = mismatch.last_error().expect("the failure is recorded");
    println!("wrong digest: {error}");
    assert!(!error.is_retryable());
    assert_eq!(error.kind(), Some("digest_mismatch"));
    assert!(error.message().contains("digest mismatch"), "{error}");
    assert!(error.message().contains(&wrong), "{error}");
    assert!(error.message().contains(&expected), "{error}");
    setup.stop().await;
}

/// The update that installs what a chain downloaded: plan-only, low risk, so no approval.
fn apply(package: &str) -> pb::UpdateApplyPackage {
    pb::UpdateApplyPackage {
        package_id: package.to_owned(),
        requested_mode: pb::RequestedMode::DryRun.into(),
        risk_level: pb::RiskLevel::Low.into(),
        ..Default::default()
    }
}

/// Enqueues the chain fetch -> verify -> apply at once, each waiting for the one before with
/// the server's `depends_on`; the verify finds the fetched file by its name in the cache.
async fn chain(
    setup: &Setup,
    name: &str,
    digest: &str,
) -> (
    jobwire::JobHandle<pb::DownloadFetch>,
    jobwire::JobHandle<pb::DownloadVerify>,
    jobwire::JobHandle<pb::UpdateApplyPackage>,
) {
    let client = &setup.client;
    let fetch = client
        .enqueue(setup.fetch(FILE_PATH, name))
        .await
        .expect("fetch enqueued");
    let verify = client
        .enqueue(pb::DownloadVerify {
            download_task_id: fetch.id().to_string(),
            artifact_path: name.to_owned(),
            checksum_sha256: digest.to_owned(),
            domain: String::new(),
        })
        .depends_on(fetch.id())
        .await
        .expect("verify enqueued");
    let apply = client
        .enqueue(apply("Git.Git"))
        .depends_on(verify.id())
        .await
        .expect("apply enqueued");
    (fetch, verify, apply)
}

#[tokio::test]
async fn a_chained_verify_gates_the_apply_and_a_wrong_digest_cancels_it() {
    let setup = Setup::start().await;
    let expected = sha256_hex(&setup.file);

    // The right digest: the three run in order, each after the one it depends on.
    let (fetch, verify, apply) = chain(&setup, "chained-good.bin", &expected).await;
    let applied = apply.wait().await.expect("the apply runs once verified");
    assert!(applied.plan_only);
    assert_eq!(applied.package_id, "Git.Git");
    let verified = verify.wait().await.expect("the verify succeeded");
    assert!(verified.verified);
    assert_eq!(verified.sha256, expected);
    let fetched = fetch.wait().await.expect("the fetch succeeded");
    assert_eq!(fetched.sha256, expected);
    let (fetch_info, verify_info, apply_info) = (
        fetch.get().await.expect("fetch"),
        verify.get().await.expect("verify"),
        apply.get().await.expect("apply"),
    );
    let ended = |info: &jobwire::JobInfo| info.finished_at().expect("finished");
    let started = |info: &jobwire::JobInfo| info.started_at().expect("started");
    assert!(
        started(&verify_info) >= ended(&fetch_info),
        "verify ran after the fetch"
    );
    assert!(
        started(&apply_info) >= ended(&verify_info),
        "apply ran after the verify"
    );

    // A wrong digest: the fetch succeeds, the verify fails for good, and the apply waiting for
    // it is cancelled without running, its reason naming the verify.
    let wrong = "0".repeat(64);
    let (fetch, verify, apply) = chain(&setup, "chained-bad.bin", &wrong).await;
    fetch.wait().await.expect("the fetch succeeded");
    let mismatch = failure(verify.wait().await);
    assert_eq!(mismatch.state(), JobState::Failed);
    assert_eq!(
        mismatch.last_error().and_then(|e| e.kind()),
        Some("digest_mismatch")
    );
    let cancelled = failure(apply.wait().await);
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert_eq!(cancelled.attempt(), 0, "the apply never ran");
    let reason = cancelled.cancel_reason().unwrap_or_default();
    println!("the apply's cancel reason: {reason}");
    assert!(reason.contains(verify.id().as_str()), "{reason:?}");
    assert!(reason.contains("FAILED"), "{reason:?}");
    setup.stop().await;
}

#[tokio::test]
async fn a_cleanup_removes_old_unreferenced_files_and_keeps_referenced_ones() {
    let setup = Setup::start().await;
    let cache = setup.cache.path();
    let long_ago = SystemTime::now() - 40 * DAY;
    for name in ["old-unreferenced.bin", "old-referenced.bin"] {
        let path = cache.join(name);
        std::fs::write(&path, vec![1u8; 1000]).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(long_ago))
            .expect("backdated");
    }
    std::fs::write(cache.join("fresh.bin"), b"new").expect("write");

    let output = setup
        .client
        .enqueue(pb::DownloadCleanup {
            older_than_days: 30,
            only_unreferenced: true,
            referenced_filenames: vec!["/somewhere/else/old-referenced.bin".into()],
        })
        .await
        .expect("cleanup enqueued")
        .wait()
        .await
        .expect("cleanup succeeds");
    println!("cleanup: {output:?}");
    assert_eq!(output.removed, ["old-unreferenced.bin"]);
    assert_eq!(output.kept, ["fresh.bin", "old-referenced.bin"]);
    assert_eq!(output.bytes_freed, 1000);
    assert!(!cache.join("old-unreferenced.bin").exists());
    assert!(cache.join("old-referenced.bin").exists());
    assert!(cache.join("fresh.bin").exists());
    setup.stop().await;
}

#[tokio::test]
async fn a_missing_file_fails_the_fetch_without_retries() {
    let setup = Setup::start().await;
    let missing = failure(
        setup
            .client
            .enqueue(setup.fetch("/missing.bin", "missing.bin"))
            .await
            .expect("fetch enqueued")
            .wait()
            .await,
    );
    assert_eq!(missing.state(), JobState::Failed);
    assert_eq!(missing.attempt(), 1, "a 404 is not retried");
    let error = missing.last_error().expect("the failure is recorded");
    println!("404: {error}");
    assert!(!error.is_retryable());
    assert_eq!(error.kind(), Some("http_status"));
    assert!(error.message().contains("404"), "{error}");
    assert!(!setup.cache.path().join("missing.bin").exists());
    assert!(
        !has_part_files(setup.cache.path()),
        "no partial file is left"
    );
    setup.stop().await;
}

#[tokio::test]
async fn the_stand_ins_plan_and_change_nothing() {
    let setup = Setup::start().await;
    let client = &setup.client;
    let handle = client
        .enqueue(pb::AiRepairPlan {
            target_software: "Google Chrome".into(),
            issue: "crash on startup".into(),
            collect_diagnostics: true,
        })
        .await
        .expect("repair plan enqueued");
    let plan = handle.wait().await.expect("a plan");
    println!("repair plan: {plan:?}");
    assert!(plan.plan_only);
    assert_eq!(plan.note, PLAN_ONLY_NOTE);
    assert_eq!(plan.target_software, "Google Chrome");
    assert!(plan.steps.len() >= 3, "{plan:?}");
    // The type's registered defaults: the seed's fault-repair band, on the default queue.
    let job = handle.get().await.expect("job");
    assert_eq!(job.priority(), 90);
    assert_eq!(job.queue(), "default");

    // The job's own log says so too.
    let mut events = handle.watch();
    let mut lines = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the plan's events kept coming")
    {
        let event = event.expect("watch event");
        if let JobEventKind::Log { message, .. } = event.kind() {
            lines.push(message.clone());
        }
        if event.is_terminal() {
            break;
        }
    }
    assert!(
        lines.iter().any(|line| line == PLAN_ONLY_NOTE),
        "the job's log: {lines:?}"
    );

    // A HIGH risk update waits for an operator's approval (the type's approval rule); once
    // approved, the seed's gate still refuses it for good without an approval ticket.
    let high = client
        .enqueue(pb::UpdateApplyPackage {
            package_id: "Git.Git".into(),
            requested_mode: pb::RequestedMode::Confirm.into(),
            risk_level: pb::RiskLevel::High.into(),
            ticket_id: String::new(),
            confirm: true,
        })
        .await
        .expect("update enqueued");
    let waiting = client.get_job(high.id().as_str()).await.expect("get");
    assert_eq!(waiting.state(), JobState::AwaitingApproval);
    client
        .approve_job(high.id().as_str(), "reviewed")
        .await
        .expect("approve");
    let refused = failure(high.wait().await);
    let error = refused.last_error().expect("the refusal is recorded");
    assert!(!error.is_retryable());
    assert_eq!(error.kind(), Some("gate_refused"));
    assert!(error.message().contains("ticket"), "{error}");

    // A batch of several software ids fans out into one child check each, and gathers them.
    let batch = client
        .enqueue(pb::UpdateCheckBatch {
            software_ids: vec![42, 7, 19],
            provider: "winget".into(),
            include_prerelease: false,
        })
        .await
        .expect("batch enqueued");
    let checked = tokio::time::timeout(WAIT, batch.wait())
        .await
        .expect("the batch ends in time")
        .expect("the batch succeeds");
    assert_eq!(checked.planned_checks, vec![7, 19, 42]);
    assert!(
        checked.note.starts_with("3 of 3 checks with winget"),
        "{}",
        checked.note
    );
    let children = client
        .list_jobs()
        .parent(batch.id())
        .send()
        .await
        .expect("children");
    assert_eq!(children.jobs().len(), 3);
    assert!(
        children
            .jobs()
            .iter()
            .all(|c| c.job_type() == "update.check.batch" && c.state() == JobState::Succeeded)
    );
    setup.stop().await;
}

#[tokio::test]
async fn the_worker_registers_the_eleven_types_with_their_schemas() {
    let setup = Setup::start().await;
    let listed = &setup.registered;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    println!("registered: {names:?}");
    assert_eq!(
        listed.len(),
        CATALOG.len(),
        "the registry lists the catalog's types and nothing else: {names:?}"
    );
    for entry in CATALOG {
        let registered = listed
            .iter()
            .find(|t| t.name == entry.job_type)
            .unwrap_or_else(|| panic!("{} is not registered: {names:?}", entry.job_type));
        assert_eq!(registered.version, 1, "{}", entry.job_type);
        assert!(registered.latest, "{}", entry.job_type);
        assert_eq!(
            registered.payload_type,
            entry.payload(),
            "{}",
            entry.job_type
        );
        assert_eq!(
            registered.output_type,
            entry.schema.output_type(),
            "{}",
            entry.job_type
        );
        let payload = registered
            .payload_schema
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no payload schema", entry.job_type));
        assert_eq!(payload.full_name, entry.payload(), "{}", entry.job_type);
        assert!(
            !payload.fields.is_empty(),
            "{}: the payload schema lists its fields",
            entry.job_type
        );
        let defaults = registered
            .defaults
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no defaults", entry.job_type));
        assert!(
            QUEUES.contains(&defaults.queue.as_str()),
            "{} defaults to queue {:?}, which the worker does not serve",
            entry.job_type,
            defaults.queue
        );
        let priority = defaults
            .priority
            .unwrap_or_else(|| panic!("{} has no default priority", entry.job_type));
        assert!(
            jobwire_catalog::PriorityBand::of(priority).is_some(),
            "{} at {priority} is in none of the seed's bands",
            entry.job_type
        );
    }

    // One type in full: the option's defaults and the payload's fields, from catalog.proto.
    let fetch = listed
        .iter()
        .find(|t| t.name == <pb::DownloadFetch as JobType>::JOB_TYPE)
        .expect("download.fetch");
    let defaults = fetch.defaults.as_ref().expect("defaults");
    assert_eq!(defaults.queue, "downloads");
    assert_eq!(defaults.priority, Some(70));
    let fields = jobwire_tests::payload_fields(fetch);
    assert_eq!(
        fields,
        [
            ("software_id", "int64"),
            ("source_url", "string"),
            ("target_filename", "string"),
            ("checksum_sha256", "string"),
            ("allow_untrusted_source", "bool"),
        ]
    );
    assert_eq!(
        fetch
            .output_schema
            .as_ref()
            .expect("output schema")
            .full_name,
        "jobwire.catalog.v1.DownloadFetchOutput"
    );
    setup.stop().await;
}
