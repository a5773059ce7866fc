//! The SDK's errors carry what the server said: a refused request's field violations (the
//! `google.rpc.BadRequest` detail of its status) come back through `jobwire::Error`, named by
//! their path in the request.

use jobwire::Client;
use jobwire_tests::{ServerProcess, codegen::Ping, test_db};

#[tokio::test]
async fn a_refused_enqueue_names_its_field() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("connect");

    let error = client
        .enqueue(Ping {
            note: "out of range".into(),
        })
        .priority(500)
        .await
        .expect_err("priority 500 is refused");

    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
    assert!(
        matches!(error, jobwire::Error::BadRequest { .. }),
        "{error:?}"
    );
    let violations = error.field_violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field(), "job.priority");
    assert!(
        violations[0].description().contains("500"),
        "the description says what was wrong: {violations:?}"
    );
}
