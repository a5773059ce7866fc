//! Signals: a handler waits for a named signal without holding a worker, and the wait outlives
//! its worker and the server; SignalJob delivers the signal and the handler runs again with it.
//! Timeouts, signals that arrive before the wait, repeats and bad input.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jobwire::{Client, HandlerError, JobContext, JobEventKind, JobType, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, eventually, test_db};
use support::{WAIT, jobs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Waits for `waits` signals named `name` (each for at most `timeout_ms`, 0: no limit) and
/// returns their payloads.
#[derive(Clone, PartialEq, prost::Message)]
struct Gate {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "2")]
    waits: u32,
    #[prost(uint64, tag = "3")]
    timeout_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Opened {
    #[prost(string, repeated, tag = "1")]
    by: Vec<String>,
}

/// A signal's payload.
#[derive(Clone, PartialEq, prost::Message)]
struct Go {
    #[prost(string, tag = "1")]
    by: String,
}

impl prost::Name for Gate {
    const NAME: &'static str = "Gate";
    const PACKAGE: &'static str = "jobwire.tests.signals";
}
impl prost::Name for Opened {
    const NAME: &'static str = "Opened";
    const PACKAGE: &'static str = "jobwire.tests.signals";
}
impl prost::Name for Go {
    const NAME: &'static str = "Go";
    const PACKAGE: &'static str = "jobwire.tests.signals";
}
impl JobType for Gate {
    const JOB_TYPE: &'static str = "signals.gate";
    type Output = Opened;
}

async fn run_gate(
    runs: Arc<AtomicU32>,
    ctx: JobContext,
    gate: Gate,
) -> Result<Opened, HandlerError> {
    runs.fetch_add(1, Ordering::SeqCst);
    let timeout = (gate.timeout_ms > 0).then(|| Duration::from_millis(gate.timeout_ms));
    let mut by = Vec::new();
    for _ in 0..gate.waits {
        match ctx.wait_signal(&gate.name, timeout) {
            Ok(signal) => by.push(
                signal
                    .payload::<Go>()
                    .map_err(|e| HandlerError::fatal(e.to_string()))?
                    .map(|go| go.by)
                    .unwrap_or_default(),
            ),
            Err(e) if e.kind() == Some("signal_timeout") => by.push("nobody: timed out".into()),
            Err(wait) => return Err(wait),
        }
    }
    Ok(Opened { by })
}

fn start_worker(url: &str, runs: &Arc<AtomicU32>) -> (CancellationToken, JoinHandle<()>) {
    let runs = runs.clone();
    let worker = Worker::builder(url)
        .worker_id("gatekeeper")
        .register::<Gate, _, _>(move |ctx, job| run_gate(runs.clone(), ctx, job))
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });
    (stop, task)
}

fn go(by: &str) -> Option<prost_types::Any> {
    Some(prost_types::Any::from_msg(&Go { by: by.into() }).expect("encode"))
}

/// Waits until the job waits PENDING for a signal of `name`, and returns it.
async fn waiting_for(url: &str, id: &str, name: &str) -> pb::Job {
    let raw = jobs(url).await;
    eventually("the job waits for its signal", WAIT, || {
        let (mut raw, id) = (raw.clone(), id.to_owned());
        async move {
            let job = support::get(&mut raw, &id).await;
            (job.state == pb::JobState::Pending as i32 && job.awaiting_signal == name)
                .then_some(job)
        }
    })
    .await
}

#[tokio::test]
async fn a_signal_reaches_a_job_waiting_for_it_across_a_server_and_worker_restart() {
    let db = test_db().await;
    let mut server = ServerProcess::start(&db, &["--poll-interval", "200ms"]).await;
    let url = server.url();
    let client = Client::connect(url.clone()).await.expect("client");
    let runs = Arc::new(AtomicU32::new(0));
    let (stop, worker) = start_worker(&url, &runs);

    let job = client
        .enqueue(Gate {
            name: "go".into(),
            waits: 1,
            timeout_ms: 0,
        })
        .await
        .expect("enqueue");
    let id = job.id().as_str().to_owned();
    let waiting = waiting_for(&url, &id, "go").await;
    assert_eq!(waiting.signal_deadline, None, "no timeout, no deadline");
    assert_eq!(waiting.attempts_counted, 0, "the wait does not count");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Nothing of the wait lives in a process: stop the worker, kill the server.
    stop.cancel();
    worker.await.expect("worker stopped");
    server.kill();
    server.restart().await;
    let waiting = waiting_for(&url, &id, "go").await;
    assert_eq!(waiting.state, pb::JobState::Pending as i32);

    let client = Client::connect(url.clone())
        .await
        .expect("client after restart");
    let number = client
        .signal_job(&id, "go", go("alice"), None)
        .await
        .expect("signal");
    assert_eq!(number, 1);
    let (stop, worker) = start_worker(&url, &runs);
    let opened = tokio::time::timeout(WAIT, client.job::<Gate>(id.clone()).wait())
        .await
        .expect("the job ends in time")
        .expect("the job succeeds");
    assert_eq!(opened.by, vec!["alice".to_owned()]);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "ran once more, with the signal"
    );

    let mut raw = jobs(&url).await;
    let done = raw
        .get_job(pb::GetJobRequest {
            id: id.clone(),
            view: pb::JobView::Full as i32,
        })
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(done.attempts_counted, 1);
    let outcomes: Vec<i32> = done.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::AttemptOutcome::Suspended as i32,
            pb::AttemptOutcome::Succeeded as i32
        ]
    );
    // The log tells the story: the wait, the signal and who sent it, the release.
    let mut events = client.watch_job(id.clone(), 0);
    let mut story = Vec::new();
    while let Some(event) = futures::StreamExt::next(&mut events).await {
        match event.expect("event").kind() {
            JobEventKind::StateChanged { state, reason, .. } => {
                story.push(format!("{state:?} {}", reason.clone().unwrap_or_default()));
            }
            JobEventKind::SignalReceived { name, actor, .. } => story.push(format!(
                "signal {name} from {}",
                actor.as_ref().map(|a| a.key_name.as_str()).unwrap_or("?")
            )),
            _ => {}
        }
    }
    let story = story.join(" | ");
    assert!(
        story.contains(
            "Pending waiting for a signal | signal go from (no key: server open) | Available signal go received"
        ),
        "{story}"
    );
    stop.cancel();
    worker.await.expect("worker stopped");
}

#[tokio::test]
async fn a_wait_times_out_and_signals_sent_before_a_wait_answer_it_in_order() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "200ms"]).await;
    let url = server.url();
    let client = Client::connect(url.clone()).await.expect("client");
    let runs = Arc::new(AtomicU32::new(0));
    let (stop, worker) = start_worker(&url, &runs);

    // A timeout: the handler's wait fails with `signal_timeout` once it passes.
    let lonely = client
        .enqueue(Gate {
            name: "never".into(),
            waits: 1,
            timeout_ms: 500,
        })
        .await
        .expect("enqueue");
    let waiting = waiting_for(&url, lonely.id().as_str(), "never").await;
    assert!(waiting.signal_deadline.is_some());
    let opened = tokio::time::timeout(WAIT, lonely.wait())
        .await
        .expect("ends in time")
        .expect("succeeds");
    assert_eq!(opened.by, vec!["nobody: timed out".to_owned()]);

    // Two waits for one name: the first signal arrives before the job first runs (no worker
    // is running), the second once it waits; each wait gets its own, in order.
    stop.cancel();
    worker.await.expect("worker stopped");
    let steps = client
        .enqueue(Gate {
            name: "step".into(),
            waits: 2,
            timeout_ms: 0,
        })
        .await
        .expect("enqueue");
    let id = steps.id().as_str().to_owned();
    let first = client
        .signal_job(&id, "step", go("one"), Some("step-1"))
        .await
        .expect("first step");
    assert_eq!(first, 1);
    // A repeat with the same request id stores nothing more.
    let mut raw = jobs(&url).await;
    let repeat = raw
        .signal_job(pb::SignalJobRequest {
            id: id.clone(),
            name: "step".into(),
            payload: go("one again"),
            request_id: "step-1".into(),
        })
        .await
        .expect("repeat")
        .into_inner();
    assert!(repeat.repeated);
    assert_eq!(repeat.number, 1);
    let (stop, worker) = start_worker(&url, &runs);
    let runs_before = runs.load(Ordering::SeqCst);
    waiting_for(&url, &id, "step").await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_before + 1,
        "the first wait was answered at once; the job waits for the second"
    );
    let second = client
        .signal_job(&id, "step", go("two"), None)
        .await
        .expect("second step");
    assert_eq!(second, 2);
    let opened = tokio::time::timeout(WAIT, steps.wait())
        .await
        .expect("ends in time")
        .expect("succeeds");
    assert_eq!(opened.by, vec!["one".to_owned(), "two".to_owned()]);

    // A finished job takes no signal.
    let refused = client.signal_job(&id, "step", None, None).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(Code::FailedPrecondition)
    );
    stop.cancel();
    worker.await.expect("worker stopped");
}

#[tokio::test]
async fn bad_signals_are_refused_naming_the_field_and_a_job_holds_at_most_100() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut raw = jobs(&url).await;
    let job = support::enqueue(&mut raw, support::spec("signals.gate", "idle")).await;
    let signal = |name: &str, payload: Option<prost_types::Any>| pb::SignalJobRequest {
        id: job.id.clone(),
        name: name.into(),
        payload,
        request_id: String::new(),
    };
    support::assert_status(
        raw.signal_job(signal("", None)).await,
        Code::InvalidArgument,
        "name",
    );
    support::assert_status(
        raw.signal_job(signal("no spaces", None)).await,
        Code::InvalidArgument,
        "name",
    );
    support::assert_status(
        raw.signal_job(signal(
            "big",
            Some(support::any_bytes("x", vec![0; 16 * 1024 + 1])),
        ))
        .await,
        Code::InvalidArgument,
        "payload",
    );
    support::assert_status(
        raw.signal_job(pb::SignalJobRequest {
            id: "not-a-uuid".into(),
            ..signal("ok", None)
        })
        .await,
        Code::InvalidArgument,
        "id",
    );
    let unknown = raw
        .signal_job(pb::SignalJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
            ..signal("ok", None)
        })
        .await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(Code::NotFound));
    for n in 1..=100 {
        let answer = raw
            .signal_job(signal("tick", None))
            .await
            .expect("signal")
            .into_inner();
        assert_eq!(answer.number, n);
    }
    let full = raw.signal_job(signal("tick", None)).await;
    assert_eq!(full.err().map(|s| s.code()), Some(Code::ResourceExhausted));
}
