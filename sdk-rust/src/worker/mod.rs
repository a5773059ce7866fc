//! The worker runtime: serves registered job types from one stream to the server.
//!
//! A [`Worker`] is built once ([`Worker::builder`]) and then [`run`](Worker::run) with a
//! shutdown future. While it runs it keeps one `Connect` stream open, reconnecting with
//! jittered exponential backoff (100 ms up to 5 s, forever) whenever the stream or the
//! connection fails. Handlers keep running across a reconnect, and results the server has not
//! acknowledged are sent again on the next stream; the server's fencing tokens make that safe.
//!
//! When the shutdown future resolves the worker drains: it tells the server to send no more
//! leases, lets running handlers finish and waits for their results to be acknowledged,
//! reconnecting if needed to deliver them. A drain that outlasts the drain timeout cancels the
//! handlers' contexts, waits a short grace, and gives up on what is left (those jobs' leases
//! lapse and the server retries them).
//!
//! Handlers report progress, log lines and checkpoints through their context while they run;
//! the worker coalesces and batches them onto the same stream, and sends what is left of them
//! before each result.
//!
//! A worker with a prefetch queue holds that many leases beyond its slots and starts each the
//! moment a slot frees, instead of a round trip to the server later. It hands back, unstarted,
//! those that waited longer than [`MAX_QUEUED_WAIT`] since their claim (the server's hold
//! included, as each lease reports it), those stopped before they started, and on a drain all of
//! them.
//!
//! Bounds: at most `concurrency` handlers run at once and at most `prefetch` leases wait
//! (leases beyond both are refused as retryable failures), the outbound channel is bounded, the results awaiting an
//! acknowledgement are bounded by the handlers that produced them, and each lease's unsent
//! reports and reports awaiting an acknowledgement are bounded (see `reports` and `reporter`).
//!
//! Pieces, one job each:
//! - `registry`: typed handlers, erased to `Any` → `Any`.
//! - `executor`: the handler tasks and the leases they hold.
//! - `reports`: what handlers reported and the worker has not sent yet.
//! - `reporter`: when reports are sent, and what their acknowledgements mean.
//! - `outbox`: results awaiting their acknowledgement.
//! - `releases`: leases handed back unstarted, until acknowledged.
//! - `session`: one stream, from hello to its end.
//! - `lifecycle`: serving, draining, aborting, finished.

mod executor;
mod lifecycle;
mod outbox;
mod queue;
mod registry;
mod releases;
mod reporter;
pub(crate) mod reports;
mod session;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Endpoint;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::context::{JobContext, StopReason};
use crate::error::HandlerError;
use crate::items::{ItemJob, ItemOptions};
use crate::job::JobType;
use crate::proto::v1 as pb;
use crate::proto::v1::worker_service_client::WorkerServiceClient;
use crate::retry::RetryPredicate;
use crate::transport::{self, Headers, Tls};
use crate::{Client, Error};

use executor::{Executor, Finished, Refusal};
use lifecycle::{Lifecycle, Phase};
use outbox::Outbox;
use registry::Registry;
use releases::Releases;
use reporter::Reporter;
use reports::Final;
use session::Ended;

/// Slots when none are configured.
const DEFAULT_CONCURRENCY: usize = 10;
/// The most slots the protocol allows a worker.
const MAX_CONCURRENCY: usize = 10_000;
/// The longest worker id the protocol allows, in characters.
const MAX_WORKER_ID_CHARS: usize = 128;
/// The drain timeout when none is configured.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long handlers get to return after the drain timeout cancelled them.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// The first delay before reconnecting after a stream failed.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// The longest delay before reconnecting.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The share of each reconnect delay drawn at random, so workers do not reconnect in lockstep.
const RECONNECT_JITTER: f64 = 0.5;
/// The longest a lease waits in the prefetch queue before it is handed back: its attempt's
/// clocks run from its claim, and another worker may have a slot free for it.
const MAX_QUEUED_WAIT: Duration = Duration::from_millis(250);
/// The shortest time between two progress reports of a lease, when none is configured.
const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A configured worker, ready to [`run`](Self::run).
pub struct Worker {
    config: Config,
    executor: Executor,
    reporter: Reporter,
}

/// What a worker says about itself on every stream.
struct Config {
    endpoint: Endpoint,
    /// Tenant and API key, put on the stream by [`Headers::request`].
    headers: Headers,
    worker_id: Arc<str>,
    /// The host the worker runs on, as its hello tells the server (for ListWorkers).
    host: Arc<str>,
    queues: Vec<String>,
    drain_timeout: Duration,
}

impl Worker {
    /// Starts configuring a worker for the server at `url` (such as
    /// `http://127.0.0.1:50051`).
    pub fn builder(url: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(url.into())
    }

    /// The name the worker gives the server, shown as the lease owner of the jobs it runs.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Serves jobs until `shutdown` resolves, then drains and returns. It drains and returns
    /// the same way when an operator asks the server to drain this worker (DrainWorker).
    ///
    /// The server need not be up: the worker connects when it can and keeps retrying. Run it
    /// with a signal future (see the `worker` example) or any other trigger, such as
    /// `token.cancelled_owned()` of a `tokio_util` cancellation token.
    ///
    /// # Errors
    ///
    /// [`Error::DrainTimeout`] when the drain did not finish within the drain timeout; the
    /// abandoned jobs' leases lapse and the server retries them.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let span = tracing::info_span!(
            "worker",
            worker = %self.config.worker_id,
            tenant = self.config.headers.tenant().unwrap_or("default"),
        );
        self.serve(shutdown).instrument(span).await
    }

    async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let Self {
            config,
            executor,
            reporter,
        } = self;
        let mut client = WorkerServiceClient::new(config.endpoint.connect_lazy());
        // Handlers read other jobs (their dependencies) through a client of their own on the
        // same endpoint, made here because a channel needs the runtime.
        let executor = executor.with_client(Client::with_headers(
            config.endpoint.connect_lazy(),
            config.headers.clone(),
        ));
        let mut lifecycle = Lifecycle::new(shutdown, config.drain_timeout, ABORT_GRACE);
        let mut work = Work {
            executor,
            outbox: Outbox::default(),
            releases: Releases::default(),
            reporter,
            ids: RequestIds::default(),
        };
        let mut reconnect =
            Backoff::new(RECONNECT_MIN, RECONNECT_MAX).with_jitter(RECONNECT_JITTER);
        tracing::info!(
            job_types = ?work.executor.job_types(),
            queues = ?config.queues,
            slots = work.executor.slots(),
            prefetch = work.executor.prefetch(),
            "worker starting"
        );
        loop {
            if lifecycle.phase().is_stopping() && work.is_idle() {
                tracing::info!("worker stopped");
                return Ok(());
            }
            if lifecycle.phase() == Phase::Finished {
                return Err(work.abandon(config.drain_timeout));
            }
            let ended = session::run(&mut client, &config, &mut work, &mut lifecycle).await;
            work.stream_ended();
            match ended {
                Ok(Ended::Drained | Ended::Finished) => {}
                Err(broken) => {
                    if broken.welcomed {
                        reconnect.reset();
                    }
                    let delay = reconnect.next_delay();
                    tracing::warn!(
                        error = %broken.error,
                        retry_in = ?delay,
                        "stream to the server failed; reconnecting"
                    );
                    work.wait_out(delay, &mut lifecycle).await;
                }
            }
        }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.config.worker_id)
            .field("queues", &self.config.queues)
            .field("job_types", &self.executor.job_types())
            .field("concurrency", &self.executor.slots())
            .finish_non_exhaustive()
    }
}

/// Request ids for every message the server acknowledges (results and reports alike), unique
/// per worker across streams: an ack is routed by its id alone, and a late one can never settle
/// the wrong message.
#[derive(Debug)]
pub(super) struct RequestIds {
    next: u64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl RequestIds {
    pub(super) fn next(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }
}

/// The state that outlives any one stream: running handlers, their reports, and unacknowledged
/// results and hand-backs.
struct Work {
    executor: Executor,
    outbox: Outbox,
    releases: Releases,
    reporter: Reporter,
    ids: RequestIds,
}

impl Work {
    /// Nothing runs or waits, and nothing awaits an acknowledgement: a drain is complete.
    fn is_idle(&self) -> bool {
        self.executor.is_empty() && self.outbox.is_empty() && self.releases.is_empty()
    }

    /// Hands back, unstarted, the queued leases that have waited too long.
    fn release_stale(&mut self) {
        let stale = self.executor.take_stale(MAX_QUEUED_WAIT);
        if !stale.is_empty() {
            tracing::debug!(
                count = stale.len(),
                "handing back queued leases that waited too long for a slot"
            );
        }
        self.releases.add(stale);
    }

    /// Records a finished handler's result in the outbox, to be sent by
    /// [`outgoing`](Self::outgoing).
    fn record(&mut self, finished: Finished) {
        let Finished {
            lease,
            job_type,
            outcome,
            left,
            timed_out,
        } = finished;
        let request_id = self.ids.next();
        match outcome {
            Ok(result) => {
                tracing::info!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    %job_type,
                    "job succeeded"
                );
                self.outbox
                    .complete(request_id, lease, job_type, result, left);
            }
            Err(error) if error.is_wait() => {
                tracing::info!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    %job_type,
                    %error,
                    "job waits"
                );
                self.outbox.wait(request_id, lease, job_type, &error, left);
            }
            Err(error) => {
                tracing::warn!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    %job_type,
                    retryable = error.is_retryable(),
                    %error,
                    "job failed"
                );
                self.outbox
                    .fail(request_id, lease, job_type, &error, left, timed_out);
            }
        }
    }

    /// Records a refused lease's failure in the outbox, to be sent by
    /// [`outgoing`](Self::outgoing).
    fn refuse(&mut self, refusal: Refusal) {
        let Refusal {
            lease,
            job_type,
            error,
        } = refusal;
        tracing::warn!(
            job_id = %lease.job_id,
            attempt = lease.attempt,
            %job_type,
            %error,
            "lease refused"
        );
        let request_id = self.ids.next();
        self.outbox
            .fail(request_id, lease, job_type, &error, Final::default(), false);
    }

    /// The hand-backs and the results not sent on the current stream yet, each result after
    /// what was left of its lease's reports.
    fn outgoing(&mut self) -> Vec<pb::ConnectRequest> {
        let mut messages = Vec::new();
        let started = self.executor.take_started();
        if !started.is_empty() {
            messages.push(pb::ConnectRequest {
                message: Some(pb::connect_request::Message::Started(pb::StartedJobs {
                    leases: started,
                })),
            });
        }
        self.releases.outgoing(&mut self.ids, &mut messages);
        for unsent in self.outbox.unsent() {
            self.reporter.final_reports(
                &unsent.lease,
                unsent.lines,
                unsent.progress,
                &mut self.ids,
                &mut messages,
            );
            messages.push(unsent.result);
        }
        messages
    }

    /// The stream ended: what was in flight on it will not be acknowledged.
    fn stream_ended(&mut self) {
        self.reporter.disconnected();
        self.outbox.rewind();
        self.releases.rewind();
    }

    /// Moves handlers that already finished into the outbox, to be sent on the next stream.
    fn collect_finished(&mut self) {
        while let Some(finished) = self.executor.try_next_finished() {
            self.record(finished);
        }
    }

    /// Acts on entering a phase; the session adds what needs the stream.
    fn on_phase(&mut self, phase: Phase) {
        match phase {
            Phase::Serving => {}
            Phase::Draining => {
                tracing::info!(
                    running = self.executor.len(),
                    queued = self.executor.queued(),
                    unacknowledged = self.outbox.len(),
                    "shutdown requested; draining"
                );
                // Queued leases go back to run elsewhere rather than delay the drain.
                self.releases.add(self.executor.take_queued());
            }
            Phase::Aborting => {
                tracing::warn!(
                    running = self.executor.len(),
                    "drain timeout reached; asking handlers to stop"
                );
                self.executor.stop_all(StopReason::Shutdown);
            }
            Phase::Finished => {}
        }
    }

    /// Waits `delay` before a reconnect while handlers keep finishing and the lifecycle keeps
    /// moving.
    async fn wait_out(&mut self, delay: Duration, lifecycle: &mut Lifecycle<'_>) {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return,
                finished = self.executor.next_finished() => {
                    // Sent when the next stream is up.
                    self.record(finished);
                }
                phase = lifecycle.changed() => {
                    self.on_phase(phase);
                    if phase == Phase::Finished {
                        return;
                    }
                }
            }
        }
    }

    /// Gives up on a drain that ran out of time.
    fn abandon(&self, timeout: Duration) -> Error {
        let error = Error::DrainTimeout {
            timeout,
            running: self.executor.len(),
            unacknowledged: self.outbox.len(),
        };
        tracing::warn!(%error, "worker stopped before its drain completed");
        error
    }
}

/// Configures a [`Worker`]: where it connects, what it serves, how much at once.
///
/// ```no_run
/// # fn demo<J: jobwire::JobType<Output = ()>>() -> Result<(), jobwire::Error> {
/// use std::time::Duration;
/// use jobwire::{HandlerError, JobContext, Worker};
///
/// let worker = Worker::builder("http://127.0.0.1:50051")
///     .worker_id("thumbnailer-1")
///     .queues(["images", "default"])
///     .concurrency(20)
///     .drain_timeout(Duration::from_secs(60))
///     .register::<J, _, _>(|ctx: JobContext, _job: J| async move {
///         tokio::select! {
///             () = ctx.cancelled() => Err(HandlerError::retryable("stopped")),
///             () = tokio::time::sleep(Duration::from_secs(1)) => Ok(()),
///         }
///     })
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until built"]
pub struct WorkerBuilder {
    url: String,
    worker_id: Option<String>,
    queues: Vec<String>,
    concurrency: usize,
    prefetch: usize,
    tenant: Option<String>,
    api_key: Option<String>,
    tls: Option<Tls>,
    drain_timeout: Duration,
    progress_interval: Duration,
    registry: Registry,
    /// The first job type registered twice, reported by `build`.
    duplicate: Option<&'static str>,
}

impl WorkerBuilder {
    fn new(url: String) -> Self {
        Self {
            url,
            worker_id: None,
            queues: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            prefetch: 0,
            tenant: None,
            api_key: None,
            tls: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            registry: Registry::default(),
            duplicate: None,
        }
    }

    /// The name shown as the lease owner (at most 128 characters). Default:
    /// `<hostname>-<pid>-<random>`, unique per worker even within one process.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// The queues to take jobs from, replacing any set before (default: `default`).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// How many handlers may run at once, 1 to 10000 (default 10).
    pub fn concurrency(mut self, slots: usize) -> Self {
        self.concurrency = slots;
        self
    }

    /// How many leases the worker may hold beyond its concurrency, 0 to 10000 (default 0).
    ///
    /// They wait in a local queue and start the moment a slot frees, rather than a round trip
    /// to the server later; for jobs that take less than a millisecond or two, that round trip
    /// is most of a slot's time. The server fills the queue only while the worker keeps pace,
    /// and a lease still waiting 250 ms after its claim is handed back (its attempt's lease and
    /// timeout run from the claim), as are all queued leases when the worker drains. Leave it
    /// at 0 for jobs that take longer than that: a queued job then only waits.
    pub fn prefetch(mut self, leases: usize) -> Self {
        self.prefetch = leases;
        self
    }

    /// The tenant to work for (sent as the `jobwire-tenant` header; default: the server's
    /// `default` tenant).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// The API key sent on the worker's stream, as `authorization: Bearer <key>` (default:
    /// none).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// TLS settings: root certificates to trust, a client certificate; the address must start
    /// with `https://` (which without them trusts the system's roots).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long a drain may take before handlers are told to stop (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The shortest time between two progress reports of one lease (default 100 ms); also how
    /// long log lines may wait to be sent in a batch. Handlers may report as often as they like:
    /// only the latest progress of each lease is sent per interval, and the last one always
    /// goes before the attempt's result.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }

    /// Serves job type `J` with `handler`, called once per attempt on its own task.
    ///
    /// A handler returns `J::Output` on success or a [`HandlerError`] that says whether the
    /// failure is worth retrying. A handler that panics fails its attempt as retryable, and the
    /// worker carries on.
    pub fn register<J, F, Fut>(mut self, handler: F) -> Self
    where
        J: JobType,
        F: Fn(JobContext, J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<J::Output, HandlerError>> + Send + 'static,
    {
        if !self.registry.insert::<J, F, Fut>(handler) && self.duplicate.is_none() {
            self.duplicate = Some(J::JOB_TYPE);
        }
        self
    }

    /// Serves the item-based job type `J` with `handler`, called once per item: the worker
    /// runs `J`'s items in order from the first one not yet finished, as
    /// [`ItemOptions::run`](crate::items::ItemOptions::run) describes, and the job's result is
    /// every item's outcome.
    pub fn register_items<J, F, Fut, R>(self, options: ItemOptions, handler: F) -> Self
    where
        J: ItemJob,
        F: Fn(JobContext, J::Item) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: prost::Message + 'static,
    {
        let handler = Arc::new(handler);
        let options = Arc::new(options);
        self.register::<J, _, _>(move |ctx: JobContext, job: J| {
            let handler = Arc::clone(&handler);
            let options = Arc::clone(&options);
            async move {
                options
                    .run(&ctx, job.items(), |ctx, item| handler(ctx, item))
                    .await
            }
        })
    }

    /// Decides the failures of every job type without a predicate of its own
    /// ([`retry_predicate_for`](Self::retry_predicate_for)): whether each is retryable and
    /// its kind. See [`retry`](crate::retry).
    pub fn retry_predicate(mut self, predicate: impl RetryPredicate) -> Self {
        self.registry.set_default_predicate(Arc::new(predicate));
        self
    }

    /// Decides the failures of job type `J`, instead of the worker's
    /// [`retry_predicate`](Self::retry_predicate). See [`retry`](crate::retry).
    pub fn retry_predicate_for<J: JobType>(mut self, predicate: impl RetryPredicate) -> Self {
        self.registry
            .set_predicate(J::JOB_TYPE, Arc::new(predicate));
        self
    }

    /// Checks the settings and builds the worker. No connection is made until it runs.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the address, tenant, API key or TLS settings are invalid (TLS
    /// settings for an `http://` address included), no handler was registered, a job type was
    /// registered twice, the concurrency or prefetch is out of range, the
    /// progress interval is zero, or the worker id is empty or too long.
    pub fn build(self) -> Result<Worker, Error> {
        if let Some(job_type) = self.duplicate {
            return Err(Error::Config(format!(
                "job type {job_type} is registered twice"
            )));
        }
        if self.registry.is_empty() {
            return Err(Error::Config("no job type is registered".into()));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(Error::Config(format!(
                "concurrency must be 1 to {MAX_CONCURRENCY}, not {}",
                self.concurrency
            )));
        }
        if self.prefetch > MAX_CONCURRENCY {
            return Err(Error::Config(format!(
                "prefetch must be 0 to {MAX_CONCURRENCY}, not {}",
                self.prefetch
            )));
        }
        if self.progress_interval.is_zero() {
            return Err(Error::Config(
                "the progress interval must be positive".into(),
            ));
        }
        let worker_id = self.worker_id.unwrap_or_else(default_worker_id);
        let id_chars = worker_id.chars().count();
        if id_chars == 0 || id_chars > MAX_WORKER_ID_CHARS {
            return Err(Error::Config(format!(
                "the worker id must be 1 to {MAX_WORKER_ID_CHARS} characters, not {id_chars}"
            )));
        }
        let mut headers = Headers::default();
        if let Some(tenant) = &self.tenant {
            headers = headers.with_tenant(tenant)?;
        }
        if let Some(key) = &self.api_key {
            headers = headers.with_api_key(key)?;
        }
        let queues = if self.queues.is_empty() {
            vec!["default".to_owned()]
        } else {
            self.queues
        };
        let worker_id: Arc<str> = Arc::from(worker_id);
        let reporter = Reporter::new(self.progress_interval);
        Ok(Worker {
            config: Config {
                endpoint: transport::endpoint(self.url, self.tls.as_ref())?,
                headers,
                worker_id: Arc::clone(&worker_id),
                host: Arc::from(host_name()),
                queues,
                drain_timeout: self.drain_timeout,
            },
            executor: Executor::new(
                self.registry,
                worker_id,
                (self.concurrency, self.prefetch),
                reporter.links(),
            ),
            reporter,
        })
    }
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("url", &self.url)
            .field("worker_id", &self.worker_id)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("tenant", &self.tenant)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("progress_interval", &self.progress_interval)
            .field("job_types", &self.registry.job_types())
            .finish_non_exhaustive()
    }
}

/// The most of a host name the hello carries (the server's limit for `Hello.host`).
const MAX_HOST: usize = 255;

/// The host the worker runs on, from the kernel or `HOSTNAME`; empty when neither says.
fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().replace('\0', ""))
        .unwrap_or_default();
    let mut cut = host.len().min(MAX_HOST);
    while !host.is_char_boundary(cut) {
        cut -= 1;
    }
    host[..cut].to_owned()
}

/// `<hostname>-<pid>-<random>`: readable in lease owners, and unique even for several workers
/// in one process (as in tests).
fn default_worker_id() -> String {
    let host = Some(host_name())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    let host: String = host.chars().take(96).collect();
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Noop {}

    impl prost::Name for Noop {
        const NAME: &'static str = "Noop";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Noop {
        const JOB_TYPE: &'static str = "test.noop";
        type Output = ();
    }

    fn builder() -> WorkerBuilder {
        Worker::builder("http://127.0.0.1:50051")
            .register::<Noop, _, _>(|_ctx, _job: Noop| async { Ok(()) })
    }

    fn config_error(builder: WorkerBuilder) -> String {
        match builder.build() {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let worker = builder().build().expect("valid");
        assert_eq!(worker.config.queues, ["default"]);
        assert_eq!(worker.executor.slots(), DEFAULT_CONCURRENCY);
        assert_eq!(worker.config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert!(worker.worker_id().contains(&std::process::id().to_string()));
        let other = builder().build().expect("valid");
        assert_ne!(worker.worker_id(), other.worker_id());
    }

    #[test]
    fn settings_are_checked_at_build() {
        assert!(config_error(Worker::builder("http://x")).contains("no job type"));
        assert!(config_error(builder().concurrency(0)).contains("concurrency"));
        assert!(config_error(builder().concurrency(10_001)).contains("concurrency"));
        assert!(config_error(builder().worker_id("")).contains("worker id"));
        assert!(config_error(builder().worker_id("w".repeat(129))).contains("worker id"));
        assert!(config_error(builder().tenant("")).contains("tenant"));
        assert!(config_error(builder().api_key("")).contains("API key"));
        assert!(config_error(builder().tls(Tls::new())).contains("https://"));
        assert!(
            config_error(builder().progress_interval(Duration::ZERO)).contains("progress interval")
        );
        assert!(
            config_error(builder().register::<Noop, _, _>(|_ctx, _job: Noop| async { Ok(()) }))
                .contains("registered twice")
        );
    }

    #[test]
    fn the_key_is_never_shown() {
        let builder = builder().api_key("jw_secret");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("jw_secret"), "{shown}");
    }

    #[test]
    fn request_ids_are_unique_and_start_at_one() {
        let mut ids = RequestIds::default();
        assert_eq!((ids.next(), ids.next(), ids.next()), (1, 2, 3));
    }

    #[test]
    fn a_running_worker_can_be_spawned() {
        fn assert_send<T: Send + 'static>(_: &T) {}
        let worker = builder().build().expect("valid");
        assert_send(&worker.run(async {}));
    }

    #[test]
    fn settings_reach_the_worker() {
        let worker = builder()
            .worker_id("w1")
            .queues(["a", "b"])
            .concurrency(3)
            .tenant("acme")
            .drain_timeout(Duration::from_secs(5))
            .build()
            .expect("valid");
        assert_eq!(worker.worker_id(), "w1");
        assert_eq!(worker.config.queues, ["a", "b"]);
        assert_eq!(worker.executor.slots(), 3);
        assert_eq!(worker.config.headers.tenant(), Some("acme"));
        assert_eq!(worker.config.drain_timeout, Duration::from_secs(5));
    }
}
