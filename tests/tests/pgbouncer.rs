//! jobwire behind a real PgBouncer in transaction pooling mode (Debian's 1.18, which keeps no
//! prepared statements across transactions): the server runs with `--database-pooling
//! transaction`, each statement in a transaction of its own with unnamed prepared statements.
//!
//! The lifecycle, watch, schedule and composition (dependencies, fan-out, signals, replay) tests
//! run here again unchanged with every server they start behind a PgBouncer of its own, which lends its 20 connections 4 server connections
//! (see `jobwire_tests::pgbouncer`), and with a direct connection for LISTEN and migrations:
//! enqueue, run, retry with backoff, exhausted and fatal failures, cancel; watch, resume,
//! delivery across replicas; cron ticks through the kill of the leading replica. The tests
//! below run the server with no direct connection at all (notifications off, polling only),
//! and with a "direct" connection that is a pooler too, which the server reports and survives.

// The included test files each load `support` as they do in their own binaries.
#![allow(clippy::duplicate_mod)]

use std::time::Duration;

use jobwire::{CatchUpPolicy, Client, JobState, RetryPolicy};
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::Sleep,
    pgbouncer::{self, PgBouncer},
    test_db,
    workers::SleepWorker,
};

/// Routes every server the included tests start through PgBouncer. It runs before the test
/// harness's `main` (an ELF initializer, as the `ctor` crate makes on Linux), so before any test
/// can start a server.
#[used]
#[unsafe(link_section = ".init_array")]
static ROUTE_SERVERS_THROUGH_PGBOUNCER: extern "C" fn() = route_servers_through_pgbouncer;

extern "C" fn route_servers_through_pgbouncer() {
    pgbouncer::route_servers_through_pgbouncer();
}

#[path = "dependencies.rs"]
mod dependencies;
#[path = "fanout.rs"]
mod fanout;
#[path = "lifecycle.rs"]
mod lifecycle;
#[path = "replay.rs"]
mod replay;
#[path = "schedules.rs"]
mod schedules;
#[path = "signals.rs"]
mod signals;
#[path = "watch.rs"]
mod watch;

const WAIT: Duration = Duration::from_secs(60);

/// A server behind `pooler` with no direct connection, polling every 100 ms and heartbeating
/// every 500 ms.
async fn polling_server(pooler: &PgBouncer, db: &jobwire_tests::TestDb) -> ServerProcess {
    ServerProcess::start_with_args(&[
        "--database-url",
        &pooler.url(db.name()),
        "--database-pooling",
        "transaction",
        "--poll-interval",
        "100ms",
        "--heartbeat-interval",
        "500ms",
    ])
    .await
}

#[tokio::test]
async fn without_a_direct_connection_an_unmigrated_database_is_refused_with_the_fix() {
    let db = test_db().await;
    let pooler = PgBouncer::start(db.url()).await;
    let url = pooler.url(db.name());
    let (status, stderr) = ServerProcess::run_refused(&[
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &url,
        "--database-pooling",
        "transaction",
    ])
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("lacks migrations 0001_jobs") && stderr.contains("--direct-database-url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn without_a_direct_connection_jobs_run_retry_and_cancel_by_polling() {
    let db = test_db().await;
    // Migrated over a direct connection first, as an operator would (or with
    // --direct-database-url).
    let mut migrating = ServerProcess::start_with_args(&["--database-url", db.url()]).await;
    assert!(migrating.terminate().await.success());
    let pooler = PgBouncer::start(db.url()).await;
    let server = polling_server(&pooler, &db).await;
    assert!(
        server
            .stderr_tail(200)
            .contains("notifications are off (--database-pooling transaction"),
        "{}",
        server.stderr_tail(200)
    );
    let worker = SleepWorker::new(server.url(), "w1").concurrency(4).spawn();
    let client = Client::connect(server.url()).await.expect("client");

    let ran = client
        .enqueue(Sleep::succeeding(10, 1))
        .await
        .expect("enqueue");
    let retried = client
        .enqueue(Sleep {
            fail_times: 1,
            seq: 2,
            ..Default::default()
        })
        .retry(
            RetryPolicy::new()
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(200))
                .jitter(0.0),
        )
        .await
        .expect("enqueue");
    assert_eq!(ran.wait().await.expect("runs").seq, 1);
    assert_eq!(retried.wait().await.expect("second attempt").attempt, 2);

    // A cancel of a running job reaches its worker with no notification: at a heartbeat.
    let long = client
        .enqueue(Sleep::succeeding(600_000, 3))
        .await
        .expect("enqueue");
    eventually("the long job to run", WAIT, || async {
        let info = long.get().await.expect("get");
        (info.state() == JobState::Running).then_some(())
    })
    .await;
    long.cancel("no longer needed").await.expect("cancel");
    match long.wait().await {
        Err(jobwire::Error::JobFailed(failure)) => {
            assert_eq!(failure.state(), JobState::Cancelled)
        }
        other => panic!("expected a cancelled job, got {other:?}"),
    }

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn without_a_direct_connection_two_replicas_elect_a_leader_that_fires_schedules() {
    let db = test_db().await;
    let mut migrating = ServerProcess::start_with_args(&["--database-url", db.url()]).await;
    assert!(migrating.terminate().await.success());
    let pooler = PgBouncer::start(db.url()).await;
    let replicas = [
        polling_server(&pooler, &db).await,
        polling_server(&pooler, &db).await,
    ];
    let client = Client::connect(replicas[1].url()).await.expect("client");
    client
        .create_schedule("every-second", "* * * * * *", Sleep::succeeding(0, 0))
        .catch_up(CatchUpPolicy::Skip)
        .await
        .expect("created");
    let worker = SleepWorker::new(replicas[0].url(), "w1")
        .concurrency(2)
        .spawn();

    let pool = db.pool().await;
    let succeeded = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE schedule_id IS NOT NULL AND state = 'succeeded'",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        (n >= 3).then_some(n)
    };
    eventually("three ticks run to success", WAIT, succeeded).await;
    let leaders = replicas
        .iter()
        .filter(|r| r.stderr_tail(10_000).contains("leadership taken"))
        .count();
    assert_eq!(leaders, 1, "one replica leads");

    worker.stop().await.expect("worker ran");
}

#[tokio::test]
async fn a_listener_behind_a_transaction_pooler_is_reported_and_the_server_polls() {
    let db = test_db().await;
    let mut migrating = ServerProcess::start_with_args(&["--database-url", db.url()]).await;
    assert!(migrating.terminate().await.success());
    let pooler = PgBouncer::start(db.url()).await;
    // The "direct" connection is a pooler too, one that lets sqlx's session settings through
    // (a strict one refuses them, and the server with them, at start): one server connection,
    // so that the migrations' advisory lock and unlock meet it, but a LISTEN there hears
    // nothing once its server connection goes back.
    let wrong = PgBouncer::start_with(db.url(), 1, "extra_float_digits, options").await;
    let server = ServerProcess::start_with_args(&[
        "--database-url",
        &pooler.url(db.name()),
        "--database-pooling",
        "transaction",
        "--direct-database-url",
        &wrong.url(db.name()),
        "--poll-interval",
        "100ms",
    ])
    .await;
    let client = Client::connect(server.url()).await.expect("client");
    let worker = SleepWorker::new(server.url(), "w1").spawn();
    let handle = client
        .enqueue(Sleep::succeeding(0, 1))
        .await
        .expect("enqueue");
    assert_eq!(handle.wait().await.expect("runs by polling").seq, 1);
    let reported = eventually("the listener's failure in the log", WAIT, || {
        let log = server.stderr_tail(10_000);
        async move {
            log.contains("did not reach the listening connection")
                .then_some(log)
        }
    })
    .await;
    assert!(reported.contains("ERROR"), "{reported}");
    worker.stop().await.expect("worker ran");
}
