//! Idempotency keys that say what happened: a repeat returns the first job, a key reused for
//! another job type or payload is refused with the first job's id, and concurrent repeats make
//! one job.

mod support;

use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, test_db};
use tonic::Code;
use tonic_types::StatusExt;

fn spec(job_type: &str, payload: &[u8], key: &str) -> pb::JobSpec {
    pb::JobSpec {
        job_type: job_type.into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/test.Payload".into(),
            value: payload.to_vec(),
        }),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn single(job: pb::JobSpec) -> pb::EnqueueJobRequest {
    pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(job),
    }
}

/// The existing job's id as the refusal's details carry it (ErrorInfo and ResourceInfo).
fn existing_id(status: &tonic::Status) -> String {
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED", "{status:?}");
    let id = info
        .metadata
        .get("existing_job_id")
        .expect("existing_job_id")
        .clone();
    let resource = status.get_details_resource_info().expect("a ResourceInfo");
    assert_eq!(resource.resource_name, id, "{status:?}");
    id
}

#[tokio::test]
async fn a_key_reused_for_another_payload_or_type_is_refused_with_the_first_jobs_id() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut jobs = support::jobs(&server.url()).await;

    let first = jobs
        .enqueue_job(single(spec("idem.job", b"A", "k1")))
        .await
        .expect("first")
        .into_inner();
    assert!(first.created);
    let id = first.job.expect("job").id;

    // The same request again: the first job.
    let repeat = jobs
        .enqueue_job(single(spec("idem.job", b"A", "k1")))
        .await
        .expect("repeat")
        .into_inner();
    assert!(!repeat.created);
    assert_eq!(repeat.job.expect("job").id, id);

    // Another payload, or another job type, under the same key: refused, naming the first job.
    for (job_type, payload) in [("idem.job", &b"B"[..]), ("idem.other", &b"A"[..])] {
        let refused = jobs
            .enqueue_job(single(spec(job_type, payload, "k1")))
            .await
            .expect_err("a reused key");
        assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
        assert!(
            refused.message().contains("job.idempotency_key"),
            "{refused:?}"
        );
        assert_eq!(existing_id(&refused), id);
    }

    // Unless the caller takes the existing job regardless.
    let accepted = jobs
        .enqueue_job(single(pb::JobSpec {
            accept_existing: true,
            ..spec("idem.job", b"B", "k1")
        }))
        .await
        .expect("accepted")
        .into_inner();
    assert!(!accepted.created);
    assert_eq!(accepted.job.expect("job").id, id);

    // A batch with one reused key is refused whole: its other job is not written either.
    let refused = jobs
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![spec("idem.job", b"C", "k2"), spec("idem.job", b"B", "k1")],
        })
        .await
        .expect_err("a batch reusing a key");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert_eq!(existing_id(&refused), id);
    let violation = refused
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations
        .first()
        .expect("a violation")
        .field
        .clone();
    assert_eq!(violation, "jobs[1].idempotency_key");
    let pool = db.pool().await;
    let k2: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = 'k2'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(k2, 0, "the refused batch's other job was written");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(total, 1);
}

#[tokio::test]
async fn fifty_concurrent_repeats_of_one_key_make_one_job() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let jobs = support::jobs(&server.url()).await;
    let answers = futures::future::join_all((0..50).map(|_| {
        let mut jobs = jobs.clone();
        async move {
            jobs.enqueue_job(single(spec("idem.job", b"same", "k-race")))
                .await
                .map(tonic::Response::into_inner)
        }
    }))
    .await;
    let answers: Vec<pb::EnqueueJobResponse> = answers
        .into_iter()
        .map(|a| a.expect("every repeat is answered"))
        .collect();
    let created = answers.iter().filter(|a| a.created).count();
    assert_eq!(created, 1, "jobs created");
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|a| a.job.as_ref().expect("job").id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db.pool().await)
        .await
        .expect("count");
    assert_eq!(rows, 1);
}
