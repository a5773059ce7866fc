//! What a handler knows about the attempt it runs, and how it learns that it must stop.
//!
//! Stopping is cooperative: the worker runtime never kills a handler that is making progress.
//! It fires the context's cancellation when the server sends `StopJob` for the lease (the job
//! was cancelled, or its lease was lost), or when a graceful drain runs out of time. A handler
//! that ignores it keeps running, but its result will be refused by the server if the lease is
//! gone.
//!
//! The context is the handler's channel back to the worker: progress, log and checkpoint calls
//! will be added here and travel on the worker's stream.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::job::{self, JobId};
use crate::proto::v1 as pb;

/// Why a handler was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The job was cancelled; it will not run again.
    Cancelled,
    /// The lease lapsed or moved to another attempt; this attempt's result will be refused.
    LeaseLost,
    /// The worker is shutting down and its drain timeout passed; the job will be retried.
    Shutdown,
}

/// The attempt a handler runs: which job, which attempt, and whether to stop.
///
/// Cheap to clone; clones share the cancellation.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    job_id: JobId,
    attempt: u32,
    max_attempts: u32,
    job_type: String,
    queue: String,
    priority: i32,
    labels: HashMap<String, String>,
    created_at: Option<SystemTime>,
    worker_id: Arc<str>,
    stop: StopSignal,
}

impl JobContext {
    /// The context of the attempt a lease starts.
    pub(crate) fn new(lease: &pb::Lease, worker_id: Arc<str>, stop: StopSignal) -> Self {
        Self {
            inner: Arc::new(Inner {
                job_id: JobId::from(lease.job_id.clone()),
                attempt: job::count(lease.attempt),
                max_attempts: job::count(lease.max_attempts),
                job_type: lease.job_type.clone(),
                queue: lease.queue.clone(),
                priority: lease.priority,
                labels: lease.labels.clone(),
                created_at: job::system_time(lease.created_at.as_ref()),
                worker_id,
                stop,
            }),
        }
    }

    /// The job's id.
    pub fn job_id(&self) -> &JobId {
        &self.inner.job_id
    }

    /// This attempt's number, 1 for the first.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Attempts in all under the job's retry policy, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// Whether a retryable failure now would still be retried; a handler may, for instance,
    /// try harder or report differently on its last chance.
    pub fn is_last_attempt(&self) -> bool {
        self.inner.attempt >= self.inner.max_attempts
    }

    /// The job type's name.
    pub fn job_type(&self) -> &str {
        &self.inner.job_type
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The job's priority, 0 to 100.
    pub fn priority(&self) -> i32 {
        self.inner.priority
    }

    /// The job's labels.
    pub fn labels(&self) -> &HashMap<String, String> {
        &self.inner.labels
    }

    /// When the job was enqueued.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.inner.created_at
    }

    /// The id of the worker running the attempt.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Whether the handler has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.stop.token.is_cancelled()
    }

    /// Resolves once the handler is asked to stop; race it against the work with
    /// `tokio::select!`. The future owns what it needs, so it can move into spawned tasks.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.stop.token.clone().cancelled_owned()
    }

    /// Why the handler was asked to stop, once it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.stop.reason.get().copied()
    }
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.inner.job_id)
            .field("attempt", &self.inner.attempt)
            .field("job_type", &self.inner.job_type)
            .field("queue", &self.inner.queue)
            .field("stop_reason", &self.stop_reason())
            .finish_non_exhaustive()
    }
}

/// The worker's side of a context's cancellation: the reason is recorded before the token
/// fires, so a handler that wakes up on it always finds the reason.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl StopSignal {
    /// Asks the handler to stop; the first reason given is the one kept.
    pub(crate) fn stop(&self, reason: StopReason) {
        // A second stop keeps the first reason: that is the one the handler may have acted on.
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> pb::Lease {
        pb::Lease {
            job_id: "j1".into(),
            attempt: 2,
            job_type: "test.ping".into(),
            queue: "default".into(),
            max_attempts: 2,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn stopping_records_the_first_reason_and_fires_the_future() {
        let stop = StopSignal::default();
        let ctx = JobContext::new(&lease(), Arc::from("w1"), stop.clone());
        assert!(!ctx.is_cancelled());
        assert_eq!(ctx.stop_reason(), None);
        let cancelled = ctx.cancelled();

        stop.stop(StopReason::Cancelled);
        stop.stop(StopReason::Shutdown);
        cancelled.await;
        assert!(ctx.is_cancelled());
        assert_eq!(ctx.stop_reason(), Some(StopReason::Cancelled));
    }

    #[test]
    fn lease_fields_reach_the_context() {
        let ctx = JobContext::new(&lease(), Arc::from("w1"), StopSignal::default());
        assert_eq!(ctx.job_id().as_str(), "j1");
        assert_eq!(ctx.attempt(), 2);
        assert!(ctx.is_last_attempt());
        assert_eq!(ctx.job_type(), "test.ping");
        assert_eq!(ctx.worker_id(), "w1");
    }
}
