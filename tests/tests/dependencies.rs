//! Dependencies between jobs: a chain runs in order and each handler reads what it depended
//! on; a failure cancels everything downstream with reasons naming it; unknown dependencies,
//! cycles and jobs of another tenant are refused whole.

mod support;

use std::time::Duration;

use jobwire::{Client, HandlerError, JobContext, JobState, JobType, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, test_db};
use support::{WAIT, jobs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// A step of a chain: its output is the path of its dependencies' outputs with its own name
/// appended, so the last step's result shows which steps ran before it, in order.
#[derive(Clone, PartialEq, prost::Message)]
struct Step {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bool, tag = "2")]
    fail: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Path {
    #[prost(string, tag = "1")]
    path: String,
}

impl prost::Name for Step {
    const NAME: &'static str = "Step";
    const PACKAGE: &'static str = "jobwire.tests.deps";
}

impl prost::Name for Path {
    const NAME: &'static str = "Path";
    const PACKAGE: &'static str = "jobwire.tests.deps";
}

impl JobType for Step {
    const JOB_TYPE: &'static str = "deps.step";
    type Output = Path;
}

fn step(name: &str) -> Step {
    Step {
        name: name.into(),
        fail: false,
    }
}

async fn run_step(ctx: JobContext, step: Step) -> Result<Path, HandlerError> {
    if step.fail {
        return Err(HandlerError::fatal(format!("{} broke", step.name)));
    }
    let mut parts = Vec::new();
    for id in ctx.depends_on() {
        let dependency = ctx
            .dependency(id)
            .await
            .map_err(|e| HandlerError::retryable(e.to_string()))?;
        if let Some(path) = dependency
            .result::<Step>()
            .map_err(|e| HandlerError::fatal(e.to_string()))?
        {
            parts.push(path.path);
        }
    }
    parts.push(step.name);
    Ok(Path {
        path: parts.join("/"),
    })
}

fn start_worker(url: &str) -> (CancellationToken, JoinHandle<()>) {
    let worker = Worker::builder(url)
        .worker_id("stepper")
        .concurrency(4)
        .register::<Step, _, _>(run_step)
        .build()
        .expect("worker");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let _ = worker.run(token.cancelled_owned()).await;
    });
    (stop, task)
}

async fn ended(client: &Client, id: &str) -> jobwire::JobInfo {
    tokio::time::timeout(WAIT, async {
        loop {
            let info = client.get_job(id).await.expect("get job");
            if matches!(
                info.state(),
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            ) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the job ends in time")
}

#[tokio::test]
async fn a_chain_runs_in_order_and_each_step_reads_what_it_depended_on() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");

    // Enqueued before any worker runs, so nothing but the dependencies orders them.
    let a = client.enqueue(step("a")).await.expect("a");
    let b = client
        .enqueue(step("b"))
        .depends_on(a.id())
        .await
        .expect("b");
    let c = client
        .enqueue(step("c"))
        .depends_on(b.id())
        .await
        .expect("c");
    for waiting in [&b, &c] {
        let info = client.get_job(waiting.id().as_str()).await.expect("get");
        assert_eq!(info.state(), JobState::Pending);
    }
    let mut raw = jobs(&server.url()).await;
    let c_job = support::get(&mut raw, c.id().as_str()).await;
    assert_eq!(c_job.depends_on, vec![b.id().as_str().to_owned()]);
    assert_eq!(
        c_job.on_dependency_failure,
        pb::DependencyFailure::Cancel as i32
    );

    let (stop, task) = start_worker(&server.url());
    let out = c.wait().await.expect("c succeeds");
    assert_eq!(
        out.path, "a/b/c",
        "each step ran after, and read, the one before"
    );
    let (a, b, c) = (
        ended(&client, a.id().as_str()).await,
        ended(&client, b.id().as_str()).await,
        ended(&client, c.id().as_str()).await,
    );
    assert!(a.finished_at() <= b.started_at(), "b started after a ended");
    assert!(b.finished_at() <= c.started_at(), "c started after b ended");
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn a_failure_cancels_what_depends_on_it_down_the_chain_naming_it() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");

    let a = client
        .enqueue(Step {
            name: "a".into(),
            fail: true,
        })
        .await
        .expect("a");
    let b = client
        .enqueue(step("b"))
        .depends_on(a.id())
        .await
        .expect("b");
    let c = client
        .enqueue(step("c"))
        .depends_on(b.id())
        .await
        .expect("c");
    // Asked to run regardless: runs once a has ended, though it failed.
    let cleanup = client
        .enqueue(step("cleanup"))
        .depends_on(a.id())
        .run_if_dependencies_fail()
        .await
        .expect("cleanup");

    let (stop, task) = start_worker(&server.url());
    let a_info = ended(&client, a.id().as_str()).await;
    assert_eq!(a_info.state(), JobState::Failed);
    for (name, handle) in [("b", &b), ("c", &c)] {
        let info = ended(&client, handle.id().as_str()).await;
        assert_eq!(info.state(), JobState::Cancelled, "{name}");
        let reason = info.cancel_reason().unwrap_or_default();
        assert!(
            reason.contains(a.id().as_str()),
            "{name}'s reason names a: {reason:?}"
        );
        assert!(reason.contains("FAILED"), "{name}: {reason:?}");
        assert!(info.started_at().is_none(), "{name} never ran");
    }
    let b_reason = client.get_job(b.id().as_str()).await.expect("b");
    assert!(
        b_reason
            .cancel_reason()
            .is_some_and(|r| r.contains("a broke")),
        "b's reason says why a failed: {:?}",
        b_reason.cancel_reason()
    );
    let out = cleanup.wait().await.expect("cleanup runs regardless");
    assert_eq!(out.path, "cleanup", "a failed dependency has no result");

    // The cancel is an event a watcher sees, with the reason.
    let events = support::collect_job_events(&server.url(), c.id().as_str(), 0).await;
    let states: Vec<(i32, String)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::StateChanged(s)) => Some((s.state, s.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        states.first().map(|s| s.0),
        Some(pb::JobState::Pending as i32)
    );
    assert!(
        states.last().is_some_and(
            |(s, r)| *s == pb::JobState::Cancelled as i32 && r.contains(a.id().as_str())
        ),
        "{states:?}"
    );
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn cancelling_a_dependency_cancels_its_dependents() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let a = client
        .enqueue(step("a"))
        .delay(Duration::from_secs(3600))
        .await
        .expect("a");
    let b = client
        .enqueue(step("b"))
        .depends_on(a.id())
        .await
        .expect("b");
    a.cancel("not needed").await.expect("cancel a");
    let info = ended(&client, b.id().as_str()).await;
    assert_eq!(info.state(), JobState::Cancelled);
    let reason = info.cancel_reason().unwrap_or_default();
    assert!(
        reason.contains(a.id().as_str()) && reason.contains("not needed"),
        "{reason:?}"
    );
}

#[tokio::test]
async fn a_batch_orders_its_own_jobs_and_a_dependency_already_done_releases_at_once() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = Client::connect(server.url()).await.expect("client");
    let (stop, task) = start_worker(&server.url());
    let first = client.enqueue(step("first")).await.expect("first");
    first.wait().await.expect("first succeeds");

    let mut raw = jobs(&server.url()).await;
    let spec = |name: &str| pb::JobSpec {
        job_type: Step::JOB_TYPE.into(),
        payload: Some(prost_types::Any::from_msg(&step(name)).expect("encode")),
        ..Default::default()
    };
    // Listed last-first: only the indexes order them.
    let batch = raw
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![
                pb::JobSpec {
                    depends_on_index: vec![1],
                    ..spec("z")
                },
                pb::JobSpec {
                    depends_on_index: vec![2],
                    ..spec("y")
                },
                pb::JobSpec {
                    depends_on: vec![first.id().as_str().to_owned()],
                    ..spec("x")
                },
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    let last = &batch.jobs[0];
    assert_eq!(last.state, pb::JobState::Pending as i32);
    let info = ended(&client, &last.id).await;
    assert_eq!(info.state(), JobState::Succeeded);
    let path = info.result::<Step>().expect("decode").expect("a result");
    assert_eq!(path.path, "first/x/y/z");
    stop.cancel();
    task.await.expect("worker");
}

#[tokio::test]
async fn unknown_dependencies_cycles_and_other_tenants_jobs_are_refused_whole() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let mut raw = jobs(&server.url()).await;
    let spec = || support::spec("deps.any", "deps");

    let unknown = uuid::Uuid::now_v7().to_string();
    let refused = raw
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                depends_on: vec![unknown.clone()],
                ..spec()
            }),
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "job.depends_on[0]");

    let refused = raw
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                depends_on: vec!["not-a-uuid".into()],
                ..spec()
            }),
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "job.depends_on[0]");

    let refused = raw
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                depends_on_index: vec![0],
                ..spec()
            }),
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "job.depends_on_index");

    // A cycle of three, and a job waiting on itself.
    let refused = raw
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![
                pb::JobSpec {
                    depends_on_index: vec![2],
                    ..spec()
                },
                pb::JobSpec {
                    depends_on_index: vec![0],
                    ..spec()
                },
                pb::JobSpec {
                    depends_on_index: vec![1],
                    ..spec()
                },
            ],
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "depends_on_index");
    let refused = raw
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![
                spec(),
                pb::JobSpec {
                    depends_on_index: vec![1],
                    ..spec()
                },
            ],
        })
        .await;
    support::assert_status(
        refused,
        Code::InvalidArgument,
        "jobs[1].depends_on_index[0]",
    );

    // A job of another tenant is no dependency: refused as unknown, and the batch holding it
    // is written not at all.
    let mut request = tonic::Request::new(pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(spec()),
    });
    request
        .metadata_mut()
        .insert("jobwire-tenant", "other".parse().expect("header"));
    let theirs = raw
        .enqueue_job(request)
        .await
        .expect("other tenant's job")
        .into_inner()
        .job
        .expect("job");
    let refused = raw
        .enqueue_jobs(pb::EnqueueJobsRequest {
            parent: Default::default(),
            jobs: vec![
                spec(),
                pb::JobSpec {
                    depends_on: vec![theirs.id.clone()],
                    ..spec()
                },
            ],
        })
        .await;
    support::assert_status(refused, Code::InvalidArgument, "jobs[1].depends_on[0]");

    let listed = raw
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.jobs.is_empty(),
        "nothing was written: {:?}",
        listed.jobs
    );
}
