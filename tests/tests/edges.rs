//! The API's promises at the edges of what it takes: numbers at and beyond their documented
//! ranges, messages at the size budget, and the smaller contract gaps an outside client found.
//! Each failure is the fitting status naming the field, never INTERNAL, and nothing half-done.

mod support;

use std::time::Duration;

use jobwire_proto::v1::{self as pb, queue_service_client::QueueServiceClient};
use jobwire_tests::{ServerProcess, eventually, test_db};
use support::{RawWorker, assert_status, channel, enqueue, jobs, spec};
use tonic::Code;

const FAST: &[&str] = &[
    "--poll-interval",
    "100ms",
    "--reap-interval",
    "100ms",
    "--lease-duration",
    "3s",
    "--heartbeat-interval",
    "1s",
];

fn rate_update(queue: &str, per_second: f64, burst: i32) -> pb::UpdateQueueRequest {
    pb::UpdateQueueRequest {
        queue: Some(pb::Queue {
            name: queue.into(),
            rate_limit: Some(pb::RateLimit { per_second, burst }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rate_limit".into()],
        }),
        allow_missing: true,
    }
}

/// A rate too slow to wait for is refused; the slowest rate allowed holds its queue to its
/// burst and never stops the claims of other queues (a claim that panicked after committing
/// once left every lease it took undelivered).
#[tokio::test]
async fn rates_outside_their_range_are_refused_and_the_slowest_allowed_claims_safely() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, FAST).await;
    let url = server.url();
    let mut queues = QueueServiceClient::new(channel(&url).await);
    for (per_second, burst) in [(1e-300, 1), (0.0, 1), (-1.0, 1), (f64::NAN, 1), (1e9, 1)] {
        assert_status(
            queues
                .update_queue(rate_update("slow", per_second, burst))
                .await,
            Code::InvalidArgument,
            "queue.rate_limit.per_second",
        );
    }
    assert_status(
        queues.update_queue(rate_update("slow", 1.0, -5)).await,
        Code::InvalidArgument,
        "queue.rate_limit.burst",
    );
    // The slowest rate allowed: one start now (its burst), the next in about eleven days.
    queues
        .update_queue(rate_update("slow", 1e-6, 1))
        .await
        .expect("the slowest rate is allowed");

    let mut client = jobs(&url).await;
    for _ in 0..3 {
        enqueue(&mut client, spec("edge.job", "slow")).await;
    }
    let mut fast = Vec::new();
    for _ in 0..5 {
        fast.push(enqueue(&mut client, spec("edge.job", "fast")).await.id);
    }
    let mut hello = support::hello("edge-worker", &["edge.job"], 4, vec![]);
    hello.queues = vec!["slow".into(), "fast".into()];
    let mut worker = RawWorker::try_connect(&url, hello).await.expect("worker");
    let mut slow_started = 0;
    let mut fast_done = 0;
    while fast_done < fast.len() {
        let lease = worker.next_lease().await;
        if lease.queue == "slow" {
            slow_started += 1;
        } else {
            fast_done += 1;
        }
        let ack = worker.complete(&lease.job_id, lease.attempt, b"ok").await;
        assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    }
    // The slow queue's one token may be spent after the fast jobs: wait for it, then no more.
    if slow_started == 0 {
        let lease = worker
            .lease_within(Duration::from_secs(5))
            .await
            .expect("the slow queue's burst starts one job");
        assert_eq!(lease.queue, "slow");
        slow_started += 1;
    }
    assert!(
        worker
            .lease_within(Duration::from_millis(500))
            .await
            .is_none(),
        "the slow queue starts nothing beyond its burst"
    );
    assert_eq!(slow_started, 1);
    assert!(
        !server.stderr_tail(200).contains("panicked"),
        "{}",
        server.stderr_tail(40)
    );
}

/// Timestamps outside protobuf's range (years 1 to 9999) are refused by name; PostgreSQL's own
/// range starts in 4713 BC and once answered INTERNAL for earlier ones.
#[tokio::test]
async fn timestamps_outside_their_range_are_refused_by_name() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    for (seconds, nanos) in [
        (-210_866_803_201, 0),
        (-62_135_596_801, 0),
        (253_402_300_800, 0),
        (0, -1),
        (0, 1_000_000_000),
    ] {
        let mut job = spec("edge.job", "default");
        job.schedule = Some(pb::job_spec::Schedule::RunAt(prost_types::Timestamp {
            seconds,
            nanos,
        }));
        assert_status(
            client
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(job),
                })
                .await,
            Code::InvalidArgument,
            "run_at",
        );
    }
    let mut job = spec("edge.job", "default");
    job.schedule = Some(pb::job_spec::Schedule::RunAt(prost_types::Timestamp {
        seconds: -62_135_596_800,
        nanos: 0,
    }));
    let early = enqueue(&mut client, job).await;
    assert_eq!(
        early.state,
        pb::JobState::Available as i32,
        "a time long past is due now"
    );
    let stored: i64 = eventually("the job is stored", Duration::from_secs(5), || {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs")
                .fetch_one(&db.pool().await)
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(stored, 1, "nothing of the refused enqueues was written");
}

const MIB: usize = 1024 * 1024;

fn big_spec(queue: &str, payload_bytes: usize) -> pb::JobSpec {
    let mut job = spec("edge.job", queue);
    job.payload = Some(support::any_bytes("test.Payload", vec![7; payload_bytes]));
    job
}

/// A job with the largest payload and the largest result succeeds and can be read back whole,
/// by GetJob and by WatchJob (invariant 11).
#[tokio::test]
async fn a_job_at_the_payload_and_result_limits_is_read_back_whole() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    let job = enqueue(&mut client, big_spec("default", MIB)).await;
    let mut worker = RawWorker::connect(&url, "big", &["edge.job"], 1).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.payload.as_ref().map(|p| p.value.len()), Some(MIB));
    let ack = worker
        .complete(&lease.job_id, lease.attempt, &vec![9; MIB])
        .await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");

    let read = support::get(&mut client, &job.id).await;
    assert_eq!(read.state, pb::JobState::Succeeded as i32);
    assert_eq!(read.payload.map(|p| p.value.len()), Some(MIB));
    assert_eq!(read.result.map(|r| r.value.len()), Some(MIB));
    let events = support::collect_job_events(&url, &job.id, 0).await;
    let last = events.last().expect("events");
    assert!(support::is_terminal(last), "{last:?}");
}

/// A lease with the largest payload and the largest checkpoint reaches its worker, and the
/// worker's stream carries on with its other jobs (it once killed every stream it was sent to).
#[tokio::test]
async fn a_lease_at_the_payload_and_checkpoint_limits_reaches_its_worker() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    let big = enqueue(&mut client, big_spec("default", MIB)).await;
    let mut worker = RawWorker::connect(&url, "ckpt", &["edge.job"], 2).await;
    let first = worker.next_lease().await;
    assert_eq!(first.job_id, big.id);
    let request_id = worker.request_id();
    let ack = worker
        .request(
            request_id,
            pb::connect_request::Message::Checkpoint(pb::SaveCheckpoint {
                request_id,
                lease: Some(pb::LeaseRef {
                    job_id: first.job_id.clone(),
                    attempt: first.attempt,
                }),
                data: vec![3; MIB],
            }),
        )
        .await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let ack = worker
        .fail_after(&first.job_id, first.attempt, "again", false, Duration::ZERO)
        .await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let small = enqueue(&mut client, spec("edge.job", "default")).await;

    let (mut resumed, mut other) = (None, None);
    while resumed.is_none() || other.is_none() {
        let lease = worker.next_lease().await;
        if lease.job_id == big.id {
            resumed = Some(lease);
        } else {
            other = Some(lease);
        }
    }
    let resumed = resumed.expect("the big job's second lease");
    assert_eq!(resumed.checkpoint.len(), MIB);
    assert_eq!(resumed.payload.as_ref().map(|p| p.value.len()), Some(MIB));
    let other = other.expect("the small job's lease");
    assert_eq!(other.job_id, small.id);
    for lease in [&other, &resumed] {
        let ack = worker.complete(&lease.job_id, lease.attempt, b"ok").await;
        assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    }
}

/// A lease too large for any message (state written by hand, or by an older server) fails its
/// job with an error that says so, instead of breaking the worker's stream on every try.
#[tokio::test]
async fn a_lease_too_large_to_send_fails_its_job_with_a_clear_error() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, FAST).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    let job = enqueue(&mut client, big_spec("default", MIB)).await;
    let pool = db.pool().await;
    // No worker is connected yet: the job waits while its checkpoint is written.
    sqlx::query("UPDATE jobs SET checkpoint = $1 WHERE id = $2::uuid")
        .bind(vec![1u8; 4 * MIB])
        .bind(&job.id)
        .execute(&pool)
        .await
        .expect("a checkpoint beyond the budget");
    let small = enqueue(&mut client, spec("edge.job", "default")).await;
    let mut worker = RawWorker::connect(&url, "w", &["edge.job"], 2).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, small.id, "only the small job's lease comes");
    let ack = worker.complete(&lease.job_id, lease.attempt, b"ok").await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let failed = eventually("the big job fails", Duration::from_secs(20), || {
        let (mut client, id) = (client.clone(), job.id.clone());
        async move {
            let job = support::get(&mut client, &id).await;
            (job.state == pb::JobState::Failed as i32).then_some(job)
        }
    })
    .await;
    let error = failed.last_error.expect("an error");
    assert!(
        error.message.contains("4194304") && !error.retryable,
        "{error:?}"
    );
}

/// Pages stop early at the size budget and say where to go on; every job is listed once.
#[tokio::test]
async fn list_pages_stop_at_the_size_budget() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&mut client, big_spec("large", 600 * 1000)).await.id);
    }
    for _ in 0..4 {
        ids.push(enqueue(&mut client, big_spec("large", MIB)).await.id);
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                queue: "large".into(),
                page_token: token.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("a page within the budget")
            .into_inner();
        assert!(!page.jobs.is_empty(), "a page holds at least one job");
        listed.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
}

/// A batch of as many small jobs as the proto allows fits the request budget (it was once held
/// to one payload's size); a request over
/// the budget is refused with RESOURCE_EXHAUSTED naming the limit, and nothing of it is written.
#[tokio::test]
async fn batches_fit_the_request_budget_and_larger_requests_are_refused() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    // About 2.3 MB: small jobs, but more than a payload's worth in all.
    let batch = pb::EnqueueJobsRequest {
        parent: Default::default(),
        jobs: (0..5000).map(|_| big_spec("bulk", 400)).collect(),
    };
    let enqueued = client
        .enqueue_jobs(batch)
        .await
        .expect("5,000 small jobs")
        .into_inner();
    assert_eq!(enqueued.jobs.len(), 5000);

    let oversized = pb::EnqueueJobsRequest {
        parent: Default::default(),
        jobs: (0..5).map(|_| big_spec("huge", MIB)).collect(),
    };
    let status = client
        .enqueue_jobs(oversized)
        .await
        .expect_err("over the budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("4194304"), "{status:?}");
    let huge: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE queue = 'huge'")
        .fetch_one(&db.pool().await)
        .await
        .expect("count");
    assert_eq!(huge, 0);
}

/// A retry waits its backoff, not the scheduler's poll: failures wake the timer that delayed
/// enqueues already use (a 0.2 s backoff once took 0.5 to 1 s, up to a poll interval).
#[tokio::test]
async fn a_retry_starts_after_its_backoff_not_after_the_poll() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--poll-interval", "10s"]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    let mut job = spec("edge.job", "default");
    job.retry_policy = Some(pb::RetryPolicy {
        max_attempts: Some(4),
        initial_backoff: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        backoff_multiplier: Some(1.0),
        jitter: Some(0.0),
        ..Default::default()
    });
    let job = enqueue(&mut client, job).await;
    let mut worker = RawWorker::connect(&url, "retrier", &["edge.job"], 1).await;
    let started = std::time::Instant::now();
    for attempt in 1..=3 {
        let lease = worker.next_lease().await;
        assert_eq!(
            (lease.job_id.as_str(), lease.attempt),
            (job.id.as_str(), attempt)
        );
        let request_id = worker.request_id();
        let ack = worker
            .request(
                request_id,
                pb::connect_request::Message::Fail(pb::FailJob {
                    request_id,
                    lease: Some(pb::LeaseRef {
                        job_id: lease.job_id.clone(),
                        attempt: lease.attempt,
                    }),
                    message: "again".into(),
                    ..Default::default()
                }),
            )
            .await;
        assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    }
    let last = worker.next_lease().await;
    assert_eq!(last.attempt, 4);
    // Three backoffs of 0.2 s; waiting for the 10 s poll instead would take 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "three retries took {:?}",
        started.elapsed()
    );
}

async fn register_log_line_type(url: &str) {
    register_type(url, "jobwire.v1.LogLine").await;
}

/// Registers `edge.logline` (again) with a payload message of jobwire's own protocol.
async fn register_type(url: &str, payload_type: &str) {
    let mut types = pb::job_type_service_client::JobTypeServiceClient::new(channel(url).await);
    types
        .register_job_type(pb::RegisterJobTypeRequest {
            job_type: Some(pb::JobType {
                name: "edge.logline".into(),
                payload_type: payload_type.into(),
                descriptor_set: jobwire_proto::FILE_DESCRIPTOR_SET.to_vec(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("register edge.logline with {payload_type}: {e}"));
}

fn json_struct(value: serde_json::Value) -> prost_types::Struct {
    fn to_value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(to_value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(json_struct(o.into())),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match value {
        serde_json::Value::Object(fields) => prost_types::Struct {
            fields: fields.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        },
        other => panic!("not an object: {other}"),
    }
}

/// Contract gaps an outside client found, each refused naming its field, none INTERNAL.
#[tokio::test]
async fn malformed_requests_are_refused_by_name_never_internal() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    register_log_line_type(&url).await;
    let mut client = jobs(&url).await;

    // A malformed Timestamp inside payload_json names its field.
    let mut job = spec("edge.logline", "default");
    job.payload = None;
    job.payload_json = Some(json_struct(serde_json::json!({"time": "yesterday"})));
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(job),
            })
            .await,
        Code::InvalidArgument,
        "job.payload_json.time",
    );

    // A Struct nested beyond what a message may nest: INVALID_ARGUMENT naming the limit.
    let mut nested = serde_json::json!({"leaf": 1});
    for _ in 0..40 {
        nested = serde_json::json!({ "in": nested });
    }
    let mut job = spec("edge.logline", "default");
    job.payload = None;
    job.payload_json = Some(json_struct(nested));
    let status = client
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(job),
        })
        .await
        .expect_err("too deep");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("nest"), "{status:?}");

    // An unknown view value.
    let job = enqueue(&mut client, spec("edge.job", "default")).await;
    assert_status(
        client
            .get_job(pb::GetJobRequest {
                id: job.id.clone(),
                view: 7,
            })
            .await,
        Code::InvalidArgument,
        "view",
    );

    // A body that is not protobuf at all.
    let mut raw = jobwire_tests::raw::RawClient::new(channel(&url).await);
    let status = raw
        .unary("/jobwire.v1.JobService/GetJob", vec![0xff, 0xff, 0xff], &[])
        .await
        .expect_err("not protobuf");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A type URL of any length.
    let mut job = spec("edge.job", "default");
    job.payload = Some(prost_types::Any {
        type_url: format!("type.googleapis.com/{}", "a".repeat(2000)),
        value: vec![],
    });
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(job),
            })
            .await,
        Code::InvalidArgument,
        "job.payload.type_url",
    );

    // A forged page token, in the form the server issues, with a NUL in its cursor.
    let mut schedules =
        pb::schedule_service_client::ScheduleServiceClient::new(channel(&url).await);
    use base64::Engine as _;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"after":"\u0000x","filter":null}"#);
    assert_status(
        schedules
            .list_schedules(pb::ListSchedulesRequest {
                page_token: forged,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
}

fn schedule(name: &str, cron: &str, job_type: &str, payload: prost_types::Any) -> pb::Schedule {
    pb::Schedule {
        name: name.into(),
        cron: cron.into(),
        job: Some(pb::JobTemplate {
            job_type: job_type.into(),
            payload: Some(payload),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A schedule's template is checked like an enqueue (a payload of a registered type that does
/// not decode was accepted, and every job it made was unreadable), and an update is checked
/// like a create (a cron that never matches again once paused the schedule silently).
#[tokio::test]
async fn schedules_are_checked_like_enqueues_and_updates_like_creates() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    register_log_line_type(&url).await;
    let mut schedules =
        pb::schedule_service_client::ScheduleServiceClient::new(channel(&url).await);
    let garbage = prost_types::Any {
        type_url: "type.googleapis.com/jobwire.v1.LogLine".into(),
        value: vec![0xff, 0xff],
    };
    assert_status(
        schedules
            .create_schedule(pb::CreateScheduleRequest {
                schedule: Some(schedule(
                    "bad",
                    "0 3 * * *",
                    "edge.logline",
                    garbage.clone(),
                )),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "schedule.job.payload",
    );
    let line = prost_types::Any {
        type_url: "type.googleapis.com/jobwire.v1.LogLine".into(),
        value: prost::Message::encode_to_vec(&pb::LogLine {
            message: "hello".into(),
            ..Default::default()
        }),
    };
    schedules
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(schedule("good", "0 3 * * *", "edge.logline", line)),
            ..Default::default()
        })
        .await
        .expect("a valid template");
    let update = |cron: &str, paths: &[&str], job: Option<prost_types::Any>| {
        let mut s = schedule("good", cron, "edge.logline", job.unwrap_or_default());
        if !paths.contains(&"job") {
            s.job = None;
        }
        pb::UpdateScheduleRequest {
            schedule: Some(s),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        }
    };
    assert_status(
        schedules
            .update_schedule(update("0 0 31 2 *", &["cron"], None))
            .await,
        Code::InvalidArgument,
        "schedule.cron",
    );
    assert_status(
        schedules
            .update_schedule(update("0 3 * * *", &["job"], Some(garbage)))
            .await,
        Code::InvalidArgument,
        "schedule.job.payload",
    );
    let kept = schedules
        .get_schedule(pb::GetScheduleRequest {
            name: "good".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .schedule
        .expect("schedule");
    assert!(!kept.paused && kept.next_run_at.is_some(), "{kept:?}");
    assert_eq!(kept.cron, "0 3 * * *");
    let triggered = schedules
        .trigger_schedule(pb::TriggerScheduleRequest {
            name: "good".into(),
        })
        .await
        .expect("trigger")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(triggered.job_type, "edge.logline");

    // A JSON template is encoded against the registered schema, a misspelled field named.
    let json_schedule = |name: &str, json: serde_json::Value| pb::Schedule {
        name: name.into(),
        cron: "0 3 * * *".into(),
        job: Some(pb::JobTemplate {
            job_type: "edge.logline".into(),
            payload_json: Some(json_struct(json)),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_status(
        schedules
            .create_schedule(pb::CreateScheduleRequest {
                schedule: Some(json_schedule("json", serde_json::json!({"mesage": "hi"}))),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "schedule.job.payload_json.mesage",
    );
    let made = schedules
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(json_schedule("json", serde_json::json!({"message": "hi"}))),
            ..Default::default()
        })
        .await
        .expect("a JSON template")
        .into_inner()
        .schedule
        .and_then(|s| s.job)
        .and_then(|job| job.payload)
        .expect("its payload");
    assert_eq!(made.type_url, "type.googleapis.com/jobwire.v1.LogLine");
    let decoded: pb::LogLine = prost::Message::decode(made.value.as_slice()).expect("decodes");
    assert_eq!(decoded.message, "hi");

    // The type registered again with another payload: a trigger of the old template is
    // refused, naming the payload, rather than making a job its worker cannot decode.
    register_type(&url, "jobwire.v1.Progress").await;
    assert_status(
        schedules
            .trigger_schedule(pb::TriggerScheduleRequest {
                name: "good".into(),
            })
            .await,
        Code::InvalidArgument,
        "schedule.job.payload.type_url",
    );
}

/// A second hello on a welcomed stream ends it with INVALID_ARGUMENT naming hello (it was
/// silently ignored, leaving the worker believing its new hello had taken).
#[tokio::test]
async fn a_second_hello_ends_the_stream_by_name() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = jobwire_tests::raw::RawClient::new(channel(&server.url()).await);
    let hello = |id: &str| {
        prost::Message::encode_to_vec(&pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Hello(support::hello(
                id,
                &["edge.job"],
                1,
                vec![],
            ))),
        })
    };
    let status = raw
        .streaming(
            "/jobwire.v1.WorkerService/Connect",
            vec![hello("first"), hello("second")],
            &[],
            Duration::from_secs(10),
        )
        .await
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("hello"), "{status:?}");
}
