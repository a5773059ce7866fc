//! The engine's batch writers, in process on a database of their own: a report the database
//! refuses, slipped past the API's validation, fails only its own caller (invariant 8's second
//! wall, behind validation).

use std::time::Duration;

use jobwire_proto::v1 as pb;
use jobwire_server::{
    api::validate,
    domain::{JobId, LeaseRef, QueueName, TenantId},
    engine::{
        Error,
        completer::{Completer, Settle},
        ending::Completion,
        fanout::{Fanout, FanoutConfig},
    },
    store::{LogBatch, Store, Worker},
};
use jobwire_tests::test_db;

const JOBS: usize = 12;

fn job_spec() -> pb::JobSpec {
    pb::JobSpec {
        job_type: "batch.test".into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/test.Payload".into(),
            value: b"x".to_vec(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_report_the_database_refuses_fails_only_its_own_caller() {
    let db = test_db().await;
    let store = Store::connect(db.url(), 8).await.expect("store");
    store
        .ensure_event_partitions(
            std::time::Duration::from_secs(24 * 3600),
            std::time::Duration::from_secs(3 * 24 * 3600),
        )
        .await
        .expect("event partitions");
    let tenant = TenantId::new_unchecked("default");
    let jobs: Vec<_> = (0..JOBS)
        .map(|_| validate::job_spec(&job_spec(), 1024).expect("valid spec"))
        .collect();
    store.enqueue_many(&tenant, &jobs).await.expect("enqueue");
    let leased = store
        .claim(
            &tenant,
            &[QueueName::new_unchecked("default")],
            &["batch.test".to_owned()],
            JOBS as i64,
            &Worker {
                id: "w",
                lease: Duration::from_secs(60),
                reports_started: false,
            },
        )
        .await
        .expect("claim");
    assert_eq!(leased.len(), JOBS);
    let (fanout, fanout_handle) = Fanout::new(
        store.clone(),
        FanoutConfig {
            interval: Duration::from_millis(5),
            stall_warning: Duration::from_secs(10),
            lag_limit: Duration::from_secs(10),
        },
    );
    drop(fanout);
    let (completer, handle) = Completer::new(store.clone(), fanout_handle);
    let running = tokio::spawn(completer.run());

    // Every lease gets a log line and a completion, sent together so they share batches; one
    // of each carries a NUL byte, which PostgreSQL refuses.
    let poisoned = JOBS / 2;
    let mut answers = Vec::new();
    for (i, row) in leased.iter().enumerate() {
        let lease = LeaseRef {
            job_id: JobId(row.job.id),
            attempt: row.job.attempt,
        };
        let text = if i == poisoned { "bad\u{0}" } else { "fine" };
        let (handle_logs, handle_done) = (handle.clone(), handle.clone());
        let logs = Settle::Logs(LogBatch {
            tenant: tenant.clone(),
            lease,
            lines: vec![serde_json::json!({"level": "INFO", "message": text})],
        });
        let done = Settle::Complete(Completion {
            wait: Default::default(),
            tenant: tenant.clone(),
            lease,
            result_type: Some(format!("type.googleapis.com/{text}")),
            result: Some(vec![1]),
        });
        answers.push((
            i,
            tokio::spawn(async move { handle_logs.settle(logs).await }),
            tokio::spawn(async move { handle_done.settle(done).await }),
        ));
    }
    for (i, logs, done) in answers {
        let (logs, done) = (
            logs.await.expect("log task"),
            done.await.expect("completion task"),
        );
        if i == poisoned {
            assert!(matches!(logs, Err(Error::Internal(_))), "{logs:?}");
            assert!(matches!(done, Err(Error::Internal(_))), "{done:?}");
        } else {
            assert!(logs.is_ok(), "log line {i}: {logs:?}");
            assert!(done.is_ok(), "completion {i}: {done:?}");
        }
    }
    drop(handle);
    running
        .await
        .expect("completer stops once its handles are gone");
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(&db.pool().await)
        .await
        .expect("count");
    assert_eq!(succeeded, JOBS as i64 - 1);
}
