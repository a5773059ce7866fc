//! Prometheus metrics (`--metrics-listen`): after a known workload run by a real worker, the
//! counters scraped over HTTP equal the jobs that reached each state, per queue and job type;
//! the histograms hold one observation per attempt; the stream, queue, pool and leader gauges
//! say what the server holds; the pruner's counters equal the rows it removed (counted in the
//! archive tables).

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jobwire::{Client, JobContext, JobType, RetryPolicy, Worker};
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::{Sleep, run_sleep},
    test_db,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
/// Jobs that succeed, in queue `fast`.
const N: usize = 6;
/// Jobs that fail on their only attempt, in queue `flaky`.
const M: usize = 3;
/// Jobs scheduled an hour ahead and cancelled before they run, in queue `later`.
const K: usize = 2;

/// One sample of the exposition: a metric name, its labels and its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads `GET /metrics` over HTTP/1.1, as Prometheus would.
async fn scrape(addr: SocketAddr) -> String {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    let driver = tokio::spawn(connection);
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("GET /metrics");
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    drop(sender);
    let _ = driver.await;
    String::from_utf8(body.to_vec()).expect("UTF-8 exposition")
}

/// Parses the text exposition format (comments skipped; label values without escapes, which
/// is all this test's names need).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
                            (key.to_owned(), value.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every one of `labels` (0 when none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Scrapes until `check` holds of the samples, and returns them.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    eventually(what, WAIT, || {
        let check = &check;
        async move {
            let samples = parse(&scrape(addr).await);
            check(&samples).then_some(samples)
        }
    })
    .await
}

#[tokio::test]
async fn counts_equal_the_jobs_that_ran_and_gauges_follow_the_server() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--metrics-listen", "127.0.0.1:0"]).await;
    let addr = server
        .metrics_addr()
        .expect("the server prints its metrics address");
    let job_type = Sleep::JOB_TYPE;

    // The single replica leads, and the pool's size is the flag's default.
    scrape_until(addr, "the replica leads", |s| {
        value(s, "jobwire_leader", &[]) == 1.0
            && value(s, "jobwire_db_pool_max_connections", &[]) == 20.0
    })
    .await;

    let client = Client::connect(server.url()).await.expect("client");
    let mut later = Vec::new();
    for seq in 0..K {
        let handle = client
            .enqueue(Sleep::succeeding(1, seq as u64))
            .queue("later")
            .delay(Duration::from_secs(3600))
            .await
            .expect("enqueue a job for later");
        later.push(handle);
    }
    // A watch of a job for later stays open until that job is cancelled.
    let mut watch = support::watch_job(&server.url(), later[0].id().as_str(), 0).await;
    let samples = scrape_until(addr, "the watch stream and the scheduled jobs show", |s| {
        value(s, "jobwire_watch_streams", &[]) == 1.0
            && value(
                s,
                "jobwire_queue_jobs",
                &[("queue", "later"), ("state", "scheduled")],
            ) == K as f64
    })
    .await;
    assert_eq!(value(&samples, "jobwire_worker_streams", &[]), 0.0);

    let worker = Worker::builder(server.url())
        .worker_id("metrics-worker")
        .queues(["fast", "flaky"])
        .concurrency(4)
        .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| {
            run_sleep(ctx, job, "metrics-worker".into())
        })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));

    let mut handles = Vec::new();
    for seq in 0..N {
        handles.push(
            client
                .enqueue(Sleep::succeeding(5, seq as u64))
                .queue("fast")
                .await
                .expect("enqueue a job that succeeds"),
        );
    }
    let mut failing = Vec::new();
    for seq in 0..M {
        failing.push(
            client
                .enqueue(Sleep {
                    millis: 5,
                    fail_times: 1,
                    fatal: true,
                    seq: seq as u64,
                })
                .queue("flaky")
                .retry(RetryPolicy::no_retries())
                .await
                .expect("enqueue a job that fails"),
        );
    }
    for handle in &handles {
        handle.wait().await.expect("the job succeeds");
    }
    for handle in &failing {
        handle.wait().await.expect_err("the job fails");
    }
    scrape_until(addr, "the worker stream shows", |s| {
        value(s, "jobwire_worker_streams", &[]) == 1.0
    })
    .await;
    for handle in &later {
        handle.cancel("not needed").await.expect("cancel");
    }
    while support::next_event(&mut watch).await.is_some() {}

    let (n, m, k) = (N as f64, M as f64, K as f64);
    let fast = [("queue", "fast"), ("job_type", job_type)];
    let flaky = [("queue", "flaky"), ("job_type", job_type)];
    let later_q = [("queue", "later"), ("job_type", job_type)];
    let samples = scrape_until(addr, "every job is counted", |s| {
        value(s, "jobwire_jobs_succeeded_total", &fast) == n
            && value(s, "jobwire_jobs_failed_total", &flaky) == m
            && value(s, "jobwire_jobs_cancelled_total", &later_q) == k
            && value(s, "jobwire_watch_streams", &[]) == 0.0
    })
    .await;

    // Counters: each job counted once, in its own queue, in every state it reached.
    for (labels, enqueued, started) in [(&fast, n, n), (&flaky, m, m), (&later_q, k, 0.0)] {
        assert_eq!(
            value(&samples, "jobwire_jobs_enqueued_total", labels),
            enqueued,
            "enqueued {labels:?}"
        );
        assert_eq!(
            value(&samples, "jobwire_jobs_started_total", labels),
            started,
            "started {labels:?}"
        );
    }
    assert_eq!(value(&samples, "jobwire_jobs_failed_total", &fast), 0.0);
    assert_eq!(value(&samples, "jobwire_jobs_succeeded_total", &flaky), 0.0);
    assert_eq!(value(&samples, "jobwire_jobs_retried_total", &[]), 0.0);
    assert_eq!(
        value(&samples, "jobwire_jobs_enqueued_total", &[]),
        n + m + k
    );
    assert_eq!(value(&samples, "jobwire_jobs_succeeded_total", &[]), n);
    assert_eq!(value(&samples, "jobwire_jobs_failed_total", &[]), m);
    assert_eq!(value(&samples, "jobwire_jobs_cancelled_total", &[]), k);
    assert!(
        samples
            .iter()
            .filter(|s| s.name.starts_with("jobwire_jobs_"))
            .all(|s| s.labels.get("tenant").map(String::as_str) == Some("default")),
        "every job series names its tenant"
    );

    // Histograms: one observation per attempt started and per attempt that ran.
    for (labels, attempts) in [(&fast, n), (&flaky, m)] {
        assert_eq!(
            value(&samples, "jobwire_job_start_delay_seconds_count", labels),
            attempts,
            "start delays of {labels:?}"
        );
        assert_eq!(
            value(&samples, "jobwire_job_run_seconds_count", labels),
            attempts,
            "run times of {labels:?}"
        );
        assert_eq!(
            value(
                &samples,
                "jobwire_job_run_seconds_bucket",
                &[labels[0], labels[1], ("le", "+Inf")]
            ),
            attempts
        );
    }
    assert_eq!(
        value(&samples, "jobwire_job_run_seconds_count", &later_q),
        0.0
    );
    // Every claim statement is observed, empty ones (the worker asking at its hello) too; the
    // attempts not claimed were leased at their enqueue. Each settle went through the completer.
    assert!(value(&samples, "jobwire_claim_batch_size_count", &[]) >= 1.0);
    assert!(value(&samples, "jobwire_claim_batch_size_sum", &[]) <= n + m);
    assert_eq!(
        value(&samples, "jobwire_completion_batch_size_sum", &[]),
        n + m
    );
    assert!(value(&samples, "jobwire_enqueue_batch_size_count", &[]) >= 1.0);
    assert_eq!(
        value(&samples, "jobwire_enqueue_batch_size_sum", &[]),
        n + m + k
    );

    // Gauges: the cancelled jobs left the queue, the pool is in use, the worker leaves.
    let samples = scrape_until(addr, "the queue gauges catch up", |s| {
        value(
            s,
            "jobwire_queue_jobs",
            &[("queue", "later"), ("state", "scheduled")],
        ) == 0.0
            && value(s, "jobwire_queue_jobs", &[("queue", "fast")]) == 0.0
    })
    .await;
    assert_eq!(
        value(
            &samples,
            "jobwire_queue_oldest_available_age_seconds",
            &[("queue", "fast")]
        ),
        0.0
    );
    assert!(
        value(&samples, "jobwire_db_pool_connections", &[]) >= 1.0,
        "the pool holds connections"
    );
    stop.cancel();
    running
        .await
        .expect("worker task")
        .expect("the worker stops cleanly");
    scrape_until(addr, "the worker stream closes", |s| {
        value(s, "jobwire_worker_streams", &[]) == 0.0
    })
    .await;
}

/// Rows of `table` (an archive table) that belong to jobs archived from `queue`.
async fn archived_in(pool: &sqlx::PgPool, table: &str, queue: &str) -> f64 {
    let sql = format!(
        "SELECT count(*) FROM {table} r JOIN jobs_archive j ON j.id = r.job_id WHERE j.queue = $1"
    );
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(queue)
        .fetch_one(pool)
        .await
        .expect("count archived rows");
    n as f64
}

#[tokio::test]
async fn the_pruners_counters_equal_the_rows_it_pruned() {
    let db = test_db().await;
    // With --archive every row pruned is first copied to its archive table, where the test
    // counts what the pruner removed.
    let server = ServerProcess::start(
        &db,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--retention",
            "1s",
            "--prune-interval",
            "100ms",
            "--archive",
        ],
    )
    .await;
    let addr = server
        .metrics_addr()
        .expect("the server prints its metrics address");
    let pool = db.pool().await;
    let samples = scrape_until(addr, "the pruner's first pass", |s| {
        value(s, "jobwire_prune_passes_total", &[]) >= 1.0
    })
    .await;
    assert!(
        samples
            .iter()
            .any(|s| s.name == "jobwire_event_partitions_dropped_total"),
        "the unlabelled counters read from the first scrape"
    );

    let client = Client::connect(server.url()).await.expect("client");
    let worker = Worker::builder(server.url())
        .worker_id("pruned-worker")
        .queues(["ran"])
        .concurrency(4)
        .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| {
            run_sleep(ctx, job, "pruned-worker".into())
        })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    // Queue `ran`: jobs that succeed and jobs that fail, one attempt each. Nothing waits for
    // them: a job may be pruned before its handle would hear it end.
    for seq in 0..N {
        client
            .enqueue(Sleep::succeeding(1, seq as u64))
            .queue("ran")
            .await
            .expect("enqueue a job that succeeds");
    }
    for seq in 0..M {
        client
            .enqueue(Sleep {
                millis: 1,
                fail_times: 1,
                fatal: true,
                seq: seq as u64,
            })
            .queue("ran")
            .retry(RetryPolicy::no_retries())
            .await
            .expect("enqueue a job that fails");
    }
    // Queue `dropped`: jobs cancelled before any worker ran them, without attempts.
    for seq in 0..K {
        client
            .enqueue(Sleep::succeeding(1, seq as u64))
            .queue("dropped")
            .delay(Duration::from_secs(3600))
            .await
            .expect("enqueue a job for later")
            .cancel("not needed")
            .await
            .expect("cancel");
    }

    let ran = [("queue", "ran")];
    let dropped = [("queue", "dropped")];
    let samples = scrape_until(addr, "every finished job pruned", |s| {
        value(s, "jobwire_jobs_pruned_total", &ran) == (N + M) as f64
            && value(s, "jobwire_jobs_pruned_total", &dropped) == K as f64
    })
    .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count jobs");
    assert_eq!(left, 0, "every job was pruned");
    for (labels, queue) in [(&ran, "ran"), (&dropped, "dropped")] {
        let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs_archive WHERE queue = $1")
            .bind(queue)
            .fetch_one(&pool)
            .await
            .expect("count archived jobs");
        assert_eq!(
            value(&samples, "jobwire_jobs_pruned_total", labels),
            jobs as f64,
            "jobs pruned from {queue}"
        );
        assert_eq!(
            value(&samples, "jobwire_attempts_pruned_total", labels),
            archived_in(&pool, "job_attempts_archive", queue).await,
            "attempts pruned from {queue}"
        );
        assert_eq!(
            value(&samples, "jobwire_events_archived_total", labels),
            archived_in(&pool, "job_events_archive", queue).await,
            "events archived from {queue}"
        );
    }
    // An attempt row is written for each attempt that ended otherwise than in success (a
    // success is read from its job's row): one per failed job.
    assert_eq!(
        value(&samples, "jobwire_attempts_pruned_total", &ran),
        M as f64,
        "one attempt row per failed job"
    );
    assert_eq!(
        value(&samples, "jobwire_attempts_pruned_total", &dropped),
        0.0
    );
    assert!(value(&samples, "jobwire_events_archived_total", &ran) >= (N + M) as f64 * 3.0);
    assert!(
        samples
            .iter()
            .filter(|s| s.name == "jobwire_jobs_pruned_total")
            .all(|s| s.labels.get("tenant").map(String::as_str) == Some("default")),
        "pruned jobs are counted under their tenant"
    );
    stop.cancel();
    running
        .await
        .expect("worker task")
        .expect("the worker stops cleanly");
}
