//! Retry predicates (the Rust SDK's `jobwire::retry`) against the real server: a worker's
//! predicate retries a handler's 503 and fails its 404 at once with the kind it names, as
//! GetJob shows (state, attempts, last error's kind); a worker-wide predicate covers the job
//! types without one of their own.

use std::time::Duration;

use jobwire::retry::{self, RetryDecision};
use jobwire::{Client, HandlerError, JobContext, JobState, JobType, RetryPolicy, Worker};
use jobwire_tests::jobs::{self, Sleep};
use jobwire_tests::{ServerProcess, test_db};
use tokio_util::sync::CancellationToken;

/// Fails its first `failures` attempts with an HTTP error of `status`.
#[derive(Clone, PartialEq, prost::Message)]
struct Fetch {
    #[prost(uint32, tag = "1")]
    status: u32,
    #[prost(uint32, tag = "2")]
    failures: u32,
}

impl prost::Name for Fetch {
    const NAME: &'static str = "Fetch";
    const PACKAGE: &'static str = "jobwire.tests";
}

impl JobType for Fetch {
    const JOB_TYPE: &'static str = "test.fetch";
    type Output = ();
}

/// An HTTP client's error, as a handler would get it from its client library.
#[derive(Debug)]
struct HttpError {
    status: u32,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GET https://example.com/item answered {}", self.status)
    }
}

impl std::error::Error for HttpError {}

async fn fetch(ctx: JobContext, job: Fetch) -> Result<(), HandlerError> {
    if ctx.attempt() <= job.failures {
        // `?` keeps the error, for the predicate to read.
        Err(HttpError { status: job.status })?;
    }
    Ok(())
}

#[tokio::test]
async fn a_retry_predicate_retries_a_5xx_and_fails_a_4xx_at_once() {
    jobwire_tests::init_tracing();
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "100ms"]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let retry = RetryPolicy::new()
        .max_attempts(5)
        .initial_backoff(Duration::ZERO);
    let flaky = client
        .enqueue(Fetch {
            status: 503,
            failures: 2,
        })
        .retry(retry)
        .await
        .expect("enqueue");
    let missing = client
        .enqueue(Fetch {
            status: 404,
            failures: 5,
        })
        .retry(retry)
        .await
        .expect("enqueue");
    // Retryable by the handler's own word; the worker-wide predicate makes it fatal.
    let other = client
        .enqueue(Sleep {
            millis: 1,
            fail_times: 5,
            ..Default::default()
        })
        .retry(retry)
        .await
        .expect("enqueue");

    let stop = CancellationToken::new();
    let worker = Worker::builder(server.url())
        .register::<Fetch, _, _>(fetch)
        .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| {
            jobs::run_sleep(ctx, job, "w".into())
        })
        .retry_predicate_for::<Fetch>(retry::on_error(|error: &HttpError| {
            let decision = if error.status >= 500 {
                RetryDecision::retryable()
            } else {
                RetryDecision::fatal()
            };
            decision.with_kind(format!("http_{}xx", error.status / 100))
        }))
        .retry_predicate(|_: &HandlerError| Some(RetryDecision::fatal().with_kind("worker_wide")))
        .build()
        .expect("worker builds");
    let running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));

    flaky
        .wait()
        .await
        .expect("the 503s were retried until it succeeded");
    let job = flaky.get().await.expect("get");
    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(job.attempts_counted(), 3);
    let error = job.last_error().expect("the last failure is kept");
    assert_eq!(error.kind(), Some("http_5xx"));
    assert_eq!(error.message(), "GET https://example.com/item answered 503");

    let failure = missing.wait().await.expect_err("the 404 fails the job");
    let failure = failure.job_failure().expect("a job failure");
    assert_eq!(failure.state(), JobState::Failed);
    let job = missing.get().await.expect("get");
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.attempts_counted(), 1, "a 4xx is not retried");
    let error = job.last_error().expect("last error");
    assert_eq!(error.kind(), Some("http_4xx"));
    assert!(!error.is_retryable());

    other.wait().await.expect_err("fails");
    let job = other.get().await.expect("get");
    assert_eq!(job.attempts_counted(), 1);
    assert_eq!(job.last_error().and_then(|e| e.kind()), Some("worker_wide"));

    stop.cancel();
    running.await.expect("joined").expect("worker ran");
}
