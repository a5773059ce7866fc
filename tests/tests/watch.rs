//! WatchJob and WatchJobs: full history after the fact, exactly-once resume, delivery across
//! replicas, and many dashboards at once. Real server binaries, real PostgreSQL.

mod support;

use std::time::Duration;

use jobwire_proto::v1::{self as pb, job_event::Event};
use jobwire_tests::{ServerProcess, test_db};
use support::{
    RawWorker, WAIT, collect_job_events, enqueue, is_terminal, jobs, next_event, spec, watch_job,
};
use tonic::{Code, Streaming};

fn sequences(events: &[pb::JobEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

fn assert_strictly_increasing(events: &[pb::JobEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "events out of order: {} then {}",
            pair[0].sequence,
            pair[1].sequence
        );
    }
}

/// Runs a job on a raw worker: `updates` progress reports, then completion.
async fn run_with_progress(worker: &mut RawWorker, job_id: &str, updates: i64, pause: Duration) {
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, job_id);
    for done in 1..=updates {
        worker.progress(job_id, lease.attempt, done, updates).await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    let ack = worker.complete(job_id, lease.attempt, b"done").await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
}

#[tokio::test]
async fn watcher_connecting_after_the_end_receives_the_whole_history() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let job = enqueue(&mut client, spec("type.watched", "default")).await;
    let mut worker = RawWorker::connect(&server.url(), "raw", &["type.watched"], 1).await;
    run_with_progress(&mut worker, &job.id, 20, Duration::from_millis(2)).await;

    let events = collect_job_events(&server.url(), &job.id, 0).await;
    assert_strictly_increasing(&events);
    let states: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::StateChanged(s)) => Some(s.state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            pb::JobState::Available as i32,
            pb::JobState::Running as i32,
            pb::JobState::Succeeded as i32
        ]
    );
    assert!(
        is_terminal(events.last().expect("events")),
        "ends with the terminal event"
    );
    let progress: Vec<i64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Progress(p)) => Some(p.items_done),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty(), "progress events are kept");
    assert_eq!(
        progress.last(),
        Some(&20),
        "the last progress is the final value"
    );
    assert!(progress.windows(2).all(|w| w[0] < w[1]));
    // The terminal event carries the job, result included.
    let Some(Event::StateChanged(done)) = &events.last().expect("events").event else {
        panic!("terminal state change expected");
    };
    let snapshot = done.job.as_ref().expect("job snapshot");
    assert_eq!(snapshot.result.as_ref().expect("result").value, b"done");
    assert_eq!(snapshot.progress.as_ref().expect("progress").items_done, 20);

    // Resuming after the terminal event ends at once; an unknown job is NOT_FOUND.
    let after_end =
        collect_job_events(&server.url(), &job.id, events.last().expect("e").sequence).await;
    assert!(after_end.is_empty());
    let status = client
        .watch_job(pb::WatchJobRequest {
            include_children: Default::default(),
            id: "0190b2c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d".into(),
            after_sequence: 0,
        })
        .await
        .expect_err("unknown job");
    assert_eq!(status.code(), Code::NotFound);
}

/// A watcher dropped every few events and resumed from its last sequence sees exactly the
/// events an uninterrupted watcher sees: none missing, none twice, in order.
#[tokio::test]
async fn resumed_watcher_receives_every_later_event_exactly_once() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    let job = enqueue(&mut client, spec("type.chatty", "default")).await;

    let full = tokio::spawn({
        let (url, id) = (url.clone(), job.id.clone());
        async move { collect_job_events(&url, &id, 0).await }
    });
    let resumed = tokio::spawn({
        let (url, id) = (url.clone(), job.id.clone());
        async move {
            let mut seen: Vec<pb::JobEvent> = Vec::new();
            let mut reconnects = 0;
            'outer: loop {
                let after = seen.last().map(|e| e.sequence).unwrap_or(0);
                let mut stream = watch_job(&url, &id, after).await;
                // Drop the stream after a handful of events, as a killed watcher would.
                for _ in 0..7 {
                    match next_event(&mut stream).await {
                        Some(response) => seen.push(response.event.expect("event")),
                        None => break 'outer,
                    }
                }
                reconnects += 1;
            }
            (seen, reconnects)
        }
    });

    let mut worker = RawWorker::connect(&url, "raw", &["type.chatty"], 1).await;
    run_with_progress(&mut worker, &job.id, 500, Duration::from_micros(500)).await;

    let full = full.await.expect("full watcher");
    let (resumed, reconnects) = resumed.await.expect("resumed watcher");
    assert!(reconnects >= 5, "the watcher was cut {reconnects} times");
    assert_strictly_increasing(&full);
    assert!(is_terminal(full.last().expect("events")));
    let progress_events = full
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Progress(_))))
        .count();
    assert!(
        progress_events > 20,
        "only {progress_events} progress events were written"
    );
    assert_eq!(
        sequences(&resumed),
        sequences(&full),
        "the resumed watcher saw other events than the uninterrupted one"
    );
    // And the store agrees with both.
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM job_events WHERE job_id = $1::uuid ORDER BY seq")
            .bind(&job.id)
            .fetch_all(&db.pool().await)
            .await
            .expect("stored events");
    assert_eq!(stored, sequences(&full));
}

/// Progress reported to one replica reaches a watcher on another.
#[tokio::test]
async fn watcher_on_one_replica_sees_progress_reported_to_another() {
    let db = test_db().await;
    let a = ServerProcess::start(&db, &[]).await;
    let b = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&a.url()).await;
    let job = enqueue(&mut client, spec("type.remote", "default")).await;
    let mut on_b = watch_job(&b.url(), &job.id, 0).await;

    let mut worker = RawWorker::connect(&a.url(), "raw-a", &["type.remote"], 1).await;
    let lease = worker.next_lease().await;
    worker.progress(&job.id, lease.attempt, 3, 10).await;
    let progress = loop {
        let event = next_event(&mut on_b)
            .await
            .expect("stream open")
            .event
            .expect("event");
        if let Some(Event::Progress(p)) = event.event {
            break p;
        }
    };
    assert_eq!((progress.items_done, progress.items_total), (3, 10));
    assert_eq!(progress.message, "3 of 10");
    worker.complete(&job.id, lease.attempt, b"ok").await;
    let mut last = None;
    while let Some(response) = next_event(&mut on_b).await {
        last = response.event;
    }
    assert!(is_terminal(&last.expect("a terminal event")));
}

/// What a replica's workers report reaches that replica's watchers once it has committed, not
/// at the next poll of the event log: with a poll interval of a minute, the progress and the end
/// still arrive within [`WAIT`]. (Reports to another replica arrive at the poll interval.)
#[tokio::test]
async fn reports_reach_watchers_when_they_commit_not_at_the_next_poll() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--watch-poll-interval", "60s"]).await;
    let mut client = jobs(&server.url()).await;
    let job = enqueue(&mut client, spec("type.prompt", "default")).await;
    let mut worker = RawWorker::connect(&server.url(), "raw", &["type.prompt"], 1).await;
    let lease = worker.next_lease().await;
    // A new watcher wakes the loop, which delivers what has committed so far.
    let mut stream = watch_job(&server.url(), &job.id, 0).await;
    let mut next = async || {
        next_event(&mut stream)
            .await
            .expect("stream open")
            .event
            .expect("event")
            .event
    };
    loop {
        if let Some(Event::StateChanged(s)) = next().await
            && s.state == pb::JobState::Running as i32
        {
            break;
        }
    }

    worker.progress(&job.id, lease.attempt, 1, 2).await;
    let ack = worker.acks(1).await.remove(0);
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let Some(Event::Progress(progress)) = next().await else {
        panic!("the progress event is next");
    };
    assert_eq!((progress.items_done, progress.items_total), (1, 2));

    worker.complete(&job.id, lease.attempt, b"ok").await;
    let Some(Event::StateChanged(done)) = next().await else {
        panic!("the end is next");
    };
    assert_eq!(done.state, pb::JobState::Succeeded as i32);
}

/// Starts a job on a raw worker and watches it up to its RUNNING event.
async fn running_and_watched(
    url: &str,
) -> (pb::Job, RawWorker, i32, Streaming<pb::WatchJobResponse>) {
    let mut client = jobs(url).await;
    let job = enqueue(&mut client, spec("type.prompt", "default")).await;
    let mut worker = RawWorker::connect(url, "raw", &["type.prompt"], 1).await;
    let lease = worker.next_lease().await;
    let mut stream = watch_job(url, &job.id, 0).await;
    loop {
        let response = next_event(&mut stream).await.expect("stream open");
        if let Some(Event::StateChanged(s)) = response.event.and_then(|e| e.event)
            && s.state == pb::JobState::Running as i32
        {
            break;
        }
    }
    (job, worker, lease.attempt, stream)
}

/// Reports progress for a running job and waits for its acknowledgement.
async fn report_progress(worker: &mut RawWorker, job_id: &str, attempt: i32) {
    worker.progress(job_id, attempt, 1, 2).await;
    let ack = worker.acks(1).await.remove(0);
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
}

/// A transaction that holds a transaction id and has written nothing.
async fn open_transaction_with_an_id(
    pool: &sqlx::PgPool,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut open = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .expect("a transaction id");
    open
}

/// Opens a transaction that writes a log event for `job` and leaves it uncommitted; returns it
/// with the event's number.
async fn open_transaction_with_an_event(
    pool: &sqlx::PgPool,
    job: &str,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, i64) {
    let mut open = pool.begin().await.expect("begin");
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
         SELECT tenant_id, id, 'log', attempt, \
                jsonb_build_object('level', 'info', 'message', 'from an open transaction') \
         FROM jobs WHERE id = $1::uuid RETURNING seq",
    )
    .bind(job)
    .fetch_one(&mut *open)
    .await
    .expect("an event in an open transaction");
    (open, seq)
}

/// Fails with `why` if the stream yields anything within half a second.
async fn assert_quiet(stream: &mut Streaming<pb::WatchJobResponse>, why: &str) {
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .is_err(),
        "{why}"
    );
}

async fn next_job_event(stream: &mut Streaming<pb::WatchJobResponse>) -> pb::JobEvent {
    next_event(stream)
        .await
        .expect("stream open")
        .event
        .expect("event")
}

/// A transaction that holds a transaction id but has numbered no event (here it only asked for
/// its id; under load, the next statement of reports, still updating its jobs) does not hold
/// back an event committed meanwhile. Before, the event waited for that transaction to end.
#[tokio::test]
async fn a_transaction_yet_to_number_an_event_does_not_hold_back_delivery() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--watch-poll-interval", "60s"]).await;
    let (job, mut worker, attempt, mut stream) = running_and_watched(&server.url()).await;
    let pool = db.pool().await;
    let open = open_transaction_with_an_id(&pool).await;

    report_progress(&mut worker, &job.id, attempt).await;
    let event = next_job_event(&mut stream).await;
    assert!(matches!(event.event, Some(Event::Progress(_))), "{event:?}");
    open.rollback().await.expect("rollback");
}

/// An event numbered by a transaction still open holds back every later event, committed or
/// not, until it commits; then both arrive, in order.
#[tokio::test]
async fn an_uncommitted_event_holds_back_later_ones_until_it_commits() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--watch-poll-interval", "20ms"]).await;
    let (job, mut worker, attempt, mut stream) = running_and_watched(&server.url()).await;
    let pool = db.pool().await;
    let (open, held) = open_transaction_with_an_event(&pool, &job.id).await;

    report_progress(&mut worker, &job.id, attempt).await;
    assert_quiet(
        &mut stream,
        "the committed progress event overtook the open one",
    )
    .await;

    open.commit().await.expect("commit");
    let first = next_job_event(&mut stream).await;
    assert_eq!(first.sequence, held);
    assert!(matches!(first.event, Some(Event::Log(_))), "{first:?}");
    let second = next_job_event(&mut stream).await;
    assert!(second.sequence > held);
    assert!(
        matches!(second.event, Some(Event::Progress(_))),
        "{second:?}"
    );
}

/// The pid of the backend running `open`.
async fn backend_pid(open: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **open)
        .await
        .expect("the backend's pid")
}

/// Waits for the server's log to have a line with every one of `needles`, and returns it.
async fn log_line(server: &ServerProcess, needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = server.stderr_tail(500);
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needles:?}; the log ends with:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Delivery held up by an open transaction is not silent for an operator: past the stall
/// warning's time the server logs which transaction holds it (its pid, application and state),
/// even with an older one open, and once it ends, that delivery resumed.
#[tokio::test]
async fn held_up_delivery_names_the_transaction_that_holds_it() {
    let db = test_db().await;
    let refused = ServerProcess::start_refused(&db, &["--watch-stall-warning", "0s"]).await;
    assert!(refused.contains("--watch-stall-warning"), "{refused}");
    let server = ServerProcess::start(
        &db,
        &[
            "--watch-poll-interval",
            "20ms",
            "--watch-stall-warning",
            "300ms",
        ],
    )
    .await;
    let (job, mut worker, attempt, mut stream) = running_and_watched(&server.url()).await;
    let pool = db.pool().await;
    // An older transaction that numbers nothing: the horizons read while it is open wait for
    // it, but it does not hold the missing number, so naming it alone would mislead.
    let older = open_transaction_with_an_id(&pool).await;
    report_progress(&mut worker, &job.id, attempt).await;
    let event = next_job_event(&mut stream).await;
    assert!(matches!(event.event, Some(Event::Progress(_))), "{event:?}");

    let (mut open, held) = open_transaction_with_an_event(&pool, &job.id).await;
    let pid = backend_pid(&mut open).await;
    report_progress(&mut worker, &job.id, attempt).await;
    assert_quiet(&mut stream, "the progress event overtook the open one").await;
    let warning = log_line(
        &server,
        &[
            "watch delivery is held up by transactions in progress",
            &format!("pid {pid} "),
        ],
    )
    .await;
    assert!(warning.contains("idle in transaction"), "{warning}");
    assert!(warning.contains("WARN"), "{warning}");

    open.commit().await.expect("commit");
    assert_eq!(next_job_event(&mut stream).await.sequence, held);
    log_line(&server, &["watch delivery resumed"]).await;
    older.rollback().await.expect("rollback");
}

/// A number taken by a transaction that rolls back never commits: the events after it wait
/// only until the transaction ends and the horizon passes the number, not for ever.
#[tokio::test]
async fn a_number_lost_to_a_rollback_holds_back_nothing_once_the_transaction_ends() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--watch-poll-interval", "20ms"]).await;
    let (job, mut worker, attempt, mut stream) = running_and_watched(&server.url()).await;
    let pool = db.pool().await;
    let (open, lost) = open_transaction_with_an_event(&pool, &job.id).await;

    report_progress(&mut worker, &job.id, attempt).await;
    assert_quiet(&mut stream, "the progress event overtook the open one").await;

    open.rollback().await.expect("rollback");
    let event = next_job_event(&mut stream).await;
    assert!(event.sequence > lost, "{event:?}");
    assert!(matches!(event.event, Some(Event::Progress(_))), "{event:?}");
    report_progress(&mut worker, &job.id, attempt).await;
    let next = next_job_event(&mut stream).await;
    assert!(next.sequence > event.sequence, "{next:?}");
    assert!(matches!(next.event, Some(Event::Progress(_))), "{next:?}");
}

/// A replica just started knows where the event log ends only once the transactions then in
/// progress have ended. A watcher connecting before waits for that, however long it takes, then
/// replays its job's events from the store. It used to start at sequence 0, and the replica read
/// the whole log from its start to serve it (on a real deployment, millions of events per
/// reconnecting watcher); then, past a 5 s wait, it still did. The server logs which transaction
/// the watcher waits for.
#[tokio::test]
async fn a_watcher_waits_for_a_replica_just_started_to_find_the_end_of_the_log() {
    let db = test_db().await;
    let first = ServerProcess::start(&db, &[]).await;
    let job = enqueue(&mut jobs(&first.url()).await, spec("type.idle", "default")).await;
    drop(first);

    let pool = db.pool().await;
    let mut open = open_transaction_with_an_id(&pool).await;
    let pid = backend_pid(&mut open).await;
    let server = ServerProcess::start(&db, &["--watch-stall-warning", "1s"]).await;
    let mut stream = watch_job(&server.url(), &job.id, 0).await;
    assert_quiet(
        &mut stream,
        "the watcher started before the replica knew where the log ends",
    )
    .await;
    // The wait is quiet for the watcher, not for an operator.
    log_line(
        &server,
        &[
            "watch delivery is held up by transactions in progress",
            &format!("pid {pid} "),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_quiet(&mut stream, "the watcher gave up waiting and started at 0").await;

    open.commit().await.expect("commit");
    let event = next_job_event(&mut stream).await;
    let Some(Event::StateChanged(s)) = event.event else {
        panic!("the job's first event is its state: {event:?}");
    };
    assert_eq!(s.state, pb::JobState::Available as i32);
}

/// Many dashboards at once while thousands of jobs run: every stream sees every event, once and
/// in order. A stream that falls behind is ended with RESOURCE_EXHAUSTED and, as the SDK does,
/// resumed after the last sequence it received (on a busy machine the five that take every event
/// of the queue can fall more than a subscription's buffer behind).
#[tokio::test]
async fn concurrent_watch_jobs_streams_miss_nothing() {
    const JOBS: usize = 5000;
    const STREAMS: usize = 200;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "100ms"]).await;
    let url = server.url();
    let mut client = jobs(&url).await;

    // 200 dashboards of finished jobs, and a few that take every event of the queue.
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let request = pb::WatchJobsRequest {
            queue: "default".into(),
            states: if i < 5 {
                vec![]
            } else {
                vec![pb::JobState::Succeeded.into()]
            },
            ..Default::default()
        };
        let stream = client
            .watch_jobs(request.clone())
            .await
            .expect("watch jobs")
            .into_inner();
        streams.push((request, stream));
    }
    let collectors: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, (mut request, mut stream))| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                let mut succeeded = 0;
                let mut resumes = 0;
                while succeeded < JOBS {
                    let message = tokio::time::timeout(WAIT, stream.message())
                        .await
                        .expect("an event in time");
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => panic!("stream {i} ended early"),
                        Err(status) if status.code() == Code::ResourceExhausted => {
                            resumes += 1;
                            request.after_sequence = seqs.last().copied().unwrap_or_default();
                            stream = client
                                .watch_jobs(request.clone())
                                .await
                                .expect("resumed watch jobs")
                                .into_inner();
                            continue;
                        }
                        Err(status) => panic!("stream {i} failed: {status:?}"),
                    };
                    let event = response.event.expect("event");
                    if let Some(Event::StateChanged(s)) = &event.event
                        && s.state == pb::JobState::Succeeded as i32
                    {
                        succeeded += 1;
                    }
                    seqs.push(event.sequence);
                }
                (i, seqs, resumes)
            })
        })
        .collect();

    let mut producer = jobs(&url).await;
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(1000) {
        producer
            .enqueue_jobs(pb::EnqueueJobsRequest {
                parent: Default::default(),
                jobs: chunk.iter().map(|_| spec("type.busy", "default")).collect(),
            })
            .await
            .expect("enqueue");
    }
    let mut worker = RawWorker::connect(&url, "raw", &["type.busy"], 50).await;
    for _ in 0..JOBS {
        let lease = worker.next_lease().await;
        worker.complete_nowait(&lease.job_id, lease.attempt).await;
    }

    // Every stream has seen every job finish, so every event it must have is committed.
    let mut collected = Vec::new();
    for collector in collectors {
        collected.push(collector.await.expect("collector"));
    }
    let pool = db.pool().await;
    let all: Vec<i64> = sqlx::query_scalar("SELECT seq FROM job_events ORDER BY seq")
        .fetch_all(&pool)
        .await
        .expect("events");
    let succeeded: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM job_events WHERE state = 'succeeded' ORDER BY seq")
            .fetch_all(&pool)
            .await
            .expect("events");
    let mut resumed = 0;
    for (i, seqs, resumes) in collected {
        resumed += resumes;
        let expected = if i < 5 { &all } else { &succeeded };
        let last = *seqs.last().expect("events");
        let expected: Vec<i64> = expected.iter().copied().filter(|s| *s <= last).collect();
        assert_eq!(
            seqs.len(),
            expected.len(),
            "stream {i} missed or repeated events"
        );
        assert_eq!(seqs, expected, "stream {i} differs from the log");
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_owned())
        })
        .unwrap_or_default();
    eprintln!(
        "server peak RSS after {STREAMS} WatchJobs streams and {JOBS} jobs: {rss}; \
         streams resumed after falling behind: {resumed}"
    );
}

/// WatchJobs filters by labels, job type and state.
#[tokio::test]
async fn watch_jobs_filters_by_label_type_and_state() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let mut a = spec("type.a", "default");
    a.labels.insert("team".into(), "alpha".into());
    let a = enqueue(&mut client, a).await;
    let mut b = spec("type.b", "default");
    b.labels.insert("team".into(), "beta".into());
    let b = enqueue(&mut client, b).await;
    for id in [&a.id, &b.id] {
        client
            .cancel_job(pb::CancelJobRequest {
                id: id.clone(),
                reason: "done".into(),
            })
            .await
            .expect("cancel");
    }

    // Reads a filtered stream until the given job's cancellation arrives.
    let read_until_cancelled = |request: pb::WatchJobsRequest, id: String| {
        let mut client = client.clone();
        async move {
            let mut stream = client
                .watch_jobs(request)
                .await
                .expect("watch")
                .into_inner();
            let mut events = Vec::new();
            loop {
                let event = next_event(&mut stream)
                    .await
                    .expect("open")
                    .event
                    .expect("event");
                let done = event.job_id == id && is_terminal(&event);
                events.push(event);
                if done {
                    return events;
                }
            }
        }
    };
    let mut by_label = pb::WatchJobsRequest::default();
    by_label.labels.insert("team".into(), "alpha".into());
    let events = read_until_cancelled(by_label, a.id.clone()).await;
    assert_eq!(events.len(), 2, "AVAILABLE and CANCELLED of job a");
    assert!(events.iter().all(|e| e.job_id == a.id));

    let by_type = pb::WatchJobsRequest {
        job_type: "type.b".into(),
        ..Default::default()
    };
    let events = read_until_cancelled(by_type, b.id.clone()).await;
    assert!(events.iter().all(|e| e.job_id == b.id));

    let by_state = pb::WatchJobsRequest {
        states: vec![pb::JobState::Cancelled.into()],
        ..Default::default()
    };
    let events = read_until_cancelled(by_state, b.id.clone()).await;
    assert_eq!(events.len(), 2, "only the two cancellations");
    assert!(events.iter().all(is_terminal));
}

/// Writes `count` log events of about two kilobytes each for a job, committed at once.
async fn write_log_events(pool: &sqlx::PgPool, job: &str, count: i32) {
    sqlx::query(
        "INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
         SELECT tenant_id, id, 'log', attempt, \
                jsonb_build_object('level', 'info', 'message', repeat('x', 2000)) \
         FROM jobs, generate_series(1, $2) WHERE id = $1::uuid",
    )
    .bind(job)
    .bind(count)
    .execute(pool)
    .await
    .expect("log events");
}

/// Reads a stream to the status that ends it: the last event's sequence, and the sequence the
/// status says to resume after.
async fn read_to_status(stream: &mut Streaming<pb::WatchJobResponse>, mut last: i64) -> (i64, i64) {
    loop {
        match tokio::time::timeout(WAIT, stream.message()).await {
            Ok(Ok(Some(response))) => last = response.event.expect("event").sequence,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => {
                let resume = status
                    .message()
                    .rsplit("resume after sequence ")
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no place to resume in {status:?}"));
                return (last, resume);
            }
            Err(_) => panic!("no status in time"),
        }
    }
}

/// A stream that a shutdown ends names the last event it sent as the place to resume, whether
/// it was replaying stored events or forwarding live ones when the server stopped. Its client
/// here reads nothing until then, so the stream is waiting to send an event (live) or is part
/// way through a page (replay): that event used to be counted as sent, and a client resuming
/// from the status missed it, or, mid-page, got the page's first events again.
#[tokio::test]
async fn a_stream_ended_by_a_shutdown_resumes_after_the_last_event_it_sent() {
    let db = test_db().await;
    let mut server = ServerProcess::start(&db, &[]).await;
    let pool = db.pool().await;
    let (live_job, _worker, _attempt, mut live) = running_and_watched(&server.url()).await;
    let replayed = enqueue(&mut jobs(&server.url()).await, spec("type.idle", "default")).await;
    write_log_events(&pool, &replayed.id, 3000).await;
    // Past the fanout's horizon, so that they are replayed from the store.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut replay = watch_job(&server.url(), &replayed.id, 0).await;
    write_log_events(&pool, &live_job.id, 3000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (_, (live_last, live_resume), (replay_last, replay_resume)) = tokio::join!(
        server.terminate(),
        read_to_status(&mut live, 0),
        read_to_status(&mut replay, 0),
    );
    assert_eq!(live_resume, live_last, "live");
    assert_eq!(replay_resume, replay_last, "replay");
}

/// Streams waiting for live events when the server shuts down end with UNAVAILABLE, "shutting
/// down", not RESOURCE_EXHAUSTED, "fell behind": the fanout ends every subscription as it stops,
/// and a stream that saw its subscription end before it saw the shutdown took the end for a
/// drop for lagging. Both statuses name the place to resume, but a client (or an operator
/// reading its logs) told "fell behind" goes looking for a slow consumer.
#[tokio::test]
async fn streams_ended_by_a_shutdown_say_so() {
    const STREAMS: usize = 64;
    let db = test_db().await;
    let mut server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        // No worker serves this type: the jobs stay AVAILABLE and their streams stay open.
        let job = enqueue(&mut client, spec("type.unserved", "default")).await;
        let mut stream = watch_job(&server.url(), &job.id, 0).await;
        let first = next_job_event(&mut stream).await;
        streams.push((stream, first.sequence));
    }

    let (_, statuses) = tokio::join!(
        server.terminate(),
        futures::future::join_all(streams.iter_mut().map(async |(stream, last)| {
            let status = match tokio::time::timeout(WAIT, stream.message()).await {
                Ok(Err(status)) => status,
                other => panic!("expected the stream to end with a status, got {other:?}"),
            };
            (status, *last)
        })),
    );
    for (status, last) in statuses {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            format!("server is shutting down; resume after sequence {last}")
        );
    }
}
