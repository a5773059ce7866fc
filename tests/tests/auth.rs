//! API keys on the real server: the key decides the tenant, each role may call what the table in
//! docs/architecture.md says (every RPC of the service descriptors, so a new one cannot slip
//! by), revoked and expired keys are refused, and a server without keys runs open only on a
//! loopback address.

mod support;

use std::time::Duration;

use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, TestDb, eventually, raw::RawClient, test_db};
use prost::Message;
use support::channel;
use tonic::Code;

/// Makes a key with `jobwire-server keys create`, as an operator would; returns its secret.
async fn key(db: &TestDb, tenant: &str, roles: &[&str], ttl: Option<&str>) -> String {
    key_with(db, tenant, roles, ttl, &[]).await
}

/// As [`key`], with more flags of `keys create`.
async fn key_with(
    db: &TestDb,
    tenant: &str,
    roles: &[&str],
    ttl: Option<&str>,
    more: &[&str],
) -> String {
    let mut flags = ttl.map_or_else(Vec::new, |ttl| vec!["--ttl", ttl]);
    flags.extend_from_slice(more);
    let secret = ServerProcess::api_key_with(db, tenant, roles, &flags).await;
    assert!(secret.starts_with("jw_"), "{secret:?}");
    secret
}

fn bearer(secret: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {secret}"))]
}

/// Who may call what: the table of docs/architecture.md, written out again here so that the
/// server's own table is checked against it, not against itself. A worker key enqueues only
/// children of a job it runs: an enqueue without a parent, as here, is refused to it
/// (`tests/fanout.rs` shows the rest).
fn allowed(method: &str, role: &str) -> bool {
    let readers = ["admin", "producer", "viewer"];
    let allow: &[&str] = match method {
        "JobService/EnqueueJob"
        | "JobService/EnqueueJobs"
        | "JobService/CancelJob"
        | "JobService/RetryJob"
        | "JobService/PauseJob"
        | "JobService/ResumeJob"
        | "JobService/ReplayJobs" => &["admin", "producer"],
        "JobService/GetJob" | "JobService/ListJobs" => {
            &["admin", "producer", "viewer", "approver", "worker"]
        }
        "JobService/WatchJob" | "JobService/WatchJobs" => {
            &["admin", "producer", "viewer", "approver"]
        }
        "JobService/ApproveJob" | "JobService/RejectJob" => &["admin", "approver"],
        "JobService/SignalJob" => &["admin", "producer", "approver"],
        "JobTypeService/GetJobType" | "JobTypeService/ListJobTypes" => {
            &["admin", "producer", "viewer", "worker", "approver"]
        }
        "QueueService/ListQueues"
        | "QueueService/GetQueue"
        | "ScheduleService/GetSchedule"
        | "ScheduleService/ListSchedules"
        | "WorkerService/ListWorkers" => &readers,
        "WorkerService/Connect" => &["admin", "worker"],
        _ => &["admin"],
    };
    allow.contains(&role)
}

#[tokio::test]
async fn each_role_calls_what_the_table_allows_and_nothing_else() {
    const ROLES: [&str; 5] = ["admin", "producer", "worker", "viewer", "approver"];
    let db = test_db().await;
    let mut keys = Vec::new();
    for role in ROLES {
        keys.push((role, key(&db, "acme", &[role], None).await));
    }
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let pool = prost_reflect::DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptors");
    let mut calls = 0;
    for service in pool.services() {
        for method in service.methods() {
            let name = format!("{}/{}", service.name(), method.name());
            let path = format!("/{}/{}", service.full_name(), method.name());
            for (role, secret) in &keys {
                let metadata = bearer(secret);
                // An allowed call may wait (a watch with nothing to say, a stream awaiting its
                // hello): the refusal comes before any of that, at once.
                let call = async {
                    match (method.is_client_streaming(), method.is_server_streaming()) {
                        (false, false) => raw.unary(&path, Vec::new(), &metadata).await.map(|_| ()),
                        (false, true) => raw
                            .server_streaming(&path, Vec::new(), &metadata, 1)
                            .await
                            .map(|_| ()),
                        _ => raw
                            .streaming(&path, Vec::new(), &metadata, Duration::from_millis(200))
                            .await
                            .map(|_| ()),
                    }
                };
                let outcome = tokio::time::timeout(Duration::from_secs(2), call).await;
                let code = match outcome {
                    Err(_) => None,
                    Ok(Ok(())) => Some(Code::Ok),
                    Ok(Err(status)) => Some(status.code()),
                };
                if allowed(&name, role) {
                    assert!(
                        !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated)),
                        "{role} must be allowed {name}, got {code:?}"
                    );
                } else {
                    assert_eq!(
                        code,
                        Some(Code::PermissionDenied),
                        "{role} must be refused {name}"
                    );
                }
                calls += 1;
            }
        }
    }
    assert!(calls >= 5 * 32, "{calls} calls");

    // Without a key: refused, saying what is missing; health stays public.
    let status = raw
        .unary("/jobwire.v1.JobService/ListJobs", Vec::new(), &[])
        .await
        .expect_err("a call without a key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization: Bearer"),
        "{status:?}"
    );
    let health = pb_health_check(&mut raw).await;
    assert!(health.is_ok(), "{health:?}");
}

async fn pb_health_check(raw: &mut RawClient) -> Result<Vec<u8>, tonic::Status> {
    raw.unary("/grpc.health.v1.Health/Check", Vec::new(), &[])
        .await
}

#[tokio::test]
async fn the_key_decides_the_tenant_whatever_the_header_says() {
    let db = test_db().await;
    let acme = key(&db, "acme", &["producer"], None).await;
    let globex = key(&db, "globex", &["producer", "viewer"], None).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);

    let spec = pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(pb::JobSpec {
            job_type: "auth.job".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/test.Payload".into(),
                value: b"secret of acme".to_vec(),
            }),
            ..Default::default()
        }),
    };
    let enqueued = raw
        .unary(
            "/jobwire.v1.JobService/EnqueueJob",
            spec.encode_to_vec(),
            &bearer(&acme),
        )
        .await
        .expect("acme enqueues");
    let job = pb::EnqueueJobResponse::decode(enqueued.as_slice())
        .expect("response")
        .job
        .expect("job");

    // globex, even naming acme in the tenant header, neither sees nor cancels acme's job.
    let mut as_acme = bearer(&globex);
    as_acme.push(("jobwire-tenant", "acme".to_owned()));
    let get = pb::GetJobRequest {
        id: job.id.clone(),
        ..Default::default()
    };
    let status = raw
        .unary(
            "/jobwire.v1.JobService/GetJob",
            get.encode_to_vec(),
            &as_acme,
        )
        .await
        .expect_err("another tenant's job");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let cancel = pb::CancelJobRequest {
        id: job.id.clone(),
        reason: String::new(),
    };
    let status = raw
        .unary(
            "/jobwire.v1.JobService/CancelJob",
            cancel.encode_to_vec(),
            &as_acme,
        )
        .await
        .expect_err("another tenant's job");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let listed = raw
        .unary(
            "/jobwire.v1.JobService/ListJobs",
            pb::ListJobsRequest::default().encode_to_vec(),
            &as_acme,
        )
        .await
        .expect("globex lists");
    let listed = pb::ListJobsResponse::decode(listed.as_slice()).expect("response");
    assert!(listed.jobs.is_empty(), "{:?}", listed.jobs);

    // acme reads its own job, its payload whole.
    let got = raw
        .unary(
            "/jobwire.v1.JobService/GetJob",
            get.encode_to_vec(),
            &bearer(&acme),
        )
        .await
        .expect("acme reads its job");
    let got = pb::GetJobResponse::decode(got.as_slice())
        .expect("response")
        .job
        .expect("job");
    assert_eq!(
        got.payload.expect("payload").value,
        b"secret of acme".to_vec()
    );
}

#[tokio::test]
async fn a_worker_key_of_another_tenant_never_receives_a_lease() {
    let db = test_db().await;
    let acme = key(&db, "acme", &["producer"], None).await;
    let globex_worker = key(&db, "globex", &["worker"], None).await;
    let acme_worker = key(&db, "acme", &["worker"], None).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let spec = pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(pb::JobSpec {
            job_type: "auth.work".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/test.Payload".into(),
                value: b"x".to_vec(),
            }),
            ..Default::default()
        }),
    };
    raw.unary(
        "/jobwire.v1.JobService/EnqueueJob",
        spec.encode_to_vec(),
        &bearer(&acme),
    )
    .await
    .expect("enqueued");
    let hello = |worker: &str| {
        pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Hello(pb::Hello {
                worker_id: worker.into(),
                job_types: vec!["auth.work".into()],
                slots: 1,
                ..Default::default()
            })),
        }
        .encode_to_vec()
    };
    let leases = |bodies: Vec<Vec<u8>>| -> usize {
        bodies
            .iter()
            .filter_map(|b| pb::ConnectResponse::decode(b.as_slice()).ok())
            .filter(|m| matches!(m.message, Some(pb::connect_response::Message::Lease(_))))
            .count()
    };
    // A globex worker, even naming acme in the header, waits and gets nothing.
    let mut metadata = bearer(&globex_worker);
    metadata.push(("jobwire-tenant", "acme".to_owned()));
    let heard = raw
        .streaming(
            "/jobwire.v1.WorkerService/Connect",
            vec![hello("globex-1")],
            &metadata,
            Duration::from_secs(2),
        )
        .await;
    let heard = match heard {
        Ok(bodies) => bodies,
        // The stream ends when the test's side closes; what came before is what counts.
        Err(status) => panic!("{status:?}"),
    };
    assert_eq!(leases(heard), 0, "a globex worker got an acme lease");
    // acme's worker gets it.
    let heard = raw
        .streaming(
            "/jobwire.v1.WorkerService/Connect",
            vec![hello("acme-1")],
            &bearer(&acme_worker),
            Duration::from_secs(2),
        )
        .await
        .expect("acme's worker");
    assert_eq!(leases(heard), 1);
}

#[tokio::test]
async fn revoked_and_expired_keys_are_refused() {
    let db = test_db().await;
    let admin = key(&db, "acme", &["admin"], None).await;
    let short = key(&db, "acme", &["viewer"], Some("1s")).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let list_jobs = |secret: String| {
        let url = server.url();
        async move {
            let mut raw = RawClient::new(channel(&url).await);
            raw.unary(
                "/jobwire.v1.JobService/ListJobs",
                Vec::new(),
                &bearer(&secret),
            )
            .await
        }
    };

    // An admin makes a key through the API, and it works.
    let created = raw
        .unary(
            "/jobwire.v1.ApiKeyService/CreateApiKey",
            pb::CreateApiKeyRequest {
                name: "dashboard".into(),
                roles: vec![pb::Role::Viewer as i32],
                ..Default::default()
            }
            .encode_to_vec(),
            &bearer(&admin),
        )
        .await
        .expect("created");
    let created = pb::CreateApiKeyResponse::decode(created.as_slice()).expect("response");
    let viewer = created.secret.clone();
    list_jobs(viewer.clone()).await.expect("a fresh key works");
    let listed = raw
        .unary(
            "/jobwire.v1.ApiKeyService/ListApiKeys",
            Vec::new(),
            &bearer(&admin),
        )
        .await
        .expect("listed");
    let listed = pb::ListApiKeysResponse::decode(listed.as_slice()).expect("response");
    assert_eq!(listed.api_keys.len(), 3);
    assert!(
        !String::from_utf8_lossy(&listed.encode_to_vec()).contains(&viewer[viewer.len() - 20..]),
        "no secret is ever listed"
    );

    // Revoked: refused at once on this replica.
    let id = created.api_key.expect("key").id;
    raw.unary(
        "/jobwire.v1.ApiKeyService/RevokeApiKey",
        pb::RevokeApiKeyRequest { id }.encode_to_vec(),
        &bearer(&admin),
    )
    .await
    .expect("revoked");
    let status = list_jobs(viewer).await.expect_err("a revoked key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{status:?}");

    // Expired: refused once its time has passed.
    let status = eventually("the short key expires", Duration::from_secs(10), || {
        let short = short.clone();
        let list_jobs = &list_jobs;
        async move { list_jobs(short).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{status:?}");

    // A made-up key, and a key with its secret changed, are refused alike.
    let mut forged = admin.clone();
    forged.pop();
    forged.push(if admin.ends_with('A') { 'B' } else { 'A' });
    let status = list_jobs(forged).await.expect_err("a forged key");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn without_keys_a_public_address_needs_insecure_no_auth() {
    let db = test_db().await;
    let (status, stderr) =
        ServerProcess::run_refused(&["--database-url", db.url(), "--listen", "0.0.0.0:0"]).await;
    assert!(!status.success());
    assert!(stderr.contains("keys create"), "{stderr}");
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");

    // On loopback, without keys, it serves open: the tenant header still names the tenant.
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    raw.unary(
        "/jobwire.v1.JobService/ListJobs",
        Vec::new(),
        &[("jobwire-tenant", "acme".to_owned())],
    )
    .await
    .expect("open on loopback");

    // The first key, made beside the running server, closes it within seconds: no restart.
    let admin = key(&db, "acme", &["admin"], None).await;
    let refused = eventually("keys required", Duration::from_secs(15), || {
        let mut raw = raw.clone();
        async move {
            raw.unary(
                "/jobwire.v1.JobService/ListJobs",
                Vec::new(),
                &[("jobwire-tenant", "acme".to_owned())],
            )
            .await
            .err()
        }
    })
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    raw.unary(
        "/jobwire.v1.JobService/ListJobs",
        Vec::new(),
        &bearer(&admin),
    )
    .await
    .expect("with the key");
}

#[tokio::test]
async fn a_key_over_its_rate_is_told_when_to_retry_while_another_proceeds() {
    use tonic_types::StatusExt;
    let db = test_db().await;
    let limited = key_with(
        &db,
        "acme",
        &["viewer"],
        None,
        &["--rate", "0.5", "--burst", "3"],
    )
    .await;
    let other = key(&db, "acme", &["viewer"], None).await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let list = |secret: &str| {
        let metadata = bearer(secret);
        let url = url.clone();
        async move {
            let mut raw = RawClient::new(channel(&url).await);
            raw.unary("/jobwire.v1.JobService/ListJobs", Vec::new(), &metadata)
                .await
        }
    };
    for n in 0..3 {
        list(&limited)
            .await
            .unwrap_or_else(|e| panic!("call {n} within the burst: {e:?}"));
    }
    let status = list(&limited).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry delay");
    assert!(
        retry > Duration::from_millis(1500) && retry <= Duration::from_secs(2),
        "{retry:?}"
    );
    for n in 0..10 {
        list(&other)
            .await
            .unwrap_or_else(|e| panic!("the other key's call {n}: {e:?}"));
    }
}

/// A key holds at most its `max_streams` streams open on a replica; one more is refused while
/// another key opens streams freely, and a stream that ends gives its slot back.
#[tokio::test]
async fn a_key_at_its_stream_limit_is_refused_one_more_while_another_proceeds() {
    let db = test_db().await;
    let limited = key_with(&db, "acme", &["viewer"], None, &["--max-streams", "2"]).await;
    let other = key(&db, "acme", &["viewer"], None).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut jobs = support::jobs(&server.url()).await;
    let watch = |secret: &str| {
        let mut request = tonic::Request::new(pb::WatchJobsRequest::default());
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("header"),
        );
        request
    };
    let first = jobs
        .watch_jobs(watch(&limited))
        .await
        .expect("first stream");
    let second = jobs
        .watch_jobs(watch(&limited))
        .await
        .expect("second stream");
    let refused = jobs
        .watch_jobs(watch(&limited))
        .await
        .expect_err("a third stream");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("2 streams"), "{refused:?}");
    // Unary calls of the same key are not streams.
    let mut raw = RawClient::new(channel(&server.url()).await);
    raw.unary(
        "/jobwire.v1.JobService/ListJobs",
        Vec::new(),
        &bearer(&limited),
    )
    .await
    .expect("a unary call at the stream limit");
    let mut others = Vec::new();
    for n in 0..5 {
        others.push(
            jobs.watch_jobs(watch(&other))
                .await
                .unwrap_or_else(|e| panic!("the other key's stream {n}: {e:?}")),
        );
    }
    drop(first);
    let third = eventually("a slot given back", Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let request = watch(&limited);
        async move { jobs.watch_jobs(request).await.ok() }
    })
    .await;
    drop((second, third, others));
}

/// Approving, rejecting, cancelling and retrying a job name the acting key in the job's events,
/// which a watcher replaying the job's history sees.
#[tokio::test]
async fn job_events_name_the_key_that_approved_rejected_cancelled_or_retried() {
    let db = test_db().await;
    let producer = key(&db, "acme", &["producer"], None).await;
    let approver = key_with(&db, "acme", &["approver"], None, &["--name", "alice"]).await;
    let admin = key_with(&db, "acme", &["admin"], None, &["--name", "ops"]).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let mut enqueue = async || {
        let bytes = raw
            .unary(
                "/jobwire.v1.JobService/EnqueueJob",
                pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(pb::JobSpec {
                        job_type: "risky.job".into(),
                        payload: Some(prost_types::Any {
                            type_url: "type.googleapis.com/test.Payload".into(),
                            value: Vec::new(),
                        }),
                        needs_approval: true,
                        ..Default::default()
                    }),
                }
                .encode_to_vec(),
                &bearer(&producer),
            )
            .await
            .expect("enqueue");
        pb::EnqueueJobResponse::decode(bytes.as_slice())
            .expect("response")
            .job
            .expect("job")
            .id
    };
    let approved = enqueue().await;
    let rejected = enqueue().await;
    let key_ids = |secret: &str| {
        let simple = secret.split('_').nth(1).expect("id");
        uuid::Uuid::parse_str(simple).expect("uuid").to_string()
    };
    let mut raw = RawClient::new(channel(&server.url()).await);
    let mut call = async |method: &str, body: Vec<u8>, secret: &str| {
        raw.unary(
            &format!("/jobwire.v1.JobService/{method}"),
            body,
            &bearer(secret),
        )
        .await
        .unwrap_or_else(|e| panic!("{method}: {e:?}"));
    };
    call(
        "ApproveJob",
        pb::ApproveJobRequest {
            id: approved.clone(),
            reason: "looks fine".into(),
        }
        .encode_to_vec(),
        &approver,
    )
    .await;
    call(
        "RejectJob",
        pb::RejectJobRequest {
            id: rejected.clone(),
            reason: "too risky".into(),
        }
        .encode_to_vec(),
        &approver,
    )
    .await;
    call(
        "CancelJob",
        pb::CancelJobRequest {
            id: approved.clone(),
            reason: "not today".into(),
        }
        .encode_to_vec(),
        &admin,
    )
    .await;
    call(
        "RetryJob",
        pb::RetryJobRequest {
            id: rejected.clone(),
        }
        .encode_to_vec(),
        &admin,
    )
    .await;

    let mut raw = RawClient::new(channel(&server.url()).await);
    let mut actors = async |id: &str, want: usize| {
        let bodies = raw
            .server_streaming(
                "/jobwire.v1.JobService/WatchJob",
                pb::WatchJobRequest {
                    include_children: Default::default(),
                    id: id.to_owned(),
                    after_sequence: 0,
                }
                .encode_to_vec(),
                &bearer(&admin),
                want,
            )
            .await
            .expect("watch");
        bodies
            .iter()
            .map(|b| pb::WatchJobResponse::decode(b.as_slice()).expect("event"))
            .filter_map(|r| match r.event?.event? {
                pb::job_event::Event::StateChanged(s) => Some((
                    pb::JobState::try_from(s.state).expect("state"),
                    s.actor.map(|a| (a.key_id, a.key_name)),
                )),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let ops = Some((key_ids(&admin), "ops".to_owned()));
    let alice = Some((key_ids(&approver), "alice".to_owned()));
    assert_eq!(
        actors(&approved, 3).await,
        vec![
            (pb::JobState::AwaitingApproval, None),
            (pb::JobState::Available, alice.clone()),
            (pb::JobState::Cancelled, ops.clone()),
        ]
    );
    assert_eq!(
        actors(&rejected, 3).await,
        vec![
            (pb::JobState::AwaitingApproval, None),
            (pb::JobState::Cancelled, alice),
            (pb::JobState::Available, ops),
        ]
    );
}

/// The names tenant A's resources go by, which tenant B's calls aim at.
struct Targets {
    job_id: String,
    key_id: String,
}

/// A request for `method` aimed at tenant A's resources: every `id`, `name`, `job_type` and
/// `queue` field, at any depth, names one of them (the job or key id, the queue, schedule or job
/// type of the method's service), so that a call that ignored the key's tenant would reach it.
fn aimed(
    desc: &prost_reflect::MessageDescriptor,
    service: &str,
    t: &Targets,
    depth: usize,
) -> prost_reflect::DynamicMessage {
    use prost_reflect::{DynamicMessage, Kind, Value};
    let mut m = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        let value = match (field.name(), field.kind()) {
            (_, _) if field.is_list() || field.is_map() => continue,
            ("id", Kind::String) if service == "ApiKeyService" => Value::String(t.key_id.clone()),
            ("id", Kind::String) => Value::String(t.job_id.clone()),
            ("name", Kind::String) => Value::String(
                match (service, desc.name()) {
                    (_, "Queue") | ("QueueService", _) => "qa",
                    (_, "Schedule") | ("ScheduleService", _) => "sa",
                    _ => "ta.job",
                }
                .to_owned(),
            ),
            ("job_type", Kind::String) => Value::String("ta.job".to_owned()),
            ("queue", Kind::String) => Value::String("qa".to_owned()),
            (_, Kind::Message(inner)) if depth < 2 && !inner.full_name().starts_with("google.") => {
                Value::Message(aimed(&inner, service, t, depth + 1))
            }
            _ => continue,
        };
        m.set_field(&field, value);
    }
    m
}

/// For every RPC of the service descriptors, tenant B's admin key aimed at tenant A's job, key,
/// queue, schedule and job type: no answer carries A's payload, and afterwards every one of A's
/// rows is as it was.
#[tokio::test]
async fn another_tenants_admin_reaches_nothing_of_a_tenant_through_any_rpc() {
    const SECRET: &[u8] = b"acme's secret payload";
    let db = test_db().await;
    let acme = key(&db, "acme", &["admin"], None).await;
    let globex = key(&db, "globex", &["admin"], None).await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let payload = prost_types::Any {
        type_url: "type.googleapis.com/test.Payload".into(),
        value: SECRET.to_vec(),
    };
    let enqueued = raw
        .unary(
            "/jobwire.v1.JobService/EnqueueJob",
            pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(pb::JobSpec {
                    job_type: "ta.job".into(),
                    queue: "qa".into(),
                    payload: Some(payload.clone()),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
            &bearer(&acme),
        )
        .await
        .expect("acme's job");
    let job_id = pb::EnqueueJobResponse::decode(enqueued.as_slice())
        .expect("response")
        .job
        .expect("job")
        .id;
    raw.unary(
        "/jobwire.v1.ScheduleService/CreateSchedule",
        pb::CreateScheduleRequest {
            schedule: Some(pb::Schedule {
                name: "sa".into(),
                cron: "0 3 * * *".into(),
                job: Some(pb::JobTemplate {
                    job_type: "ta.job".into(),
                    payload: Some(payload),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
        &bearer(&acme),
    )
    .await
    .expect("acme's schedule");
    let listed = raw
        .unary(
            "/jobwire.v1.ApiKeyService/ListApiKeys",
            Vec::new(),
            &bearer(&acme),
        )
        .await
        .expect("acme's keys");
    let key_id = pb::ListApiKeysResponse::decode(listed.as_slice())
        .expect("response")
        .api_keys
        .first()
        .expect("a key")
        .id
        .clone();
    let targets = Targets { job_id, key_id };

    let pool = prost_reflect::DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptors");
    let mut calls = 0;
    for service in pool.services() {
        for method in service.methods() {
            if method.is_client_streaming() {
                // WorkerService/Connect: a_worker_key_of_another_tenant_never_receives_a_lease.
                continue;
            }
            let path = format!("/{}/{}", service.full_name(), method.name());
            let body = aimed(&method.input(), service.name(), &targets, 0).encode_to_vec();
            // Naming acme in the tenant header too: a server that trusted it would act there.
            let mut metadata = bearer(&globex);
            metadata.push(("jobwire-tenant", "acme".to_owned()));
            let answer = if method.is_server_streaming() {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    raw.server_streaming(&path, body, &metadata, 100),
                )
                .await
                .map(|r| r.map(|bodies| bodies.concat()))
            } else {
                Ok(raw.unary(&path, body, &metadata).await)
            };
            if let Ok(Ok(bytes)) = answer {
                assert!(
                    !bytes.windows(SECRET.len()).any(|w| w == SECRET),
                    "{path} gave globex acme's payload"
                );
            }
            calls += 1;
        }
    }
    assert!(calls >= 31, "{calls} calls");

    // Every row of acme's is as it was.
    let pool = db.pool().await;
    let (state, cancel_reason): (String, Option<String>) =
        sqlx::query_as("SELECT state::text, cancel_reason FROM jobs WHERE id = $1::uuid")
            .bind(&targets.job_id)
            .fetch_one(&pool)
            .await
            .expect("acme's job");
    assert_eq!((state.as_str(), cancel_reason), ("available", None));
    let queue: (bool, Option<i32>) = sqlx::query_as(
        "SELECT paused_at IS NOT NULL, concurrency_limit FROM queues \
         WHERE tenant_id = 'acme' AND name = 'qa'",
    )
    .fetch_one(&pool)
    .await
    .expect("acme's queue");
    assert_eq!(queue, (false, None));
    let schedule: (bool, String) = sqlx::query_as(
        "SELECT paused, cron FROM schedules WHERE tenant_id = 'acme' AND name = 'sa'",
    )
    .fetch_one(&pool)
    .await
    .expect("acme's schedule");
    assert_eq!(schedule, (false, "0 3 * * *".to_owned()));
    let acme_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant_id = 'acme'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(acme_jobs, 1, "no job was made in acme's name");
    let types: i64 = sqlx::query_scalar("SELECT count(*) FROM job_types WHERE tenant_id = 'acme'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(types, 0, "no job type was registered in acme's name");
    let revoked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1::uuid")
            .bind(&targets.key_id)
            .fetch_one(&pool)
            .await
            .expect("acme's key");
    assert_eq!(revoked, None);
}

/// Administrative calls that succeed are in the audit log with their key, newest first; one that
/// failed is not, and no payload is written down.
#[tokio::test]
async fn the_audit_log_lists_administrative_actions_with_their_actor() {
    let db = test_db().await;
    let admin = key_with(&db, "acme", &["admin"], None, &["--name", "ops-alice"]).await;
    let producer = key_with(
        &db,
        "acme",
        &["producer"],
        None,
        &["--name", "shop-backend"],
    )
    .await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = RawClient::new(channel(&server.url()).await);
    let enqueue = pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(pb::JobSpec {
            job_type: "audit.job".into(),
            queue: "audited".into(),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/test.Payload".into(),
                value: b"payload never audited".to_vec(),
            }),
            ..Default::default()
        }),
    };
    let job = raw
        .unary(
            "/jobwire.v1.JobService/EnqueueJob",
            enqueue.encode_to_vec(),
            &bearer(&producer),
        )
        .await
        .expect("enqueued");
    let job_id = pb::EnqueueJobResponse::decode(job.as_slice())
        .expect("response")
        .job
        .expect("job")
        .id;
    let url = server.url();
    let call = |path: &'static str, body: Vec<u8>, secret: &str| {
        let metadata = bearer(secret);
        let url = url.clone();
        async move {
            let mut raw = RawClient::new(channel(&url).await);
            raw.unary(path, body, &metadata).await
        }
    };
    call(
        "/jobwire.v1.QueueService/PauseQueue",
        pb::PauseQueueRequest {
            name: "audited".into(),
            reason: "maintenance".into(),
        }
        .encode_to_vec(),
        &admin,
    )
    .await
    .expect("paused");
    call(
        "/jobwire.v1.JobService/CancelJob",
        pb::CancelJobRequest {
            id: job_id.clone(),
            reason: "customer asked".into(),
        }
        .encode_to_vec(),
        &producer,
    )
    .await
    .expect("cancelled");
    call(
        "/jobwire.v1.JobService/CancelJob",
        pb::CancelJobRequest {
            id: job_id.clone(),
            reason: "again".into(),
        }
        .encode_to_vec(),
        &producer,
    )
    .await
    .expect_err("a finished job is not cancelled twice");
    call(
        "/jobwire.v1.ApiKeyService/CreateApiKey",
        pb::CreateApiKeyRequest {
            name: "reporting".into(),
            roles: vec![pb::Role::Viewer as i32],
            ..Default::default()
        }
        .encode_to_vec(),
        &admin,
    )
    .await
    .expect("a key");

    // A request over the message budget is refused whole, before anything reads it all.
    let status = call(
        "/jobwire.v1.QueueService/PauseQueue",
        pb::PauseQueueRequest {
            name: "audited".into(),
            reason: "x".repeat(5 * 1024 * 1024),
        }
        .encode_to_vec(),
        &admin,
    )
    .await
    .expect_err("over the budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let listed = call(
        "/jobwire.v1.AuditService/ListAuditEvents",
        Vec::new(),
        &admin,
    )
    .await
    .expect("the audit log");
    let events = pb::ListAuditEventsResponse::decode(listed.as_slice())
        .expect("response")
        .events;
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.method.clone(), e.key_name.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "ApiKeyService/CreateApiKey".to_owned(),
                "ops-alice".to_owned()
            ),
            ("JobService/CancelJob".to_owned(), "shop-backend".to_owned()),
            ("QueueService/PauseQueue".to_owned(), "ops-alice".to_owned()),
        ]
    );
    let cancel = serde_json::to_string(&format!("{:?}", events[1].request)).expect("json");
    assert!(cancel.contains("customer asked"), "{cancel}");
    assert!(cancel.contains(&job_id), "{cancel}");
    let everything = format!("{events:?}");
    assert!(!everything.contains("payload never audited"));
    assert!(
        events
            .iter()
            .all(|e| !e.key_id.is_empty() && e.time.is_some())
    );

    // Only admins read it.
    let status = call(
        "/jobwire.v1.AuditService/ListAuditEvents",
        Vec::new(),
        &producer,
    )
    .await
    .expect_err("a producer");
    assert_eq!(status.code(), Code::PermissionDenied);
}
