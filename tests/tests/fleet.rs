//! The worker fleet seen and steered from the server, and a queue's health: ListWorkers shows
//! the workers connected to every replica with their slots and the leases they hold,
//! DrainWorker makes one finish what it runs, take nothing new and disconnect (on whichever
//! replica it is connected) while the others work on, a tenant sees and drains only its own
//! workers, and a queue whose oldest available job waits past a threshold says so.
//!
//! The jobs are [`Sleep`] jobs whose handlers block on a gate of their worker's until the test
//! releases them, so a test reads the fleet while it is busy and decides when each job ends:
//! nothing here waits on wall time.

use std::sync::Arc;
use std::time::Duration;

use jobwire::{Client, JobContext, Worker, tonic::Code};
use jobwire_proto::v1::{self as pb, worker_service_client::WorkerServiceClient};
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::{Sleep, SleepOutput},
    test_db,
};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long anything awaited may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// A worker in the test process whose handlers each wait for a permit of its gate, and say
/// (worker id, job seq) as they start.
struct GatedWorker {
    gate: Arc<Semaphore>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), jobwire::Error>>,
}

impl GatedWorker {
    fn spawn(
        url: &str,
        tenant: &str,
        id: &str,
        slots: usize,
        started: mpsc::UnboundedSender<(String, u64)>,
    ) -> Self {
        let gate = Arc::new(Semaphore::new(0));
        let name = id.to_owned();
        let handler_gate = Arc::clone(&gate);
        let worker = Worker::builder(url)
            .tenant(tenant)
            .worker_id(id)
            .concurrency(slots)
            .drain_timeout(WAIT)
            .register::<Sleep, _, _>(move |_ctx: JobContext, job: Sleep| {
                let (name, gate, started) =
                    (name.clone(), Arc::clone(&handler_gate), started.clone());
                async move {
                    let _ = started.send((name.clone(), job.seq));
                    gate.acquire().await.expect("the gate stays open").forget();
                    Ok(SleepOutput {
                        seq: job.seq,
                        attempt: 1,
                        worker: name,
                    })
                }
            })
            .build()
            .expect("worker builds");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { worker.run(token.cancelled_owned()).await });
        Self { gate, stop, task }
    }

    /// Lets `n` of its handlers finish.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Waits for the worker's `run` to return by itself (a drain the server asked for).
    async fn ended(self) -> Result<(), jobwire::Error> {
        let _guard = self.stop.drop_guard();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker's run returned")
            .expect("the worker task did not panic")
    }

    /// Drains it from this side and waits for it.
    async fn stop(self) {
        self.release(1000);
        self.stop.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

async fn client(url: &str, tenant: &str) -> Client {
    Client::builder(url)
        .tenant(tenant)
        .connect()
        .await
        .expect("client")
}

async fn list_workers(client: &Client) -> Result<Vec<pb::Worker>, tonic::Status> {
    let mut service = WorkerServiceClient::new(client.channel());
    let response = service
        .list_workers(client.request(pb::ListWorkersRequest::default()))
        .await?;
    Ok(response.into_inner().workers)
}

async fn drain(client: &Client, worker_id: &str) -> Result<Vec<pb::Worker>, tonic::Status> {
    let mut service = WorkerServiceClient::new(client.channel());
    let response = service
        .drain_worker(client.request(pb::DrainWorkerRequest {
            worker_id: worker_id.to_owned(),
        }))
        .await?;
    Ok(response.into_inner().workers)
}

/// The next `n` handler starts.
async fn starts(rx: &mut mpsc::UnboundedReceiver<(String, u64)>, n: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let start = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a handler started")
            .expect("the workers are alive");
        out.push(start);
    }
    out
}

#[tokio::test]
async fn list_workers_shows_the_fleet_and_drain_worker_stops_one_while_the_other_works_on() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let producer = client(&url, "acme").await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let a = GatedWorker::spawn(&url, "acme", "fleet-a", 2, started_tx.clone());
    let b = GatedWorker::spawn(&url, "acme", "fleet-b", 2, started_tx.clone());

    let mut handles = Vec::new();
    for seq in 0..4 {
        handles.push(
            producer
                .enqueue(Sleep::succeeding(0, seq))
                .send()
                .await
                .expect("enqueued"),
        );
    }
    let first = starts(&mut started, 4).await;
    for worker in ["fleet-a", "fleet-b"] {
        assert_eq!(
            first.iter().filter(|(w, _)| w == worker).count(),
            2,
            "each worker's two slots are busy: {first:?}"
        );
    }

    // Both are listed, busy: every slot holds a lease.
    let workers = eventually("both workers listed with their leases", WAIT, || async {
        let workers = list_workers(&producer).await.expect("ListWorkers");
        (workers.len() == 2 && workers.iter().all(|w| w.leases_held == 2)).then_some(workers)
    })
    .await;
    let mut ids: Vec<&str> = workers.iter().map(|w| w.worker_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["fleet-a", "fleet-b"]);
    for worker in &workers {
        assert_eq!((worker.slots, worker.free_slots), (2, 0), "{worker:?}");
        assert_eq!(worker.job_types, ["test.sleep"], "{worker:?}");
        assert_eq!(worker.queues, ["default"], "{worker:?}");
        assert!(
            worker.version.starts_with("jobwire-rust/"),
            "the SDK says what it is: {worker:?}"
        );
        assert!(!worker.host.is_empty(), "{worker:?}");
        assert!(
            worker
                .replica
                .ends_with(&format!(":{}", server.addr().port())),
            "{worker:?}"
        );
        assert!(!worker.draining);
        assert!(worker.connected_at.is_some() && worker.last_heartbeat_at.is_some());
        assert!(uuid::Uuid::parse_str(&worker.stream_id).is_ok());
    }

    // Drain a: it is told, and takes nothing new even once its own jobs are done.
    let drained = drain(&producer, "fleet-a").await.expect("DrainWorker");
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0].worker_id, "fleet-a");
    assert!(drained[0].draining);
    for seq in 4..6 {
        handles.push(
            producer
                .enqueue(Sleep::succeeding(0, seq))
                .send()
                .await
                .expect("enqueued"),
        );
    }
    a.release(2);
    a.ended().await.expect("fleet-a drained cleanly");
    // The drained worker's jobs succeeded, by its hand.
    let mut a_seqs: Vec<u64> = first
        .iter()
        .filter(|(w, _)| w == "fleet-a")
        .map(|(_, seq)| *seq)
        .collect();
    a_seqs.sort_unstable();
    for seq in &a_seqs {
        let output = tokio::time::timeout(WAIT, handles[*seq as usize].wait())
            .await
            .expect("a's job ended")
            .expect("a's job succeeded");
        assert_eq!(output.worker, "fleet-a");
    }
    let listed = eventually("the drained worker gone from the list", WAIT, || async {
        let workers = list_workers(&producer).await.expect("ListWorkers");
        (workers.len() == 1).then_some(workers)
    })
    .await;
    assert_eq!(listed[0].worker_id, "fleet-b");

    // b works on: its two jobs and the two a never took.
    b.release(4);
    for handle in &handles {
        tokio::time::timeout(WAIT, handle.wait())
            .await
            .expect("every job ended")
            .expect("every job succeeded");
    }
    let later = starts(&mut started, 2).await;
    assert!(
        later.iter().all(|(w, seq)| w == "fleet-b" && *seq >= 4),
        "the jobs enqueued after the drain ran on b alone: {later:?}"
    );
    assert!(started.try_recv().is_err(), "nothing else started anywhere");
    b.stop().await;
}

#[tokio::test]
async fn a_worker_on_another_replica_is_listed_and_drained_through_the_first() {
    let db = test_db().await;
    let first = ServerProcess::start(&db, &[]).await;
    let second = ServerProcess::start(&db, &[]).await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let far = GatedWorker::spawn(&second.url(), "acme", "far-worker", 1, started_tx);
    let near = client(&first.url(), "acme").await;

    let handle = near
        .enqueue(Sleep::succeeding(0, 7))
        .send()
        .await
        .expect("enqueued");
    assert_eq!(
        starts(&mut started, 1).await,
        [("far-worker".to_owned(), 7)]
    );
    let workers = eventually(
        "the far worker listed by the first replica",
        WAIT,
        || async {
            let workers = list_workers(&near).await.expect("ListWorkers");
            (workers.len() == 1 && workers[0].leases_held == 1).then_some(workers)
        },
    )
    .await;
    let worker = &workers[0];
    assert_eq!(worker.worker_id, "far-worker");
    assert_eq!((worker.slots, worker.free_slots), (1, 0));
    assert!(
        worker
            .replica
            .ends_with(&format!(":{}", second.addr().port())),
        "it is connected to the second replica: {worker:?}"
    );

    let drained = drain(&near, "far-worker")
        .await
        .expect("DrainWorker through the first replica");
    assert_eq!(drained.len(), 1);
    // The second replica tells its worker: the drain is on before the job ends.
    eventually("the far worker draining", WAIT, || async {
        let workers = list_workers(&near).await.expect("ListWorkers");
        workers.iter().all(|w| w.draining).then_some(())
    })
    .await;
    far.release(1);
    far.ended().await.expect("the far worker drained cleanly");
    let output = tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("the job ended")
        .expect("the job succeeded");
    assert_eq!(output.worker, "far-worker");
    eventually("no worker listed", WAIT, || async {
        list_workers(&near)
            .await
            .expect("ListWorkers")
            .is_empty()
            .then_some(())
    })
    .await;

    // A worker no one connects under is not found.
    let status = drain(&near, "far-worker").await.expect_err("gone");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = drain(&near, "").await.expect_err("no id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn a_tenant_sees_and_drains_only_its_own_workers() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = GatedWorker::spawn(&url, "acme", "acme-worker", 1, started_tx);
    let acme = client(&url, "acme").await;
    let globex = client(&url, "globex").await;
    let handle = acme
        .enqueue(Sleep::succeeding(0, 1))
        .send()
        .await
        .expect("enqueued");
    starts(&mut started, 1).await;
    eventually("acme's worker listed", WAIT, || async {
        (list_workers(&acme).await.expect("ListWorkers").len() == 1).then_some(())
    })
    .await;

    assert!(
        list_workers(&globex).await.expect("ListWorkers").is_empty(),
        "globex sees none of acme's workers"
    );
    let status = drain(&globex, "acme-worker")
        .await
        .expect_err("globex cannot drain acme's worker");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let listed = list_workers(&acme).await.expect("ListWorkers");
    assert!(!listed[0].draining, "acme's worker was not touched");

    // It still works: its job ends when released, and it stays connected.
    worker.release(1);
    tokio::time::timeout(WAIT, handle.wait())
        .await
        .expect("the job ended")
        .expect("the job succeeded");
    assert_eq!(list_workers(&acme).await.expect("ListWorkers").len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_queue_crossing_its_oldest_age_threshold_reports_its_health() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let client = client(&server.url(), "acme").await;
    let queue = client.queue("reports");
    let set = queue
        .update()
        .warn_after(Some(Duration::from_secs(3600)))
        .critical_after(Some(Duration::from_secs(3 * 3600)))
        .create_if_missing()
        .send()
        .await
        .expect("thresholds set");
    assert_eq!(set.warn_after(), Some(Duration::from_secs(3600)));
    assert_eq!(set.critical_after(), Some(Duration::from_secs(3 * 3600)));
    assert_eq!(set.health(), jobwire::QueueHealth::Ok, "an empty queue");
    assert_eq!(set.backlog(), 0);

    let job = client
        .enqueue(Sleep::succeeding(0, 1))
        .queue("reports")
        .send()
        .await
        .expect("enqueued");
    let fresh = queue.get().await.expect("queue");
    assert_eq!(fresh.backlog(), 1);
    assert_eq!(fresh.health(), jobwire::QueueHealth::Ok, "a fresh job");

    // The job has waited two hours: past the warning, short of critical.
    let pool = db.pool().await;
    sqlx::query("UPDATE jobs SET run_at = now() - interval '2 hours' WHERE id = $1::uuid")
        .bind(job.id().to_string())
        .execute(&pool)
        .await
        .expect("aged");
    let aged = queue.get().await.expect("queue");
    assert!(aged.oldest_available_age() >= Some(Duration::from_secs(7200)));
    assert_eq!(aged.health(), jobwire::QueueHealth::Warning);

    // A tighter critical threshold crosses it; the list says the same.
    let critical = queue
        .update()
        .critical_after(Some(Duration::from_secs(5400)))
        .send()
        .await
        .expect("tightened");
    assert_eq!(critical.health(), jobwire::QueueHealth::Critical);
    let listed = client.list_queues().await.expect("queues");
    let reports = listed
        .iter()
        .find(|q| q.name() == "reports")
        .expect("listed");
    assert_eq!(reports.health(), jobwire::QueueHealth::Critical);
    assert_eq!(reports.backlog(), 1);

    // Without thresholds nothing is judged late.
    let cleared = queue
        .update()
        .warn_after(None)
        .critical_after(None)
        .send()
        .await
        .expect("cleared");
    assert_eq!(cleared.health(), jobwire::QueueHealth::Ok);
    assert_eq!(cleared.warn_after(), None);

    // Out of range: refused, naming the field.
    let refused = queue
        .update()
        .warn_after(Some(Duration::from_millis(10)))
        .send()
        .await
        .expect_err("below a second");
    assert!(
        format!("{refused:?}").contains("queue.warn_after"),
        "{refused:?}"
    );
}
