//! Item-based jobs (the Rust SDK's `jobwire::items`) against the real server: a worker process
//! SIGKILLed mid-way, after item k finished, leaves a checkpoint from which a new worker
//! finishes the job; the items before k ran exactly once (counted through the `item_runs`
//! table the handler writes to), progress is counted in items, and the result lists every
//! item's outcome. A pause mid-way resumes at the item it stopped in; under
//! `OnItemFailure::FailJob` a fatal item fails the job, naming it.

mod support;

use std::time::Duration;

use jobwire::items::{ItemOptions, ItemResults, OnItemFailure};
use jobwire::{Client, JobContext, JobState, RetryPolicy, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::items::{self, BatchItem, ItemBatch, ItemRun, create_item_runs};
use jobwire_tests::{ChildProcess, ServerProcess, eventually, test_db};
use support::{get, jobs as job_client};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

fn spawn_item_worker(server: &ServerProcess, db_url: &str, id: &str) -> ChildProcess {
    ChildProcess::spawn(
        env!("CARGO_BIN_EXE_item-worker"),
        &[],
        &[
            ("JOBWIRE_URL", server.url().as_str()),
            ("WORKER_ID", id),
            ("ITEMS_DATABASE_URL", db_url),
        ],
    )
}

/// (item, attempt, phase, worker) for every recorded run of the job's items, in item order.
async fn runs(pool: &sqlx::PgPool, job_id: &str) -> Vec<(i32, i32, String, String)> {
    sqlx::query_as(
        "SELECT item, attempt, phase, worker FROM item_runs WHERE job_id = $1 \
         ORDER BY item, attempt",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await
    .expect("item runs")
}

#[tokio::test]
async fn an_item_job_resumes_from_its_first_unfinished_item_after_a_sigkill() {
    jobwire_tests::init_tracing();
    let db = test_db().await;
    let pool = db.pool().await;
    create_item_runs(&pool).await;
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
    const COUNT: u32 = 10;
    const HANG_AT: u32 = 6;
    let handle = client
        .enqueue(ItemBatch {
            count: COUNT,
            hang_at: Some(HANG_AT),
            fail: vec![2, 8],
        })
        .retry(RetryPolicy::new().initial_backoff(Duration::ZERO))
        .await
        .expect("enqueue");
    let id = handle.id().as_str().to_owned();

    let mut victim = spawn_item_worker(&server, db.url(), "victim");
    // The victim hangs in item 6 once items 0 to 5 are finished and their checkpoint stored
    // (the next item starts only after the server has it).
    eventually("the victim hangs in item 6", WAIT, || {
        let (pool, id) = (pool.clone(), id.clone());
        async move {
            runs(&pool, &id)
                .await
                .iter()
                .any(|(item, _, phase, _)| *item == HANG_AT as i32 && phase == "hang")
                .then_some(())
        }
    })
    .await;
    // Progress is counted in items: 6 of 10 finished.
    let mut raw = job_client(&server.url()).await;
    let progress = eventually("progress of 6 items of 10", WAIT, || {
        let (mut raw, id) = (raw.clone(), id.clone());
        async move {
            get(&mut raw, &id)
                .await
                .progress
                .filter(|p| p.items_done == i64::from(HANG_AT))
        }
    })
    .await;
    assert_eq!(progress.items_total, i64::from(COUNT));
    assert_eq!(
        progress.message, "1 failed",
        "item 2 failed before the kill"
    );
    victim.kill();

    let mut rescuer = spawn_item_worker(&server, db.url(), "rescuer");
    let results: ItemResults = handle.wait().await.expect("the job succeeds");
    rescuer.terminate().await;

    // Every item ran to its end once: those before 6 by the victim (attempt 1), 6 and after by
    // the rescuer (attempt 2); item 6 also hung once in attempt 1.
    let recorded = runs(&pool, &id).await;
    let mut expected = Vec::new();
    for item in 0..COUNT as i32 {
        let (attempt, worker) = if item < HANG_AT as i32 {
            (1, "victim")
        } else {
            (2, "rescuer")
        };
        if item == HANG_AT as i32 {
            expected.push((item, 1, "hang".to_owned(), "victim".to_owned()));
        }
        let phase = if item == 2 || item == 8 {
            "fail"
        } else {
            "done"
        };
        expected.push((item, attempt, phase.to_owned(), worker.to_owned()));
    }
    assert_eq!(recorded, expected);

    // The result lists every item's outcome, in order.
    assert_eq!(results.len(), COUNT as usize);
    assert_eq!(results.done_count(), 8);
    assert_eq!(results.failed_count(), 2);
    for (index, outcome) in results.outcomes().iter().enumerate() {
        let index = index as u32;
        if index == 2 || index == 8 {
            let failure = outcome.failure().expect("failed item");
            assert_eq!(failure.message(), format!("item {index} failed as asked"));
            assert_eq!(failure.kind(), Some("item_fail"));
        } else {
            let run: ItemRun = outcome
                .output()
                .expect("decodes")
                .expect("done item has an output");
            let attempt = if index < HANG_AT { 1 } else { 2 };
            assert_eq!((run.index, run.attempt), (index, attempt));
        }
    }

    let job = get(&mut raw, &id).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    let progress = job.progress.expect("progress");
    assert_eq!(
        (progress.items_done, progress.items_total),
        (i64::from(COUNT), i64::from(COUNT))
    );
    assert_eq!(job.attempts.len(), 2);
    assert_eq!(
        job.attempts[0].outcome,
        pb::AttemptOutcome::LeaseExpired as i32
    );
    assert_eq!(
        handle.get().await.expect("get").state(),
        JobState::Succeeded
    );
}

/// Runs an in-process worker serving `test.items` with `options` until the token is cancelled.
fn spawn_worker(
    url: &str,
    pool: sqlx::PgPool,
    options: ItemOptions,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let worker = Worker::builder(url)
        .worker_id("in-process")
        .register_items::<ItemBatch, _, _, _>(options, move |ctx: JobContext, item: BatchItem| {
            items::run_item(pool.clone(), ctx, item)
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

#[tokio::test]
async fn a_paused_item_job_resumes_at_the_item_it_stopped_in() {
    let db = test_db().await;
    let pool = db.pool().await;
    create_item_runs(&pool).await;
    let server = ServerProcess::start(&db, &["--poll-interval", "100ms"]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let (stop, worker) = spawn_worker(&server.url(), pool.clone(), ItemOptions::new());
    let handle = client
        .enqueue(ItemBatch {
            count: 5,
            hang_at: Some(3),
            fail: Vec::new(),
        })
        .await
        .expect("enqueue");
    let id = handle.id().as_str().to_owned();
    eventually("item 3 hangs", WAIT, || {
        let (pool, id) = (pool.clone(), id.clone());
        async move {
            runs(&pool, &id)
                .await
                .iter()
                .any(|(item, _, phase, _)| *item == 3 && phase == "hang")
                .then_some(())
        }
    })
    .await;
    handle.pause("operator").await.expect("pause");
    eventually("the job is paused", WAIT, || {
        let handle = handle.clone();
        async move {
            let job = handle.get().await.expect("get");
            (job.state() == JobState::Paused).then_some(job)
        }
    })
    .await;
    handle.resume().await.expect("resume");
    let results = handle.wait().await.expect("the job succeeds");
    stop.cancel();
    worker.await.expect("worker stopped");

    assert_eq!(results.len(), 5);
    assert_eq!(results.done_count(), 5);
    let phases: Vec<(i32, String)> = runs(&pool, &id)
        .await
        .into_iter()
        .map(|(item, _, phase, _)| (item, phase))
        .collect();
    let expected: Vec<(i32, String)> = [
        (0, "done"),
        (1, "done"),
        (2, "done"),
        (3, "hang"),
        (3, "done"),
        (4, "done"),
    ]
    .into_iter()
    .map(|(item, phase)| (item, phase.to_owned()))
    .collect();
    assert_eq!(
        phases, expected,
        "items 0-2 ran once, 3 ran again after the pause"
    );
}

#[tokio::test]
async fn under_fail_job_a_fatal_item_fails_the_job_naming_it() {
    let db = test_db().await;
    let pool = db.pool().await;
    create_item_runs(&pool).await;
    let server = ServerProcess::start(&db, &["--poll-interval", "100ms"]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let (stop, worker) = spawn_worker(
        &server.url(),
        pool.clone(),
        ItemOptions::new().on_failure(OnItemFailure::FailJob),
    );
    let handle = client
        .enqueue(ItemBatch {
            count: 5,
            hang_at: None,
            fail: vec![3],
        })
        .retry(
            RetryPolicy::new()
                .max_attempts(3)
                .initial_backoff(Duration::ZERO),
        )
        .await
        .expect("enqueue");
    let error = handle.wait().await.expect_err("the job fails");
    stop.cancel();
    worker.await.expect("worker stopped");

    let failure = error.job_failure().expect("a job failure");
    assert_eq!(failure.state(), JobState::Failed);
    let last = failure.last_error().expect("last error");
    assert_eq!(last.message(), "item 3: item 3 failed as asked");
    assert_eq!(last.kind(), Some("item_fail"));
    let job = handle.get().await.expect("get");
    assert_eq!(job.attempts_counted(), 1, "a fatal item is not retried");
    assert!(job.has_checkpoint(), "items 0-2 keep their outcomes");
    let items: Vec<i32> = runs(&pool, handle.id().as_str())
        .await
        .into_iter()
        .map(|(item, ..)| item)
        .collect();
    assert_eq!(items, [0, 1, 2, 3]);
}
