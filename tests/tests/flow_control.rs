//! Flow control through QueueService, across several server replicas: a global concurrency
//! limit, a global rate limit, a pause that holds on every replica and across a restart,
//! strict priorities, delayed jobs, and refusals of bad input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobwire::{Client, JobState, RateLimit, tonic::Code};
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::Sleep,
    test_db,
    workers::{Gauge, SleepWorker},
};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);
/// How long a worker's leases may take to be handed back once it has gone: far less than a
/// lease lasts (30 s by default).
const HANDBACK_WAIT: Duration = Duration::from_secs(5);

async fn count(pool: &PgPool, sql: &'static str, queue: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .bind(queue)
        .fetch_one(pool)
        .await
        .expect("count");
    n
}

/// Enqueues `total` jobs into `queue` that succeed at once.
async fn enqueue_instant_jobs(client: &Client, queue: &str, total: i64) {
    client
        .enqueue_many(
            (0..total as u64).map(|i| client.enqueue(Sleep::succeeding(0, i)).queue(queue)),
        )
        .await
        .expect("enqueued");
}

async fn wait_all_succeeded(pool: &PgPool, queue: &str, total: i64) {
    eventually(
        &format!("{total} jobs of {queue} succeeded"),
        WAIT,
        || async {
            let done = count(
                pool,
                "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'succeeded'",
                queue,
            )
            .await;
            (done == total).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_concurrency_limit_holds_across_three_replicas() {
    let db = test_db().await;
    let pool = db.pool().await;
    let servers = [
        ServerProcess::start(&db, &[]).await,
        ServerProcess::start(&db, &[]).await,
        ServerProcess::start(&db, &[]).await,
    ];
    let client = Client::connect(servers[0].url()).await.expect("client");
    let queue = client
        .queue("limited")
        .update()
        .concurrency_limit(Some(3))
        .create_if_missing()
        .await
        .expect("limit set");
    assert_eq!(queue.concurrency_limit(), Some(3));

    let gauge = Arc::new(Gauge::default());
    let workers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            SleepWorker::new(s.url(), format!("w{i}"))
                .concurrency(10)
                .queues(&["limited"])
                .gauge(gauge.clone())
                .spawn()
        })
        .collect();

    let total = 300;
    client
        .enqueue_many((0..total).map(|i| client.enqueue(Sleep::succeeding(15, i)).queue("limited")))
        .await
        .expect("enqueued");

    // Sample the table itself while the jobs run: RUNNING is what the limit governs.
    let mut max_running = 0;
    let mut samples = 0;
    loop {
        let running = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'running'",
            "limited",
        )
        .await;
        max_running = max_running.max(running);
        samples += 1;
        let done = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'succeeded'",
            "limited",
        )
        .await;
        if done == total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let workers_used = count(
        &pool,
        "SELECT count(DISTINCT worker_id) FROM job_attempt_history a \
         JOIN jobs j ON j.id = a.job_id WHERE j.queue = $1",
        "limited",
    )
    .await;
    println!(
        "limit 3: max RUNNING in {samples} samples {max_running}; max handlers at once {}; \
         workers used {workers_used}",
        gauge.max()
    );
    assert!(max_running <= 3, "{max_running} jobs ran at once");
    assert!(gauge.max() <= 3, "{} handlers ran at once", gauge.max());
    assert_eq!(
        gauge.max(),
        3,
        "the limit, not something else, bounded the run"
    );
    assert_eq!(workers_used, 3, "every replica's worker took part");
    for worker in workers {
        let _ = worker.stop().await;
    }
}

#[tokio::test]
async fn a_rate_limit_holds_across_two_replicas() {
    let db = test_db().await;
    let pool = db.pool().await;
    let servers = [
        ServerProcess::start(&db, &[]).await,
        ServerProcess::start(&db, &[]).await,
    ];
    let client = Client::connect(servers[0].url()).await.expect("client");
    client
        .queue("rated")
        .update()
        .rate_limit(Some(RateLimit::per_second(20.0).burst(5)))
        .create_if_missing()
        .await
        .expect("limit set");
    client
        .enqueue_many((0..400).map(|i| client.enqueue(Sleep::succeeding(1, i)).queue("rated")))
        .await
        .expect("enqueued");
    let workers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            SleepWorker::new(s.url(), format!("r{i}"))
                .concurrency(10)
                .queues(&["rated"])
                .spawn()
        })
        .collect();
    // Count from the first start, over five seconds, from the attempts' own start times.
    let first: chrono::DateTime<chrono::Utc> = eventually("a first start", WAIT, || async {
        let (at,): (Option<chrono::DateTime<chrono::Utc>>,) =
            sqlx::query_as("SELECT min(started_at) FROM jobs WHERE queue = 'rated'")
                .fetch_one(&pool)
                .await
                .expect("first start");
        at
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (started, replicas): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT a.worker_id) FROM job_attempt_history a \
         JOIN jobs j ON j.id = a.job_id \
         WHERE j.queue = 'rated' AND a.started_at < $1 + interval '5 seconds'",
    )
    .bind(first)
    .fetch_one(&pool)
    .await
    .expect("started");
    // The bucket starts full: 5 at once, then 20 a second.
    println!("rate 20/s (burst 5) over 5 s: {started} jobs started, by {replicas} workers");
    assert!(
        (80..=120).contains(&started),
        "{started} jobs started in 5 s at 20/s"
    );
    assert_eq!(replicas, 2, "both replicas' workers started jobs");
    for worker in workers {
        let _ = worker.stop().await;
    }
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_on_any_replica_across_a_restart() {
    let db = test_db().await;
    let pool = db.pool().await;
    let mut servers = [
        ServerProcess::start(&db, &["--poll-interval", "200ms"]).await,
        ServerProcess::start(&db, &["--poll-interval", "200ms"]).await,
    ];
    let client = Client::connect(servers[1].url()).await.expect("client");
    client
        .enqueue_many((0..20).map(|i| client.enqueue(Sleep::succeeding(1, i)).queue("held")))
        .await
        .expect("enqueued");
    let paused = client
        .queue("held")
        .pause("incident 42")
        .await
        .expect("paused");
    assert!(paused.is_paused());
    assert_eq!(paused.pause_reason(), Some("incident 42"));

    let workers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            SleepWorker::new(s.url(), format!("p{i}"))
                .concurrency(5)
                .queues(&["held"])
                .spawn()
        })
        .collect();
    // A lease claimed ahead and handed back on the pause does not count as a start.
    let started_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND attempt - attempt_base > 0";
    // Several poll intervals with workers asking on both replicas.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&pool, started_sql, "held").await, 0);

    servers[0].restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&pool, started_sql, "held").await,
        0,
        "the pause held across a restart"
    );
    let client = Client::connect(servers[0].url()).await.expect("client");
    let queue = client.queue("held").get().await.expect("queue");
    assert!(queue.is_paused(), "the pause survived the restart");
    assert_eq!(queue.count(JobState::Available), 20);
    assert!(queue.oldest_available_age().is_some());

    let resumed = client.queue("held").resume().await.expect("resumed");
    assert!(!resumed.is_paused());
    wait_all_succeeded(&pool, "held", 20).await;
    let queue = client.queue("held").get().await.expect("queue");
    assert_eq!(queue.count(JobState::Succeeded), 20);
    assert_eq!(queue.finished_last_minute(), 20);
    assert!(queue.oldest_available_age().is_none());
    for worker in workers {
        let _ = worker.stop().await;
    }
}

#[tokio::test]
async fn higher_priority_runs_first_within_a_queue() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    client
        .enqueue_many((0..50).map(|i| {
            client
                .enqueue(Sleep::succeeding(0, i))
                .queue("prio")
                .priority(10)
        }))
        .await
        .expect("low enqueued");
    client
        .enqueue_many((50..100).map(|i| {
            client
                .enqueue(Sleep::succeeding(0, i))
                .queue("prio")
                .priority(90)
        }))
        .await
        .expect("high enqueued");
    let worker = SleepWorker::new(server.url(), "one")
        .concurrency(1)
        .queues(&["prio"])
        .spawn();
    wait_all_succeeded(&pool, "prio", 100).await;
    // The order leases were handed out: by claim (an attempt starts when its lease is granted,
    // and jobs claimed ahead share their claim's time), then in the claim's own order, which
    // is the order a worker receives them.
    let order: Vec<(i16,)> = sqlx::query_as(
        "SELECT j.priority FROM job_attempt_history a JOIN jobs j ON j.id = a.job_id \
         WHERE j.queue = 'prio' ORDER BY a.started_at, j.priority DESC, j.run_at, j.id",
    )
    .fetch_all(&pool)
    .await
    .expect("order");
    let order: Vec<i16> = order.into_iter().map(|(p,)| p).collect();
    assert!(
        order[..50].iter().all(|p| *p == 90) && order[50..].iter().all(|p| *p == 10),
        "start order by priority: {order:?}"
    );
    // Among equals, the oldest first (enqueue order: the same run_at, then the id).
    let started: Vec<(i16, chrono::DateTime<chrono::Utc>, uuid::Uuid)> = sqlx::query_as(
        "SELECT j.priority, j.run_at, j.id FROM job_attempt_history a \
         JOIN jobs j ON j.id = a.job_id \
         WHERE j.queue = 'prio' ORDER BY a.started_at, j.priority DESC, j.run_at, j.id",
    )
    .fetch_all(&pool)
    .await
    .expect("ties");
    assert!(
        started
            .windows(2)
            .all(|w| w[0].0 != w[1].0 || (w[0].1, w[0].2) < (w[1].1, w[1].2)),
        "equal priorities ran oldest first"
    );
    let _ = worker.stop().await;
}

#[tokio::test]
async fn delayed_jobs_start_when_due_and_not_before() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let worker = SleepWorker::new(server.url(), "d")
        .concurrency(4)
        .queues(&["later"])
        .spawn();
    let delays = [300u64, 700, 1100, 1500, 2300];
    let before = Instant::now();
    for (i, ms) in delays.iter().enumerate() {
        let handle = client
            .enqueue(Sleep::succeeding(0, i as u64))
            .queue("later")
            .delay(Duration::from_millis(*ms))
            .await
            .expect("enqueued");
        let info = handle.get().await.expect("job");
        assert_eq!(info.state(), JobState::Scheduled);
    }
    wait_all_succeeded(&pool, "later", delays.len() as i64).await;
    let lags: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM a.started_at - j.run_at)::float8 \
         FROM job_attempt_history a JOIN jobs j ON j.id = a.job_id WHERE j.queue = 'later' \
         ORDER BY j.run_at",
    )
    .fetch_all(&pool)
    .await
    .expect("lags");
    let lags: Vec<f64> = lags.into_iter().map(|(l,)| l * 1000.0).collect();
    println!(
        "delayed jobs: start lag after run_at (ms) {lags:.1?}; whole run {:?}",
        before.elapsed()
    );
    assert!(
        lags.iter().all(|l| *l >= 0.0),
        "a job started early: {lags:?}"
    );
    // Not a speed check: a lag this large would mean the due time was missed altogether
    // (the target, under 1 s, is reported above).
    assert!(lags.iter().all(|l| *l < 3000.0), "lags {lags:?}");
    let _ = worker.stop().await;
}

#[tokio::test]
async fn bad_queue_requests_name_the_field() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");

    let missing = client
        .queue("nowhere")
        .get()
        .await
        .expect_err("unknown queue");
    assert_eq!(missing.code(), Some(Code::NotFound));
    assert!(missing.to_string().contains("nowhere"), "{missing}");
    let missing = client
        .queue("nowhere")
        .update()
        .concurrency_limit(Some(2))
        .await
        .expect_err("update of an unknown queue");
    assert_eq!(missing.code(), Some(Code::NotFound));
    let missing = client.queue("nowhere").pause("x").await.expect_err("pause");
    assert_eq!(missing.code(), Some(Code::NotFound));

    // Through the raw API, so values the SDK's types cannot express reach the server.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = jobwire::proto::v1::queue_service_client::QueueServiceClient::new(channel);
    let cases = [
        (
            Some(-1),
            None,
            vec!["concurrency_limit"],
            "queue.concurrency_limit",
        ),
        (
            Some(0),
            None,
            vec!["concurrency_limit"],
            "queue.concurrency_limit",
        ),
        (
            None,
            Some((0.0, 1)),
            vec!["rate_limit"],
            "queue.rate_limit.per_second",
        ),
        (
            None,
            Some((5.0, -3)),
            vec!["rate_limit"],
            "queue.rate_limit.burst",
        ),
        (None, None, vec!["paused"], "update_mask.paths[0]"),
        (None, None, vec![], "update_mask"),
    ];
    for (limit, rate, paths, field) in cases {
        let status = raw
            .update_queue(jobwire::proto::v1::UpdateQueueRequest {
                queue: Some(jobwire::proto::v1::Queue {
                    name: "q".into(),
                    concurrency_limit: limit,
                    rate_limit: rate.map(|(per_second, burst)| jobwire::proto::v1::RateLimit {
                        per_second,
                        burst,
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                }),
                allow_missing: true,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field} named in {:?}",
            status.message()
        );
    }
    let status = raw
        .get_queue(jobwire::proto::v1::GetQueueRequest {
            name: "bad name!".into(),
        })
        .await
        .expect_err("bad name");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("name"), "{}", status.message());
    // Nothing was created by the refused updates.
    assert!(client.list_queues().await.expect("list").is_empty());
}

/// A worker whose jobs finish faster than a claim's round trip gets leases claimed ahead of its
/// free slots. They wait on the server, not the worker: the worker never runs more than its
/// slots, a pause hands the waiting leases back (their attempt not counted), and no lease is left to
/// lapse, so every job succeeds on its first attempt.
#[tokio::test]
async fn leases_claimed_ahead_wait_on_the_server_and_go_back_on_a_pause() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let total: i64 = 3_000;
    enqueue_instant_jobs(&client, "ahead", total).await;

    let slots = 4;
    let gauge = Arc::new(Gauge::default());
    let worker = SleepWorker::new(server.url(), "fast")
        .concurrency(slots)
        .queues(&["ahead"])
        .gauge(gauge.clone())
        .spawn();
    let running_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'running'";
    let done_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'succeeded'";
    let mut most_running = 0;
    while count(&pool, done_sql, "ahead").await < total / 2 {
        most_running = most_running.max(count(&pool, running_sql, "ahead").await);
    }
    assert!(
        most_running > slots as i64,
        "leases were claimed ahead of the {slots} slots (at most {most_running} running)"
    );

    client.queue("ahead").pause("hold").await.expect("paused");
    eventually("no lease left after the pause", WAIT, || async {
        (count(&pool, running_sql, "ahead").await == 0).then_some(())
    })
    .await;
    let handed_back_attempts = count(
        &pool,
        "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'available' \
         AND attempt - attempt_base > 0",
        "ahead",
    )
    .await;
    assert_eq!(
        handed_back_attempts, 0,
        "a handed-back attempt does not count"
    );
    assert!(count(&pool, done_sql, "ahead").await < total);

    client.queue("ahead").resume().await.expect("resumed");
    wait_all_succeeded(&pool, "ahead", total).await;
    let retried = count(
        &pool,
        "SELECT count(*) FROM jobs WHERE queue = $1 AND attempt - attempt_base <> 1",
        "ahead",
    )
    .await;
    assert_eq!(retried, 0, "every job ran once, on its first attempt");
    assert!(
        gauge.max() <= slots,
        "the worker ran {} jobs at once with {slots} slots",
        gauge.max()
    );
    worker.stop().await.expect("drained");
}

/// The jobs table's activity counters: rows read (by sequential scans and through indexes),
/// rows inserted and rows updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
struct TableCounters {
    rows_read: i64,
    inserted: i64,
    updated: i64,
}

async fn jobs_table_counters(pool: &PgPool) -> TableCounters {
    sqlx::query_as(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) AS rows_read, \
                n_tup_ins AS inserted, n_tup_upd AS updated \
         FROM pg_stat_user_tables WHERE relname = 'jobs'",
    )
    .fetch_one(pool)
    .await
    .expect("table counters")
}

/// Plans are cached per connection and made from the table's size at the time, so a table that
/// grows from empty must be analyzed before autovacuum would: the leader does it as the table
/// doubles. A drain of the analyzed table then finds every job by key: PostgreSQL's counters
/// show a few rows of `jobs` read per job from the first claim to the last completion. A plan
/// that joined the claimed jobs to a scan of the table (as one did, with statistics of 20,000
/// available jobs) reads the whole table per claim: hundreds of rows per job. A leader loop's
/// plan made before the last ANALYZE may still scan the table once a tick, which this allows.
#[tokio::test]
async fn the_jobs_table_is_analyzed_as_it_grows_and_a_drain_reads_it_by_key() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let total: i64 = 10_000;
    for chunk in 0..10 {
        client
            .enqueue_many(
                (chunk * 1_000..(chunk + 1) * 1_000)
                    .map(|i| client.enqueue(Sleep::succeeding(0, i)).queue("scan")),
            )
            .await
            .expect("enqueued");
    }
    // The leader analyzes a table each time it doubles, so its estimate trails the table by up
    // to half; a pass that sampled it just short of half its final size leaves the estimate a
    // little under half for good (the table does not double again). A quarter is the margin.
    eventually(
        "the leader analyzed the jobs table as it grew",
        WAIT,
        || async {
            let (analyzed,): (bool,) = sqlx::query_as(
                "SELECT reltuples >= $1 / 4 FROM pg_class WHERE oid = 'jobs'::regclass",
            )
            .bind(total as f32)
            .fetch_one(&pool)
            .await
            .expect("statistics");
            analyzed.then_some(())
        },
    )
    .await;
    let before = eventually("inserts reported", WAIT, || async {
        let counters = jobs_table_counters(&pool).await;
        (counters.inserted >= total).then_some(counters)
    })
    .await;

    let worker = SleepWorker::new(server.url(), "scan")
        .concurrency(8)
        .queues(&["scan"])
        .spawn();
    // Awaited through the events, as polling `jobs` would add to the rows read.
    eventually("every job's success event", WAIT, || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM job_events WHERE kind = 'state' AND state = 'succeeded'",
        )
        .fetch_one(&pool)
        .await
        .expect("events");
        (n == total).then_some(())
    })
    .await;
    worker.stop().await.expect("drained");
    // Each job is updated at least twice, by its claim and by its completion; backends report
    // their counters when idle, so they are read once every update is in and they stay still.
    let started = Instant::now();
    let mut after = jobs_table_counters(&pool).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = jobs_table_counters(&pool).await;
        if now == after && now.updated >= before.updated + 2 * total {
            break;
        }
        assert!(started.elapsed() < WAIT, "counters never settled: {now:?}");
        after = now;
    }
    let read = after.rows_read - before.rows_read;
    assert!(
        read <= 10 * total,
        "draining {total} jobs read {read} rows of jobs ({before:?} -> {after:?})"
    );
}

/// Jobs of the `hoard` queue in `state` whose `part` label is `part`.
async fn count_part(pool: &PgPool, state: &str, part: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE queue = 'hoard' AND state::text = $1 \
         AND labels->>'part' = $2",
    )
    .bind(state)
    .bind(part)
    .fetch_one(pool)
    .await
    .expect("count");
    n
}

/// A fast worker holds leases ready beyond its slots; when its slots then fill with long jobs,
/// those leases go back after a short wait and another worker runs them, each on its first
/// attempt: a worker that slows down does not sit on jobs another could run.
#[tokio::test]
async fn leases_held_ready_behind_long_jobs_go_to_another_worker() {
    leases_behind_long_jobs_go_to_another_worker(0).await;
}

/// As above, with leases also queued at the worker: those behind the long jobs are handed back
/// by the worker itself, as the server cannot take back a lease it delivered.
#[tokio::test]
async fn leases_prefetched_behind_long_jobs_go_to_another_worker() {
    leases_behind_long_jobs_go_to_another_worker(8).await;
}

async fn leases_behind_long_jobs_go_to_another_worker(prefetch: usize) {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let (head, slow, tail) = (400_u64, 2_u64, 40_u64);
    // Priorities fix the order of the claims: the fast head, then the long jobs, then the tail.
    let part = |name: &'static str, priority: i32, millis: u64, seqs: std::ops::Range<u64>| {
        let client = &client;
        seqs.map(move |i| {
            client
                .enqueue(Sleep::succeeding(millis, i))
                .queue("hoard")
                .priority(priority)
                .label("part", name)
        })
    };
    client
        .enqueue_many(
            part("head", 60, 0, 0..head)
                .chain(part("slow", 50, 10_000, head..head + slow))
                .chain(part("tail", 40, 0, head + slow..head + slow + tail)),
        )
        .await
        .expect("enqueued");

    let first = SleepWorker::new(server.url(), "first")
        .concurrency(slow as usize)
        .prefetch(prefetch)
        .queues(&["hoard"])
        .spawn();
    eventually("both long jobs running", WAIT, || async {
        (count_part(&pool, "running", "slow").await == slow as i64).then_some(())
    })
    .await;

    let second = SleepWorker::new(server.url(), "second")
        .concurrency(4)
        .queues(&["hoard"])
        .spawn();
    eventually("the tail succeeded", WAIT, || async {
        (count_part(&pool, "succeeded", "tail").await == tail as i64).then_some(())
    })
    .await;
    assert_eq!(
        count_part(&pool, "running", "slow").await,
        slow as i64,
        "the tail ran while the long jobs still held the first worker's slots"
    );
    let (retried,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE queue = 'hoard' AND labels->>'part' = 'tail' \
         AND attempt - attempt_base <> 1",
    )
    .fetch_one(&pool)
    .await
    .expect("attempts");
    assert_eq!(retried, 0, "a handed-back lease leaves no attempt behind");
    // Read from the event log, not sampled while it happens: ready leases wait at most 250 ms,
    // shorter than a busy machine may take between two looks at the table.
    let (handed_back,): (i64,) = sqlx::query_as(
        "SELECT count(DISTINCT e.job_id) FROM job_events e JOIN jobs j ON j.id = e.job_id \
         WHERE j.queue = 'hoard' AND j.labels->>'part' = 'tail' AND e.kind = 'state' \
           AND e.state = 'available' AND e.data->>'reason' = 'lease not delivered'",
    )
    .fetch_one(&pool)
    .await
    .expect("hand-backs");
    assert!(
        handed_back > 0,
        "the first worker held tail leases ready when its slots filled, and handed them back"
    );
    second.stop().await.expect("drained");
    // The first worker is mid-way through the long jobs; the test ends without waiting on them.
    drop(first);
}

/// A worker that drains hands back the leases queued in its prefetch, unstarted: every job
/// still runs exactly once, on its first attempt, and none waits for a lease to lapse.
#[tokio::test]
async fn a_draining_worker_hands_back_its_prefetched_leases() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let total: i64 = 3_000;
    enqueue_instant_jobs(&client, "drainq", total).await;

    let slots = 2;
    let gauge = Arc::new(Gauge::default());
    let first = SleepWorker::new(server.url(), "first")
        .concurrency(slots)
        .prefetch(16)
        .queues(&["drainq"])
        .gauge(gauge.clone())
        .spawn();
    let done_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'succeeded'";
    eventually("a third of the jobs done", WAIT, || async {
        (count(&pool, done_sql, "drainq").await >= total / 3).then_some(())
    })
    .await;
    first.stop().await.expect("drained");
    assert!(
        gauge.max() <= slots,
        "the worker ran {} jobs at once with {slots} slots",
        gauge.max()
    );
    // Leases on their way to the worker as it left are handed back by the server once its
    // stream has ended, just after `stop` returns; well before one could lapse (a lapse would
    // also show below as a second attempt).
    let running_sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND state = 'running'";
    eventually(
        "the drained worker holds no lease",
        HANDBACK_WAIT,
        || async { (count(&pool, running_sql, "drainq").await == 0).then_some(()) },
    )
    .await;

    let second = SleepWorker::new(server.url(), "second")
        .concurrency(4)
        .queues(&["drainq"])
        .spawn();
    wait_all_succeeded(&pool, "drainq", total).await;
    let retried = count(
        &pool,
        "SELECT count(*) FROM jobs WHERE queue = $1 AND attempt - attempt_base <> 1",
        "drainq",
    )
    .await;
    assert_eq!(retried, 0, "every job ran once, on its first attempt");
    let attempts = count(
        &pool,
        "SELECT count(*) FROM job_attempt_history a JOIN jobs j ON j.id = a.job_id \
         WHERE j.queue = $1 AND a.outcome = 'succeeded'",
        "drainq",
    )
    .await;
    assert_eq!(attempts, total, "one attempt recorded per job");
    second.stop().await.expect("drained");
}
