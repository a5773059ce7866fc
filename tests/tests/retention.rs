//! Retention (issue 30): finished jobs past their queue's retention are pruned by the leader
//! with their attempts (into the archive first with --archive), jobs not finished or finished
//! recently are kept, a queue's own retention overrides the server's, pruning under a running
//! workload loses no live job, old event partitions are dropped whole, a watcher resuming below
//! the pruned events gets OUT_OF_RANGE naming the oldest retained sequence, and a pruned job's
//! idempotency key makes a new job.
//!
//! Time is made short rather than waited for: retentions of a second, partitions of a second,
//! and a pruner pass every 100 ms. Nothing here asserts how long anything took.

mod support;

use std::{collections::HashSet, time::Duration};

use jobwire_proto::v1::{self as pb, queue_service_client::QueueServiceClient};
use jobwire_server::store::Store;
use jobwire_tests::{ServerProcess, eventually, test_db};
use sqlx::PgPool;
use support::{RawWorker, channel, enqueue, jobs, spec};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

/// How long anything the pruner does may take to be seen, on a loaded machine.
const PRUNED_WITHIN: Duration = Duration::from_secs(60);

/// Retention, partitions and passes short enough that a test sees them act.
const FAST: [&str; 6] = [
    "--retention",
    "1s",
    "--prune-interval",
    "100ms",
    "--event-partition-interval",
    "1s",
];

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

async fn get_code(jobs: &mut pb::job_service_client::JobServiceClient<Channel>, id: &str) -> Code {
    match jobs
        .get_job(pb::GetJobRequest {
            id: id.into(),
            view: pb::JobView::Basic.into(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Waits until GetJob answers NOT_FOUND for `id`: the pruner removed it.
async fn await_pruned(jobs: &mut pb::job_service_client::JobServiceClient<Channel>, id: &str) {
    eventually(&format!("job {id} pruned"), PRUNED_WITHIN, || {
        let mut jobs = jobs.clone();
        async move { (get_code(&mut jobs, id).await == Code::NotFound).then_some(()) }
    })
    .await;
}

async fn cancel(jobs: &mut pb::job_service_client::JobServiceClient<Channel>, id: &str) {
    jobs.cancel_job(pb::CancelJobRequest {
        id: id.into(),
        reason: "done with it".into(),
    })
    .await
    .expect("cancel");
}

async fn count(pool: &PgPool, sql: &'static str, id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .expect(sql)
}

#[tokio::test]
async fn finished_jobs_past_retention_go_with_their_attempts_into_the_archive() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &with(&FAST, &["--archive"])).await;
    let url = server.url();
    let pool = db.pool().await;
    let mut jobs = jobs(&url).await;
    let mut worker = RawWorker::connect(&url, "w1", &["ret.job"], 1).await;

    // A job that ran and failed for good: one attempt row.
    let failed = enqueue(
        &mut jobs,
        pb::JobSpec {
            retry_policy: Some(pb::RetryPolicy {
                max_attempts: Some(1),
                ..Default::default()
            }),
            ..spec("ret.job", "")
        },
    )
    .await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, failed.id);
    let ack = worker.fail(&failed.id, lease.attempt, "broken", true).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    // One cancelled before it ran, holding a signal sent while it waited.
    let cancelled = enqueue(&mut jobs, spec("other.job", "")).await;
    jobs.signal_job(pb::SignalJobRequest {
        id: cancelled.id.clone(),
        name: "go".into(),
        ..Default::default()
    })
    .await
    .expect("signal");
    cancel(&mut jobs, &cancelled.id).await;
    // Jobs not finished: one running (its lease held), one scheduled for later.
    let running = enqueue(&mut jobs, spec("ret.job", "")).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, running.id);
    let later = enqueue(
        &mut jobs,
        pb::JobSpec {
            schedule: Some(pb::job_spec::Schedule::Delay(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            })),
            ..spec("other.job", "")
        },
    )
    .await;
    let failed_events = count(
        &pool,
        "SELECT count(*) FROM job_events WHERE job_id = $1::uuid",
        &failed.id,
    )
    .await;
    assert!(failed_events >= 3, "{failed_events} events");
    // The partition the first events went to, to see it dropped.
    let first_partition: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM job_events WHERE job_id = $1::uuid ORDER BY seq \
         LIMIT 1",
    )
    .bind(&failed.id)
    .fetch_one(&pool)
    .await
    .expect("partition");

    await_pruned(&mut jobs, &failed.id).await;
    await_pruned(&mut jobs, &cancelled.id).await;
    for kept in [&running, &later] {
        assert_eq!(get_code(&mut jobs, &kept.id).await, Code::Ok, "{kept:?}");
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM job_attempts WHERE job_id = $1::uuid",
            &failed.id
        )
        .await,
        0,
        "attempts of the pruned job"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM job_signals WHERE job_id = $1::uuid",
            &cancelled.id
        )
        .await,
        0,
        "signals of the pruned job"
    );

    // The archive holds them whole.
    let (state, payload, attempt): (String, Vec<u8>, i32) = sqlx::query_as(
        "SELECT state::text, payload, attempt FROM jobs_archive WHERE id = $1::uuid",
    )
    .bind(&failed.id)
    .fetch_one(&pool)
    .await
    .expect("the failed job archived");
    assert_eq!(
        (state.as_str(), payload.as_slice(), attempt),
        ("failed", &b"payload"[..], 1)
    );
    let cancelled_state: String =
        sqlx::query_scalar("SELECT state::text FROM jobs_archive WHERE id = $1::uuid")
            .bind(&cancelled.id)
            .fetch_one(&pool)
            .await
            .expect("the cancelled job archived");
    assert_eq!(cancelled_state, "cancelled");
    let archived_attempt: (i32, String) = sqlx::query_as(
        "SELECT attempt, outcome::text FROM job_attempts_archive WHERE job_id = $1::uuid",
    )
    .bind(&failed.id)
    .fetch_one(&pool)
    .await
    .expect("the attempt archived");
    assert_eq!(archived_attempt, (1, "failed".to_owned()));
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM job_events_archive WHERE job_id = $1::uuid",
            &failed.id
        )
        .await,
        failed_events,
        "events archived"
    );

    // The events go with their partition, dropped whole once past the retention.
    eventually("the first event partition dropped", PRUNED_WITHIN, || {
        let pool = pool.clone();
        let first_partition = first_partition.clone();
        async move {
            let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(&first_partition)
                .fetch_one(&pool)
                .await
                .expect("to_regclass");
            exists.is_none().then_some(())
        }
    })
    .await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM job_events WHERE job_id = $1::uuid",
            &failed.id
        )
        .await,
        0,
        "events of the pruned job"
    );
    // Partitions for what comes are there, made ahead.
    let ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobwire_event_partitions() WHERE upper_bound > now()",
    )
    .fetch_one(&pool)
    .await
    .expect("partitions");
    assert!(ahead >= 2, "{ahead} partitions ahead");
}

/// The archive is written column by named column: an archived job, its attempt and its events
/// read exactly as they did before the pruning (but for when they were archived), whatever
/// order their columns have in the archive tables.
#[tokio::test]
async fn archived_rows_equal_what_was_pruned_column_for_column() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &with(&FAST, &["--archive"])).await;
    let url = server.url();
    let pool = db.pool().await;
    let mut jobs = jobs(&url).await;
    let mut queues = QueueServiceClient::new(channel(&url).await);
    let retention = |retention| pb::UpdateQueueRequest {
        queue: Some(pb::Queue {
            name: "whole".into(),
            retention,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["retention".into()],
        }),
        allow_missing: true,
    };
    // Kept until its rows are read, then left to the server's retention of a second.
    queues
        .update_queue(retention(Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        })))
        .await
        .expect("a retention of an hour");
    let mut worker = RawWorker::try_connect(
        &url,
        pb::Hello {
            queues: vec!["whole".into()],
            ..support::hello("w1", &["ret.whole"], 1, Vec::new())
        },
    )
    .await
    .expect("a worker of the queue");
    let job = enqueue(
        &mut jobs,
        pb::JobSpec {
            idempotency_key: "whole-1".into(),
            ..spec("ret.whole", "whole")
        },
    )
    .await;
    // A first attempt that fails (an attempt row), a second that reports progress and succeeds.
    let lease = worker.next_lease().await;
    let ack = worker
        .fail_after(
            &job.id,
            lease.attempt,
            "once",
            false,
            Duration::from_millis(1),
        )
        .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let lease = worker.next_lease().await;
    assert_eq!(lease.attempt, 2);
    worker.progress(&job.id, lease.attempt, 1, 2).await;
    let ack = worker.complete(&job.id, lease.attempt, b"the result").await;
    assert_eq!(ack.code, 0, "{ack:?}");

    let rows = |table: &str, key: &str, order: &str| {
        format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(r) - 'archived_at' ORDER BY {order}), '[]')::text \
             FROM {table} r WHERE {key} = $1::uuid"
        )
    };
    let read = async |table: &str, key: &str, order: &str| -> String {
        sqlx::query_scalar(sqlx::AssertSqlSafe(rows(table, key, order)))
            .bind(&job.id)
            .fetch_one(&pool)
            .await
            .expect("rows")
    };
    let before = (
        read("jobs", "id", "id").await,
        read("job_attempts", "job_id", "attempt").await,
        read("job_events", "job_id", "seq").await,
    );
    assert!(before.0.contains("whole-1"), "{}", before.0);
    assert!(before.1.contains("once"), "{}", before.1);
    assert!(before.2.contains("progress"), "{}", before.2);

    queues
        .update_queue(retention(None))
        .await
        .expect("the server's retention");
    await_pruned(&mut jobs, &job.id).await;
    let archived = (
        read("jobs_archive", "id", "id").await,
        read("job_attempts_archive", "job_id", "attempt").await,
        read("job_events_archive", "job_id", "seq").await,
    );
    assert_eq!(archived, before);
}

/// A backlog of expired jobs that takes the pruner longer than the event partitions made ahead
/// of it reach (a retention first turned on over a large table) must not leave new events
/// without a partition: enqueues, which write one each, all succeed while it is pruned, and the
/// whole backlog goes into the archive.
#[tokio::test]
async fn enqueues_find_a_partition_while_a_long_backlog_is_pruned() {
    const BACKLOG: i64 = 600_000;
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(
        &db,
        &[
            "--retention",
            "1s",
            "--prune-interval",
            "1s",
            "--event-partition-interval",
            "1s",
            "--archive",
        ],
    )
    .await;
    let url = server.url();
    let mut jobs = jobs(&url).await;
    // The backlog: copies of one cancelled job, finished an hour ago, in one statement.
    let seed = enqueue(&mut jobs, spec("ret.backlog", "backlog")).await;
    cancel(&mut jobs, &seed.id).await;
    let copies = format!(
        "DO $$ DECLARE columns text; BEGIN \
             SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO columns \
             FROM pg_attribute WHERE attrelid = 'jobs'::regclass AND attnum > 0 \
               AND NOT attisdropped AND attname NOT IN ('id', 'finished_at'); \
             EXECUTE format('INSERT INTO jobs (id, finished_at, %s) \
                 SELECT gen_random_uuid(), now() - interval ''1 hour'', %s \
                 FROM jobs, generate_series(1, {BACKLOG}) WHERE id = %L', \
                 columns, columns, '{}'); \
         END $$",
        seed.id
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(copies))
        .execute(&pool)
        .await
        .expect("backlog");

    let left = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_type = 'ret.backlog'")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut enqueued = 0;
    while left().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "backlog not pruned");
        jobs.enqueue_job(pb::EnqueueJobRequest {
            job: Some(spec("ret.job", "")),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("enqueue {enqueued} while pruning: {status:?}"));
        enqueued += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let archived: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs_archive WHERE job_type = 'ret.backlog'")
            .fetch_one(&pool)
            .await
            .expect("archived");
    assert_eq!(archived, BACKLOG + 1);
    assert!(enqueued > 0);
}

#[tokio::test]
async fn a_queues_retention_overrides_the_servers() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &FAST).await;
    let url = server.url();
    let mut jobs = jobs(&url).await;
    let mut queues = QueueServiceClient::new(channel(&url).await);

    let retention = |seconds, nanos| pb::UpdateQueueRequest {
        queue: Some(pb::Queue {
            name: "keep".into(),
            retention: Some(prost_types::Duration { seconds, nanos }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["retention".into()],
        }),
        allow_missing: true,
    };
    // Out of range: refused, naming the field.
    for (seconds, nanos) in [(0, 500_000_000), (3651 * 24 * 3600, 0)] {
        let refused = queues
            .update_queue(retention(seconds, nanos))
            .await
            .expect_err("out of range");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("queue.retention"), "{refused:?}");
    }
    let updated = queues
        .update_queue(retention(3600, 0))
        .await
        .expect("a retention of an hour")
        .into_inner()
        .queue
        .expect("queue");
    assert_eq!(updated.retention.map(|d| d.seconds), Some(3600));

    let kept = enqueue(&mut jobs, spec("ret.job", "keep")).await;
    let pruned = enqueue(&mut jobs, spec("ret.job", "short")).await;
    cancel(&mut jobs, &kept.id).await;
    cancel(&mut jobs, &pruned.id).await;
    // Each pass goes through every queue: once the default's job is gone, the pass that took
    // it also judged the other queue's, by then past the server's retention too.
    await_pruned(&mut jobs, &pruned.id).await;
    assert_eq!(get_code(&mut jobs, &kept.id).await, Code::Ok);

    // Back to the server's default: the kept job goes too.
    let shown = queues
        .update_queue(pb::UpdateQueueRequest {
            queue: Some(pb::Queue {
                name: "keep".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["retention".into()],
            }),
            allow_missing: false,
        })
        .await
        .expect("retention removed")
        .into_inner()
        .queue
        .expect("queue");
    assert_eq!(shown.retention, None);
    await_pruned(&mut jobs, &kept.id).await;
}

#[tokio::test]
async fn pruning_under_a_running_workload_loses_no_live_job() {
    const JOBS: usize = 400;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &FAST).await;
    let url = server.url();
    let pool = db.pool().await;

    // The worker completes every job it is given, and reports which.
    let worker_url = url.clone();
    let worker = tokio::spawn(async move {
        let mut worker = RawWorker::connect(&worker_url, "w1", &["load.job"], 8).await;
        let mut done = HashSet::new();
        while done.len() < JOBS {
            let lease = worker.next_lease().await;
            let ack = worker.complete(&lease.job_id, lease.attempt, b"ok").await;
            assert_eq!(ack.code, 0, "{ack:?}");
            assert!(done.insert(lease.job_id.clone()), "{} twice", lease.job_id);
        }
        done
    });
    // Producers enqueue in waves while earlier waves finish and are pruned; some jobs wait
    // past the retention before they may run.
    let mut enqueued = HashSet::new();
    let mut client = jobs(&url).await;
    for wave in 0..20 {
        for n in 0..JOBS / 20 {
            let mut job = spec("load.job", "");
            if n % 10 == 0 {
                job.schedule = Some(pb::job_spec::Schedule::Delay(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }));
            }
            job.idempotency_key = format!("{wave}-{n}");
            assert!(enqueued.insert(enqueue(&mut client, job).await.id));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let done = tokio::time::timeout(PRUNED_WITHIN, worker)
        .await
        .expect("every job ran in time")
        .expect("worker");
    assert_eq!(done, enqueued, "every enqueued job ran once");
    // And the pruner was at work meanwhile: every finished job goes.
    eventually("every finished job pruned", PRUNED_WITHIN, || {
        let pool = pool.clone();
        async move {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
                .fetch_one(&pool)
                .await
                .expect("count");
            (left == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_watcher_resuming_below_the_pruned_events_gets_out_of_range_naming_the_oldest() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &FAST).await;
    let url = server.url();
    let pool = db.pool().await;
    let mut jobs = jobs(&url).await;

    let old = enqueue(&mut jobs, spec("ret.job", "")).await;
    cancel(&mut jobs, &old.id).await;
    let (first, last): (i64, i64) =
        sqlx::query_as("SELECT min(seq), max(seq) FROM job_events WHERE job_id = $1::uuid")
            .bind(&old.id)
            .fetch_one(&pool)
            .await
            .expect("events");
    let through = eventually("the old events pruned", PRUNED_WITHIN, || {
        let pool = pool.clone();
        async move {
            let through: i64 = sqlx::query_scalar("SELECT pruned_through FROM event_log")
                .fetch_one(&pool)
                .await
                .expect("event_log");
            (through >= last).then_some(through)
        }
    })
    .await;
    let new = enqueue(&mut jobs, spec("ret.job", "")).await;

    // Resuming after a pruned sequence: OUT_OF_RANGE naming the oldest retained one.
    let oldest = (through + 1).to_string();
    let mut stream = jobs
        .watch_jobs(pb::WatchJobsRequest {
            after_sequence: first,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let refused = tokio::time::timeout(support::WAIT, stream.message())
        .await
        .expect("an answer in time")
        .expect_err("the pruned events");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("after_sequence"), "{refused:?}");
    assert!(refused.message().contains(&oldest), "{refused:?}");
    let info = refused.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "EVENTS_PRUNED");
    assert_eq!(info.metadata.get("oldest_retained_sequence"), Some(&oldest));
    let mut stream = jobs
        .watch_job(pb::WatchJobRequest {
            include_children: Default::default(),
            id: new.id.clone(),
            after_sequence: first,
        })
        .await
        .expect("watch")
        .into_inner();
    let refused = tokio::time::timeout(support::WAIT, stream.message())
        .await
        .expect("an answer in time")
        .expect_err("the pruned events");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");

    // From the horizon, or from 0 (the retained history), the new job's events come, and none
    // of the pruned ones.
    for after in [through, 0] {
        let mut stream = jobs
            .watch_jobs(pb::WatchJobsRequest {
                after_sequence: after,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        let event = support::next_event(&mut stream)
            .await
            .expect("an event")
            .event
            .expect("event");
        assert!(event.sequence > through, "{event:?}");
        assert_eq!(event.job_id, new.id, "{event:?}");
    }
}

#[tokio::test]
async fn a_pruned_jobs_idempotency_key_makes_a_new_job() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &FAST).await;
    let mut jobs = jobs(&server.url()).await;
    let keyed = || pb::JobSpec {
        idempotency_key: "nightly-report".into(),
        ..spec("ret.job", "")
    };
    let first = enqueue(&mut jobs, keyed()).await;
    assert_eq!(
        enqueue(&mut jobs, keyed()).await.id,
        first.id,
        "held while kept"
    );
    cancel(&mut jobs, &first.id).await;
    await_pruned(&mut jobs, &first.id).await;
    let response = jobs
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(keyed()),
        })
        .await
        .expect("enqueue")
        .into_inner();
    assert!(response.created, "{response:?}");
    assert_ne!(response.job.expect("job").id, first.id);
}

/// The archive is written by column name, every column of the source: a column added to a
/// source table and not to its archive would stop the archiving pruner. This fails when a
/// migration forgets one.
#[tokio::test]
async fn archive_tables_hold_every_column_of_their_sources() {
    let db = test_db().await;
    let _store = Store::connect(db.url(), 2).await.expect("migrated");
    let pool = db.pool().await;
    for (source, archive) in [
        ("jobs", "jobs_archive"),
        ("job_attempts", "job_attempts_archive"),
        ("job_events", "job_events_archive"),
    ] {
        let missing: Vec<String> = sqlx::query_scalar(
            "SELECT s.column_name::text FROM information_schema.columns s \
             WHERE s.table_schema = current_schema() AND s.table_name = $1 \
               AND NOT EXISTS (SELECT 1 FROM information_schema.columns a \
                   WHERE a.table_schema = s.table_schema AND a.table_name = $2 \
                     AND a.column_name = s.column_name AND a.data_type = s.data_type) \
             ORDER BY 1",
        )
        .bind(source)
        .bind(archive)
        .fetch_all(&pool)
        .await
        .expect("columns");
        assert!(
            missing.is_empty(),
            "{archive} lacks {missing:?} of {source}"
        );
    }
}
