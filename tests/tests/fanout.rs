//! Fan-out and fan-in: a running handler enqueues children through its context and waits for
//! them without holding a slot; its job runs again, once, when every child has ended, and
//! aggregates their results. Cancelling the parent cancels its unfinished children; a server
//! killed in the middle of a fan-out loses no child and resumes the parent exactly once.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobwire::{Client, HandlerError, JobContext, JobState, JobType, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, eventually, test_db};
use support::{WAIT, jobs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A parent: fans out `count` parts, `batch` to an enqueue; parts from `block_from` on run
/// until they are stopped.
#[derive(Clone, PartialEq, prost::Message)]
struct Batch {
    #[prost(uint32, tag = "1")]
    count: u32,
    #[prost(uint32, tag = "2")]
    batch: u32,
    #[prost(uint32, tag = "3")]
    block_from: u32,
}

/// What the parent made of its children.
#[derive(Clone, PartialEq, prost::Message)]
struct Total {
    #[prost(uint64, tag = "1")]
    sum: u64,
    #[prost(uint32, tag = "2")]
    children: u32,
    #[prost(uint32, tag = "3")]
    succeeded: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Part {
    #[prost(uint32, tag = "1")]
    index: u32,
    #[prost(bool, tag = "2")]
    block: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Square {
    #[prost(uint64, tag = "1")]
    value: u64,
}

impl prost::Name for Batch {
    const NAME: &'static str = "Batch";
    const PACKAGE: &'static str = "jobwire.tests.fanout";
}
impl prost::Name for Total {
    const NAME: &'static str = "Total";
    const PACKAGE: &'static str = "jobwire.tests.fanout";
}
impl prost::Name for Part {
    const NAME: &'static str = "Part";
    const PACKAGE: &'static str = "jobwire.tests.fanout";
}
impl prost::Name for Square {
    const NAME: &'static str = "Square";
    const PACKAGE: &'static str = "jobwire.tests.fanout";
}
impl JobType for Batch {
    const JOB_TYPE: &'static str = "fanout.batch";
    type Output = Total;
}
impl JobType for Part {
    const JOB_TYPE: &'static str = "fanout.part";
    type Output = Square;
}

/// What the handlers did, seen from the test.
#[derive(Default)]
struct Seen {
    /// Runs of the parent that aggregated (resumed after its children ended).
    resumed: Mutex<u32>,
    /// Enqueue calls of children the server stored.
    batches_stored: Mutex<u32>,
    /// Runs of each part, by index, and the workers that ran them.
    parts: Mutex<HashMap<u32, u32>>,
    workers: Mutex<HashSet<String>>,
}

async fn run_batch(seen: Arc<Seen>, ctx: JobContext, batch: Batch) -> Result<Total, HandlerError> {
    if ctx.children_ended() {
        *seen.resumed.lock().expect("lock") += 1;
        let children = ctx
            .children()
            .await
            .map_err(|e| HandlerError::retryable(e.to_string()))?;
        let mut total = Total {
            children: u32::try_from(children.len()).expect("count"),
            ..Total::default()
        };
        for child in &children {
            if let Some(square) = child
                .result::<Part>()
                .map_err(|e| HandlerError::fatal(e.to_string()))?
            {
                total.sum += square.value;
                total.succeeded += 1;
            }
        }
        return Ok(total);
    }
    let indexes: Vec<u32> = (0..batch.count).collect();
    for chunk in indexes.chunks(usize::try_from(batch.batch.max(1)).expect("batch")) {
        let parts: Vec<Part> = chunk
            .iter()
            .map(|&index| Part {
                index,
                block: index >= batch.block_from,
            })
            .collect();
        // The server may go away mid-call: the same call again finds what it stored, if it did.
        loop {
            match ctx.enqueue_children(parts.clone()).await {
                Ok(_) => break,
                Err(e) if e.code() == Some(tonic::Code::Aborted) || ctx.is_cancelled() => {
                    return Err(HandlerError::retryable(e.to_string()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        *seen.batches_stored.lock().expect("lock") += 1;
    }
    Err(ctx.wait_for_children())
}

async fn run_part(seen: Arc<Seen>, ctx: JobContext, part: Part) -> Result<Square, HandlerError> {
    if part.block {
        ctx.cancelled().await;
        return Err(HandlerError::retryable("stopped"));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    *seen
        .parts
        .lock()
        .expect("lock")
        .entry(part.index)
        .or_default() += 1;
    seen.workers
        .lock()
        .expect("lock")
        .insert(ctx.worker_id().to_owned());
    Ok(Square {
        value: u64::from(part.index) * u64::from(part.index),
    })
}

/// Starts `n` workers of two slots each, in this process.
fn start_workers(
    url: &str,
    n: usize,
    seen: &Arc<Seen>,
) -> (CancellationToken, Vec<JoinHandle<()>>) {
    let stop = CancellationToken::new();
    let tasks = (0..n)
        .map(|i| {
            let (for_batch, for_part) = (seen.clone(), seen.clone());
            let worker = Worker::builder(url)
                .worker_id(format!("fan-{i}"))
                .concurrency(2)
                .register::<Batch, _, _>(move |ctx, job| run_batch(for_batch.clone(), ctx, job))
                .register::<Part, _, _>(move |ctx, job| run_part(for_part.clone(), ctx, job))
                .build()
                .expect("worker");
            let token = stop.clone();
            tokio::spawn(async move {
                let _ = worker.run(token.cancelled_owned()).await;
            })
        })
        .collect();
    (stop, tasks)
}

async fn stop_workers((stop, tasks): (CancellationToken, Vec<JoinHandle<()>>)) {
    stop.cancel();
    for task in tasks {
        task.await.expect("worker stopped");
    }
}

fn sum_of_squares(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

/// Every child of `parent`, through ListJobs filtered by parent.
async fn children(url: &str, parent: &str) -> Vec<pb::Job> {
    let mut raw = jobs(url).await;
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = raw
            .list_jobs(pb::ListJobsRequest {
                parent_id: parent.to_owned(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list children")
            .into_inner();
        all.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn a_parent_fans_out_to_four_workers_and_resumes_once_to_aggregate_its_children() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let client = Client::connect(url.clone()).await.expect("client");
    let seen = Arc::new(Seen::default());
    let workers = start_workers(&url, 4, &seen);

    let parent = client
        .enqueue(Batch {
            count: 100,
            batch: 100,
            block_from: u32::MAX,
        })
        .await
        .expect("enqueue parent");
    // The watcher of the parent and its children, from the parent's first event.
    let mut events = client.watch_job_and_children(parent.id().clone(), 0);
    let watched = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = futures::StreamExt::next(&mut events).await {
            seen.push(event.expect("event"));
        }
        seen
    });

    let total = tokio::time::timeout(WAIT, parent.wait())
        .await
        .expect("the parent ends in time")
        .expect("the parent succeeds");
    assert_eq!(
        total,
        Total {
            sum: sum_of_squares(100),
            children: 100,
            succeeded: 100,
        },
        "the parent aggregated every child's result"
    );
    assert_eq!(
        *seen.resumed.lock().expect("lock"),
        1,
        "resumed exactly once"
    );
    let parts = seen.parts.lock().expect("lock").clone();
    assert_eq!(parts.len(), 100);
    assert!(parts.values().all(|&runs| runs == 1), "each child ran once");
    let part_workers = seen.workers.lock().expect("lock").len();
    assert!(
        part_workers > 1,
        "the children spread over the workers: {part_workers}"
    );

    let mut raw = jobs(&url).await;
    let job = raw
        .get_job(pb::GetJobRequest {
            id: parent.id().as_str().to_owned(),
            view: pb::JobView::Full as i32,
        })
        .await
        .expect("get parent")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(
        job.children,
        Some(pb::ChildCounts {
            total: 100,
            unfinished: 0,
            succeeded: 100,
            failed: 0,
            cancelled: 0,
        })
    );
    assert_eq!(
        job.attempts_counted, 1,
        "the wait and the resume count once"
    );
    let outcomes: Vec<i32> = job.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::AttemptOutcome::Suspended as i32,
            pb::AttemptOutcome::Succeeded as i32
        ]
    );
    let listed = children(&url, parent.id().as_str()).await;
    assert_eq!(listed.len(), 100);
    assert!(listed.iter().all(|c| c.parent_id == parent.id().as_str()));

    // The watcher saw the parent wait, every child succeed, and the parent end last.
    let events = tokio::time::timeout(WAIT, watched)
        .await
        .expect("the watch ends with the parent")
        .expect("watcher");
    let of_parent: Vec<_> = events
        .iter()
        .filter(|e| e.job_id() == parent.id())
        .filter_map(|e| match e.kind() {
            jobwire::JobEventKind::StateChanged { state, reason, .. } => {
                Some((*state, reason.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .collect();
    assert!(
        of_parent
            .iter()
            .any(|(s, reason)| *s == JobState::Pending && reason == "waiting for its children"),
        "{of_parent:?}"
    );
    assert!(
        of_parent
            .iter()
            .any(|(s, reason)| *s == JobState::Available && reason == "children ended"),
        "{of_parent:?}"
    );
    let children_done: HashSet<_> = events
        .iter()
        .filter(|e| e.job_id() != parent.id() && e.state() == Some(JobState::Succeeded))
        .map(|e| e.job_id().clone())
        .collect();
    assert_eq!(
        children_done.len(),
        100,
        "every child's success was streamed"
    );
    let last = events.last().expect("events");
    assert_eq!(
        (last.job_id(), last.state()),
        (parent.id(), Some(JobState::Succeeded))
    );
    let sequences: Vec<i64> = events.iter().map(jobwire::JobEvent::sequence).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "in order, once");

    stop_workers(workers).await;
}

#[tokio::test]
async fn cancelling_a_waiting_parent_cancels_its_unfinished_children_naming_it() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let client = Client::connect(url.clone()).await.expect("client");
    let seen = Arc::new(Seen::default());
    let workers = start_workers(&url, 4, &seen);

    let parent = client
        .enqueue(Batch {
            count: 100,
            batch: 25,
            block_from: 10,
        })
        .await
        .expect("enqueue parent");
    let id = parent.id().as_str().to_owned();
    let raw = jobs(&url).await;
    // Midway: ten children done, some running (blocked), the rest queued.
    let job = eventually("the parent waits and ten children succeeded", WAIT, || {
        let (mut raw, id) = (raw.clone(), id.clone());
        async move {
            let job = support::get(&mut raw, &id).await;
            (job.state == pb::JobState::Pending as i32
                && job.children.as_ref().is_some_and(|c| c.succeeded == 10))
            .then_some(job)
        }
    })
    .await;
    assert!(job.awaiting_children);
    assert_eq!(job.children.map(|c| c.total), Some(100));
    eventually("blocked children running", WAIT, || {
        let (url, id) = (url.clone(), id.clone());
        async move {
            let listed = children(&url, &id).await;
            let running = listed
                .iter()
                .filter(|c| c.state == pb::JobState::Running as i32)
                .count();
            (running > 0).then_some(())
        }
    })
    .await;

    client
        .cancel_job(&id, "operator stopped the batch")
        .await
        .expect("cancel parent");
    let job = eventually("every child ended", WAIT, || {
        let (mut raw, id) = (raw.clone(), id.clone());
        async move {
            let job = support::get(&mut raw, &id).await;
            (job.children.as_ref().is_some_and(|c| c.unfinished == 0)).then_some(job)
        }
    })
    .await;
    assert_eq!(job.state, pb::JobState::Cancelled as i32);
    assert_eq!(
        job.children,
        Some(pb::ChildCounts {
            total: 100,
            unfinished: 0,
            succeeded: 10,
            failed: 0,
            cancelled: 90,
        })
    );
    for child in children(&url, &id).await {
        if child.state == pb::JobState::Cancelled as i32 {
            assert!(
                child.cancel_reason.starts_with(&format!(
                    "parent {id} (fanout.batch) ended CANCELLED: operator stopped the batch"
                )),
                "{}",
                child.cancel_reason
            );
        }
    }
    assert_eq!(*seen.resumed.lock().expect("lock"), 0, "never resumed");
    stop_workers(workers).await;
}

#[tokio::test]
async fn a_server_killed_during_a_fan_out_of_1000_children_loses_none_and_resumes_the_parent_once()
{
    let db = test_db().await;
    let mut server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "15s",
            "--heartbeat-interval",
            "1s",
            "--poll-interval",
            "200ms",
        ],
    )
    .await;
    let url = server.url();
    let client = Client::connect(url.clone()).await.expect("client");
    let seen = Arc::new(Seen::default());
    let workers = start_workers(&url, 4, &seen);

    let parent = client
        .enqueue(Batch {
            count: 1000,
            batch: 50,
            block_from: u32::MAX,
        })
        .await
        .expect("enqueue parent");
    eventually("some children stored", WAIT, || {
        let seen = seen.clone();
        async move { (*seen.batches_stored.lock().expect("lock") >= 3).then_some(()) }
    })
    .await;
    let stored = *seen.batches_stored.lock().expect("lock");
    assert!(
        stored < 20,
        "the kill must land mid fan-out ({stored} of 20 stored)"
    );
    server.kill();
    server.restart().await;

    let total = tokio::time::timeout(WAIT * 3, parent.wait())
        .await
        .expect("the parent ends in time")
        .expect("the parent succeeds");
    assert_eq!(
        total,
        Total {
            sum: sum_of_squares(1000),
            children: 1000,
            succeeded: 1000,
        }
    );
    assert_eq!(
        *seen.resumed.lock().expect("lock"),
        1,
        "resumed exactly once"
    );
    let listed = children(&url, parent.id().as_str()).await;
    assert_eq!(listed.len(), 1000, "no child lost, none twice");
    let parts = seen.parts.lock().expect("lock").clone();
    assert_eq!(parts.len(), 1000, "every child ran");
    stop_workers(workers).await;
}

#[tokio::test]
async fn a_worker_key_enqueues_children_of_the_job_it_runs_and_nothing_else() {
    let db = test_db().await;
    let (producer, worker_key) = (
        ServerProcess::api_key(&db, "acme", &["producer"]).await,
        ServerProcess::api_key(&db, "acme", &["worker"]).await,
    );
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let client = Client::builder(url.clone())
        .api_key(producer.clone())
        .connect()
        .await
        .expect("client");
    let seen = Arc::new(Seen::default());
    let (for_batch, for_part) = (seen.clone(), seen.clone());
    let worker = Worker::builder(url.clone())
        .worker_id("keyed")
        .api_key(worker_key.clone())
        .concurrency(2)
        .register::<Batch, _, _>(move |ctx, job| run_batch(for_batch.clone(), ctx, job))
        .register::<Part, _, _>(move |ctx, job| run_part(for_part.clone(), ctx, job))
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });

    let parent = client
        .enqueue(Batch {
            count: 3,
            batch: 3,
            block_from: u32::MAX,
        })
        .await
        .expect("enqueue parent");
    let total = tokio::time::timeout(WAIT, parent.wait())
        .await
        .expect("in time")
        .expect("the worker key enqueued the children");
    assert_eq!(total.children, 3);

    let with_key = |secret: &str, request: pb::EnqueueJobRequest| {
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("header"),
        );
        request
    };
    let spec = || pb::EnqueueJobRequest {
        job: Some(support::spec("fanout.part", "default")),
        parent: None,
    };
    let mut raw = jobs(&url).await;
    let refused = raw.enqueue_job(with_key(&worker_key, spec())).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "a worker key enqueues nothing but children"
    );
    // A parent that is not running the attempt named: the lease is stale.
    let stale = raw
        .enqueue_job(with_key(
            &producer,
            pb::EnqueueJobRequest {
                parent: Some(pb::LeaseRef {
                    job_id: parent.id().as_str().to_owned(),
                    attempt: 1,
                }),
                ..spec()
            },
        ))
        .await;
    assert_eq!(stale.err().map(|s| s.code()), Some(tonic::Code::Aborted));
    let unknown = raw
        .enqueue_job(with_key(
            &producer,
            pb::EnqueueJobRequest {
                parent: Some(pb::LeaseRef {
                    job_id: uuid::Uuid::now_v7().to_string(),
                    attempt: 1,
                }),
                ..spec()
            },
        ))
        .await;
    support::assert_status(unknown, tonic::Code::InvalidArgument, "parent.job_id");
    let zero = raw
        .enqueue_job(with_key(
            &producer,
            pb::EnqueueJobRequest {
                parent: Some(pb::LeaseRef {
                    job_id: parent.id().as_str().to_owned(),
                    attempt: 0,
                }),
                ..spec()
            },
        ))
        .await;
    support::assert_status(zero, tonic::Code::InvalidArgument, "parent.attempt");
    let listed = client
        .list_jobs()
        .parent(parent.id())
        .send()
        .await
        .expect("list children");
    assert_eq!(
        listed.jobs().len(),
        3,
        "nothing was added by the refused calls"
    );
    stop.cancel();
    task.await.expect("worker stopped");
}
