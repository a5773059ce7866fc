//! Approval rules, the approval timeout, and retry rules by failure kind, declared on a job
//! type in its `(jobwire.v1.job)` option (tests/proto: `update.apply.package`) and registered
//! by the worker that serves it.

mod support;

use std::time::Duration;

use jobwire::{Client, HandlerError, JobContext, JobState, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, TestDb, codegen::ApplyUpdate, test_db};
use support::WAIT;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Makes a key of the default tenant with `jobwire-server keys create`; returns its secret.
async fn key(db: &TestDb, name: &str, roles: &[&str]) -> String {
    ServerProcess::api_key_with(db, "default", roles, &["--name", name]).await
}

/// Serves `update.apply.package`: a package named `fail-4xx` fails with a client error, one
/// named `flaky-5xx` with a server error on its first two attempts; the rest succeed.
fn start_worker(url: &str, key: &str) -> (CancellationToken, JoinHandle<()>) {
    let worker = Worker::builder(url)
        .worker_id("updater")
        .api_key(key)
        .register::<ApplyUpdate, _, _>(|ctx: JobContext, job: ApplyUpdate| async move {
            match job.package.as_str() {
                "fail-4xx" => {
                    Err(HandlerError::retryable("404 Not Found: no such package")
                        .with_kind("http_4xx"))
                }
                "flaky-5xx" if ctx.attempt() < 3 => {
                    Err(HandlerError::retryable("503 Service Unavailable").with_kind("http_5xx"))
                }
                _ => Ok(()),
            }
        })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });
    (stop, task)
}

async fn state_becomes(client: &Client, id: &str, want: JobState) -> jobwire::JobInfo {
    tokio::time::timeout(WAIT, async {
        loop {
            let info = client.get_job(id).await.expect("get job");
            if info.state() == want {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {id} never became {want:?}"))
}

async fn registered(client: &Client, url: &str, key: &str) {
    let mut types =
        pb::job_type_service_client::JobTypeServiceClient::new(support::channel(url).await);
    tokio::time::timeout(WAIT, async {
        loop {
            let mut request = tonic::Request::new(pb::GetJobTypeRequest {
                name: "update.apply.package".into(),
                ..Default::default()
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().expect("header"),
            );
            if let Ok(t) = types.get_job_type(request).await {
                let defaults = t
                    .into_inner()
                    .job_type
                    .and_then(|t| t.defaults)
                    .expect("defaults");
                assert_eq!(defaults.approval_when.len(), 1);
                assert_eq!(defaults.approval_when[0].field, "risk_level");
                assert_eq!(defaults.approval_when[0].equals, vec!["high", "critical"]);
                assert_eq!(defaults.approval_timeout.map(|d| d.seconds), Some(3600));
                let kinds: Vec<_> = defaults
                    .retry_policy
                    .expect("policy")
                    .by_kind
                    .into_iter()
                    .map(|r| (r.kind, r.never))
                    .collect();
                assert_eq!(
                    kinds,
                    vec![
                        ("http_4xx".to_owned(), true),
                        ("http_5xx".to_owned(), false)
                    ]
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker registers the type");
    let _ = client;
}

#[tokio::test]
async fn approval_is_needed_only_when_the_risk_is_high_and_the_approver_is_in_the_events() {
    let db = test_db().await;
    let admin = key(&db, "ops-admin", &["admin"]).await;
    let approver = key(&db, "alice", &["approver"]).await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::builder(server.url())
        .api_key(&admin)
        .connect()
        .await
        .expect("client");
    let (stop, task) = start_worker(&server.url(), &admin);
    registered(&client, &server.url(), &admin).await;

    let low = client
        .enqueue(ApplyUpdate {
            package: "curl".into(),
            risk_level: "low".into(),
        })
        .await
        .expect("low");
    let high = client
        .enqueue(ApplyUpdate {
            package: "kernel".into(),
            risk_level: "high".into(),
        })
        .await
        .expect("high");
    let unset = client
        .enqueue(ApplyUpdate {
            package: "vim".into(),
            risk_level: String::new(),
        })
        .await
        .expect("unset");
    low.wait()
        .await
        .expect("a low-risk update runs without approval");
    unset
        .wait()
        .await
        .expect("so does one without a risk level");
    let waiting = client.get_job(high.id().as_str()).await.expect("get");
    assert_eq!(waiting.state(), JobState::AwaitingApproval);
    let mut raw = support::jobs(&server.url()).await;
    let mut get = tonic::Request::new(pb::GetJobRequest {
        id: high.id().as_str().into(),
        view: pb::JobView::Basic.into(),
    });
    get.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin}").parse().expect("header"),
    );
    let job = raw
        .get_job(get)
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("job");
    let deadline = job
        .approval_deadline
        .expect("an approval deadline from the type");
    let created = job.created_at.expect("created");
    assert!((3590..=3610).contains(&(deadline.seconds - created.seconds)));
    assert_eq!(
        job.on_approval_timeout,
        pb::ApprovalTimeoutAction::Reject as i32
    );

    let as_approver = Client::builder(server.url())
        .api_key(&approver)
        .connect()
        .await
        .expect("approver client");
    as_approver
        .approve_job(high.id().as_str(), "change ticket 42")
        .await
        .expect("approve");
    high.wait().await.expect("the approved update runs");

    let mut watch = tonic::Request::new(pb::WatchJobRequest {
        include_children: Default::default(),
        id: high.id().as_str().into(),
        after_sequence: 0,
    });
    watch.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin}").parse().expect("header"),
    );
    let mut stream = raw.watch_job(watch).await.expect("watch").into_inner();
    let mut approved = None;
    while let Some(event) = support::next_event(&mut stream).await {
        let event = event.event.expect("event");
        if let Some(pb::job_event::Event::StateChanged(change)) = &event.event
            && change.state == pb::JobState::Available as i32
        {
            approved = Some(change.clone());
        }
        if support::is_terminal(&event) {
            break;
        }
    }
    let approved = approved.expect("the approval's state change");
    assert!(approved.reason.contains("change ticket 42"), "{approved:?}");
    let actor = approved.actor.expect("the approver");
    assert_eq!(actor.key_name, "alice");
    assert!(!actor.key_id.is_empty());
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn the_approval_timeout_rejects_or_fails_the_job_as_it_was_told() {
    let db = test_db().await;
    let admin = key(&db, "ops-admin", &["admin"]).await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::builder(server.url())
        .api_key(&admin)
        .connect()
        .await
        .expect("client");
    let (stop, task) = start_worker(&server.url(), &admin);
    registered(&client, &server.url(), &admin).await;
    let mut raw = support::jobs(&server.url()).await;
    let enqueue = |action: pb::ApprovalTimeoutAction| {
        let mut raw = raw.clone();
        let admin = admin.clone();
        async move {
            let mut request = tonic::Request::new(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(pb::JobSpec {
                    job_type: "update.apply.package".into(),
                    payload_json: Some(jobwire_tests_struct(&[
                        ("package", "kernel"),
                        ("riskLevel", "critical"),
                    ])),
                    approval_timeout: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    on_approval_timeout: action.into(),
                    ..Default::default()
                }),
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {admin}").parse().expect("header"),
            );
            raw.enqueue_job(request)
                .await
                .expect("enqueue")
                .into_inner()
                .job
                .expect("job")
        }
    };
    let rejected = enqueue(pb::ApprovalTimeoutAction::Unspecified).await;
    let failed = enqueue(pb::ApprovalTimeoutAction::Fail).await;
    assert_eq!(rejected.state, pb::JobState::AwaitingApproval as i32);
    assert_eq!(failed.state, pb::JobState::AwaitingApproval as i32);

    let info = state_becomes(&client, &rejected.id, JobState::Cancelled).await;
    assert!(
        info.cancel_reason()
            .is_some_and(|r| r.starts_with("approval timed out")),
        "{:?}",
        info.cancel_reason()
    );
    state_becomes(&client, &failed.id, JobState::Failed).await;
    let mut get = tonic::Request::new(pb::GetJobRequest {
        id: failed.id.clone(),
        view: pb::JobView::Full.into(),
    });
    get.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin}").parse().expect("header"),
    );
    let job = raw
        .get_job(get)
        .await
        .expect("get")
        .into_inner()
        .job
        .expect("job");
    let error = job.last_error.expect("an error");
    assert_eq!(error.kind, "approval_timeout");
    assert!(job.attempts.is_empty(), "it never ran");
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn retry_rules_by_kind_decide_which_failures_are_retried() {
    let db = test_db().await;
    let admin = key(&db, "ops-admin", &["admin"]).await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::builder(server.url())
        .api_key(&admin)
        .connect()
        .await
        .expect("client");
    let (stop, task) = start_worker(&server.url(), &admin);
    registered(&client, &server.url(), &admin).await;

    let client_error = client
        .enqueue(ApplyUpdate {
            package: "fail-4xx".into(),
            risk_level: "low".into(),
        })
        .await
        .expect("4xx");
    let server_error = client
        .enqueue(ApplyUpdate {
            package: "flaky-5xx".into(),
            risk_level: "low".into(),
        })
        .await
        .expect("5xx");
    server_error
        .wait()
        .await
        .expect("a server error is retried until it passes");
    let info = client
        .get_job(server_error.id().as_str())
        .await
        .expect("get");
    assert_eq!(info.attempt(), 3);

    let failed = state_becomes(&client, client_error.id().as_str(), JobState::Failed).await;
    assert_eq!(failed.attempt(), 1, "a client error is never retried");
    assert_eq!(failed.max_attempts(), Some(5), "though attempts remained");
    let error = failed.last_error().expect("error");
    assert_eq!(error.kind(), Some("http_4xx"));
    assert!(!error.is_retryable(), "the rule made it final");
    stop.cancel();
    task.await.expect("worker");
}

/// A JSON object of string fields, as payload_json takes it.
fn jobwire_tests_struct(fields: &[(&str, &str)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect(),
    }
}
