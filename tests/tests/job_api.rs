//! JobService end to end on the real server binary and real PostgreSQL: reads, filters and page
//! tokens, cancel and retry, idempotency, bad input, and the fencing token of the worker stream.

mod support;

use jobwire_proto::v1 as pb;
use jobwire_server::{
    domain::{JobId, LeaseRef, TenantId},
    engine::ending,
    store::Store,
};
use std::time::Duration;

use jobwire_tests::{ServerProcess, eventually, test_db};
use support::{RawWorker, assert_status, enqueue, get, hello, jobs, spec};
use tonic::Code;

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).expect("known state")
}

#[tokio::test]
async fn list_filters_and_pages() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;

    let mut a_ids = Vec::new();
    for _ in 0..3 {
        a_ids.push(enqueue(&mut client, spec("type.one", "queue-a")).await.id);
    }
    for _ in 0..2 {
        enqueue(&mut client, spec("type.two", "queue-b")).await;
    }
    let lister = client.clone();
    let list = |req: pb::ListJobsRequest| {
        let mut client = lister.clone();
        async move { client.list_jobs(req).await.map(|r| r.into_inner()) }
    };

    let by_queue = list(pb::ListJobsRequest {
        queue: "queue-a".into(),
        ..Default::default()
    })
    .await
    .expect("list by queue");
    assert_eq!(by_queue.jobs.len(), 3);
    // Newest first: ids are UUID v7, so the last enqueued comes first.
    let listed: Vec<_> = by_queue.jobs.iter().map(|j| j.id.clone()).collect();
    let mut expected = a_ids.clone();
    expected.reverse();
    assert_eq!(listed, expected);

    let by_type = list(pb::ListJobsRequest {
        job_type: "type.two".into(),
        ..Default::default()
    })
    .await
    .expect("list by type");
    assert_eq!(by_type.jobs.len(), 2);
    assert!(by_type.jobs.iter().all(|j| j.job_type == "type.two"));

    let cancelled = client
        .cancel_job(pb::CancelJobRequest {
            id: a_ids[0].clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    assert_eq!(cancelled.cancel_reason, "not needed");

    let by_state = list(pb::ListJobsRequest {
        states: vec![pb::JobState::Available.into()],
        ..Default::default()
    })
    .await
    .expect("list by state");
    assert_eq!(by_state.jobs.len(), 4);
    let only_cancelled = list(pb::ListJobsRequest {
        states: vec![pb::JobState::Cancelled.into()],
        ..Default::default()
    })
    .await
    .expect("list cancelled");
    assert_eq!(only_cancelled.jobs.len(), 1);
    assert_eq!(only_cancelled.jobs[0].id, a_ids[0]);

    // Pages of 2 over 5 jobs: 2, 2, 1, each job once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(pb::ListJobsRequest {
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .expect("page");
        pages += 1;
        seen.extend(page.jobs.iter().map(|j| j.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // A token is bound to its filters.
        assert_status(
            list(pb::ListJobsRequest {
                page_size: 2,
                page_token: token.clone(),
                queue: "queue-b".into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "page_token",
        );
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);

    assert_status(
        list(pb::ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_status(
        list(pb::ListJobsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_size",
    );
}

#[tokio::test]
async fn cancel_retry_and_idempotency() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;

    // The same idempotency key returns the first job.
    let mut keyed = spec("type.keyed", "default");
    keyed.idempotency_key = "order-42".into();
    let first = client
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(keyed.clone()),
        })
        .await
        .expect("first enqueue")
        .into_inner();
    let second = client
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(keyed),
        })
        .await
        .expect("second enqueue")
        .into_inner();
    assert!(first.created);
    assert!(!second.created);
    let first_id = first.job.expect("job").id;
    assert_eq!(first_id, second.job.expect("job").id);

    // A batch answers each job in request order, with its state; a key used before answers
    // with the job that holds it.
    let keyed = |key: &str| pb::JobSpec {
        idempotency_key: key.into(),
        ..spec("type.keyed", "default")
    };
    let later = pb::JobSpec {
        schedule: Some(pb::job_spec::Schedule::Delay(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        })),
        ..spec("type.later", "default")
    };
    let batch = client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![keyed("batch-1"), keyed("order-42"), later],
        })
        .await
        .expect("keyed batch")
        .into_inner()
        .jobs;
    let answered: Vec<(bool, pb::JobState)> = batch
        .iter()
        .map(|j| (j.created, pb::JobState::try_from(j.state).expect("state")))
        .collect();
    assert_eq!(
        answered,
        [
            (true, pb::JobState::Available),
            (false, pb::JobState::Available),
            (true, pb::JobState::Scheduled),
        ]
    );
    assert_eq!(batch[1].id, first_id);
    assert_ne!(batch[0].id, first_id);
    assert_eq!(get(&mut client, &batch[2].id).await.job_type, "type.later");
    let again = client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![spec("type.plain", "default"), keyed("batch-1")],
        })
        .await
        .expect("second keyed batch")
        .into_inner()
        .jobs;
    assert!(again[0].created);
    assert!(!again[1].created);
    assert_eq!(again[1].id, batch[0].id);

    // A non-retryable failure fails at once; RetryJob gives it a fresh set of attempts.
    let job = enqueue(&mut client, spec("type.flaky", "default")).await;
    let mut worker = RawWorker::connect(&server.url(), "raw-1", &["type.flaky"], 1).await;
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, job.id);
    assert_eq!(lease.attempt, 1);
    let ack = worker.fail(&job.id, 1, "disk full", true).await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let failed = get(&mut client, &job.id).await;
    assert_eq!(state(&failed), pb::JobState::Failed);
    assert_eq!(failed.attempts.len(), 1);
    let error = failed.last_error.expect("last error");
    assert_eq!(error.message, "disk full");
    assert!(!error.retryable);

    // Cancelling a finished job is refused and changes nothing.
    assert_status(
        client
            .cancel_job(pb::CancelJobRequest {
                id: job.id.clone(),
                reason: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "JOB_STATE_FAILED",
    );

    let retried = client
        .retry_job(pb::RetryJobRequest { id: job.id.clone() })
        .await
        .expect("retry")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(state(&retried), pb::JobState::Available);
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, job.id);
    assert_eq!(lease.attempt, 2, "fencing tokens never repeat");
    let ack = worker.complete(&job.id, 2, b"done").await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let done = get(&mut client, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded);
    assert_eq!(done.result.expect("result").value, b"done");
    assert_eq!(done.attempts.len(), 2);

    // Retrying a job that succeeded is refused.
    assert_status(
        client
            .retry_job(pb::RetryJobRequest { id: job.id.clone() })
            .await,
        Code::FailedPrecondition,
        "JOB_STATE_SUCCEEDED",
    );

    // A list in the full view gives each job its own attempts; the basic view gives none.
    let list = |view: pb::JobView| {
        let mut client = client.clone();
        async move {
            client
                .list_jobs(pb::ListJobsRequest {
                    view: view as i32,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner()
                .jobs
        }
    };
    let attempts = |jobs: &[pb::Job]| {
        jobs.iter()
            .map(|j| (j.id.clone(), j.attempts.iter().map(|a| a.attempt).collect()))
            .collect::<Vec<(String, Vec<i32>)>>()
    };
    let full = list(pb::JobView::Full).await;
    assert_eq!(full.len(), 5, "{:?}", attempts(&full));
    for (id, numbers) in attempts(&full) {
        let expected = if id == job.id { vec![1, 2] } else { vec![] };
        assert_eq!(numbers, expected, "job {id}");
    }
    let basic = list(pb::JobView::Basic).await;
    assert!(basic.iter().all(|j| j.attempts.is_empty()), "{basic:?}");
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;

    let missing = "0190b2c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d";
    assert_status(
        client
            .get_job(pb::GetJobRequest {
                id: missing.into(),
                view: 0,
            })
            .await,
        Code::NotFound,
        missing,
    );
    assert_status(
        client
            .get_job(pb::GetJobRequest {
                id: "not-a-uuid".into(),
                view: 0,
            })
            .await,
        Code::InvalidArgument,
        "id",
    );
    assert_status(
        client
            .cancel_job(pb::CancelJobRequest {
                id: String::new(),
                reason: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "id",
    );

    let mut high = spec("type.a", "default");
    high.priority = Some(101);
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(high),
            })
            .await,
        Code::InvalidArgument,
        "job.priority",
    );
    let mut negative = spec("type.a", "default");
    negative.priority = Some(-1);
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(negative),
            })
            .await,
        Code::InvalidArgument,
        "job.priority",
    );
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(spec("", "default")),
            })
            .await,
        Code::InvalidArgument,
        "job.job_type",
    );
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(spec("bad type!", "default")),
            })
            .await,
        Code::InvalidArgument,
        "job.job_type",
    );
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: None,
            })
            .await,
        Code::InvalidArgument,
        "job",
    );
    let mut no_payload = spec("type.a", "default");
    no_payload.payload = None;
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(no_payload),
            })
            .await,
        Code::InvalidArgument,
        "job.payload",
    );
    let mut big = spec("type.a", "default");
    big.payload = Some(support::any_bytes("test.Big", vec![7; 1024 * 1024 + 1]));
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(big),
            })
            .await,
        Code::InvalidArgument,
        "job.payload",
    );
    let mut policy = spec("type.a", "default");
    policy.retry_policy = Some(pb::RetryPolicy {
        max_attempts: Some(0),
        ..Default::default()
    });
    assert_status(
        client
            .enqueue_job(pb::EnqueueJobRequest {
                parent: Default::default(),
                job: Some(policy),
            })
            .await,
        Code::InvalidArgument,
        "job.retry_policy.max_attempts",
    );
    let mut tenant_request = tonic::Request::new(pb::ListJobsRequest::default());
    tenant_request
        .metadata_mut()
        .insert("jobwire-tenant", "no/slashes".parse().expect("ascii"));
    assert_status(
        client.list_jobs(tenant_request).await,
        Code::InvalidArgument,
        "jobwire-tenant",
    );

    // A batch is all or nothing: one bad job, and none is stored.
    let mut bad = spec("type.a", "default");
    bad.priority = Some(500);
    assert_status(
        client
            .enqueue_jobs(pb::EnqueueJobsRequest {
                parent: Default::default(),
                jobs: vec![spec("type.a", "default"), bad, spec("type.a", "default")],
            })
            .await,
        Code::InvalidArgument,
        "jobs[1].priority",
    );
    let all = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(all.jobs.is_empty(), "no half-written batch: {:?}", all.jobs);

    // Cancelling a finished job.
    let job = enqueue(&mut client, spec("type.a", "default")).await;
    client
        .cancel_job(pb::CancelJobRequest {
            id: job.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("first cancel");
    assert_status(
        client
            .cancel_job(pb::CancelJobRequest {
                id: job.id.clone(),
                reason: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "JOB_STATE_CANCELLED",
    );

    // The server is still serving, and the valid batch goes through.
    let batch = client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![spec("type.a", "default"), spec("type.b", "default")],
        })
        .await
        .expect("valid batch")
        .into_inner();
    assert_eq!(batch.jobs.len(), 2);
    assert!(batch.jobs.iter().all(|j| j.created));
}

#[tokio::test]
async fn tenants_are_isolated() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let job = enqueue(&mut client, spec("type.a", "default")).await;

    let mut request = tonic::Request::new(pb::GetJobRequest {
        id: job.id.clone(),
        view: 0,
    });
    request
        .metadata_mut()
        .insert("jobwire-tenant", "other".parse().expect("ascii"));
    assert_status(client.get_job(request).await, Code::NotFound, &job.id);

    let mut request = tonic::Request::new(pb::ListJobsRequest::default());
    request
        .metadata_mut()
        .insert("jobwire-tenant", "other".parse().expect("ascii"));
    let listed = client.list_jobs(request).await.expect("list").into_inner();
    assert!(listed.jobs.is_empty());
}

/// A worker that stops heartbeating loses its lease; the job is retried on another worker with
/// a new fencing token, and the first worker's late completion is refused and changes nothing.
#[tokio::test]
async fn stale_lease_is_refused_after_expiry() {
    let db = test_db().await;
    let server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "600ms",
            "--heartbeat-interval",
            "200ms",
            "--reap-interval",
            "100ms",
            "--poll-interval",
            "100ms",
        ],
    )
    .await;
    let mut client = jobs(&server.url()).await;
    let mut job_spec = spec("type.slow", "default");
    job_spec.retry_policy = Some(pb::RetryPolicy {
        initial_backoff: Some(prost_types::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    });
    let job = enqueue(&mut client, job_spec).await;

    let mut silent = RawWorker::connect(&server.url(), "silent", &["type.slow"], 1).await;
    let first = silent.next_lease().await;
    assert_eq!(first.attempt, 1);

    // The silent worker never heartbeats; the lease lapses and a second worker gets attempt 2.
    let mut second = RawWorker::connect(&server.url(), "second", &["type.slow"], 1).await;
    let lease = second.next_lease().await;
    assert_eq!(lease.job_id, job.id);
    assert_eq!(lease.attempt, 2);

    let ack = second.complete(&job.id, 2, b"fresh").await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");

    let late = silent.complete(&job.id, 1, b"late").await;
    assert_eq!(late.code, Code::Aborted as i32, "{late:?}");
    let late_fail = silent.fail(&job.id, 1, "late failure", false).await;
    assert_eq!(late_fail.code, Code::Aborted as i32, "{late_fail:?}");

    // A heartbeat naming the lost lease is answered with a stop.
    silent
        .heartbeat(vec![pb::LeaseRef {
            job_id: job.id.clone(),
            attempt: 1,
        }])
        .await;
    let stop = silent.next_stop().await;
    assert_eq!(stop.reason, pb::StopReason::LeaseLost as i32);

    let done = get(&mut client, &job.id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded);
    assert_eq!(done.result.expect("result").value, b"fresh");
    assert_eq!(done.attempts.len(), 2);
    assert_eq!(
        done.attempts[0].outcome,
        pb::AttemptOutcome::LeaseExpired as i32
    );
    assert_eq!(
        done.attempts[1].outcome,
        pb::AttemptOutcome::Succeeded as i32
    );
}

/// A worker may name its own retry delay: it replaces the policy's backoff (5 s by default).
#[tokio::test]
async fn worker_named_retry_delay_overrides_the_policy() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let job = enqueue(&mut client, spec("type.later", "default")).await;
    let mut worker = RawWorker::connect(&server.url(), "raw", &["type.later"], 1).await;
    worker.next_lease().await;

    let ack = worker
        .fail_after(
            &job.id,
            1,
            "rate limited",
            false,
            std::time::Duration::from_secs(120),
        )
        .await;
    assert_eq!(ack.code, Code::Ok as i32, "{ack:?}");
    let waiting = get(&mut client, &job.id).await;
    assert_eq!(state(&waiting), pb::JobState::Retrying);
    let failed_at = waiting
        .last_error
        .expect("error")
        .occurred_at
        .expect("time");
    let run_at = waiting.run_at.expect("run_at");
    let delay = run_at.seconds - failed_at.seconds;
    assert!(
        (119..=121).contains(&delay),
        "the next attempt waits the worker's 120 s, not the policy's 5 s: {delay} s"
    );
}

/// An enqueue whose idempotency key another transaction is inserting waits for it; once that
/// commits, the enqueue's statement skips the key but cannot see the winner (it committed after
/// the statement's snapshot), and the job is read again. The single and the batch call are both
/// answered with the winner, created false, and no second job is written.
#[tokio::test]
async fn an_enqueue_racing_an_uncommitted_key_is_answered_with_the_winner() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    // The racing job is a copy of this one under the key: the same job type and payload, so
    // the enqueues below repeat it (another payload would be refused, ALREADY_EXISTS).
    enqueue(&mut client, spec("type.keyed", "default")).await;
    let pool = db.pool().await;
    let mut racer = pool.begin().await.expect("begin");
    let winner: String = sqlx::query_scalar(
        "INSERT INTO jobs (id, tenant_id, queue, job_type, payload_type, payload, priority, \
             state, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, \
             run_at, idempotency_key) \
         SELECT gen_random_uuid(), tenant_id, queue, job_type, payload_type, payload, priority, \
             state, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, \
             run_at, 'raced' \
         FROM jobs LIMIT 1 RETURNING id::text",
    )
    .fetch_one(&mut *racer)
    .await
    .expect("insert the racing job");

    let keyed = pb::JobSpec {
        idempotency_key: "raced".into(),
        ..spec("type.keyed", "default")
    };
    let single = {
        let (mut client, job) = (client.clone(), keyed.clone());
        tokio::spawn(async move {
            client
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(job),
                })
                .await
        })
    };
    let batch = {
        let (mut client, job) = (client.clone(), keyed.clone());
        tokio::spawn(async move {
            client
                .enqueue_jobs(pb::EnqueueJobsRequest {
                    parent: Default::default(),
                    jobs: vec![spec("type.plain", "default"), job],
                })
                .await
        })
    };
    // Both statements have taken their snapshots and wait on the racing insert's key.
    eventually(
        "both enqueues wait on the key",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND application_name LIKE 'jobwire-server/%'",
                )
                .fetch_one(&pool)
                .await
                .expect("activity");
                (waiting == 2).then_some(())
            }
        },
    )
    .await;
    racer.commit().await.expect("commit the racing job");

    let single = single
        .await
        .expect("task")
        .expect("single enqueue")
        .into_inner();
    assert!(!single.created);
    assert_eq!(single.job.expect("job").id, winner);
    let batch = batch
        .await
        .expect("task")
        .expect("batch enqueue")
        .into_inner()
        .jobs;
    assert!(batch[0].created);
    assert!(!batch[1].created);
    assert_eq!(batch[1].id, winner);
    let keyed_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = 'raced'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(keyed_jobs, 1);
}

/// Concurrent single enqueues are group-committed: every caller is answered after its own
/// commit (its job is readable at once from another connection), a bad request fails alone,
/// and racing callers with one idempotency key get one job.
#[tokio::test]
async fn concurrent_enqueues_share_commits_but_not_failures() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = jobs(&url).await;
            let mut job = spec("type.grouped", "default");
            if i % 10 == 3 {
                job.priority = Some(500);
            }
            if i % 10 == 7 {
                job.idempotency_key = "shared-key".into();
            }
            let result = client
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(job),
                })
                .await
                .map(|r| r.into_inner());
            if let Ok(response) = &result {
                let id = &response.job.as_ref().expect("job").id;
                let mut reader = jobs(&url).await;
                let stored = get(&mut reader, id).await;
                assert_eq!(&stored.id, id, "an answered enqueue is committed");
            }
            (i, result)
        }));
    }
    let mut created = 0;
    let mut shared_ids = Vec::new();
    let mut shared_created = 0;
    for task in tasks {
        let (i, result) = task.await.expect("task");
        match i % 10 {
            3 => {
                let status = result.expect_err("bad priority fails");
                assert_eq!(status.code(), Code::InvalidArgument);
                assert!(status.message().contains("job.priority"));
            }
            7 => {
                let response = result.expect("keyed enqueue");
                shared_ids.push(response.job.expect("job").id);
                shared_created += i32::from(response.created);
            }
            _ => {
                let response = result.expect("valid enqueue succeeds");
                assert!(response.created);
                created += 1;
            }
        }
    }
    assert_eq!(created, 240);
    assert_eq!(shared_created, 1, "one caller created the keyed job");
    shared_ids.sort();
    shared_ids.dedup();
    assert_eq!(shared_ids.len(), 1, "every keyed caller got the same job");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db.pool().await)
        .await
        .expect("count");
    assert_eq!(stored, 241);
}

/// Concurrent single enqueues share their transactions: 200 calls released at once over one
/// connection are written by at most half as many transactions (jobs written together carry
/// the same `xmin`). Written one by one, they would take 200.
#[tokio::test]
async fn concurrent_enqueues_are_written_by_few_transactions() {
    const CALLERS: usize = 200;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = jobs(&server.url()).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let mut client = client.clone();
        let start = start.clone();
        calls.spawn(async move {
            start.wait().await;
            client
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(spec("type.grouped", "default")),
                })
                .await
                .expect("enqueue");
        });
    }
    while let Some(call) = calls.join_next().await {
        call.expect("task");
    }
    let (stored, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM jobs")
            .fetch_one(&db.pool().await)
            .await
            .expect("count");
    assert_eq!(stored, CALLERS as i64);
    assert!(
        transactions * 2 <= stored,
        "{stored} jobs were written by {transactions} transactions"
    );
}

/// Progress reports of hundreds of jobs at once are written in several statements side by side;
/// each report is still answered for itself: applied, or ABORTED for a lease the worker does not
/// hold, with nothing written for it. Reports and completions of many jobs take few
/// transactions.
#[tokio::test]
async fn a_burst_of_progress_reports_is_answered_report_by_report() {
    const JOBS: usize = 400;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: (0..JOBS).map(|_| spec("type.burst", "default")).collect(),
        })
        .await
        .expect("enqueue");
    let mut worker = RawWorker::connect(
        &url,
        "burst",
        &["type.burst"],
        i32::try_from(JOBS).expect("small"),
    )
    .await;
    let mut leases = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        leases.push(worker.next_lease().await);
    }

    let mut expected = std::collections::HashMap::new();
    for (i, lease) in leases.iter().enumerate() {
        let id = worker.progress(&lease.job_id, lease.attempt, 1, 2).await;
        expected.insert(id, Code::Ok);
        if i % 40 == 0 {
            let stale = worker
                .progress(&lease.job_id, lease.attempt + 1, 1, 2)
                .await;
            expected.insert(stale, Code::Aborted);
        }
    }
    let acks = worker.acks(expected.len()).await;
    for ack in &acks {
        assert_eq!(
            Code::from(ack.code),
            expected[&ack.request_id],
            "report {}: {}",
            ack.request_id,
            ack.message
        );
    }
    let answered: std::collections::HashSet<u64> = acks.iter().map(|a| a.request_id).collect();
    assert_eq!(answered.len(), expected.len(), "every report answered once");

    let pool = db.pool().await;
    let (events, jobs_with_progress): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM job_events WHERE kind = 'progress' AND attempt = 1), \
                (SELECT count(*) FROM jobs WHERE progress->>'items_done' = '1')",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(
        events,
        i64::try_from(JOBS).expect("small"),
        "one event per report applied"
    );
    assert_eq!(jobs_with_progress, i64::try_from(JOBS).expect("small"));
    let stale_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_events WHERE kind = 'progress' AND attempt <> 1",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(stale_events, 0, "nothing written for a lease not held");

    // Reports and completions are written in batches: rows written by one statement carry its
    // transaction's id as their `xmin`.
    for lease in &leases {
        worker.complete_nowait(&lease.job_id, lease.attempt).await;
    }
    for ack in worker.acks(JOBS).await {
        assert_eq!(Code::from(ack.code), Code::Ok, "{}", ack.message);
    }
    let (enqueue_transactions, progress_transactions, completion_transactions): (i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(DISTINCT xmin::text) FROM job_events \
                     WHERE kind = 'state' AND state = 'available'), \
                    (SELECT count(DISTINCT xmin::text) FROM job_events WHERE kind = 'progress'), \
                    (SELECT count(DISTINCT xmin::text) FROM jobs WHERE state = 'succeeded')",
        )
        .fetch_one(&pool)
        .await
        .expect("counts");
    assert_eq!(enqueue_transactions, 1, "EnqueueJobs is one statement");
    let half = i64::try_from(JOBS / 2).expect("small");
    assert!(
        progress_transactions <= half,
        "{JOBS} progress reports written by {progress_transactions} transactions"
    );
    assert!(
        completion_transactions <= half,
        "{JOBS} completions written by {completion_transactions} transactions"
    );
}

/// A lease handed back before its worker saw it (its stream closed, or it waited too long on
/// the server) does not count as an attempt, and its number is not used again. Its job goes
/// back to the queue, unless it was asked to stop meanwhile: then it ends as asked, cancelled
/// or paused, and is not run again.
#[tokio::test]
async fn a_lease_handed_back_undelivered_ends_its_job_as_a_stop_asked() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    for _ in 0..3 {
        enqueue(&mut client, spec("type.handback", "default")).await;
    }
    let mut worker = RawWorker::connect(&url, "handback", &["type.handback"], 3).await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(worker.next_lease().await);
    }
    let (cancelled, paused, plain) = (&leases[0], &leases[1], &leases[2]);
    client
        .cancel_job(pb::CancelJobRequest {
            id: cancelled.job_id.clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel");
    client
        .pause_job(pb::PauseJobRequest {
            id: paused.job_id.clone(),
            reason: "later".into(),
        })
        .await
        .expect("pause");

    let store = Store::connect(db.url(), 2).await.expect("store");
    let refs: Vec<LeaseRef> = leases
        .iter()
        .map(|l| LeaseRef {
            job_id: JobId(l.job_id.parse().expect("uuid")),
            attempt: l.attempt,
        })
        .collect();
    let released = ending::release(&store, &TenantId::default_tenant(), &refs)
        .await
        .expect("release");
    assert_eq!(released, 3);

    let job = get(&mut client, &cancelled.job_id).await;
    assert_eq!(job.state, pb::JobState::Cancelled as i32);
    assert_eq!(
        (job.attempt, job.attempts_counted),
        (1, 0),
        "the undelivered attempt does not count, and keeps its number"
    );
    assert!(job.finished_at.is_some());
    let job = get(&mut client, &paused.job_id).await;
    assert_eq!(job.state, pb::JobState::Paused as i32);
    assert_eq!((job.attempt, job.attempts_counted), (1, 0));
    let job = get(&mut client, &plain.job_id).await;
    assert_eq!(job.state, pb::JobState::Available as i32);
    assert_eq!((job.attempt, job.attempts_counted), (1, 0));

    let pool = db.pool().await;
    let last: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT DISTINCT ON (job_id) state::text, data FROM job_events \
         WHERE kind = 'state' AND job_id = ANY($1::uuid[]) ORDER BY job_id, seq DESC",
    )
    .bind(refs.iter().map(|r| r.job_id.0).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await
    .expect("events");
    let mut last: Vec<(String, String)> = last
        .into_iter()
        .map(|(state, data)| (state, data["reason"].as_str().unwrap_or("").to_owned()))
        .collect();
    last.sort();
    assert_eq!(
        last,
        [
            ("available".to_owned(), "lease not delivered".to_owned()),
            ("cancelled".to_owned(), "not needed".to_owned()),
            ("paused".to_owned(), "later".to_owned()),
        ]
    );

    // Sent again (as a worker does after a broken stream), the hand-back matches nothing: the
    // next claim of the plain job is attempt 2, not a second attempt 1.
    let again = ending::release(&store, &TenantId::default_tenant(), &refs)
        .await
        .expect("release again");
    assert_eq!(again, 0);
    let mut second = RawWorker::connect(&url, "second", &["type.handback"], 1).await;
    let lease = second.next_lease().await;
    assert_eq!(
        (lease.job_id.as_str(), lease.attempt),
        (plain.job_id.as_str(), 2)
    );
}

/// A drained worker closes its stream only with nothing running or queued, so a lease it still
/// holds then reached it after it went idle (it was on its way). The server hands such a lease
/// back as the stream ends; it used to lapse, and its job ran again only after the lease
/// duration (30 s), as a second attempt.
#[tokio::test]
async fn a_lease_a_drained_worker_never_started_is_handed_back_as_it_leaves() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = jobs(&server.url()).await;
    let job = enqueue(&mut client, spec("type.late", "default")).await;
    let reporting = |id: &str| pb::Hello {
        reports_started: true,
        ..support::hello(id, &["type.late"], 1, Vec::new())
    };
    let mut worker = RawWorker::try_connect(&server.url(), reporting("late"))
        .await
        .expect("connect");
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, job.id);

    worker.drain_and_close().await;
    let pool = db.pool().await;
    let runs = eventually(
        "the job available again",
        Duration::from_secs(5),
        || async {
            let (state, runs): (String, i32) = sqlx::query_as(
                "SELECT state::text, attempt - attempt_base FROM jobs WHERE id = $1::uuid",
            )
            .bind(&job.id)
            .fetch_one(&pool)
            .await
            .expect("job");
            (state == "available").then_some(runs)
        },
    )
    .await;
    assert_eq!(runs, 0, "a lease never started is no attempt");

    // A lease whose handler started is not handed back: it counts, and is left to lapse.
    let mut worker = RawWorker::try_connect(&server.url(), reporting("late-2"))
        .await
        .expect("connect");
    let lease = worker.next_lease().await;
    assert_eq!(lease.job_id, job.id);
    worker
        .started(vec![pb::LeaseRef {
            job_id: lease.job_id.clone(),
            attempt: lease.attempt,
        }])
        .await;
    worker.drain_and_close().await;
    let (state, started): (String, bool) = sqlx::query_as(
        "SELECT state::text, handler_started_at IS NOT NULL FROM jobs WHERE id = $1::uuid",
    )
    .bind(&job.id)
    .fetch_one(&pool)
    .await
    .expect("job");
    assert_eq!((state.as_str(), started), ("running", true));
}

/// A worker that keeps pace is sent leases beyond its slots, up to its prefetch and no more.
/// A lease it hands back unstarted is available again, the attempt not counted, or, when its
/// job was cancelled meanwhile, ends cancelled; the stop for a queued lease reaches the worker
/// like any other. Malformed hand-backs and prefetches are refused with the field named.
#[tokio::test]
async fn a_prefetching_worker_holds_its_slots_and_prefetch_and_hands_back_what_it_did_not_start() {
    const SLOTS: i32 = 1;
    const PREFETCH: i32 = 2;
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;

    let refused = RawWorker::try_connect(
        &url,
        pb::Hello {
            prefetch: -1,
            ..support::hello("prefetch", &["type.prefetch"], SLOTS, Vec::new())
        },
    )
    .await
    .map(|_| ());
    assert_status(refused, Code::InvalidArgument, "hello.prefetch");

    client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: (0..400).map(|_| spec("type.prefetch", "default")).collect(),
        })
        .await
        .expect("enqueue");
    let mut worker =
        RawWorker::connect_prefetching(&url, "prefetch", &["type.prefetch"], SLOTS, PREFETCH).await;
    // A worker with no pace yet gets its slot filled, not its prefetch: its jobs might be
    // long, and those queued behind them would wait for nothing.
    let first = worker.next_lease().await;
    // Each lease says how long the server held it since its claim, for the worker's queue.
    let held_for = first.held.expect("held");
    assert_eq!(held_for.seconds, 0, "{held_for:?}");
    assert!((0..250_000_000).contains(&held_for.nanos), "{held_for:?}");
    assert!(
        worker
            .lease_within(Duration::from_millis(300))
            .await
            .is_none(),
        "no lease beyond the slot before the worker shows a pace"
    );
    worker.complete_nowait(&first.job_id, first.attempt).await;
    // Completing leases as they come gives the worker a pace, so the dispatcher fills its
    // prefetch as well as its slot.
    for _ in 0..300 {
        let lease = worker.next_lease().await;
        worker.complete_nowait(&lease.job_id, lease.attempt).await;
    }
    let mut held = Vec::new();
    while let Some(lease) = worker.lease_within(Duration::from_millis(500)).await {
        held.push(lease);
    }
    assert_eq!(
        held.len(),
        usize::try_from(SLOTS + PREFETCH).expect("small"),
        "the worker holds its slot and its prefetch, and no more"
    );
    let pool = db.pool().await;
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'running'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(running, i64::from(SLOTS + PREFETCH));

    // A cancel of a queued job reaches the worker, which hands the lease back.
    let (started, queued, spare) = (&held[0], &held[1], &held[2]);
    client
        .cancel_job(pb::CancelJobRequest {
            id: queued.job_id.clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel");
    let stop = worker.next_stop().await;
    assert_eq!(stop.reason, pb::StopReason::Cancelled as i32);
    assert_eq!(
        stop.lease.as_ref().map(|l| l.job_id.as_str()),
        Some(queued.job_id.as_str())
    );
    let ack = worker.release(&[queued, spare]).await;
    assert_eq!(Code::from(ack.code), Code::Ok, "{}", ack.message);
    let job = get(&mut client, &queued.job_id).await;
    assert_eq!(state(&job), pb::JobState::Cancelled);
    assert_eq!(job.attempts_counted, 0, "the attempt never started");
    // The spare went back to the head of the queue. Once the started job completes, the worker
    // has room again and gets it back under a new attempt number, counted as its first.
    let ack = worker
        .complete(&started.job_id, started.attempt, b"done")
        .await;
    assert_eq!(Code::from(ack.code), Code::Ok);
    let again = worker.next_lease().await;
    assert_eq!(
        (again.job_id.as_str(), again.attempt),
        (spare.job_id.as_str(), spare.attempt + 1)
    );
    assert_eq!(get(&mut client, &spare.job_id).await.attempts_counted, 1);
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(data->>'reason', '') FROM job_events \
         WHERE kind = 'state' AND job_id = $1::uuid ORDER BY seq",
    )
    .bind(&spare.job_id)
    .fetch_all(&pool)
    .await
    .expect("events");
    assert!(
        reasons.iter().any(|r| r == "lease not delivered"),
        "the spare's hand-back is in its history: {reasons:?}"
    );

    // A hand-back of a lease that moved on changes nothing: a finished job stays finished.
    let ack = worker.release(&[started]).await;
    assert_eq!(Code::from(ack.code), Code::Ok);
    assert_eq!(
        state(&get(&mut client, &started.job_id).await),
        pb::JobState::Succeeded
    );

    let ack = worker.release_refs(Vec::new()).await;
    assert_eq!(Code::from(ack.code), Code::InvalidArgument);
    assert!(ack.message.contains("release.leases"), "{}", ack.message);
    let ack = worker
        .release_refs(vec![pb::LeaseRef {
            job_id: "not-a-uuid".into(),
            attempt: 1,
        }])
        .await;
    assert_eq!(Code::from(ack.code), Code::InvalidArgument);
    assert!(
        ack.message.contains("release.leases[0].job_id"),
        "{}",
        ack.message
    );
}

/// A cancel asked while the job's lease waits on the server for its worker (claimed ahead, so
/// no stream holds it yet) reaches the worker with the lease, not at a heartbeat seconds later;
/// a lease that waits too long is handed back instead, and the job ends cancelled unstarted.
#[tokio::test]
async fn a_cancel_asked_while_the_lease_waits_on_the_server_reaches_the_worker_with_it() {
    let db = test_db().await;
    let pool = db.pool().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let mut client = jobs(&url).await;
    client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: (0..400).map(|_| spec("type.ahead", "default")).collect(),
        })
        .await
        .expect("enqueue");
    // No heartbeats from this worker: a stop can only reach it unprompted.
    let mut worker = RawWorker::connect(&url, "ahead", &["type.ahead"], 1).await;
    let mut completed = Vec::new();
    for _ in 0..300 {
        let lease = worker.next_lease().await;
        worker.complete_nowait(&lease.job_id, lease.attempt).await;
        completed.push(lease.job_id);
    }
    let current = worker.next_lease().await;
    completed.push(current.job_id.clone());
    // The next lease in claim order that the worker has not seen: held ready for it.
    let victim: String = sqlx::query_scalar(
        "SELECT id::text FROM jobs WHERE state = 'running' AND NOT id::text = ANY($1) \
         ORDER BY priority DESC, run_at, id LIMIT 1",
    )
    .bind(&completed)
    .fetch_one(&pool)
    .await
    .expect("a lease claimed ahead");
    client
        .cancel_job(pb::CancelJobRequest {
            id: victim.clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel");
    worker
        .complete_nowait(&current.job_id, current.attempt)
        .await;

    let next = worker
        .lease_within(Duration::from_secs(2))
        .await
        .expect("the worker has room for the next lease");
    if next.job_id == victim {
        let stop = tokio::time::timeout(Duration::from_secs(2), worker.next_stop())
            .await
            .expect("the stop follows the lease, without waiting for a heartbeat");
        assert_eq!(stop.reason, pb::StopReason::Cancelled as i32);
        assert_eq!(
            stop.lease.map(|l| l.job_id),
            Some(victim.clone()),
            "the stop names the lease just sent"
        );
    } else {
        let job = get(&mut client, &victim).await;
        assert_eq!(state(&job), pb::JobState::Cancelled);
        assert_eq!(
            job.attempts_counted, 0,
            "handed back before it reached the worker"
        );
    }
}

/// A pause (or a tightened limit) of a queue asks a prefetching worker that serves it to hand back
/// the leases it holds queued for it, so none starts after the pause; a worker is not asked
/// about queues it does not serve.
#[tokio::test]
async fn a_paused_queue_asks_prefetching_workers_for_their_queued_leases() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let hello = pb::Hello {
        queues: vec!["default".into(), "second".into()],
        prefetch: 4,
        ..hello("prefetch", &["type.prefetch"], 1, Vec::new())
    };
    let mut worker = RawWorker::try_connect(&url, hello)
        .await
        .expect("the server welcomes the worker");
    let client = jobwire::Client::connect(url.clone()).await.expect("client");
    client
        .queue("elsewhere")
        .update()
        .concurrency_limit(Some(2))
        .create_if_missing()
        .await
        .expect("created");
    client
        .queue("elsewhere")
        .pause("not served here")
        .await
        .expect("paused");
    client.queue("default").pause("hold").await.expect("paused");
    let release = worker.next_release_queued().await;
    assert_eq!(
        release.queue, "default",
        "the first request is for the queue the worker serves"
    );

    // A resume, or a lifted limit, asks for nothing back: notifications arrive in commit
    // order, so the next request is for the queue paused after them.
    client.queue("default").resume().await.expect("resumed");
    client
        .queue("default")
        .update()
        .concurrency_limit(None)
        .await
        .expect("no limit");
    client.queue("second").pause("hold").await.expect("paused");
    let release = worker.next_release_queued().await;
    assert_eq!(release.queue, "second");
    client
        .queue("default")
        .update()
        .concurrency_limit(Some(3))
        .await
        .expect("limited");
    let release = worker.next_release_queued().await;
    assert_eq!(
        release.queue, "default",
        "a limit asks for queued leases back"
    );

    // A raised limit asks for nothing back; a lowered one, or a new rate limit, does.
    client
        .queue("default")
        .update()
        .concurrency_limit(Some(10))
        .await
        .expect("raised");
    nothing_asked_since(&client, &mut worker, "the raise asked for nothing").await;
    client
        .queue("default")
        .update()
        .concurrency_limit(Some(5))
        .await
        .expect("lowered");
    let release = worker.next_release_queued().await;
    assert_eq!(release.queue, "default", "a lowered limit asks");
    client
        .queue("default")
        .update()
        .rate_limit(Some(jobwire::RateLimit::per_second(50.0).burst(10)))
        .await
        .expect("rate limited");
    let release = worker.next_release_queued().await;
    assert_eq!(release.queue, "default", "a new rate limit asks");
    client
        .queue("default")
        .update()
        .rate_limit(Some(jobwire::RateLimit::per_second(100.0).burst(10)))
        .await
        .expect("rate raised");
    nothing_asked_since(&client, &mut worker, "a raised rate asked for nothing").await;
}

/// Checks that the worker was asked for nothing since its last `ReleaseQueued`: pausing the
/// queue `second` again, the next request is for it (requests arrive in commit order).
async fn nothing_asked_since(client: &jobwire::Client, worker: &mut RawWorker, why: &str) {
    client.queue("second").resume().await.expect("resumed");
    client
        .queue("second")
        .pause("marker")
        .await
        .expect("paused");
    let release = worker.next_release_queued().await;
    assert_eq!(release.queue, "second", "{why}");
}
