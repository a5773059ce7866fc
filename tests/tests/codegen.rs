//! Job types declared only in protobuf, with the `(jobwire.v1.job)` option: `jobwire-build`
//! generates their `JobType` impls (tests/build.rs), a producer enqueues them typed, a worker
//! runs them typed and registers their schema when it connects, and an operator then lists
//! them and enqueues them as JSON through grpcurl.

use std::time::Duration;

use jobwire::{Client, JobContext, JobState, JobType, Worker};
use jobwire_proto::v1::{self as pb, job_type_service_client::JobTypeServiceClient};
use jobwire_tests::{
    ServerProcess,
    codegen::{Ping, Purge, Thumbnail, ThumbnailResult},
    eventually, grpcurl, test_db,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn spawn_worker(
    url: String,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), jobwire::Error>>,
) {
    let worker = Worker::builder(url)
        .queues(["media", "default"])
        .register::<Thumbnail, _, _>(|_ctx: JobContext, job: Thumbnail| async move {
            Ok(ThumbnailResult {
                url: format!("{}?w={}", job.url, job.width),
                width: job.width,
            })
        })
        .register::<Ping, _, _>(|_ctx: JobContext, _job: Ping| async move { Ok(()) })
        .register::<Purge, _, _>(|_ctx: JobContext, _job: Purge| async move { Ok(()) })
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    (stop, task)
}

async fn list_types(url: &str) -> Vec<pb::JobType> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    JobTypeServiceClient::new(channel)
        .list_job_types(pb::ListJobTypesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .job_types
}

#[tokio::test]
async fn a_job_type_declared_in_protobuf_runs_typed_and_as_json() {
    // The generated impl carries what the option said.
    assert_eq!(Thumbnail::JOB_TYPE, "media.thumbnail");
    let schema = Thumbnail::SCHEMA.expect("schema");
    assert_eq!(schema.payload_type(), "jobwire.tests.v1.Thumbnail");
    assert_eq!(schema.output_type(), "jobwire.tests.v1.ThumbnailResult");
    assert_eq!(
        Ping::SCHEMA.expect("schema").output_type(),
        "google.protobuf.Empty"
    );

    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let (stop, task) = spawn_worker(server.url());

    // The worker registered both types when it connected.
    let types = eventually("the worker's types registered", WAIT, || async {
        let types = list_types(&server.url()).await;
        (types.len() == 3).then_some(types)
    })
    .await;
    let thumbnail = types
        .iter()
        .find(|t| t.name == "media.thumbnail")
        .expect("thumbnail type");
    assert_eq!(thumbnail.version, 1);
    let defaults = thumbnail.defaults.as_ref().expect("defaults");
    assert_eq!(defaults.queue, "media");
    assert_eq!(defaults.priority, Some(75));
    let fields = jobwire_tests::payload_fields(thumbnail);
    assert_eq!(
        fields,
        [
            ("url", "string"),
            ("width", "int32"),
            ("keep_aspect", "bool"),
            ("budget", "message")
        ]
    );

    // A typed enqueue takes the type's defaults.
    let client = Client::connect(server.url()).await.expect("client");
    let handle = client
        .enqueue(Thumbnail {
            url: "https://example.com/cat.png".into(),
            width: 64,
            ..Default::default()
        })
        .await
        .expect("enqueued");
    let info = handle.get().await.expect("job");
    assert_eq!(info.queue(), "media");
    assert_eq!(info.priority(), 75);
    assert_eq!(info.max_attempts(), Some(4));
    assert_eq!(info.timeout(), Some(Duration::from_secs(20)));
    assert_eq!(info.as_proto().job_type_version, 1);
    let output = handle.wait().await.expect("ran");
    assert_eq!(output.url, "https://example.com/cat.png?w=64");
    client
        .enqueue(Ping {
            note: "hello".into(),
        })
        .await
        .expect("ping")
        .wait()
        .await
        .expect("ping ran");

    // The same type as JSON, by an operator who never saw the Rust code.
    let addr = server.addr().to_string();
    let out = grpcurl::run(&[
        "-plaintext",
        "-d",
        r#"{"job": {"job_type": "media.thumbnail",
            "payload_json": {"url": "https://example.com/dog.png", "width": 32,
                             "keepAspect": true, "budget": "1.5s"}}}"#,
        &addr,
        "jobwire.v1.JobService/EnqueueJob",
    ]);
    let out: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let id = out["job"]["id"].as_str().expect("id").to_owned();
    let done = client
        .job::<Thumbnail>(id.clone())
        .wait()
        .await
        .expect("ran");
    assert_eq!(done.width, 32);
    let info = client.get_job(&id).await.expect("job");
    assert_eq!(info.state(), JobState::Succeeded);
    let result = info.as_proto().result_json.clone().expect("result as JSON");
    assert!(
        format!("{result:?}").contains("https://example.com/dog.png?w=32"),
        "{result:?}"
    );

    // A job type that needs approval waits for it, and its payload is its identity.
    let purge = client
        .enqueue(Purge { path: "/a".into() })
        .send_detailed()
        .await
        .expect("purge");
    assert_eq!(purge.state(), JobState::AwaitingApproval);
    let again = client
        .enqueue(Purge { path: "/a".into() })
        .send_detailed()
        .await
        .expect("purge again");
    assert!(!again.created(), "the same payload names the same job");
    assert_eq!(again.handle().id(), purge.handle().id());
    let other = client
        .enqueue(Purge { path: "/b".into() })
        .await
        .expect("another purge");
    // Everything enqueued before ran meanwhile; the purges did not.
    assert_eq!(
        purge.handle().get().await.expect("job").state(),
        JobState::AwaitingApproval
    );
    let approved = client
        .approve_job(purge.handle().id(), "ok by ops")
        .await
        .expect("approved");
    assert_eq!(approved.state(), JobState::Available);
    purge.handle().wait().await.expect("the approved purge ran");
    let rejected = client
        .reject_job(other.id(), "wrong path")
        .await
        .expect("rejected");
    assert_eq!(rejected.state(), JobState::Cancelled);
    assert_eq!(rejected.cancel_reason(), Some("rejected: wrong path"));
    let refused = client
        .approve_job(other.id(), "too late")
        .await
        .expect_err("a cancelled job cannot be approved");
    assert_eq!(
        refused.code(),
        Some(jobwire::tonic::Code::FailedPrecondition)
    );

    // A reconnecting worker with the same schema adds no version.
    stop.cancel();
    task.await.expect("worker task").expect("worker ran");
    let (stop, task) = spawn_worker(server.url());
    client
        .enqueue(Ping {
            note: "again".into(),
        })
        .await
        .expect("ping")
        .wait()
        .await
        .expect("ping ran after the reconnect");
    let types = list_types(&server.url()).await;
    assert!(types.iter().all(|t| t.version == 1), "{types:?}");
    stop.cancel();
    task.await.expect("worker task").expect("worker ran");
}
