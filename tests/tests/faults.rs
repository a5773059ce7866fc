//! Fault tests: processes killed with SIGKILL, several replicas on one database. Each checks
//! invariants 1 and 2 from the database itself (the jobs table and every attempt) and from the
//! handlers, which count their own runs: the attempts table records a success per succeeded
//! job whatever happened, so only the handlers can tell that a job ran twice.

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use jobwire::{Client, JobContext, RetryPolicy, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{
    ChildProcess, ServerProcess, eventually,
    jobs::{self, Sleep, SleepOutput},
    test_db,
};
use support::{RawWorker, get, jobs as job_client, spec};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(120);

/// How many times each job's handler (by `Sleep::seq`) ran to success.
type Runs = Arc<Mutex<HashMap<u64, u32>>>;

fn spawn_sdk_worker(
    url: &str,
    id: &str,
    concurrency: usize,
    runs: Runs,
) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let name = id.to_owned();
    let worker = Worker::builder(url)
        .worker_id(id)
        .concurrency(concurrency)
        .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
            let (name, runs) = (name.clone(), runs.clone());
            async move {
                let seq = job.seq;
                let output = jobs::run_sleep(ctx, job, name).await?;
                *runs.lock().expect("lock").entry(seq).or_default() += 1;
                Ok(output)
            }
        })
        .build()
        .expect("worker builds");
    let token = stop.clone();
    let task = tokio::spawn(async move {
        worker
            .run(token.cancelled_owned())
            .await
            .expect("worker ran");
    });
    (stop, task)
}

/// Counts jobs by state straight from the table.
async fn count_in_state(pool: &sqlx::PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state::text = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Every job's handler ran to success exactly once (counted by the handlers), every job
/// succeeded by its final attempt, and nothing is left running.
async fn assert_each_succeeded_once(pool: &sqlx::PgPool, expected: i64, runs: &Runs) {
    assert_each_ran_once(&runs.lock().expect("lock"), expected);
    assert_eq!(count_in_state(pool, "succeeded").await, expected);
    assert_eq!(count_in_state(pool, "running").await, 0);
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j WHERE \
            (SELECT count(*) FROM job_attempt_history a \
             WHERE a.job_id = j.id AND a.outcome = 'succeeded') <> 1 \
         OR NOT EXISTS (SELECT 1 FROM job_attempt_history a WHERE a.job_id = j.id \
                        AND a.attempt = j.attempt AND a.outcome = 'succeeded')",
    )
    .fetch_one(pool)
    .await
    .expect("check attempts");
    assert_eq!(
        bad, 0,
        "jobs not succeeded exactly once by their final attempt"
    );
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_attempts WHERE outcome = 'running'")
            .fetch_one(pool)
            .await
            .expect("count open attempts");
    assert_eq!(open, 0, "attempts left open");
}

/// Each of `expected` jobs (seq 0 to expected - 1) ran to success once.
fn assert_each_ran_once(runs: &HashMap<u64, u32>, expected: i64) {
    let twice: Vec<(&u64, &u32)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "jobs whose handler succeeded more than once: {twice:?}"
    );
    let ran = i64::try_from(runs.len()).expect("small");
    assert_eq!(ran, expected, "jobs whose handler succeeded");
}

#[test]
#[should_panic(expected = "jobs whose handler succeeded more than once")]
fn a_job_run_twice_is_caught() {
    assert_each_ran_once(&HashMap::from([(0, 1), (1, 2)]), 2);
}

/// A worker killed mid-job: its lease lapses, another worker completes the job, and the dead
/// worker's token is refused afterwards.
#[tokio::test]
async fn killed_worker_lease_expires_and_another_worker_finishes() {
    let db = test_db().await;
    let server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "1s",
            "--heartbeat-interval",
            "250ms",
            "--reap-interval",
            "100ms",
            "--poll-interval",
            "100ms",
        ],
    )
    .await;
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Sleep {
            millis: 3_000,
            seq: 1,
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
    let mut raw = job_client(&server.url()).await;
    let running = eventually("the victim runs the job", WAIT, || {
        let mut raw = raw.clone();
        let id = handle.id().as_str().to_owned();
        async move {
            let job = get(&mut raw, &id).await;
            (job.state == pb::JobState::Running as i32 && job.lease_owner == "victim")
                .then_some(job)
        }
    })
    .await;
    assert_eq!(running.attempt, 1);
    // The running attempt is read from the job's row: it has no attempt row until it ends.
    assert_eq!(running.attempts.len(), 1, "{:?}", running.attempts);
    assert_eq!(running.attempts[0].attempt, 1);
    assert_eq!(running.attempts[0].worker_id, "victim");
    assert_eq!(
        running.attempts[0].outcome,
        pb::AttemptOutcome::Running as i32
    );
    assert!(running.attempts[0].started_at.is_some());
    assert!(running.attempts[0].finished_at.is_none());
    victim.kill();

    let (stop, worker) = spawn_sdk_worker(&server.url(), "rescuer", 1, Runs::default());
    let output: SleepOutput = handle.wait().await.expect("the job completes");
    assert_eq!(output.worker, "rescuer");
    assert_eq!(output.attempt, 2);

    // The dead worker's token (attempt 1), sent late, is refused and changes nothing.
    let mut late = RawWorker::connect(&server.url(), "victim", &["test.sleep"], 1).await;
    let ack = late.complete(handle.id().as_str(), 1, b"late").await;
    assert_eq!(ack.code, Code::Aborted as i32, "{ack:?}");
    let job = get(&mut raw, handle.id().as_str()).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    assert_eq!(job.attempts.len(), 2);
    assert_eq!(
        job.attempts[0].outcome,
        pb::AttemptOutcome::LeaseExpired as i32
    );
    assert_eq!(job.attempts[0].worker_id, "victim");
    assert_eq!(job.attempts[1].worker_id, "rescuer");
    assert_eq!(
        job.attempts[1].outcome,
        pb::AttemptOutcome::Succeeded as i32
    );
    let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(
        at(&job.attempts[1].started_at) <= at(&job.attempts[1].finished_at)
            && job.attempts[1].finished_at.is_some(),
        "{:?}",
        job.attempts[1]
    );
    assert_eq!(job.lease_owner, "", "no lease is held once the job ended");

    stop.cancel();
    worker.await.expect("worker stopped");
}

/// The server killed with 1,000 jobs in flight and restarted: every accepted job ends
/// SUCCEEDED exactly once, by its final attempt; none lost, none left RUNNING.
#[tokio::test]
async fn killed_server_loses_nothing() {
    let db = test_db().await;
    let mut server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "15s",
            "--heartbeat-interval",
            "1s",
            "--poll-interval",
            "200ms",
        ],
    )
    .await;
    let client = Client::connect(server.url()).await.expect("client");
    let payloads: Vec<Sleep> = (0..1000)
        .map(|seq| Sleep {
            millis: 20,
            seq,
            ..Default::default()
        })
        .collect();
    for chunk in payloads.chunks(250) {
        client
            .enqueue_many(chunk.to_vec())
            .await
            .expect("enqueue batch");
    }
    let runs = Runs::default();
    let (stop, worker) = spawn_sdk_worker(&server.url(), "survivor", 40, runs.clone());
    let pool = db.pool().await;
    eventually("some jobs done", WAIT, || {
        let pool = pool.clone();
        async move { (count_in_state(&pool, "succeeded").await >= 200).then_some(()) }
    })
    .await;
    assert!(
        count_in_state(&pool, "succeeded").await < 1000,
        "the kill must land with work in flight"
    );

    server.kill();
    server.restart().await;

    eventually("all jobs succeeded", WAIT, || {
        let pool = pool.clone();
        async move { (count_in_state(&pool, "succeeded").await == 1000).then_some(()) }
    })
    .await;
    assert_each_succeeded_once(&pool, 1000, &runs).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(total, 1000, "every accepted job is there");

    stop.cancel();
    worker.await.expect("worker stopped");
}

/// The database drops every connection of a running server (a failover, a restarted
/// PostgreSQL): a call may fail with UNAVAILABLE (a pooled connection used moments before is not
/// tested again before use; two or three calls here), never with anything else, and the server
/// serves again without a restart, its pool rid of the dead connections.
#[tokio::test]
async fn a_server_whose_database_connections_drop_serves_again() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = job_client(&server.url()).await;
    let enqueue = |client: &mut pb::job_service_client::JobServiceClient<_>| {
        let mut client = client.clone();
        async move {
            client
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(spec("type.reconnect", "default")),
                })
                .await
        }
    };
    enqueue(&mut client).await.expect("first enqueue");
    let pool = db.pool().await;
    let dropped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'jobwire-server/%') t",
    )
    .fetch_one(&pool)
    .await
    .expect("terminate the server's connections");
    assert!(dropped > 0, "the server held connections");

    let (mut answered, mut in_a_row, mut unavailable) = (1, 0, 0);
    while in_a_row < 20 {
        match enqueue(&mut client).await {
            Ok(response) => {
                let id = response.into_inner().job.expect("job").id;
                assert_eq!(get(&mut client, &id).await.id, id);
                answered += 1;
                in_a_row += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                in_a_row = 0;
                unavailable += 1;
                assert!(unavailable < 100, "the server never recovered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        stored, answered,
        "every answered enqueue is stored, and nothing else"
    );
}

/// Two server processes on one database: 2,000 jobs, and no job is ever run by two workers at
/// the same time (checked by the handlers themselves and by the attempts table).
#[tokio::test]
async fn two_servers_never_lease_a_job_twice() {
    let db = test_db().await;
    let a = ServerProcess::start(&db, &["--poll-interval", "200ms"]).await;
    let b = ServerProcess::start(&db, &["--poll-interval", "200ms"]).await;

    let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let doubled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let runs = Runs::default();
    let mut workers = Vec::new();
    for (i, url) in [a.url(), b.url(), a.url(), b.url()].into_iter().enumerate() {
        let stop = CancellationToken::new();
        let (running, doubled, runs) = (running.clone(), doubled.clone(), runs.clone());
        let name = format!("w{i}");
        let worker = Worker::builder(url)
            .worker_id(name.clone())
            .concurrency(10)
            .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
                let (running, doubled, runs, name) =
                    (running.clone(), doubled.clone(), runs.clone(), name.clone());
                async move {
                    let seq = job.seq;
                    if !running.lock().expect("lock").insert(seq) {
                        doubled.lock().expect("lock").push(seq);
                    }
                    let result = jobs::run_sleep(ctx, job, name).await;
                    running.lock().expect("lock").remove(&seq);
                    if result.is_ok() {
                        *runs.lock().expect("lock").entry(seq).or_default() += 1;
                    }
                    result
                }
            })
            .build()
            .expect("worker builds");
        let token = stop.clone();
        workers.push((
            stop,
            tokio::spawn(async move {
                worker
                    .run(token.cancelled_owned())
                    .await
                    .expect("worker ran");
            }),
        ));
    }

    let producer_a = Client::connect(a.url()).await.expect("client");
    let producer_b = Client::connect(b.url()).await.expect("client");
    for (i, chunk) in (0..2000u64)
        .map(|seq| Sleep {
            millis: 2,
            seq,
            ..Default::default()
        })
        .collect::<Vec<_>>()
        .chunks(500)
        .enumerate()
    {
        let producer = if i % 2 == 0 { &producer_a } else { &producer_b };
        producer
            .enqueue_many(chunk.to_vec())
            .await
            .expect("enqueue batch");
    }

    let pool = db.pool().await;
    eventually("all jobs succeeded", WAIT, || {
        let pool = pool.clone();
        async move { (count_in_state(&pool, "succeeded").await == 2000).then_some(()) }
    })
    .await;
    assert!(
        doubled.lock().expect("lock").is_empty(),
        "jobs run twice at once: {:?}",
        doubled.lock().expect("lock")
    );
    assert_each_succeeded_once(&pool, 2000, &runs).await;
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM job_attempt_history")
        .fetch_one(&pool)
        .await
        .expect("count attempts");
    assert_eq!(attempts, 2000, "no job needed a second lease");
    let by_server: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT worker_id) FROM job_attempt_history")
            .fetch_one(&pool)
            .await
            .expect("count workers");
    assert!(by_server >= 2, "both replicas served work");

    for (stop, task) in workers {
        stop.cancel();
        task.await.expect("worker stopped");
    }
}
