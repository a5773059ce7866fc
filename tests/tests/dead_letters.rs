//! The dead-letter view: ListJobs of FAILED jobs filtered by their last error's kind and text
//! and by labels, paged with the filters kept in the token.

mod support;

use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, test_db};
use support::jobs;
use tonic::Code;

/// A FAILED job of the default tenant with `last_error` (kind, message) and `labels`, written
/// as the worker protocol's final failure leaves it (the listing under test only reads rows).
async fn failed(pool: &sqlx::PgPool, kind: &str, message: &str, labels: serde_json::Value) {
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, queue, job_type, payload_type, payload, priority, \
             state, attempt, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, \
             retry_jitter, run_at, labels, last_error, finished_at) \
         VALUES (gen_random_uuid(), 'default', 'dl', 'dl.job', 'p', '\\x00', 50, 'failed', 3, 3, \
             10, 100, 2, 0, now(), $1, jsonb_build_object('kind', $2::text, 'message', $3::text, \
             'retryable', false, 'attempt', 3, 'occurred_at', now()), now())",
    )
    .bind(labels)
    .bind(kind)
    .bind(message)
    .execute(pool)
    .await
    .expect("a failed job");
}

#[tokio::test]
async fn failed_jobs_are_listed_by_error_kind_text_and_labels() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let pool = db.pool().await;
    for n in 0..3 {
        failed(
            &pool,
            "http_5xx",
            &format!("upstream said 503 ({n})"),
            serde_json::json!({"team": "a"}),
        )
        .await;
    }
    failed(
        &pool,
        "http_4xx",
        "Not Found: /x",
        serde_json::json!({"team": "a"}),
    )
    .await;
    failed(
        &pool,
        "http_5xx",
        "upstream said 502",
        serde_json::json!({"team": "b"}),
    )
    .await;
    let client = jobs(&server.url()).await;
    let list = |request: pb::ListJobsRequest| {
        let mut client = client.clone();
        async move { client.list_jobs(request).await.map(|r| r.into_inner()) }
    };
    let failed_state = vec![pb::JobState::Failed as i32];

    let by_kind = list(pb::ListJobsRequest {
        states: failed_state.clone(),
        error_kind: "http_5xx".into(),
        ..Default::default()
    })
    .await
    .expect("by kind");
    assert_eq!(by_kind.jobs.len(), 4);

    let by_text = list(pb::ListJobsRequest {
        states: failed_state.clone(),
        error_text: "NOT FOUND".into(),
        ..Default::default()
    })
    .await
    .expect("by text");
    assert_eq!(by_text.jobs.len(), 1);
    assert_eq!(
        by_text.jobs[0].last_error.as_ref().expect("error").kind,
        "http_4xx"
    );

    let by_all = list(pb::ListJobsRequest {
        states: failed_state.clone(),
        error_kind: "http_5xx".into(),
        error_text: "503".into(),
        labels: [("team".to_owned(), "a".to_owned())].into(),
        page_size: 2,
        ..Default::default()
    })
    .await
    .expect("by all");
    assert_eq!(by_all.jobs.len(), 2);
    assert!(!by_all.next_page_token.is_empty());
    let rest = list(pb::ListJobsRequest {
        states: failed_state.clone(),
        error_kind: "http_5xx".into(),
        error_text: "503".into(),
        labels: [("team".to_owned(), "a".to_owned())].into(),
        page_size: 2,
        page_token: by_all.next_page_token.clone(),
        ..Default::default()
    })
    .await
    .expect("the next page");
    assert_eq!(rest.jobs.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // The token holds its filters: another filter with it is refused.
    let refused = list(pb::ListJobsRequest {
        states: failed_state,
        error_kind: "http_4xx".into(),
        page_size: 2,
        page_token: by_all.next_page_token,
        ..Default::default()
    })
    .await
    .expect_err("a token of other filters");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // Limits are checked and named.
    let long = list(pb::ListJobsRequest {
        error_text: "x".repeat(257),
        ..Default::default()
    })
    .await
    .expect_err("a long error_text");
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(long.message().contains("error_text"), "{long:?}");
}
