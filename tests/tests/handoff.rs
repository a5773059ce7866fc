//! Jobs started at their enqueue: with a worker of the replica idle, an EnqueueJob commits the
//! job RUNNING under a lease to that worker, with no claim after it. The job's log still reads
//! AVAILABLE then RUNNING, a paused or limited queue is never started this way, and a slot set
//! aside for a job that did not start is given back.

use std::time::Duration;

use jobwire::{Client, JobState, RateLimit};
use jobwire_tests::{ServerProcess, eventually, jobs::Sleep, test_db, workers::SleepWorker};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(30);

async fn state_of(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT state::text FROM jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("state")
}

/// The job's state events: (state, attempt, worker, the transaction's start).
/// Each state event of a job: its state, attempt, worker, and the transaction that wrote it
/// (`xmin`; event times are each row's own clock, so they differ within a transaction).
async fn state_events(pool: &PgPool, id: &str) -> Vec<(String, i32, Option<String>, String)> {
    sqlx::query_as(
        "SELECT state::text, attempt, data->>'worker', xmin::text FROM job_events \
         WHERE job_id = $1::uuid AND kind = 'state' ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("events")
}

/// Runs a first job through `queue`, so the worker is connected and has found it drained.
async fn warm_up(client: &Client, queue: &str) {
    let job = client
        .enqueue(Sleep::succeeding(1, 0))
        .queue(queue)
        .await
        .expect("warm-up");
    tokio::time::timeout(WAIT, job.wait())
        .await
        .expect("warm-up ran in time")
        .expect("warm-up ran");
}

async fn wait_succeeded(pool: &PgPool, id: &str) {
    eventually(&format!("job {id} succeeded"), WAIT, || async {
        (state_of(pool, id).await == "succeeded").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_enqueued_while_a_worker_is_idle_starts_in_its_enqueue_transaction() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let worker = SleepWorker::new(server.url(), "idle")
        .concurrency(2)
        .queues(&["direct"])
        .spawn();
    warm_up(&client, "direct").await;

    let enqueued = client
        .enqueue(Sleep::succeeding(1, 1))
        .queue("direct")
        .send_detailed()
        .await
        .expect("enqueued");
    assert!(enqueued.created());
    assert_eq!(
        enqueued.state(),
        JobState::Running,
        "the enqueue itself started the job"
    );
    let id = enqueued.handle().id().as_str().to_owned();
    enqueued.handle().wait().await.expect("ran");

    let events = state_events(&pool, &id).await;
    let states: Vec<(&str, i32)> = events.iter().map(|e| (e.0.as_str(), e.1)).collect();
    assert_eq!(
        states,
        [("available", 0), ("running", 1), ("succeeded", 1)],
        "{events:?}"
    );
    assert_eq!(events[1].2.as_deref(), Some("idle"));
    assert_eq!(
        events[0].3, events[1].3,
        "AVAILABLE and RUNNING were written by one transaction"
    );
    let attempts: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT attempt, worker_id, outcome::text FROM job_attempt_history \
         WHERE job_id = $1::uuid",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .expect("attempts");
    assert_eq!(attempts, [(1, "idle".to_owned(), "succeeded".to_owned())]);
    worker.stop().await.expect("worker stopped");
}

#[tokio::test]
async fn paused_and_limited_queues_are_not_started_at_enqueue_and_the_slot_is_given_back() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "200ms"]).await;
    let client = Client::connect(server.url()).await.expect("client");
    client
        .queue("held")
        .update()
        .rate_limit(None)
        .create_if_missing()
        .await
        .expect("queue");
    client
        .queue("held")
        .pause("maintenance")
        .await
        .expect("paused");
    // One slot: were it kept for the job that could not start, nothing else would run.
    let worker = SleepWorker::new(server.url(), "one")
        .concurrency(1)
        .queues(&["held", "free"])
        .spawn();
    warm_up(&client, "free").await;

    let held = client
        .enqueue(Sleep::succeeding(1, 1))
        .queue("held")
        .send_detailed()
        .await
        .expect("enqueued");
    assert_eq!(
        held.state(),
        JobState::Available,
        "a paused queue starts nothing"
    );
    let held_id = held.handle().id().as_str().to_owned();

    let free = client
        .enqueue(Sleep::succeeding(1, 2))
        .queue("free")
        .await
        .expect("enqueued");
    tokio::time::timeout(WAIT, free.wait())
        .await
        .expect("the slot was given back, so the next job ran")
        .expect("ran");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(&pool, &held_id).await, "available");

    client.queue("held").resume().await.expect("resumed");
    wait_succeeded(&pool, &held_id).await;

    // A rate-limited queue is claimed under its limit, never at an enqueue.
    client
        .queue("free")
        .update()
        .rate_limit(Some(RateLimit::per_second(100.0)))
        .await
        .expect("limited");
    // The enqueue statement refuses to start a job of a limited queue even before the
    // dispatcher has heard of the limit.
    let limited = client
        .enqueue(Sleep::succeeding(1, 3))
        .queue("free")
        .send_detailed()
        .await
        .expect("enqueued");
    assert_eq!(limited.state(), JobState::Available);
    tokio::time::timeout(WAIT, limited.handle().wait())
        .await
        .expect("claimed under the limit")
        .expect("ran");
    let claimed: Vec<(String,)> = sqlx::query_as(
        "SELECT state::text FROM job_events WHERE job_id = $1::uuid AND kind = 'state' \
         ORDER BY seq",
    )
    .bind(limited.handle().id().as_str())
    .fetch_all(&pool)
    .await
    .expect("events");
    assert_eq!(
        claimed.into_iter().map(|(s,)| s).collect::<Vec<_>>(),
        ["available", "running", "succeeded"]
    );
    worker.stop().await.expect("worker stopped");
}
