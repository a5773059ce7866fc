//! Watching under load: many watchers replaying at once wait their turn for the database instead
//! of failing, a burst of events in one commit drops no watcher that keeps up, and the watch
//! streams of one connection are bounded.

mod support;

use std::time::Duration;

use jobwire_proto::v1::{self as pb, job_service_client::JobServiceClient};
use jobwire_tests::{ServerProcess, test_db};
use support::{channel, spec};
use tonic::{Code, Streaming, transport::Channel};

const WATCHERS: usize = 1000;
const HISTORY: usize = 600;

async fn enqueue_batch(client: &mut JobServiceClient<Channel>, queue: &str, n: usize) {
    // Payloads of 600 bytes, as a real job's might be: each state event carries its job.
    let job = pb::JobSpec {
        payload: Some(support::any_bytes("test.Payload", vec![5; 600])),
        ..spec("load.job", queue)
    };
    client
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: (0..n).map(|_| job.clone()).collect(),
        })
        .await
        .expect("enqueue");
}

async fn watch_all(
    client: &mut JobServiceClient<Channel>,
    queue: &str,
    after: i64,
) -> Result<Streaming<pb::WatchJobsResponse>, tonic::Status> {
    Ok(client
        .watch_jobs(pb::WatchJobsRequest {
            queue: queue.into(),
            after_sequence: after,
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Reads `n` events, or the error that ended the stream first.
async fn read(
    stream: &mut Streaming<pb::WatchJobsResponse>,
    n: usize,
) -> Result<i64, tonic::Status> {
    read_paced(stream, n, Duration::ZERO).await
}

/// Reads `n` events, pausing `pause` after every hundred, as a dashboard that renders them does.
async fn read_paced(
    stream: &mut Streaming<pb::WatchJobsResponse>,
    n: usize,
    pause: Duration,
) -> Result<i64, tonic::Status> {
    let mut last = 0;
    for i in 0..n {
        if i % 100 == 99 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let message = tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no event in 120 s"))??
            .ok_or_else(|| tonic::Status::aborted("the stream ended early"))?;
        let sequence = message.event.map_or(0, |e| e.sequence);
        assert!(sequence > last, "events in order");
        last = sequence;
    }
    Ok(last)
}

/// A thousand watchers replaying the history at once, on a healthy database: every one gets it
/// all (each replay once held a pooled connection, and most waited out the pool's timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_watchers_replaying_at_once_all_succeed() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let channel = channel(&server.url()).await;
    let mut client = JobServiceClient::new(channel.clone());
    enqueue_batch(&mut client, "history", HISTORY).await;
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut client = JobServiceClient::new(channel.clone());
        watchers.push(tokio::spawn(async move {
            let mut stream = watch_all(&mut client, "history", 0).await?;
            read(&mut stream, HISTORY).await
        }));
    }
    let mut failures = Vec::new();
    for watcher in watchers {
        if let Err(status) = watcher.await.expect("watcher task") {
            failures.push(status);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {WATCHERS} watchers failed, such as {:?}",
        failures.len(),
        failures.first()
    );
}

/// 5,000 events committed at once reach a watcher that keeps up; only falling behind in time
/// drops one (a buffer of 4,096 events once dropped every watcher of such a batch).
#[tokio::test]
async fn a_burst_in_one_commit_drops_no_watcher_that_keeps_up() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut client = JobServiceClient::new(channel(&server.url()).await);
    // Subscribed before the burst, from its current end.
    let mut stream = watch_all(&mut client, "burst", 0).await.expect("watch");
    enqueue_batch(&mut client, "burst", 1).await;
    read(&mut stream, 1).await.expect("the first event");
    enqueue_batch(&mut client, "burst", 5000).await;
    // A second for the burst: behind for a moment, never for long.
    read_paced(&mut stream, 5000, Duration::from_millis(20))
        .await
        .expect("every event of the burst, with no disconnect");
}

/// Watch streams per connection are bounded: beyond the limit a new one is refused with
/// RESOURCE_EXHAUSTED, and a stream that ends gives its place back.
#[tokio::test]
async fn watch_streams_per_connection_are_bounded() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--max-watches-per-connection", "3"]).await;
    let channel = channel(&server.url()).await;
    let mut client = JobServiceClient::new(channel.clone());
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            watch_all(&mut client, "bounded", 0)
                .await
                .expect("within the limit"),
        );
    }
    let refused = watch_all(&mut client, "bounded", 0)
        .await
        .map(|_| ())
        .expect_err("beyond the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("3"), "{refused:?}");
    // Another connection has places of its own.
    let mut other = JobServiceClient::new(support::channel(&server.url()).await);
    let _elsewhere = watch_all(&mut other, "bounded", 0)
        .await
        .expect("another connection");
    drop(open.pop());
    let reopened = async {
        loop {
            match watch_all(&mut client, "bounded", 0).await {
                Ok(stream) => return stream,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("a place comes free once a stream is dropped");
}
