//! SDK workers running [`Sleep`] jobs inside the test process, so a test can count what its
//! handlers see (who ran what, how many at once) while the server decides what runs where.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use jobwire::{JobContext, Worker};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::jobs::{self, Sleep};

/// Handlers running right now, and the most ever seen at once.
#[derive(Debug, Default)]
pub struct Gauge {
    current: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    fn enter(self: &Arc<Self>) -> GaugeGuard {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        GaugeGuard(Arc::clone(self))
    }
}

struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker to spawn: its server, name, slots, queues, and an optional [`Gauge`].
#[derive(Debug, Clone)]
pub struct SleepWorker {
    url: String,
    id: String,
    concurrency: usize,
    prefetch: usize,
    queues: Vec<String>,
    gauge: Option<Arc<Gauge>>,
}

/// A spawned worker; [`stop`](Self::stop) drains it.
#[derive(Debug)]
pub struct RunningWorker {
    stop: CancellationToken,
    task: JoinHandle<Result<(), jobwire::Error>>,
}

impl SleepWorker {
    pub fn new(url: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            id: id.into(),
            concurrency: 1,
            prefetch: 0,
            queues: Vec::new(),
            gauge: None,
        }
    }

    pub fn concurrency(mut self, slots: usize) -> Self {
        self.concurrency = slots;
        self
    }

    /// Leases held beyond the slots (`Worker::prefetch`).
    pub fn prefetch(mut self, leases: usize) -> Self {
        self.prefetch = leases;
        self
    }

    /// The queues served (the SDK's default queue when none are given).
    pub fn queues(mut self, queues: &[&str]) -> Self {
        self.queues = queues.iter().map(|q| (*q).to_owned()).collect();
        self
    }

    pub fn gauge(mut self, gauge: Arc<Gauge>) -> Self {
        self.gauge = Some(gauge);
        self
    }

    pub fn spawn(self) -> RunningWorker {
        let name = self.id.clone();
        let gauge = self.gauge.clone();
        let mut builder = Worker::builder(self.url)
            .worker_id(self.id)
            .concurrency(self.concurrency)
            .prefetch(self.prefetch)
            .drain_timeout(Duration::from_secs(5));
        if !self.queues.is_empty() {
            builder = builder.queues(self.queues);
        }
        let worker = builder
            .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
                let name = name.clone();
                let guard = gauge.as_ref().map(Gauge::enter);
                async move {
                    let out = jobs::run_sleep(ctx, job, name).await;
                    drop(guard);
                    out
                }
            })
            .build()
            .expect("worker builds");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { worker.run(token.cancelled_owned()).await });
        RunningWorker { stop, task }
    }
}

impl RunningWorker {
    /// Drains the worker and returns how its run ended (a drain may time out when the server
    /// went away first, which some tests expect).
    pub async fn stop(self) -> Result<(), jobwire::Error> {
        self.stop.cancel();
        self.task.await.expect("the worker task panicked")
    }
}
