//! What a handler knows about the attempt it runs, how it reports on it, and how it learns
//! that it must stop.
//!
//! Stopping is cooperative: the worker runtime never kills a handler that is making progress.
//! It fires the context's cancellation when the server sends `StopJob` for the lease (the job
//! was cancelled or paused, its lease was lost, or it ran past its timeout), when the attempt's
//! deadline passes, when the server refuses a report as stale, or when a graceful drain runs out
//! of time; [`JobContext::stop_reason`] says which. A handler that ignores it keeps running, but
//! once the lease is gone its result is refused. A handler told to stop does best to return
//! promptly (after a [`checkpoint`](JobContext::checkpoint) when pausing): the worker keeps
//! renewing its lease while it winds down, but the server honours it only for a grace period
//! after the stop, and then the lease is lost.
//!
//! The context is also the handler's channel back to the server. [`progress`](JobContext::progress)
//! and the [`log`](JobContext::log) family never wait and are cheap enough for tight loops: the
//! worker coalesces progress to the latest value and batches log lines, and sends both on its
//! stream before the attempt's result. A [`checkpoint`](JobContext::checkpoint) waits for the
//! server to store it; the next attempt (after a pause, a crash or a retry) starts with it in
//! [`last_checkpoint`](JobContext::last_checkpoint).
//!
//! A handler fans out through its context: [`enqueue_children`](JobContext::enqueue_children)
//! stores jobs as its children, and returning
//! [`wait_for_children`](JobContext::wait_for_children) hands back its slot while they run. The
//! job then waits on the server, holding no worker, and runs again (an attempt that does not
//! count against its retries) once every child has ended, with
//! [`children_ended`](JobContext::children_ended) set, to aggregate
//! [`children`](JobContext::children). The handler runs from its start each time, so it tells
//! the two apart by `children_ended` (or its checkpoint).
//!
//! A handler waits for a signal ([`Client::signal_job`]) the same way:
//! [`wait_signal`](JobContext::wait_signal) answers at once with a signal the job holds, and
//! otherwise returns the wait for the handler to return; the job runs again once the signal
//! arrives, and the same call then answers with it. A handler's n-th wait for a name is answered
//! by the n-th signal of that name, so a handler that runs from its start again finds each of
//! its waits answered as before.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::client::{Enqueued, NewJob};
use crate::error::{HandlerError, Wait};
use crate::job::{self, JobId, JobInfo};
use crate::proto::v1 as pb;
use crate::report::{LogLevel, Progress};
use crate::worker::reports::Reports;
use crate::{Client, Error};

/// Why a handler was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The job was cancelled; it will not run again.
    Cancelled,
    /// The job was paused: save a [`checkpoint`](JobContext::checkpoint), then return. It runs
    /// again, from that checkpoint, once resumed; the attempt does not count against its
    /// retries.
    Paused,
    /// The attempt ran past the job's timeout; it counts as a retryable failure.
    TimedOut,
    /// The lease lapsed or moved to another attempt; this attempt's result will be refused.
    LeaseLost,
    /// The worker is shutting down and its drain timeout passed; the job will be retried.
    Shutdown,
}

impl StopReason {
    /// The failure kind reported for an attempt that failed after this stop, when the stop
    /// decides how the server settles it.
    pub(crate) fn failure_kind(self) -> Option<&'static str> {
        match self {
            Self::Cancelled => Some("cancelled"),
            Self::Paused => Some("paused"),
            Self::TimedOut => Some("timeout"),
            Self::LeaseLost | Self::Shutdown => None,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cancelled => "cancelled",
            Self::Paused => "paused",
            Self::TimedOut => "timed out",
            Self::LeaseLost => "lease lost",
            Self::Shutdown => "worker shutting down",
        })
    }
}

/// The attempt a handler runs: which job, which attempt, whether to stop, and how to report.
///
/// Cheap to clone; clones share the cancellation and the reports.
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
    deadline: Option<SystemTime>,
    /// The checkpoint the attempt started from; empty when there is none.
    checkpoint: Vec<u8>,
    worker_id: Arc<str>,
    stop: StopSignal,
    reports: Reports,
    /// The jobs this one depended on.
    depends_on: Vec<JobId>,
    /// The worker's connection, for reading other jobs (none in unit tests).
    client: Option<Client>,
    /// The attempt resumes the job after its children ended.
    children_ended: bool,
    /// The signals the job received, oldest first.
    signals: Vec<pb::JobSignal>,
    /// The wait (name, count) this attempt resumes from timed out.
    signal_timed_out: Option<(String, i32)>,
    /// Waits for signals made so far, by name: the next one's count.
    signal_waits: std::sync::Mutex<HashMap<String, i32>>,
    /// Children this attempt enqueued so far: the next one's position, for its default key.
    /// Held across each enqueue, so that calls number their children one after the other, and
    /// moved on only once the server has stored them: a call that failed is numbered the same
    /// when made again, and so finds what it stored if it did.
    children_enqueued: tokio::sync::Mutex<u32>,
}

impl JobContext {
    /// The context of the attempt a lease starts.
    pub(crate) fn new(
        lease: &pb::Lease,
        worker_id: Arc<str>,
        stop: StopSignal,
        reports: Reports,
    ) -> Self {
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
                deadline: job::system_time(lease.deadline.as_ref()),
                checkpoint: lease.checkpoint.clone(),
                worker_id,
                stop,
                reports,
                depends_on: lease.depends_on.iter().cloned().map(JobId::from).collect(),
                client: None,
                children_ended: lease.children_ended,
                children_enqueued: tokio::sync::Mutex::new(0),
                signals: lease.signals.clone(),
                signal_timed_out: lease
                    .signal_timed_out
                    .as_ref()
                    .map(|w| (w.name.clone(), w.count)),
                signal_waits: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The same context reading other jobs through `client`. Called before the context is
    /// shared, so the inner value is still unique; otherwise it is left as it was.
    pub(crate) fn with_client(mut self, client: Option<Client>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.client = client;
        }
        self
    }

    /// The jobs this job waited for (`Enqueue::depends_on`), all SUCCEEDED unless the job was
    /// enqueued to run regardless of their failure.
    pub fn depends_on(&self) -> &[JobId] {
        &self.inner.depends_on
    }

    /// One of the jobs this job depended on, as the server has it now, to read its result:
    /// `ctx.dependency(&id).await?.result::<Fetch>()?`.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] when the server cannot be reached or refuses the read, and
    /// [`Error::Config`] when `id` is not one of [`depends_on`](Self::depends_on).
    pub async fn dependency(&self, id: &JobId) -> Result<JobInfo, Error> {
        if !self.inner.depends_on.contains(id) {
            return Err(Error::Config(format!(
                "job {id} is not a dependency of job {}",
                self.inner.job_id
            )));
        }
        self.client()?.get_job(id.as_str()).await
    }

    fn client(&self) -> Result<&Client, Error> {
        self.inner.client.as_ref().ok_or_else(|| {
            Error::Config("this context has no connection to the server's JobService".into())
        })
    }

    /// Enqueues jobs as children of this job, in one transaction, all or none. The server
    /// takes them only while this attempt holds its lease (a stale one is refused with
    /// [`Error::Rpc`] ABORTED), and cancels those not yet ended if this job ends CANCELLED or
    /// FAILED.
    ///
    /// A child enqueued without an idempotency key gets one naming this job and the child's
    /// position among those this attempt enqueued (`<job id>/child/<n>`): a call that failed
    /// (the server unreachable, its answer lost) may be made again and finds what it stored,
    /// and a handler that runs again after a crash or a retry and enqueues the same children
    /// in the same order gets the existing ones back rather than twins.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] when a job is invalid (none was stored), [`Error::Rpc`] or
    /// [`Error::Transport`] when the server cannot be reached or the lease is stale,
    /// [`Error::Config`] on a context with no connection.
    pub async fn enqueue_children<I>(
        &self,
        jobs: I,
    ) -> Result<Vec<Enqueued<<I::Item as NewJob>::Job>>, Error>
    where
        I: IntoIterator,
        I::Item: NewJob,
    {
        let client = self.client()?;
        let mut specs = crate::client::specs(jobs)?;
        let mut enqueued = self.inner.children_enqueued.lock().await;
        let count = u32::try_from(specs.len()).unwrap_or(u32::MAX);
        for (n, spec) in (*enqueued..).zip(specs.iter_mut()) {
            if spec.idempotency_key.is_empty() {
                spec.idempotency_key = format!("{}/child/{n}", self.inner.job_id);
            }
        }
        let parent = pb::LeaseRef {
            job_id: self.inner.job_id.as_str().to_owned(),
            attempt: i32::try_from(self.inner.attempt).unwrap_or(i32::MAX),
        };
        let stored = client.enqueue_specs(specs, Some(parent)).await?;
        *enqueued = enqueued.saturating_add(count);
        Ok(stored)
    }

    /// What the handler returns to wait for its children rather than finish:
    /// `return Err(ctx.wait_for_children())`. The attempt ends without counting against the
    /// job's retries, the job waits on the server without holding a slot, and it runs again
    /// once every child has ended, with [`children_ended`](Self::children_ended) set. A job
    /// with no unfinished child runs again at once.
    pub fn wait_for_children(&self) -> HandlerError {
        HandlerError::waiting(Wait::Children)
    }

    /// Waits for a signal named `name` (sent with [`Client::signal_job`]), for at most
    /// `timeout` (`None`: no limit). When the job holds it, it is returned at once. Otherwise
    /// the error returned is the wait itself, for the handler to return (`?` does):
    /// `let go = ctx.wait_signal("go", None)?;`. The job then waits on the server, holding no
    /// worker, and runs again once the signal arrives (or the timeout passes), an attempt that
    /// does not count against its retries; the same call then answers with the signal.
    ///
    /// Each call for a name waits for the next signal of that name: the n-th call for the n-th.
    ///
    /// # Errors
    ///
    /// The wait, as above, or, when this wait timed out, a retryable failure of kind
    /// `signal_timeout` (return it to retry the job, or handle it).
    pub fn wait_signal(
        &self,
        name: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<Signal, HandlerError> {
        let count = {
            let mut waits = self
                .inner
                .signal_waits
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let next = waits.entry(name.to_owned()).or_insert(0);
            *next += 1;
            *next
        };
        let index = usize::try_from(count - 1).unwrap_or(usize::MAX);
        if let Some(signal) = self
            .inner
            .signals
            .iter()
            .filter(|s| s.name == name)
            .nth(index)
        {
            return Ok(Signal::from_proto(signal));
        }
        if self
            .inner
            .signal_timed_out
            .as_ref()
            .is_some_and(|(n, c)| n == name && *c == count)
        {
            return Err(
                HandlerError::retryable(format!("waiting for signal {name} timed out"))
                    .with_kind("signal_timeout"),
            );
        }
        Err(HandlerError::waiting(Wait::Signal {
            name: name.to_owned(),
            count,
            timeout,
        }))
    }

    /// Every signal the job has received, oldest first (as its lease carried them).
    pub fn signals(&self) -> Vec<Signal> {
        self.inner.signals.iter().map(Signal::from_proto).collect()
    }

    /// Whether this attempt resumes the job after its children ended (it returned
    /// [`wait_for_children`](Self::wait_for_children) before): time to aggregate
    /// [`children`](Self::children).
    pub fn children_ended(&self) -> bool {
        self.inner.children_ended
    }

    /// Every child of this job as the server has it now, oldest first, with their states and
    /// results: read once [`children_ended`](Self::children_ended), every one has ended.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] when the server cannot be reached or refuses the read.
    pub async fn children(&self) -> Result<Vec<JobInfo>, Error> {
        self.client()?.children(&self.inner.job_id).await
    }

    /// The job's id.
    pub fn job_id(&self) -> &JobId {
        &self.inner.job_id
    }

    /// This attempt's number, 1 for the first: its lease's fencing token. A paused attempt, or
    /// a lease handed back before its handler started, took a number too, so after a pause and
    /// a resume this is 2 while the job has counted one attempt
    /// ([`JobInfo::attempts_counted`](crate::JobInfo::attempts_counted)).
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

    /// When the attempt must stop, if the job has a timeout. The worker fires the cancellation
    /// with [`StopReason::TimedOut`] then (by its own clock, which may differ from the
    /// server's).
    pub fn deadline(&self) -> Option<SystemTime> {
        self.inner.deadline
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
        self.inner.stop.reason()
    }

    /// Reports how far the job has come; watchers see it as a progress event.
    ///
    /// Never waits, and is cheap enough to call for every item of a large job: the worker keeps
    /// only the latest value and sends it at most once per progress interval (see
    /// [`WorkerBuilder::progress_interval`](crate::WorkerBuilder::progress_interval)), and
    /// always before the attempt's result. When the worker reconnects, it sends the latest value
    /// again. After the lease is lost, or the attempt's result was recorded, it does nothing.
    pub fn progress(&self, progress: Progress) {
        self.inner
            .reports
            .progress(progress.into_proto(SystemTime::now()));
    }

    /// Logs a line to the job's own log, which watchers see as log events.
    ///
    /// Never waits: lines are batched and sent in order, at the latest with the attempt's
    /// result. A line longer than 8192 characters is cut. When a handler logs faster than the
    /// worker can send, at most 10,000 lines wait; older ones are dropped, and a warning line
    /// in the job's log (and in the worker's) says how many. Lines on their way when the
    /// worker's stream breaks are not sent again (the server may or may not have stored them);
    /// lines not sent yet wait for the next stream. After the lease is lost, or the attempt's
    /// result was recorded, it does nothing.
    pub fn log(&self, level: LogLevel, message: impl Into<String>) {
        self.inner.reports.log(level, message.into());
    }

    /// Logs a line at [`LogLevel::Debug`]; see [`log`](Self::log).
    pub fn debug(&self, message: impl Into<String>) {
        self.log(LogLevel::Debug, message);
    }

    /// Logs a line at [`LogLevel::Info`]; see [`log`](Self::log).
    pub fn info(&self, message: impl Into<String>) {
        self.log(LogLevel::Info, message);
    }

    /// Logs a line at [`LogLevel::Warn`]; see [`log`](Self::log).
    pub fn warn(&self, message: impl Into<String>) {
        self.log(LogLevel::Warn, message);
    }

    /// Logs a line at [`LogLevel::Error`]; see [`log`](Self::log).
    pub fn error(&self, message: impl Into<String>) {
        self.log(LogLevel::Error, message);
    }

    /// Stores opaque state from which a later attempt can resume, and waits until the server
    /// has it. The next attempt of the job (after a pause, a lost worker or a retryable
    /// failure) starts with the last one saved, in [`last_checkpoint`](Self::last_checkpoint).
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when the attempt no longer holds its lease (the handler's
    /// cancellation fires too); [`Error::Disconnected`] when the worker's stream broke before
    /// the server answered (whether it was stored is unknown; calling again after the
    /// reconnect may succeed); [`Error::Rpc`] when the server refused it, such as
    /// `InvalidArgument` for data beyond its payload limit.
    pub async fn checkpoint(&self, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.inner.reports.checkpoint(data.into()).await
    }

    /// Stores a protobuf message as the checkpoint; see [`checkpoint`](Self::checkpoint).
    ///
    /// # Errors
    ///
    /// As for [`checkpoint`](Self::checkpoint).
    pub async fn checkpoint_msg<M: prost::Message>(&self, message: &M) -> Result<(), Error> {
        self.checkpoint(message.encode_to_vec()).await
    }

    /// The checkpoint the attempt started from: the last one an earlier attempt saved, or
    /// `None` when there is none.
    pub fn last_checkpoint(&self) -> Option<&[u8]> {
        (!self.inner.checkpoint.is_empty()).then_some(self.inner.checkpoint.as_slice())
    }

    /// The checkpoint the attempt started from, decoded as `M`; see
    /// [`last_checkpoint`](Self::last_checkpoint).
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the checkpoint is not an `M` (say, one saved by an older version
    /// of the handler).
    pub fn last_checkpoint_msg<M: prost::Message + Default>(&self) -> Result<Option<M>, Error> {
        self.last_checkpoint()
            .map(|data| {
                M::decode(data).map_err(|source| Error::Decode {
                    what: "checkpoint",
                    source,
                })
            })
            .transpose()
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

/// A signal a job received ([`Client::signal_job`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    name: String,
    payload: Option<prost_types::Any>,
    received_at: Option<SystemTime>,
}

impl Signal {
    fn from_proto(signal: &pb::JobSignal) -> Self {
        Self {
            name: signal.name.clone(),
            payload: signal.payload.clone(),
            received_at: job::system_time(signal.received_at.as_ref()),
        }
    }

    /// The signal's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the server received it.
    pub fn received_at(&self) -> Option<SystemTime> {
        self.received_at
    }

    /// The payload as sent, if any.
    pub fn payload_any(&self) -> Option<&prost_types::Any> {
        self.payload.as_ref()
    }

    /// The payload as a `M` (`None` when the signal carries none).
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when it carries another message.
    pub fn payload<M: prost::Message + prost::Name + Default>(&self) -> Result<Option<M>, Error> {
        self.payload
            .as_ref()
            .map(|any| {
                any.to_msg::<M>().map_err(|source| Error::Decode {
                    what: "signal payload",
                    source,
                })
            })
            .transpose()
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
    /// Asks the handler to stop; the first reason given is the one kept. True for the first
    /// call.
    pub(crate) fn stop(&self, reason: StopReason) -> bool {
        // A second stop keeps the first reason: that is the one the handler may have acted on.
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    /// The reason kept, once stopped.
    pub(crate) fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::reports::Links;

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

    fn context(lease: &pb::Lease, stop: StopSignal) -> JobContext {
        let (links, _hub, _checkpoints) = Links::new();
        let reports = links.attach(pb::LeaseRef {
            job_id: lease.job_id.clone(),
            attempt: lease.attempt,
        });
        JobContext::new(lease, Arc::from("w1"), stop, reports)
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Step {
        #[prost(uint32, tag = "1")]
        step: u32,
    }

    #[tokio::test]
    async fn stopping_records_the_first_reason_and_fires_the_future() {
        let stop = StopSignal::default();
        let ctx = context(&lease(), stop.clone());
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
        let ctx = context(&lease(), StopSignal::default());
        assert_eq!(ctx.job_id().as_str(), "j1");
        assert_eq!(ctx.attempt(), 2);
        assert!(ctx.is_last_attempt());
        assert_eq!(ctx.job_type(), "test.ping");
        assert_eq!(ctx.worker_id(), "w1");
        assert_eq!(ctx.deadline(), None);
        assert_eq!(ctx.last_checkpoint(), None);
        assert!(matches!(ctx.last_checkpoint_msg::<Step>(), Ok(None)));
    }

    #[test]
    fn the_checkpoint_of_the_lease_is_the_last_one() {
        let mut with_checkpoint = lease();
        with_checkpoint.checkpoint = prost::Message::encode_to_vec(&Step { step: 7 });
        with_checkpoint.deadline = Some(prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        });
        let ctx = context(&with_checkpoint, StopSignal::default());
        assert_eq!(ctx.last_checkpoint(), Some(&[8, 7][..]));
        assert_eq!(
            ctx.last_checkpoint_msg::<Step>().ok(),
            Some(Some(Step { step: 7 }))
        );
        assert_eq!(
            ctx.deadline(),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5))
        );

        with_checkpoint.checkpoint = vec![0xff];
        let ctx = context(&with_checkpoint, StopSignal::default());
        assert!(matches!(
            ctx.last_checkpoint_msg::<Step>(),
            Err(Error::Decode {
                what: "checkpoint",
                ..
            })
        ));
    }

    #[test]
    fn stops_that_settle_the_job_name_its_failure_kind() {
        assert_eq!(StopReason::Cancelled.failure_kind(), Some("cancelled"));
        assert_eq!(StopReason::Paused.failure_kind(), Some("paused"));
        assert_eq!(StopReason::TimedOut.failure_kind(), Some("timeout"));
        assert_eq!(StopReason::LeaseLost.failure_kind(), None);
        assert_eq!(StopReason::Shutdown.failure_kind(), None);
        assert_eq!(StopReason::TimedOut.to_string(), "timed out");
    }
}
