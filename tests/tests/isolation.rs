//! Invariant 8: one caller's bad input never fails another caller's request.
//!
//! Enqueues are group-committed per tenant and the completer writes every tenant's reports in
//! shared statements, so a string PostgreSQL cannot store (U+0000 is valid UTF-8 and valid
//! protobuf, but neither `text` nor `jsonb` takes it) must be refused before it joins a batch,
//! and a batch that fails anyway must not take its neighbours down with it.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use jobwire_proto::v1::{self as pb, connect_request::Message as In};
use jobwire_tests::{ServerProcess, test_db};
use support::{RawWorker, assert_status, channel, spec};
use tonic::{Code, Request, transport::Channel};

const NUL: &str = "bad\u{0}value";
const VALID_CALLERS: usize = 8;
const CALLS_EACH: usize = 30;
const JOB_TYPE: &str = "iso.work";

fn tenant_request<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("jobwire-tenant", tenant.parse().expect("ascii tenant"));
    request
}

/// A job spec whose one string field `poisoned` (of a rotating set) holds a NUL.
fn poisoned_spec(n: usize) -> (pb::JobSpec, &'static str) {
    let mut job = spec(JOB_TYPE, "shared");
    let field = match n % 4 {
        0 => {
            job.idempotency_key = format!("{NUL}{n}");
            "idempotency_key"
        }
        1 => {
            job.labels = HashMap::from([("team".to_owned(), NUL.to_owned())]);
            "labels"
        }
        2 => {
            job.labels = HashMap::from([(NUL.to_owned(), "x".to_owned())]);
            "labels"
        }
        _ => {
            job.payload = Some(prost_types::Any {
                type_url: format!("type.googleapis.com/{NUL}"),
                value: vec![1],
            });
            "payload.type_url"
        }
    };
    (job, field)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_byte_in_an_enqueue_fails_only_its_own_caller() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let channel = channel(&server.url()).await;
    let stop = Arc::new(AtomicBool::new(false));

    let poison = {
        let (channel, stop) = (channel.clone(), stop.clone());
        tokio::spawn(async move {
            let mut client = pb::job_service_client::JobServiceClient::new(channel);
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) || answers.len() < CALLS_EACH {
                let (job, field) = poisoned_spec(answers.len());
                let result = client
                    .enqueue_job(tenant_request(
                        "shared",
                        pb::EnqueueJobRequest {
                            parent: Default::default(),
                            job: Some(job),
                        },
                    ))
                    .await;
                answers.push((result, field));
            }
            answers
        })
    };
    let mut valid = Vec::new();
    for caller in 0..VALID_CALLERS {
        let channel = channel.clone();
        valid.push(tokio::spawn(async move {
            let mut client = pb::job_service_client::JobServiceClient::new(channel);
            let mut failures = Vec::new();
            for call in 0..CALLS_EACH {
                let mut job = spec(JOB_TYPE, "shared");
                job.idempotency_key = format!("caller-{caller}-{call}");
                job.labels = HashMap::from([("caller".to_owned(), caller.to_string())]);
                if let Err(status) = client
                    .enqueue_job(tenant_request(
                        "shared",
                        pb::EnqueueJobRequest {
                            parent: Default::default(),
                            job: Some(job),
                        },
                    ))
                    .await
                {
                    failures.push(status);
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for task in valid {
        failures.extend(task.await.expect("valid caller"));
    }
    stop.store(true, Ordering::Relaxed);
    let poisoned = poison.await.expect("poisoning caller");
    assert!(
        failures.is_empty(),
        "{} of {} valid enqueues failed beside {} poisoned ones, such as {:?}",
        failures.len(),
        VALID_CALLERS * CALLS_EACH,
        poisoned.len(),
        failures.first()
    );
    for (result, field) in poisoned {
        assert_status(result, Code::InvalidArgument, field);
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db.pool().await)
        .await
        .expect("count");
    assert_eq!(stored, (VALID_CALLERS * CALLS_EACH) as i64);
}

/// One report a worker sends about a lease, with a NUL in the field it names when poisoned.
fn report(lease: &pb::Lease, request_id: u64, n: usize, poisoned: bool) -> (In, &'static str) {
    let text = |valid: &str| {
        if poisoned {
            NUL.to_owned()
        } else {
            valid.to_owned()
        }
    };
    let lease_ref = Some(pb::LeaseRef {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
    });
    match n % 5 {
        0 => (
            In::Progress(pb::ReportProgress {
                request_id,
                lease: lease_ref,
                progress: Some(pb::Progress {
                    message: text("halfway"),
                    fraction: Some(0.5),
                    ..Default::default()
                }),
            }),
            "progress.progress.message",
        ),
        1 => (
            In::Progress(pb::ReportProgress {
                request_id,
                lease: lease_ref,
                progress: Some(pb::Progress {
                    stage: "fetch".into(),
                    data: Some(prost_types::Struct {
                        fields: [(
                            "note".to_owned(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(text("ok"))),
                            },
                        )]
                        .into(),
                    }),
                    ..Default::default()
                }),
            }),
            "progress.progress.data",
        ),
        2 => (
            In::Logs(pb::ReportLogs {
                request_id,
                lease: lease_ref,
                lines: vec![pb::LogLine {
                    level: pb::LogLevel::Info.into(),
                    message: text("a line"),
                    time: None,
                }],
            }),
            "logs.lines[0].message",
        ),
        3 => (
            In::Fail(pb::FailJob {
                request_id,
                lease: lease_ref,
                message: text("it broke"),
                kind: "test".into(),
                non_retryable: true,
                retry_after: None,
                timed_out: false,
            }),
            "fail.message",
        ),
        _ => (
            In::Complete(pb::CompleteJob {
                wait_signal: Default::default(),
                wait_for_children: Default::default(),
                request_id,
                lease: lease_ref,
                result: Some(prost_types::Any {
                    type_url: text("type.googleapis.com/test.Result"),
                    value: b"done".to_vec(),
                }),
            }),
            "complete.result.type_url",
        ),
    }
}

async fn enqueue_for(channel: &Channel, tenant: &str, jobs: usize) {
    let mut client = pb::job_service_client::JobServiceClient::new(channel.clone());
    client
        .enqueue_jobs(tenant_request(
            tenant,
            pb::EnqueueJobsRequest {
                parent: Default::default(),
                jobs: (0..jobs).map(|_| spec(JOB_TYPE, "default")).collect(),
            },
        ))
        .await
        .expect("enqueue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_byte_in_a_worker_report_fails_only_its_own_report() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let channel = channel(&url).await;
    let stop = Arc::new(AtomicBool::new(false));

    // The poisoning worker holds one lease and reports on it with a NUL in every report.
    enqueue_for(&channel, "poison", 1).await;
    let poison = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worker = RawWorker::try_connect_as(&url, "poison", poison_hello())
                .await
                .expect("poison worker");
            let lease = worker.next_lease().await;
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) || answers.len() < CALLS_EACH {
                let request_id = worker.request_id();
                let (message, field) = report(&lease, request_id, answers.len(), true);
                answers.push((worker.request(request_id, message).await, field));
            }
            answers
        })
    };
    let mut valid = Vec::new();
    for caller in 0..VALID_CALLERS {
        let tenant = format!("tenant-{caller}");
        enqueue_for(&channel, &tenant, CALLS_EACH / 5).await;
        let url = url.clone();
        valid.push(tokio::spawn(async move {
            let hello = support::hello(&format!("worker-{caller}"), &[JOB_TYPE], 1, vec![]);
            let mut worker = RawWorker::try_connect_as(&url, &tenant, hello)
                .await
                .expect("worker");
            let mut refused = Vec::new();
            let mut n = 0;
            for _ in 0..CALLS_EACH / 5 {
                let lease = worker.next_lease().await;
                // Progress, progress data, a log line, then a failure or a completion.
                for step in [0, 1, 2, 3 + caller % 2] {
                    let request_id = worker.request_id();
                    let (message, what) = report(&lease, request_id, step, false);
                    let ack = worker.request(request_id, message).await;
                    if ack.code != Code::Ok as i32 {
                        refused.push((what, ack));
                    }
                    n += 1;
                }
            }
            (n, refused)
        }));
    }
    let (mut reports, mut refused) = (0, Vec::new());
    for task in valid {
        let (n, r) = task.await.expect("valid worker");
        reports += n;
        refused.extend(r);
    }
    stop.store(true, Ordering::Relaxed);
    let poisoned = poison.await.expect("poisoning worker");
    assert!(
        refused.is_empty(),
        "{} of {reports} valid reports were refused beside {} poisoned ones: {:?}",
        refused.len(),
        poisoned.len(),
        &refused[..refused.len().min(5)]
    );
    for (ack, field) in poisoned {
        assert_eq!(ack.code, Code::InvalidArgument as i32, "{field}: {ack:?}");
        assert!(ack.message.contains(field), "{field}: {ack:?}");
    }
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE tenant_id <> 'poison' \
         AND state NOT IN ('succeeded', 'failed')",
    )
    .fetch_one(&db.pool().await)
    .await
    .expect("count");
    assert_eq!(unfinished, 0, "every valid job ended as its worker said");
}

fn poison_hello() -> pb::Hello {
    support::hello("poisoner", &[JOB_TYPE], 1, vec![])
}
