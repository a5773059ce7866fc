//! ReplayJobs: dead letters replayed by filter, with a dry run whose count is what is then
//! replayed, a payload change checked against the job type's schema, and request ids that make
//! a repeated call harmless.

mod support;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use jobwire::{HandlerError, JobContext, JobType, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, codegen::ApplyUpdate, test_db};
use support::{WAIT, jobs};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// A job that fails (kind `http_5xx`) while the upstream is down.
#[derive(Clone, PartialEq, prost::Message)]
struct Fetch {
    #[prost(uint32, tag = "1")]
    n: u32,
}

impl prost::Name for Fetch {
    const NAME: &'static str = "Fetch";
    const PACKAGE: &'static str = "jobwire.tests.replay";
}

impl JobType for Fetch {
    const JOB_TYPE: &'static str = "replay.fetch";
    type Output = ();
}

async fn count(pool: &sqlx::PgPool, job_type: &str, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_type = $1 AND state = $2::job_state")
        .bind(job_type)
        .bind(state)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn until_count(pool: &sqlx::PgPool, job_type: &str, state: &str, want: i64) {
    tokio::time::timeout(WAIT * 3, async {
        while count(pool, job_type, state).await != want {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{want} {job_type} jobs never became {state}"));
}

fn spec(n: u32, team: &str) -> pb::JobSpec {
    pb::JobSpec {
        job_type: Fetch::JOB_TYPE.into(),
        payload: Some(prost_types::Any::from_msg(&Fetch { n }).expect("encode")),
        retry_policy: Some(pb::RetryPolicy {
            max_attempts: Some(1),
            ..Default::default()
        }),
        labels: [("team".to_owned(), team.to_owned())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_dry_run_counts_what_a_replay_then_requeues_and_a_repeat_replays_nothing() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let pool = db.pool().await;
    let upstream_up = Arc::new(AtomicBool::new(false));
    let up = upstream_up.clone();
    let worker = Worker::builder(server.url())
        .worker_id("fetcher")
        .concurrency(16)
        .register::<Fetch, _, _>(move |_ctx: JobContext, _job: Fetch| {
            let up = up.clone();
            async move {
                if up.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(HandlerError::retryable("503 from upstream").with_kind("http_5xx"))
                }
            }
        })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });

    let mut raw = jobs(&server.url()).await;
    let batch: Vec<pb::JobSpec> = (0..600)
        .map(|n| spec(n, if n < 500 { "a" } else { "b" }))
        .collect();
    raw.enqueue_jobs(pb::EnqueueJobsRequest {
        parent: Default::default(),
        jobs: batch,
    })
    .await
    .expect("enqueue");
    until_count(&pool, Fetch::JOB_TYPE, "failed", 600).await;

    let filter = pb::ReplayJobsRequest {
        job_type: Fetch::JOB_TYPE.into(),
        error_kind: "http_5xx".into(),
        labels: [("team".to_owned(), "a".to_owned())].into(),
        limit: 10_000,
        ..Default::default()
    };
    let dry = raw
        .replay_jobs(pb::ReplayJobsRequest {
            dry_run: true,
            ..filter.clone()
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(dry.count, 500);
    assert_eq!(dry.sample_ids.len(), 10);
    assert!(!dry.truncated);
    assert_eq!(
        count(&pool, Fetch::JOB_TYPE, "failed").await,
        600,
        "a dry run changes nothing"
    );

    upstream_up.store(true, Ordering::SeqCst);
    let replayed = raw
        .replay_jobs(pb::ReplayJobsRequest {
            request_id: "replay-team-a".into(),
            ..filter.clone()
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(
        replayed.count, dry.count,
        "the dry run's count is what was replayed"
    );
    assert_eq!(replayed.sample_ids, dry.sample_ids);
    assert!(!replayed.repeated);
    until_count(&pool, Fetch::JOB_TYPE, "succeeded", 500).await;
    assert_eq!(
        count(&pool, Fetch::JOB_TYPE, "failed").await,
        100,
        "team b untouched"
    );

    // A client retrying after a lost answer: the same answer, and nothing replayed again.
    let again = raw
        .replay_jobs(pb::ReplayJobsRequest {
            request_id: "replay-team-a".into(),
            ..filter.clone()
        })
        .await
        .expect("repeat")
        .into_inner();
    assert!(again.repeated);
    assert_eq!(again.count, 500);
    let replays: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_events WHERE data->>'reason' = 'replayed (request replay-team-a)'",
    )
    .fetch_one(&pool)
    .await
    .expect("replay events");
    assert_eq!(replays, 500, "each job replayed once, not twice");

    // The replay is in each job's events, with its request id.
    let id = &replayed.sample_ids[0];
    let events = support::collect_job_events(&server.url(), id, 0).await;
    assert!(events.iter().any(|e| matches!(
        &e.event,
        Some(pb::job_event::Event::StateChanged(s))
            if s.state == pb::JobState::Available as i32 && s.reason.contains("replay-team-a")
    )));

    // A limit below the match count: that many, oldest first, and more said to remain.
    let limited = raw
        .replay_jobs(pb::ReplayJobsRequest {
            job_type: Fetch::JOB_TYPE.into(),
            limit: 30,
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("limited")
        .into_inner();
    assert_eq!((limited.count, limited.truncated), (30, true));

    for (request, field) in [
        (
            pb::ReplayJobsRequest {
                states: vec![pb::JobState::Succeeded as i32],
                dry_run: true,
                ..Default::default()
            },
            "states[0]",
        ),
        (pb::ReplayJobsRequest::default(), "request_id"),
        (
            pb::ReplayJobsRequest {
                limit: 10_001,
                dry_run: true,
                ..Default::default()
            },
            "limit",
        ),
        (
            pb::ReplayJobsRequest {
                request_id: "x".into(),
                payload_patch: Some(prost_types::Struct::default()),
                ..Default::default()
            },
            "job_type",
        ),
    ] {
        support::assert_status(raw.replay_jobs(request).await, Code::InvalidArgument, field);
    }
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn a_payload_change_is_checked_against_the_schema_and_applied_to_every_replayed_job() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let pool = db.pool().await;
    let worker = Worker::builder(server.url())
        .worker_id("updater")
        .register::<ApplyUpdate, _, _>(|_ctx: JobContext, job: ApplyUpdate| async move {
            if job.package == "kernel-6.1.0-broken" {
                Err(HandlerError::fatal("no such version"))
            } else {
                Ok(())
            }
        })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });
    let client = jobwire::Client::connect(server.url())
        .await
        .expect("client");
    // The type's schema is registered once the worker has connected.
    let mut types = pb::job_type_service_client::JobTypeServiceClient::new(
        support::channel(&server.url()).await,
    );
    tokio::time::timeout(WAIT, async {
        while types
            .get_job_type(pb::GetJobTypeRequest {
                name: ApplyUpdate::JOB_TYPE.into(),
                ..Default::default()
            })
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("registered");
    let mut handles = Vec::new();
    for _ in 0..3 {
        let handle = client
            .enqueue(ApplyUpdate {
                package: "kernel-6.1.0-broken".into(),
                risk_level: "low".into(),
            })
            .await
            .expect("enqueue");
        handles.push(handle);
    }
    until_count(&pool, ApplyUpdate::JOB_TYPE, "failed", 3).await;
    let mut raw = jobs(&server.url()).await;
    let patch = |field: &str, value: &str| prost_types::Struct {
        fields: [(
            field.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
            },
        )]
        .into(),
    };

    // A change the schema refuses replays nothing.
    let refused = raw
        .replay_jobs(pb::ReplayJobsRequest {
            job_type: ApplyUpdate::JOB_TYPE.into(),
            request_id: "bad-patch".into(),
            payload_patch: Some(patch("no_such_field", "x")),
            ..Default::default()
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "payload_patch");
    assert_eq!(count(&pool, ApplyUpdate::JOB_TYPE, "failed").await, 3);

    let replayed = raw
        .replay_jobs(pb::ReplayJobsRequest {
            job_type: ApplyUpdate::JOB_TYPE.into(),
            request_id: "fix-version".into(),
            payload_patch: Some(patch("package", "kernel-6.1.1")),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replayed.count, 3);
    until_count(&pool, ApplyUpdate::JOB_TYPE, "succeeded", 3).await;
    let job = support::get(&mut raw, handles[0].id().as_str()).await;
    let payload = job.payload_json.expect("JSON payload");
    assert_eq!(
        payload.fields.get("package").and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        }),
        Some("kernel-6.1.1")
    );
    assert_eq!(
        payload.fields.get("riskLevel").and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        }),
        Some("low"),
        "fields the patch leaves out are kept"
    );
    stop.cancel();
    task.await.expect("worker");
}
