//! The lease lifecycle's contract under faults: a worker that ignores its deadline is told
//! TIMED_OUT and its late result refused; an attempt counts only once its handler started, so
//! leases lost with a server or with PostgreSQL burn no attempt (invariant 9).

mod support;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jobwire::{Client, JobContext, RetryPolicy, Worker};
use jobwire_proto::v1::{self as pb, connect_request::Message as In};
use jobwire_server::embedded_pg::EmbeddedPostgres;
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::{self, Sleep},
    test_db,
};
use support::{RawWorker, get, jobs as job_client, spec};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(120);

fn timed(millis: u64) -> pb::JobSpec {
    let mut job = spec("lease.timed", "default");
    job.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: i32::try_from(millis * 1_000_000).expect("small"),
    });
    job.retry_policy = Some(pb::RetryPolicy {
        max_attempts: Some(1),
        ..Default::default()
    });
    job
}

/// A worker that ignores its deadline is told TIMED_OUT at the deadline (not LEASE_LOST after
/// the deadline and the stop grace), its late result is refused with ABORTED (it once made the
/// job SUCCEED), and the attempt ends TIMED_OUT; a failure reported after the deadline is a
/// timeout too, whatever the worker called it (it once was recorded FAILED).
#[tokio::test]
async fn a_worker_ignoring_its_deadline_is_told_timed_out_and_its_late_result_refused() {
    let db = test_db().await;
    let server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "3s",
            "--heartbeat-interval",
            "1s",
            "--stop-grace",
            "2s",
            "--reap-interval",
            "100ms",
        ],
    )
    .await;
    let url = server.url();
    let mut client = job_client(&url).await;
    let ignored = support::enqueue(&mut client, timed(400)).await;
    let mut worker = RawWorker::connect(&url, "deaf", &["lease.timed"], 2).await;
    let lease = worker.next_lease().await;
    let leased_at = Instant::now();
    assert_eq!(lease.job_id, ignored.id);
    let stop = worker.next_stop().await;
    let told_after = leased_at.elapsed();
    assert_eq!(stop.reason, pb::StopReason::TimedOut as i32, "{stop:?}");
    assert!(
        told_after < Duration::from_secs(2),
        "told at the deadline, long before the lease or the grace ran out: {told_after:?}"
    );
    let ack = worker.complete(&lease.job_id, lease.attempt, b"late").await;
    assert_eq!(ack.code, Code::Aborted as i32, "{ack:?}");
    assert!(ack.message.contains("timeout"), "{ack:?}");
    // The worker keeps ignoring it: its lease lapses, and the attempt ends timed out.
    let ended = eventually("the attempt ends", WAIT, || {
        let (mut client, id) = (client.clone(), ignored.id.clone());
        async move {
            let job = get(&mut client, &id).await;
            (job.state == pb::JobState::Failed as i32).then_some(job)
        }
    })
    .await;
    assert_eq!(
        ended.attempts.last().map(|a| a.outcome),
        Some(pb::AttemptOutcome::TimedOut as i32),
        "{:?}",
        ended.attempts
    );
    assert!(ended.result.is_none(), "the late result was not kept");

    // A failure after the deadline, not flagged as a timeout by its worker.
    let late = support::enqueue(&mut client, timed(200)).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, late.id);
    let stop = worker.next_stop().await;
    assert_eq!(stop.reason, pb::StopReason::TimedOut as i32);
    let request_id = worker.request_id();
    let ack = worker
        .request(
            request_id,
            In::Fail(pb::FailJob {
                request_id,
                lease: Some(pb::LeaseRef {
                    job_id: lease.job_id.clone(),
                    attempt: lease.attempt,
                }),
                message: "gave up".into(),
                kind: "io".into(),
                ..Default::default()
            }),
        )
        .await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let job = get(&mut client, &late.id).await;
    assert_eq!(job.state, pb::JobState::Failed as i32);
    assert_eq!(
        job.attempts.last().map(|a| a.outcome),
        Some(pb::AttemptOutcome::TimedOut as i32)
    );
}

/// What the handlers saw: which jobs (by seq) a handler started.
#[derive(Default)]
struct Seen {
    started: Mutex<HashSet<u64>>,
}

fn spawn_worker(url: &str, seen: Arc<Seen>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let worker = Worker::builder(url)
        .worker_id("drainer")
        .concurrency(20)
        .prefetch(20)
        .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
            let seen = seen.clone();
            async move {
                seen.started.lock().expect("lock").insert(job.seq);
                jobs::run_sleep(ctx, job, "drainer".into()).await
            }
        })
        .build()
        .expect("worker builds");
    let token = stop.clone();
    let task = tokio::spawn(async move {
        // A drain may time out when the server went away first; that is not what is tested.
        let _ = worker.run(token.cancelled_owned()).await;
    });
    (stop, task)
}

async fn enqueue_all(client: &Client, n: u64) {
    let payloads: Vec<Sleep> = (0..n).map(|seq| Sleep::succeeding(5, seq)).collect();
    for chunk in payloads.chunks(500) {
        let batch = chunk.iter().map(|job| {
            client
                .enqueue(job.clone())
                .retry(RetryPolicy::new().max_attempts(1))
        });
        client.enqueue_many(batch).await.expect("enqueue");
    }
}

async fn count(pool: &sqlx::PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state::text = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Every job of the run ended; none FAILED whose handler never started it.
async fn assert_no_attempt_burned(pool: &sqlx::PgPool, seen: &Seen, jobs: i64) {
    let finished = count(pool, "succeeded").await + count(pool, "failed").await;
    assert_eq!(finished, jobs, "every job ended");
    let failed: Vec<Sleep> =
        sqlx::query_scalar::<_, Vec<u8>>("SELECT payload FROM jobs WHERE state = 'failed'")
            .fetch_all(pool)
            .await
            .expect("failed jobs")
            .into_iter()
            .map(|p| prost::Message::decode(p.as_slice()).expect("a Sleep payload"))
            .collect();
    let started = seen.started.lock().expect("lock");
    let burned: Vec<u64> = failed
        .iter()
        .map(|job| job.seq)
        .filter(|seq| !started.contains(seq))
        .collect();
    assert!(
        burned.is_empty(),
        "{} of {} failed jobs never had a handler start them: {:?}",
        burned.len(),
        failed.len(),
        &burned[..burned.len().min(20)]
    );
}

/// With max_attempts=1, a server SIGKILLed mid-drain takes with it the leases it claimed
/// ahead; they lapse, and no job ends FAILED having never run (106 did, in one run).
#[tokio::test]
async fn a_server_killed_mid_drain_burns_no_attempt() {
    let db = test_db().await;
    let args = [
        "--lease-duration",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--reap-interval",
        "100ms",
        "--poll-interval",
        "100ms",
    ];
    let mut server = ServerProcess::start(&db, &args).await;
    let client = Client::connect(server.url()).await.expect("client");
    const JOBS: u64 = 3000;
    enqueue_all(&client, JOBS).await;
    let seen = Arc::new(Seen::default());
    let (stop, worker) = spawn_worker(&server.url(), seen.clone());
    let pool = db.pool().await;
    eventually("some jobs done", WAIT, || {
        let pool = pool.clone();
        async move { (count(&pool, "succeeded").await >= 500).then_some(()) }
    })
    .await;
    server.kill();
    server.restart().await;
    eventually("every job ended", WAIT, || {
        let pool = pool.clone();
        async move {
            let ended = count(&pool, "succeeded").await + count(&pool, "failed").await;
            (ended == JOBS as i64).then_some(())
        }
    })
    .await;
    assert_no_attempt_burned(&pool, &seen, JOBS as i64).await;
    stop.cancel();
    let _ = worker.await;
}

/// With max_attempts=1, PostgreSQL restarted at once (SIGKILL, crash recovery) mid-drain: claims
/// whose commits reached no one, and leases whose server lost its connections, burn no attempt.
#[tokio::test]
async fn postgres_restarted_mid_drain_burns_no_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = EmbeddedPostgres::start(dir.path()).await.expect("cluster");
    pg.ensure_database("jobwire").await.expect("database");
    let url = pg.database_url("jobwire");
    let server = ServerProcess::start_with_args(&[
        "--database-url",
        &url,
        "--lease-duration",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--reap-interval",
        "100ms",
        "--poll-interval",
        "100ms",
    ])
    .await;
    let client = Client::connect(server.url()).await.expect("client");
    const JOBS: u64 = 3000;
    enqueue_all(&client, JOBS).await;
    let seen = Arc::new(Seen::default());
    let (stop, worker) = spawn_worker(&server.url(), seen.clone());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("pool");
    eventually("some jobs done", WAIT, || {
        let pool = pool.clone();
        async move { (count(&pool, "succeeded").await >= 500).then_some(()) }
    })
    .await;
    pool.close().await;
    pg.kill().await.expect("kill the cluster");
    let pg = EmbeddedPostgres::start(dir.path()).await.expect("restart");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("pool");
    eventually("every job ended", WAIT, || {
        let pool = pool.clone();
        async move {
            let ended = count(&pool, "succeeded").await + count(&pool, "failed").await;
            (ended == JOBS as i64).then_some(())
        }
    })
    .await;
    assert_no_attempt_burned(&pool, &seen, JOBS as i64).await;
    stop.cancel();
    let _ = worker.await;
    drop(server);
    pool.close().await;
    pg.stop().await.expect("stop the cluster");
}
