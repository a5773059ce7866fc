//! The job lifecycle through the Rust SDK: enqueue, run on a worker, typed result, retries with
//! backoff, exhausted attempts, non-retryable failures. Real server binary, real PostgreSQL.

mod support;

use std::time::Duration;

use jobwire::{Client, Error, JobState, RetryPolicy};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, jobs::Sleep, test_db, workers::SleepWorker};
use support::{get, jobs as job_client};

fn secs(d: &prost_types::Timestamp) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

#[tokio::test]
async fn enqueued_job_runs_and_returns_its_typed_result() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = SleepWorker::new(server.url(), "w1").concurrency(4).spawn();
    let client = Client::connect(server.url()).await.expect("client");

    let handle = client
        .enqueue(Sleep {
            millis: 10,
            seq: 7,
            ..Default::default()
        })
        .priority(80)
        .await
        .expect("enqueue");
    let output = handle.wait().await.expect("job succeeds");
    assert_eq!(output.seq, 7);
    assert_eq!(output.attempt, 1);
    assert_eq!(output.worker, "w1");

    let info = handle.get().await.expect("get");
    assert_eq!(info.state(), JobState::Succeeded);

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn failing_twice_then_succeeding_respects_backoff() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "50ms"]).await;
    let worker = SleepWorker::new(server.url(), "w1").concurrency(2).spawn();
    let client = Client::connect(server.url()).await.expect("client");

    let handle = client
        .enqueue(Sleep {
            fail_times: 2,
            seq: 1,
            ..Default::default()
        })
        .retry(
            RetryPolicy::new()
                .max_attempts(5)
                .initial_backoff(Duration::from_millis(300))
                .backoff_multiplier(2.0)
                .jitter(0.0),
        )
        .await
        .expect("enqueue");
    let output = handle.wait().await.expect("third attempt succeeds");
    assert_eq!(output.attempt, 3);

    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    let outcomes: Vec<i32> = job.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::AttemptOutcome::Failed as i32,
            pb::AttemptOutcome::Failed as i32,
            pb::AttemptOutcome::Succeeded as i32
        ]
    );
    // The waits before attempts 2 and 3 are the policy's 300 ms and 600 ms (no jitter).
    for (i, expected) in [(1, 0.3), (2, 0.6)] {
        let ended = secs(job.attempts[i - 1].finished_at.as_ref().expect("finished"));
        let started = secs(job.attempts[i].started_at.as_ref().expect("started"));
        assert!(
            started - ended >= expected - 0.005,
            "attempt {} started {:.3}s after attempt {} ended, before its backoff of {expected}s",
            i + 1,
            started - ended,
            i
        );
    }
    assert_eq!(
        job.attempts[0].error.as_ref().expect("error").message,
        "attempt 1 failed"
    );

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn exhausted_attempts_fail_the_job_and_keep_every_error() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "50ms"]).await;
    let worker = SleepWorker::new(server.url(), "w1").concurrency(2).spawn();
    let client = Client::connect(server.url()).await.expect("client");

    let handle = client
        .enqueue(Sleep {
            fail_times: 99,
            ..Default::default()
        })
        .retry(
            RetryPolicy::new()
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(20))
                .jitter(0.0),
        )
        .await
        .expect("enqueue");
    let error = handle.wait().await.expect_err("the job fails");
    let failure = error.job_failure().expect("a job failure");
    assert_eq!(failure.state(), JobState::Failed);
    assert_eq!(failure.attempt(), 3);
    assert_eq!(
        failure.last_error().expect("last error").message(),
        "attempt 3 failed"
    );

    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    let errors: Vec<String> = job
        .attempts
        .iter()
        .map(|a| a.error.as_ref().expect("error kept").message.clone())
        .collect();
    assert_eq!(
        errors,
        vec!["attempt 1 failed", "attempt 2 failed", "attempt 3 failed"]
    );

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn non_retryable_failure_fails_after_one_attempt() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let worker = SleepWorker::new(server.url(), "w1").concurrency(2).spawn();
    let client = Client::connect(server.url()).await.expect("client");

    let handle = client
        .enqueue(Sleep {
            fail_times: 99,
            fatal: true,
            ..Default::default()
        })
        .await
        .expect("enqueue");
    match handle.wait().await {
        Err(Error::JobFailed(failure)) => {
            assert_eq!(failure.state(), JobState::Failed);
            assert_eq!(failure.attempt(), 1);
            let last = failure.last_error().expect("last error");
            assert!(!last.is_retryable());
        }
        other => panic!("expected a failed job, got {other:?}"),
    }
    let mut raw = job_client(&server.url()).await;
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.attempts.len(), 1);

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn cancelled_queued_job_never_runs() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Sleep::default())
        .priority(100)
        .await
        .expect("enqueue");
    let info = handle.cancel("changed my mind").await.expect("cancel");
    assert_eq!(info.state(), JobState::Cancelled);
    let later = client
        .enqueue(Sleep::default())
        .priority(0)
        .await
        .expect("enqueue");

    // One slot, highest priority first: had the cancelled job been claimable, it would have run
    // before the later, low-priority one finished.
    let worker = SleepWorker::new(server.url(), "w1").concurrency(1).spawn();
    later.wait().await.expect("the later job runs");
    let mut raw = job_client(&server.url()).await;
    let cancelled = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert!(cancelled.attempts.is_empty());
    match handle.wait().await {
        Err(Error::JobFailed(failure)) => assert_eq!(failure.state(), JobState::Cancelled),
        other => panic!("expected a cancelled job, got {other:?}"),
    }

    worker.stop().await.expect("worker ran");
}
