//! The server as an operator runs it: health that follows PostgreSQL (through a PostgreSQL
//! crash and restart, which loses no accepted job), the embedded default cluster, graceful
//! shutdown with workers connected, the engine's statements kept on warm connections, a
//! database whose event numbering watchers cannot rely on refused at start-up, and the
//! runtime's threads as configured.

use std::{path::Path, sync::Arc, time::Duration};

use jobwire::Client;
use jobwire_server::embedded_pg::EmbeddedPostgres;
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::Sleep,
    test_db,
    workers::{Gauge, SleepWorker},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const WAIT: Duration = Duration::from_secs(60);

/// The health status, or None when the server cannot be asked.
async fn health(url: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?
        .into_inner()
        .status;
    ServingStatus::try_from(status).ok()
}

async fn wait_for_health(url: &str, want: ServingStatus) {
    eventually(&format!("health {want:?}"), WAIT, || async move {
        (health(url).await == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn health_follows_postgres_and_a_postgres_crash_loses_no_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = EmbeddedPostgres::start(dir.path())
        .await
        .expect("start cluster");
    pg.ensure_database("jobwire").await.expect("database");
    let url = pg.database_url("jobwire");
    let server =
        ServerProcess::start_with_args(&["--database-url", &url, "--poll-interval", "100ms"]).await;
    wait_for_health(&server.url(), ServingStatus::Serving).await;

    let client = Client::connect(server.url()).await.expect("client");
    let accepted = client
        .enqueue(Sleep {
            seq: 1,
            ..Default::default()
        })
        .await
        .expect("enqueue");

    // PostgreSQL crashes (SIGKILL): the replica stops reporting SERVING.
    pg.kill().await.expect("kill cluster");
    wait_for_health(&server.url(), ServingStatus::NotServing).await;

    // It comes back (crash recovery): the replica serves again, and the job accepted before
    // the crash is there and runs.
    let pg = EmbeddedPostgres::start(dir.path())
        .await
        .expect("restart cluster");
    wait_for_health(&server.url(), ServingStatus::Serving).await;
    let worker = SleepWorker::new(server.url(), "ops").concurrency(2).spawn();
    let output = tokio::time::timeout(WAIT, accepted.wait())
        .await
        .expect("in time")
        .expect("the accepted job succeeds");
    assert_eq!(output.seq, 1);
    let after = client
        .enqueue(Sleep {
            seq: 2,
            ..Default::default()
        })
        .await
        .expect("enqueue after recovery");
    assert_eq!(after.wait().await.expect("succeeds").seq, 2);

    // A drain may time out when the server went away first; that is not what is tested.
    let _ = worker.stop().await;
    drop(server);
    pg.stop().await.expect("stop cluster");
}

fn postmaster_running(data_dir: &Path) -> bool {
    data_dir.join("pgdata/postmaster.pid").exists()
}

#[tokio::test]
async fn embedded_default_starts_reuses_and_stops_its_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8 path");

    let mut server = ServerProcess::start_with_args(&["--data-dir", data_dir]).await;
    assert!(
        postmaster_running(dir.path()),
        "the server started its own cluster"
    );
    wait_for_health(&server.url(), ServingStatus::Serving).await;
    let client = Client::connect(server.url()).await.expect("client");
    let job = client
        .enqueue(Sleep {
            millis: 200,
            seq: 9,
            ..Default::default()
        })
        .await
        .expect("enqueue");

    // SIGTERM with a worker connected and a job running: a clean exit, cluster stopped.
    let worker = SleepWorker::new(server.url(), "ops").concurrency(2).spawn();
    eventually("the job runs", WAIT, || {
        let job = job.clone();
        async move {
            let info = job.get().await.ok()?;
            (info.state() != jobwire::JobState::Available).then_some(())
        }
    })
    .await;
    let status = server.terminate().await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    assert!(
        !postmaster_running(dir.path()),
        "the server stopped its cluster on exit"
    );

    // The next start, on the same address, reuses the cluster and its data; the worker
    // reconnects by itself and delivers the result of the job it kept running.
    server.restart().await;
    assert!(postmaster_running(dir.path()));
    let client = Client::connect(server.url()).await.expect("client");
    let again = client.job::<Sleep>(job.id().clone());
    let output = tokio::time::timeout(WAIT, again.wait())
        .await
        .expect("in time")
        .expect("the job finishes after the restart");
    assert_eq!(output.seq, 9);

    // A drain may time out when the server went away first; that is not what is tested.
    let _ = worker.stop().await;
    assert!(server.terminate().await.success());
    assert!(!postmaster_running(dir.path()));
}

/// The backends of `server`'s pool, and how many of them ended a transaction since `since`
/// (an enqueue is a transaction scoped to its tenant, so its connection's last statement is its
/// COMMIT; nothing else this test's server runs ends in one while no worker is connected and no
/// schedule exists).
async fn backends(
    pool: &sqlx::PgPool,
    server: &ServerProcess,
    since: chrono::DateTime<chrono::Utc>,
) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE query = 'COMMIT' AND state_change > $2) \
         FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("jobwire-server/{}", server.pid()))
    .bind(since)
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// Once a burst has opened many connections, single enqueues one after another run on the
/// connection the last one used, not on each idle connection in turn (sqlx's pool hands out the
/// oldest), so they do not pay every connection's first use of the statement.
#[tokio::test]
async fn enqueues_one_after_another_stay_on_a_warm_connection() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--db-max-connections", "20"]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let job = client.enqueue(Sleep::default()).await.expect("enqueue");
    let id = job.id().to_string();
    // Reads run on the pool's connections, so a burst of them opens many.
    let reads = futures::future::join_all((0..40).map(|_| client.get_job(&id))).await;
    assert!(reads.iter().all(Result::is_ok), "{reads:?}");
    let pool = db.pool().await;
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .expect("now");
    let (opened, _) = backends(&pool, &server, since).await;
    assert!(opened >= 8, "the burst opened only {opened} connections");

    for seq in 0..30 {
        client
            .enqueue(Sleep {
                seq,
                ..Default::default()
            })
            .await
            .expect("enqueue");
    }
    let (_, enqueued_on) = backends(&pool, &server, since).await;
    assert!(
        (1..=2).contains(&enqueued_on),
        "30 enqueues in a row ran on {enqueued_on} of {opened} connections"
    );
}

/// Watchers' ordering needs event numbers handed out one at a time. A database whose event
/// sequence was changed to cache blocks of numbers per session is refused at start-up, with
/// the fix in the message; set back, it is served.
#[tokio::test]
async fn a_cached_event_sequence_is_refused_at_start() {
    let db = test_db().await;
    // Serving means migrated: the server opens the database after its ready line.
    let server = ServerProcess::start(&db, &[]).await;
    wait_for_health(&server.url(), ServingStatus::Serving).await;
    drop(server);
    let pool = db.pool().await;
    sqlx::query("ALTER TABLE job_events ALTER COLUMN seq SET CACHE 20")
        .execute(&pool)
        .await
        .expect("cache the sequence");

    let stderr = ServerProcess::start_refused(&db, &[]).await;
    assert!(
        stderr.contains("caches 20 numbers") && stderr.contains("SET CACHE 1"),
        "{stderr}"
    );

    sqlx::query("ALTER TABLE job_events ALTER COLUMN seq SET CACHE 1")
        .execute(&pool)
        .await
        .expect("uncache the sequence");
    let server = ServerProcess::start(&db, &[]).await;
    wait_for_health(&server.url(), ServingStatus::Serving).await;
}

/// `--worker-threads` sizes the runtime; on a single thread the server still serves a worker
/// running jobs side by side, and a count it cannot use is refused, naming the flag.
#[tokio::test]
async fn the_runtime_runs_on_the_threads_it_is_given() {
    let db = test_db().await;
    let stderr = ServerProcess::start_refused(&db, &["--worker-threads", "0"]).await;
    assert!(stderr.contains("--worker-threads"), "{stderr}");

    let server = ServerProcess::start(&db, &["--worker-threads", "3"]).await;
    assert_runtime_threads(&server, 3);
    drop(server);

    let server = ServerProcess::start(&db, &["--worker-threads", "1"]).await;
    assert_runtime_threads(&server, 1);
    let client = Client::connect(server.url()).await.expect("client");
    let mut jobs = Vec::new();
    for seq in 0..8 {
        let job = client
            .enqueue(Sleep {
                seq,
                millis: 1000,
                ..Default::default()
            })
            .await
            .expect("enqueue");
        jobs.push(job);
    }
    let gauge = Arc::new(Gauge::default());
    let worker = SleepWorker::new(server.url(), "one-thread")
        .concurrency(8)
        .gauge(Arc::clone(&gauge))
        .spawn();
    for job in jobs {
        tokio::time::timeout(WAIT, job.wait())
            .await
            .expect("in time")
            .expect("the job succeeds");
    }
    assert_eq!(gauge.max(), 8, "the jobs ran side by side");
    worker.stop().await.expect("drain");
}

/// Checks the start-up line that gives the runtime's thread count, as the runtime reports it.
fn assert_runtime_threads(server: &ServerProcess, threads: usize) {
    let stderr = server.stderr_tail(200);
    let started = stderr
        .lines()
        .find(|line| line.contains("async runtime started"))
        .unwrap_or_else(|| panic!("no start-up line in {stderr}"));
    assert!(
        started.contains(&format!("worker_threads={threads}")),
        "{started}"
    );
}

/// One data directory serves one server: a second one is refused with a message naming the
/// directory, and leaves the first one's cluster running (it once adopted the cluster and
/// stopped it under the first when it exited). A port already taken is refused naming the
/// address and --listen, before any cluster is touched. The ready line comes only once health
/// answers SERVING.
#[tokio::test]
async fn a_data_directory_and_a_port_serve_one_server_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let first = ServerProcess::start_with_args(&["--data-dir", data_dir]).await;
    assert_eq!(
        health(&first.url()).await,
        Some(ServingStatus::Serving),
        "ready means serving"
    );
    let client = Client::connect(first.url()).await.expect("client");

    let (status, stderr) =
        ServerProcess::run_refused(&["--listen", "127.0.0.1:0", "--data-dir", data_dir]).await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(data_dir) && stderr.contains("data directory"),
        "{stderr}"
    );

    let taken = first.addr().to_string();
    let (status, stderr) =
        ServerProcess::run_refused(&["--listen", &taken, "--data-dir", data_dir]).await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&taken) && stderr.contains("--listen"),
        "{stderr}"
    );

    assert!(
        postmaster_running(dir.path()),
        "the first server's cluster runs on"
    );
    assert_eq!(health(&first.url()).await, Some(ServingStatus::Serving));
    client
        .enqueue(Sleep {
            seq: 1,
            ..Default::default()
        })
        .await
        .expect("the first server still serves");
}
