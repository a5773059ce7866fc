//! Control of running jobs through the SDK: cancel (also with the worker killed before it
//! answers), pause and resume from a checkpoint, execution timeouts, and coalesced progress.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use jobwire::{Client, HandlerError, JobContext, JobState, RetryPolicy, StopReason, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{
    ChildProcess, ServerProcess, eventually,
    jobs::{self, Sleep, Spin, Steps},
    test_db,
};
use nix::sys::signal::Signal;
use support::{get, jobs as job_client};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// Fast failure detection for the tests that wait out a lease.
const QUICK: &[&str] = &[
    "--lease-duration",
    "1s",
    "--heartbeat-interval",
    "250ms",
    "--reap-interval",
    "100ms",
    "--poll-interval",
    "100ms",
    "--stop-grace",
    "500ms",
];

fn run_worker(worker: Worker) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });
    (stop, task)
}

async fn wait_running(client: &Client, id: &str) {
    eventually("the job runs", WAIT, || async move {
        let info = client.get_job(id).await.ok()?;
        (info.state() == JobState::Running).then_some(())
    })
    .await;
}

#[tokio::test]
async fn cancelling_a_running_job_stops_its_handler_for_good() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let observed = Arc::new(AtomicBool::new(false));
    let seen = observed.clone();
    let worker = Worker::builder(server.url())
        .worker_id("w")
        .register::<Sleep, _, _>(move |ctx: JobContext, _job: Sleep| {
            let seen = seen.clone();
            async move {
                ctx.cancelled().await;
                if ctx.stop_reason() == Some(StopReason::Cancelled) {
                    seen.store(true, Ordering::SeqCst);
                }
                Err::<jobs::SleepOutput, _>(HandlerError::retryable("cancelled"))
            }
        })
        .build()
        .expect("worker");
    let (stop, task) = run_worker(worker);
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client.enqueue(Sleep::default()).await.expect("enqueue");
    wait_running(&client, handle.id().as_str()).await;

    handle.cancel("operator said so").await.expect("cancel");
    let error = handle.wait().await.expect_err("the job does not succeed");
    assert_eq!(
        error.job_failure().expect("job failure").state(),
        JobState::Cancelled
    );
    assert!(
        observed.load(Ordering::SeqCst),
        "the handler saw the cancellation"
    );
    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.state, pb::JobState::Cancelled as i32);
    assert_eq!(job.cancel_reason, "operator said so");
    assert_eq!(job.attempts.len(), 1, "no further attempt starts");
    assert_eq!(
        job.attempts[0].outcome,
        pb::AttemptOutcome::Cancelled as i32
    );

    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn cancel_reaches_the_job_even_when_its_worker_was_killed() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, QUICK).await;
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Sleep {
            millis: 60_000,
            ..Default::default()
        })
        .retry(RetryPolicy::new().initial_backoff(Duration::ZERO))
        .await
        .expect("enqueue");
    let mut victim = ChildProcess::spawn(
        env!("CARGO_BIN_EXE_test-worker"),
        &[],
        &[
            ("JOBWIRE_URL", server.url().as_str()),
            ("WORKER_ID", "victim"),
            ("CONCURRENCY", "1"),
        ],
    );
    wait_running(&client, handle.id().as_str()).await;
    // Frozen, it cannot acknowledge the cancel; then it dies.
    victim.signal(Signal::SIGSTOP);
    handle.cancel("stop it").await.expect("cancel");
    victim.kill();

    // A healthy worker is around: had the job been retried, it would run it.
    let worker = Worker::builder(server.url())
        .worker_id("bystander")
        .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| async move {
            jobs::run_sleep(ctx, job, "bystander".into()).await
        })
        .build()
        .expect("worker");
    let (stop, task) = run_worker(worker);
    let error = handle.wait().await.expect_err("cancelled");
    assert_eq!(
        error.job_failure().expect("job failure").state(),
        JobState::Cancelled
    );
    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.attempts.len(), 1, "no further attempt starts");
    assert_eq!(
        job.attempts[0].outcome,
        pb::AttemptOutcome::Cancelled as i32
    );

    stop.cancel();
    task.await.expect("worker");
}

fn steps_worker(url: &str) -> Worker {
    Worker::builder(url)
        .worker_id("stepper")
        .register::<Steps, _, _>(jobs::run_steps)
        .build()
        .expect("worker")
}

#[tokio::test]
async fn paused_job_resumes_from_its_checkpoint_without_using_an_attempt() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let (stop, task) = run_worker(steps_worker(&server.url()));
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Steps {
            steps: 40,
            step_millis: 25,
        })
        .await
        .expect("enqueue");
    eventually("a few steps done", WAIT, || {
        let handle = handle.clone();
        async move {
            let info = handle.get().await.ok()?;
            (info.has_checkpoint() && info.state() == JobState::Running).then_some(())
        }
    })
    .await;
    let before = handle.get().await.expect("get");

    handle.pause("maintenance").await.expect("pause");
    eventually("paused", WAIT, || {
        let handle = handle.clone();
        async move {
            let info = handle.get().await.ok()?;
            (info.state() == JobState::Paused).then_some(info)
        }
    })
    .await;
    let paused = handle.get().await.expect("get");
    assert_eq!(
        paused.attempts_counted(),
        before.attempts_counted() - 1,
        "the paused attempt does not count against max_attempts"
    );

    handle.resume().await.expect("resume");
    let output = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time")
        .expect("finishes");
    assert!(
        output.started_from > 0,
        "the second attempt started from the checkpoint"
    );
    assert_eq!(output.reached, 40);
    let done = handle.get().await.expect("get");
    assert_eq!(done.attempts_counted(), 1, "one attempt counted in all");
    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    let outcomes: Vec<i32> = job.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::AttemptOutcome::Paused as i32,
            pb::AttemptOutcome::Succeeded as i32
        ]
    );

    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn a_job_past_its_timeout_is_stopped_and_retried() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "100ms"]).await;
    let worker = Worker::builder(server.url())
        .worker_id("slowpoke")
        .register::<Sleep, _, _>(|ctx: JobContext, mut job: Sleep| async move {
            // Slow on the first attempt only.
            if ctx.attempt() > 1 {
                job.millis = 0;
            }
            jobs::run_sleep(ctx, job, "slowpoke".into()).await
        })
        .build()
        .expect("worker");
    let (stop, task) = run_worker(worker);
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Sleep {
            millis: 30_000,
            ..Default::default()
        })
        .timeout(Duration::from_millis(300))
        .retry(RetryPolicy::new().initial_backoff(Duration::ZERO))
        .await
        .expect("enqueue");
    let output = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time")
        .expect("the retry succeeds");
    assert_eq!(output.attempt, 2);
    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.attempts[0].outcome, pb::AttemptOutcome::TimedOut as i32);
    assert_eq!(
        job.attempts[0].error.as_ref().expect("error").kind,
        "timeout"
    );

    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn a_tight_progress_loop_costs_a_bounded_number_of_writes() {
    const CALLS: u32 = 100_000;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = Worker::builder(server.url())
        .worker_id("spinner")
        .register::<Spin, _, _>(jobs::run_spin)
        .build()
        .expect("worker");
    let (stop, task) = run_worker(worker);
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Spin { calls: CALLS })
        .await
        .expect("enqueue");
    tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("in time")
        .expect("succeeds");

    let info = handle.get().await.expect("get");
    let progress = info.progress().expect("stored progress");
    assert_eq!(
        progress.items_done(),
        u64::from(CALLS),
        "ends at the final value"
    );
    let writes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_events WHERE job_id = $1::uuid AND kind = 'progress'",
    )
    .bind(handle.id().as_str())
    .fetch_one(&db.pool().await)
    .await
    .expect("count");
    eprintln!("{CALLS} progress calls became {writes} progress writes");
    let logged: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT data FROM job_events WHERE job_id = $1::uuid AND kind = 'log' ORDER BY seq",
    )
    .bind(handle.id().as_str())
    .fetch_all(&db.pool().await)
    .await
    .expect("logs");
    assert_eq!(
        logged.len(),
        1,
        "the handler's log line is kept: {logged:?}"
    );
    assert_eq!(logged[0]["message"], format!("reported {CALLS} times"));
    assert_eq!(logged[0]["level"], "LOG_LEVEL_INFO");
    assert!(
        (1..=100).contains(&writes),
        "{writes} writes for {CALLS} calls"
    );

    stop.cancel();
    task.await.expect("worker");
}
