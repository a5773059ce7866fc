//! Runs handlers: one task per lease on a [`JoinSet`], never more than the worker's slots.
//!
//! Leases that arrive while every slot is busy wait in the prefetch queue, up to its size, and
//! start the moment a task is reaped, without the round trip a lease from the server would
//! take. A queued lease's attempt has already started on the server, so the session hands back
//! those that wait longer than it allows, and those stopped before they started.
//!
//! The executor owns every handler task, so none is detached: dropping it aborts whatever still
//! runs. A panicking handler ends its task, not the worker; the runtime's `JoinError` is turned
//! into a retryable failure for that lease. Tasks outlive any one stream to the server, which is
//! why the executor belongs to the worker and not to a connection.
//!
//! The executor also decides what a stopped attempt reports: a handler stopped by a cancel, a
//! pause or its timeout that returns an error fails with the kind `cancelled`, `paused` or
//! `timeout` (retryable: the server settles the job by the stop's reason); one that returns a
//! result completes as usual. A lease's deadline is watched inside its own task, so a timeout
//! needs no task of its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost_types::Any;
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::Client;
use crate::context::{JobContext, StopReason, StopSignal};
use crate::error::HandlerError;
use crate::job;
use crate::proto::v1 as pb;
use crate::worker::queue::{LeaseQueue, Queued, lease_ref};
use crate::worker::registry::{ErasedHandler, Registry};
use crate::worker::reports::{Final, LeaseReports, Links};

/// A lease that is running.
struct InFlight {
    job_type: String,
    stop: StopSignal,
    reports: Arc<LeaseReports>,
    /// The server no longer honours the lease: it is not renewed any more.
    lost: bool,
}

/// What asking a handler to stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stopping {
    /// The lease does not run here.
    NotRunning,
    /// The lease was queued: it was taken off the queue without starting, to be handed back.
    Unstarted,
    /// The handler was asked to stop.
    Asked,
    /// The handler had been asked before (its first reason stands), as when the server repeats
    /// a stop with every heartbeat.
    AlreadyAsked,
}

/// A handler that returned (or panicked), with the lease it ran.
#[derive(Debug)]
pub(super) struct Finished {
    pub(super) lease: pb::LeaseRef,
    pub(super) job_type: String,
    /// What to report, after the stop's reason (if any) was taken into account.
    pub(super) outcome: Result<Any, HandlerError>,
    /// What was left of the lease's reports, to send before the result.
    pub(super) left: Final,
    /// The handler was stopped because the attempt ran past its deadline.
    pub(super) timed_out: bool,
}

/// A lease the worker will not run, and the failure to report for it.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) lease: pb::LeaseRef,
    pub(super) job_type: String,
    pub(super) error: HandlerError,
}

/// The handler tasks of one worker.
pub(super) struct Executor {
    registry: Registry,
    worker_id: Arc<str>,
    /// The worker's connection as a client, handed to each context to read other jobs.
    client: Option<Client>,
    /// Where each lease's progress, logs and checkpoints go.
    links: Links,
    /// The most handlers that may run at once.
    slots: usize,
    /// The most leases that may wait for a slot.
    prefetch: usize,
    /// Leases waiting for a slot.
    queued: LeaseQueue,
    tasks: JoinSet<Result<Any, HandlerError>>,
    /// Every lease whose task has not been reaped yet.
    leases: HashMap<pb::LeaseRef, InFlight>,
    /// Which lease each task runs; a panicked task tells only its id.
    by_task: HashMap<task::Id, pb::LeaseRef>,
    /// Leases whose handlers started since the server was last told.
    started: Vec<pb::LeaseRef>,
}

impl Executor {
    pub(super) fn new(
        registry: Registry,
        worker_id: Arc<str>,
        (slots, prefetch): (usize, usize),
        links: Links,
    ) -> Self {
        Self {
            registry,
            worker_id,
            client: None,
            links,
            slots,
            prefetch,
            queued: LeaseQueue::default(),
            tasks: JoinSet::new(),
            leases: HashMap::new(),
            by_task: HashMap::new(),
            started: Vec::new(),
        }
    }

    /// Starts the handler of `lease` on its own task, or queues it while every slot is busy, or
    /// says why it will not run (boxed: a refusal is rare and large).
    pub(super) fn start(&mut self, lease: pb::Lease) -> Result<(), Box<Refusal>> {
        let lease_ref = lease_ref(&lease);
        let refuse = |error: HandlerError| {
            Box::new(Refusal {
                lease: lease_ref.clone(),
                job_type: lease.job_type.clone(),
                error,
            })
        };
        let Some(handler) = self.registry.get(&lease.job_type) else {
            return Err(refuse(
                HandlerError::retryable(format!(
                    "no handler registered for type {} on this worker",
                    lease.job_type
                ))
                .with_kind("unknown_job_type"),
            ));
        };
        if self.leases.contains_key(&lease_ref) || self.queued.contains(&lease_ref) {
            // The same attempt again (never expected): the run in progress will report it, and
            // a failure sent for the duplicate would end that run's attempt under its feet.
            tracing::warn!(
                job_id = %lease_ref.job_id,
                attempt = lease_ref.attempt,
                "ignoring a lease for an attempt that already runs here"
            );
            return Ok(());
        }
        if self.leases.len() < self.slots {
            self.spawn(lease, handler);
            return Ok(());
        }
        if self.queued.len() < self.prefetch {
            tracing::debug!(job_id = %lease_ref.job_id, attempt = lease_ref.attempt, "lease queued");
            let now = Instant::now();
            let held = lease
                .held
                .and_then(|held| Duration::try_from(held).ok())
                .unwrap_or_default();
            self.queued.push(Queued {
                lease,
                handler,
                since: now.checked_sub(held).unwrap_or(now),
            });
            return Ok(());
        }
        Err(refuse(
            HandlerError::retryable(format!(
                "worker {} has no free slot ({} of {} busy, {} queued); the lease was refused",
                self.worker_id,
                self.leases.len(),
                self.slots,
                self.queued.len()
            ))
            .with_kind("worker_full")
            .with_retry_after(Duration::ZERO),
        ))
    }

    /// Lets handlers read other jobs (their dependencies) through `client`.
    pub(super) fn with_client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    fn spawn(&mut self, lease: pb::Lease, handler: ErasedHandler) {
        let lease_ref = lease_ref(&lease);
        let stop = StopSignal::default();
        let reports = self.links.attach(lease_ref.clone());
        let shared = reports.shared();
        let ctx = JobContext::new(&lease, Arc::clone(&self.worker_id), stop.clone(), reports)
            .with_client(self.client.clone());
        let deadline = job::system_time(lease.deadline.as_ref());
        let timer = stop.clone();
        let span = tracing::info_span!(
            "job",
            job_id = %lease.job_id,
            attempt = lease.attempt,
            job_type = %lease.job_type,
            worker = %self.worker_id,
        );
        crate::trace::adopt(&span, &lease);
        let payload = lease.payload.unwrap_or_default();
        // The handler is called inside the task, so a panic even before its first await is
        // caught by the task and not by the worker's loop.
        let task = self.tasks.spawn(
            async move { until_deadline(handler.call(ctx, payload), deadline, timer).await }
                .instrument(span),
        );
        tracing::debug!(job_id = %lease_ref.job_id, attempt = lease_ref.attempt, "handler started");
        self.started.push(lease_ref.clone());
        self.by_task.insert(task.id(), lease_ref.clone());
        self.leases.insert(
            lease_ref,
            InFlight {
                job_type: lease.job_type,
                stop,
                reports: shared,
                lost: false,
            },
        );
    }

    /// The leases whose handlers started since the last call, for the server to count their
    /// attempts (see `Hello.reports_started`).
    pub(super) fn take_started(&mut self) -> Vec<pb::LeaseRef> {
        std::mem::take(&mut self.started)
    }

    /// Starts queued leases on the slots free.
    fn start_queued(&mut self) {
        while self.leases.len() < self.slots {
            let Some(Queued { lease, handler, .. }) = self.queued.pop_front() else {
                return;
            };
            self.spawn(lease, handler);
        }
    }

    /// Takes off the queue the leases that have waited `max_wait` or longer, to hand back.
    pub(super) fn take_stale(&mut self, max_wait: Duration) -> Vec<pb::LeaseRef> {
        let now = Instant::now();
        let Some(cutoff) = now.checked_sub(max_wait) else {
            return Vec::new();
        };
        refs(self.queued.take_begun_by(cutoff))
    }

    /// When the oldest queued lease will have waited `max_wait`.
    pub(super) fn stale_at(&self, max_wait: Duration) -> Option<Instant> {
        self.queued.oldest().map(|since| since + max_wait)
    }

    /// Takes every queued lease off the queue, to hand back.
    pub(super) fn take_queued(&mut self) -> Vec<pb::LeaseRef> {
        refs(self.queued.take_where(|_| true))
    }

    /// Takes the queued leases of `queue` off the queue, to hand back.
    pub(super) fn take_queued_of(&mut self, queue: &str) -> Vec<pb::LeaseRef> {
        refs(self.queued.take_where(|q| q.lease.queue == queue))
    }

    /// The next handler to finish; pending while none runs. Cancel-safe: a result is only taken
    /// from the task set when it is returned.
    pub(super) async fn next_finished(&mut self) -> Finished {
        loop {
            let Some(joined) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            if let Some(finished) = self.settle(joined) {
                return finished;
            }
        }
    }

    /// A handler that already finished, if any, without waiting.
    pub(super) fn try_next_finished(&mut self) -> Option<Finished> {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            if let Some(finished) = self.settle(joined) {
                return Some(finished);
            }
        }
        None
    }

    /// Asks the handler of `lease` to stop. A lost lease is no longer renewed and its reports
    /// are closed: the server would refuse them.
    pub(super) fn stop(&mut self, lease: &pb::LeaseRef, reason: StopReason) -> Stopping {
        let Some(running) = self.leases.get_mut(lease) else {
            return match self.queued.remove(lease) {
                Some(_) => Stopping::Unstarted,
                None => Stopping::NotRunning,
            };
        };
        if reason == StopReason::LeaseLost {
            running.lost = true;
            running.reports.lose();
        }
        if running.stop.stop(reason) {
            Stopping::Asked
        } else {
            Stopping::AlreadyAsked
        }
    }

    /// Asks every handler to stop.
    pub(super) fn stop_all(&mut self, reason: StopReason) {
        for running in self.leases.values() {
            running.stop.stop(reason);
        }
    }

    /// The leases to renew: every queued one and every running one that is not lost. A handler
    /// asked to stop keeps its lease while it winds down (a pausing one still saves its
    /// checkpoint); the server bounds that with its own grace, and the result then settles the
    /// job.
    pub(super) fn live_leases(&self) -> Vec<pb::LeaseRef> {
        let mut live: Vec<pb::LeaseRef> = self
            .leases
            .iter()
            .filter(|(_, running)| !running.lost)
            .map(|(lease, _)| lease.clone())
            .chain(self.queued.leases().map(lease_ref))
            .collect();
        live.sort_unstable_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
        live
    }

    /// How many handlers run (including those asked to stop that have not returned).
    pub(super) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Nothing runs and nothing is queued.
    pub(super) fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.queued.is_empty()
    }

    /// How many leases wait for a slot.
    pub(super) fn queued(&self) -> usize {
        self.queued.len()
    }

    pub(super) fn slots(&self) -> usize {
        self.slots
    }

    pub(super) fn prefetch(&self) -> usize {
        self.prefetch
    }

    pub(super) fn job_types(&self) -> Vec<String> {
        self.registry.job_types()
    }

    pub(super) fn job_schemas(&self) -> Vec<crate::proto::v1::JobType> {
        self.registry.schemas()
    }

    /// Pairs a joined task with its lease, and gives its slot to the next queued lease.
    fn settle(
        &mut self,
        joined: Result<(task::Id, Result<Any, HandlerError>), JoinError>,
    ) -> Option<Finished> {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, outcome),
            Err(err) => (err.id(), Err(join_failure(err))),
        };
        let lease = self.by_task.remove(&id)?;
        let running = self.leases.remove(&lease)?;
        self.start_queued();
        let reason = running.stop.reason();
        Some(Finished {
            lease,
            job_type: running.job_type,
            outcome: after_stop(outcome, reason),
            left: running.reports.finish(),
            timed_out: reason == Some(StopReason::TimedOut),
        })
    }
}

fn refs(queued: Vec<Queued>) -> Vec<pb::LeaseRef> {
    queued.iter().map(|q| lease_ref(&q.lease)).collect()
}

/// Runs `handler`, firing its cancellation with [`StopReason::TimedOut`] at `deadline` (a time
/// of the server's, read by the worker's clock) and then letting it return.
async fn until_deadline<F: Future>(
    handler: F,
    deadline: Option<SystemTime>,
    stop: StopSignal,
) -> F::Output {
    let Some(deadline) = deadline else {
        return handler.await;
    };
    // A deadline already past fires at once.
    let remaining = deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::pin!(handler);
    tokio::select! {
        output = &mut handler => output,
        () = tokio::time::sleep(remaining) => {
            stop.stop(StopReason::TimedOut);
            handler.await
        }
    }
}

/// What a handler's outcome reports once its stop's reason is known. A result stands (the
/// server decides what a result after a stop means); a failure after a cancel, pause or
/// timeout is named for it and retryable, so the server settles the job by the stop's reason
/// rather than by the handler's view of the error.
fn after_stop(
    outcome: Result<Any, HandlerError>,
    reason: Option<StopReason>,
) -> Result<Any, HandlerError> {
    let Err(error) = outcome else {
        return outcome;
    };
    let Some((reason, kind)) = reason.and_then(|r| r.failure_kind().map(|kind| (r, kind))) else {
        return Err(error);
    };
    let message = if error.message().is_empty() {
        format!("stopped: {reason}")
    } else {
        error.message().to_owned()
    };
    let stopped = HandlerError::retryable(message).with_kind(kind);
    Err(match error.retry_after() {
        Some(delay) => stopped.with_retry_after(delay),
        None => stopped,
    })
}

/// The failure to report for a task that did not return: a panic, or an abort.
fn join_failure(err: JoinError) -> HandlerError {
    if err.is_panic() {
        let panic = err.into_panic();
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".to_owned());
        HandlerError::retryable(format!("handler panicked: {message}")).with_kind("panic")
    } else {
        HandlerError::retryable("handler task was aborted").with_kind("aborted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobType;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Work {
        #[prost(string, tag = "1")]
        mode: String,
    }

    impl prost::Name for Work {
        const NAME: &'static str = "Work";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Work {
        const JOB_TYPE: &'static str = "test.work";
        type Output = ();
    }

    /// A handler that does what its payload says: "ok", "panic", "wait" for cancellation and
    /// fail, "finish" its work despite a cancellation, or "report" progress and a line.
    fn executor(slots: usize, prefetch: usize) -> Executor {
        let mut registry = Registry::default();
        registry.insert::<Work, _, _>(|ctx: JobContext, work: Work| async move {
            match work.mode.as_str() {
                "panic" => panic!("boom"),
                "wait" => {
                    ctx.cancelled().await;
                    Err(HandlerError::fatal(""))
                }
                "finish" => {
                    ctx.cancelled().await;
                    Ok(())
                }
                "report" => {
                    ctx.progress(crate::Progress::items(1, 2));
                    ctx.progress(crate::Progress::items(2, 2));
                    ctx.info("done");
                    Ok(())
                }
                _ => Ok(()),
            }
        });
        let (links, _hub, _checkpoints) = Links::new();
        Executor::new(registry, Arc::from("w1"), (slots, prefetch), links)
    }

    fn lease(job_id: &str, job_type: &str, mode: &str) -> pb::Lease {
        pb::Lease {
            job_id: job_id.into(),
            attempt: 1,
            job_type: job_type.into(),
            payload: Some(Any::from_msg(&Work { mode: mode.into() }).expect("encode")),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_finished_handler_frees_its_slot() {
        let mut executor = executor(1, 0);
        executor
            .start(lease("j1", "test.work", "ok"))
            .expect("starts");
        assert_eq!(executor.len(), 1);
        let finished = executor.next_finished().await;
        assert_eq!(finished.lease.job_id, "j1");
        assert!(finished.outcome.is_ok());
        assert!(executor.is_empty());
    }

    #[tokio::test]
    async fn a_panic_becomes_a_retryable_failure() {
        let mut executor = executor(1, 0);
        executor
            .start(lease("j1", "test.work", "panic"))
            .expect("starts");
        let finished = executor.next_finished().await;
        let error = finished.outcome.expect_err("panicked");
        assert!(error.is_retryable());
        assert_eq!(error.message(), "handler panicked: boom");
        assert!(executor.is_empty());
    }

    #[tokio::test]
    async fn leases_beyond_the_slots_or_of_unknown_types_are_refused() {
        let mut executor = executor(1, 0);
        executor
            .start(lease("j1", "test.work", "wait"))
            .expect("starts");

        let refusal = executor
            .start(lease("j2", "test.work", "ok"))
            .expect_err("no free slot");
        assert_eq!(refusal.lease.job_id, "j2");
        assert!(refusal.error.is_retryable());
        assert_eq!(refusal.error.retry_after(), Some(Duration::ZERO));

        let refusal = executor
            .start(lease("j3", "test.other", "ok"))
            .expect_err("unknown type");
        assert_eq!(
            refusal.error.message(),
            "no handler registered for type test.other on this worker"
        );
        assert!(refusal.error.is_retryable());
        assert_eq!(executor.len(), 1);
    }

    fn lease_ref(job_id: &str) -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: job_id.into(),
            attempt: 1,
        }
    }

    fn job_ids(leases: &[pb::LeaseRef]) -> Vec<&str> {
        leases.iter().map(|l| l.job_id.as_str()).collect()
    }

    /// An executor with one slot, busy with a handler that waits to be stopped (`j1`), and
    /// `queued` leases behind it (`j2`, `j3`, ...).
    fn busy(prefetch: usize, queued: usize) -> Executor {
        let mut executor = executor(1, prefetch);
        for n in 1..=queued + 1 {
            let mode = if n == 1 { "wait" } else { "ok" };
            executor
                .start(lease(&format!("j{n}"), "test.work", mode))
                .expect("started or queued");
        }
        executor
    }

    #[tokio::test]
    async fn leases_beyond_the_slots_wait_in_the_queue_and_start_as_a_slot_frees() {
        let mut executor = busy(2, 2);
        let refusal = executor
            .start(lease("j4", "test.work", "ok"))
            .expect_err("slot and queue full");
        assert_eq!(refusal.error.kind(), Some("worker_full"));
        assert_eq!((executor.len(), executor.queued()), (1, 2));
        // Queued leases are renewed like running ones.
        assert_eq!(job_ids(&executor.live_leases()), ["j1", "j2", "j3"]);

        executor.stop(&lease_ref("j1"), StopReason::Cancelled);
        let mut finished = Vec::new();
        for _ in 0..3 {
            finished.push(executor.next_finished().await.lease.job_id);
        }
        assert_eq!(finished, ["j1", "j2", "j3"], "one at a time, in order");
        assert!(executor.is_empty());
    }

    #[tokio::test]
    async fn a_queued_lease_stopped_is_taken_off_unstarted() {
        let mut executor = busy(2, 1);
        assert_eq!(
            executor.stop(&lease_ref("j2"), StopReason::Cancelled),
            Stopping::Unstarted
        );
        assert_eq!(
            executor.stop(&lease_ref("j2"), StopReason::Cancelled),
            Stopping::NotRunning
        );
        assert_eq!(job_ids(&executor.live_leases()), ["j1"]);
        // The same attempt again is no duplicate once handed back.
        executor
            .start(lease("j2", "test.work", "ok"))
            .expect("queued");
        assert_eq!(job_ids(&executor.take_queued()), ["j2"]);
        assert_eq!((executor.len(), executor.queued()), (1, 0));
    }

    #[tokio::test]
    async fn a_queue_changed_takes_only_its_own_queued_leases() {
        let mut executor = busy(3, 0);
        for (job, queue) in [("j2", "a"), ("j3", "b"), ("j4", "a")] {
            executor
                .start(pb::Lease {
                    queue: queue.into(),
                    ..lease(job, "test.work", "ok")
                })
                .expect("queued");
        }
        assert_eq!(job_ids(&executor.take_queued_of("a")), ["j2", "j4"]);
        assert_eq!(job_ids(&executor.take_queued()), ["j3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_leases_go_stale_oldest_first() {
        let wait = Duration::from_millis(250);
        let mut executor = busy(3, 0);
        assert_eq!(executor.stale_at(wait), None);
        let first = Instant::now();
        executor
            .start(lease("j2", "test.work", "ok"))
            .expect("queued");
        tokio::time::advance(Duration::from_millis(100)).await;
        executor
            .start(lease("j3", "test.work", "ok"))
            .expect("queued");
        assert_eq!(executor.stale_at(wait), Some(first + wait));
        assert!(executor.take_stale(wait).is_empty());

        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(job_ids(&executor.take_stale(wait)), ["j2"]);
        assert_eq!(
            executor.stale_at(wait),
            Some(first + wait + Duration::from_millis(100))
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(job_ids(&executor.take_stale(wait)), ["j3"]);
        assert_eq!(executor.stale_at(wait), None);
        assert_eq!((executor.len(), executor.queued()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_the_server_held_goes_stale_sooner() {
        let wait = Duration::from_millis(250);
        let mut executor = busy(3, 0);
        let first = Instant::now();
        executor
            .start(lease("j2", "test.work", "ok"))
            .expect("queued");
        tokio::time::advance(Duration::from_millis(50)).await;
        // Claimed 200 ms before it arrived: older than j2, though queued behind it.
        let held = pb::Lease {
            held: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..lease("j3", "test.work", "ok")
        };
        executor.start(held).expect("queued");
        let j3_claimed = first - Duration::from_millis(150);
        assert_eq!(executor.stale_at(wait), Some(j3_claimed + wait));

        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(job_ids(&executor.take_stale(wait)), ["j3"]);
        assert_eq!(executor.stale_at(wait), Some(first + wait));
        assert_eq!(executor.queued(), 1);
    }

    #[tokio::test]
    async fn lost_leases_are_not_renewed_and_stopped_handlers_wake() {
        let mut executor = executor(3, 0);
        for job in ["j1", "j2", "j3"] {
            executor
                .start(lease(job, "test.work", "wait"))
                .expect("starts");
        }
        assert_eq!(executor.live_leases().len(), 3);

        let j1 = lease_ref("j1");
        assert_eq!(executor.stop(&j1, StopReason::Cancelled), Stopping::Asked);
        assert_eq!(
            executor.stop(&j1, StopReason::Cancelled),
            Stopping::AlreadyAsked
        );
        // Stopping, not lost: still renewed while it winds down.
        assert_eq!(executor.live_leases().len(), 3);
        assert_eq!(
            executor.stop(&lease_ref("j3"), StopReason::LeaseLost),
            Stopping::Asked
        );
        assert_eq!(
            executor
                .live_leases()
                .iter()
                .map(|l| l.job_id.as_str())
                .collect::<Vec<_>>(),
            ["j1", "j2"]
        );
        let mut errors = HashMap::new();
        for _ in 0..2 {
            let finished = executor.next_finished().await;
            errors.insert(
                finished.lease.job_id,
                finished.outcome.expect_err("stopped"),
            );
        }
        let cancelled = &errors["j1"];
        assert_eq!(cancelled.kind(), Some("cancelled"));
        assert_eq!(cancelled.message(), "stopped: cancelled");
        assert!(
            cancelled.is_retryable(),
            "the server settles a cancel, not a retry"
        );
        assert_eq!(
            errors["j3"].kind(),
            None,
            "a lost lease reports the handler's own error"
        );

        executor.stop_all(StopReason::Shutdown);
        let finished = executor.next_finished().await;
        assert_eq!(finished.lease.job_id, "j2");
        let error = finished.outcome.expect_err("stopped");
        assert_eq!(
            error.kind(),
            None,
            "a shutdown reports the handler's own error"
        );
        assert!(executor.try_next_finished().is_none());
        assert_eq!(
            executor.stop(&j1, StopReason::Cancelled),
            Stopping::NotRunning
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_stops_the_handler_as_timed_out() {
        let mut executor = executor(1, 0);
        let mut timed = lease("j1", "test.work", "wait");
        timed.deadline = Some((SystemTime::now() + Duration::from_secs(30)).into());
        executor.start(timed).expect("starts");
        let finished = executor.next_finished().await;
        let error = finished.outcome.expect_err("timed out");
        assert_eq!(error.kind(), Some("timeout"));
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn a_result_after_a_stop_stands() {
        let mut executor = executor(1, 0);
        executor
            .start(lease("j1", "test.work", "finish"))
            .expect("starts");
        let j1 = pb::LeaseRef {
            job_id: "j1".into(),
            attempt: 1,
        };
        assert_eq!(executor.stop(&j1, StopReason::Paused), Stopping::Asked);
        assert!(executor.next_finished().await.outcome.is_ok());
    }

    #[tokio::test]
    async fn what_a_handler_reported_last_comes_with_its_result() {
        let mut executor = executor(1, 0);
        executor
            .start(lease("j1", "test.work", "report"))
            .expect("starts");
        let finished = executor.next_finished().await;
        assert_eq!(finished.left.latest.map(|p| p.items_done), Some(2));
        assert!(finished.left.latest_unsent);
        assert_eq!(finished.left.lines.len(), 1);
    }

    #[test]
    fn failures_after_a_stop_keep_the_handlers_message_and_delay() {
        let error = HandlerError::fatal("disk full").with_retry_after(Duration::from_secs(4));
        let reported =
            after_stop(Err(error.clone()), Some(StopReason::TimedOut)).expect_err("a failure");
        assert_eq!(reported.message(), "disk full");
        assert_eq!(reported.kind(), Some("timeout"));
        assert!(reported.is_retryable());
        assert_eq!(reported.retry_after(), Some(Duration::from_secs(4)));
        assert_eq!(
            after_stop(Err(error.clone()), Some(StopReason::LeaseLost)),
            Err(error.clone())
        );
        assert_eq!(after_stop(Err(error.clone()), None), Err(error));
    }
}
