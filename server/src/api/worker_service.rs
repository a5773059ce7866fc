//! `jobwire.v1.WorkerService`: the stream between the server and each worker process.
//!
//! Every stream has one owner task, a [`Session`], which `select!`s over the worker's messages,
//! leases from the dispatcher, acknowledgements from the completer and shutdown, and writes
//! through one bounded channel. A failed write means the worker left: leases not yet written are
//! handed back at once; leases it already holds stay until it reconnects and adopts them again,
//! or until they lapse and the reaper retries their jobs (invariant 2).
//!
//! The session keeps the set of leases its worker holds, to return a dispatcher slot exactly
//! once per lease when the worker reports its outcome or hands the lease back, and to pass on stop requests (cancel,
//! pause) for them: at once when the request's notification arrives, and again with every
//! heartbeat while the request stands, so a missed notification or a reconnect loses nothing
//! (invariant 3).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use jobwire_proto::v1::{
    self as pb, connect_request::Message as In, connect_response::Message as Out,
    worker_service_server::WorkerService,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use jobwire_proto::limits::{MAX_LOG_BATCH_BYTES, MAX_MESSAGE_BYTES};

use super::{ApiError, budget, convert, job_type_service, tenant_of, validate};
use crate::{
    domain::{JobId, LeaseRef, QueueName, TenantId},
    engine::{
        Engine,
        completer::{Settle, SettleError},
        dispatcher::{Outgoing, Registration, SessionId},
        notifier::StopSignal,
    },
    registry::Registry,
    store::{
        Checkpoint, Completion, Failure, LogBatch, NewJobType, ProgressUpdate, Renewed,
        SettleResult, StopKind, Store,
    },
};

/// Messages buffered towards one worker before its session waits for the worker to read.
const OUTBOUND_CAPACITY: usize = 256;
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_SLOTS: i32 = 10_000;
const MAX_WORKER_ID: usize = 128;
const MAX_FAILURE_KIND: usize = 128;
const MAX_FAILURE_MESSAGE: usize = 8192;
const MAX_LOG_LINES: usize = 1000;
const MAX_LOG_LINE: usize = 8192;
const MAX_PROGRESS_TEXT: usize = 1024;
const MAX_PROGRESS_DATA: usize = 64 * 1024;
/// How long a stream remembers a stop for a lease it does not hold, in case the lease is on its
/// way to it: claimed ahead, a lease waits at most 250 ms in the dispatcher, then a moment in
/// the channel to the stream.
const PENDING_STOP_TTL: Duration = Duration::from_secs(1);
/// The most such stops a stream remembers; beyond it (a bulk cancel) the oldest are forgotten,
/// and their leases learn of the stop at their next heartbeat, as before.
const MAX_PENDING_STOPS: usize = 65_536;

/// Timings and limits a session enforces.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub lease_duration: Duration,
    pub heartbeat_interval: Duration,
    pub max_payload_bytes: usize,
    /// How long a worker has to stop a job after a cancel or pause before its lease lapses.
    pub stop_grace: Duration,
}

pub struct WorkerApi {
    store: Store,
    registry: Registry,
    engine: Engine,
    config: SessionConfig,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    next_session: AtomicU64,
}

impl WorkerApi {
    pub fn new(
        store: Store,
        registry: Registry,
        engine: Engine,
        config: SessionConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            store,
            registry,
            engine,
            config,
            shutdown,
            tasks,
            next_session: AtomicU64::new(1),
        }
    }
}

type Outbound = mpsc::Sender<Result<pb::ConnectResponse, Status>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type ConnectStream = ReceiverStream<Result<pb::ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let tenant = tenant_of(&request)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id,
            tenant: tenant.clone(),
            store: self.store.clone(),
            registry: self.registry.clone(),
            engine: self.engine.clone(),
            config: self.config.clone(),
            tx,
            held: HashSet::new(),
            draining: false,
            pending_stops: PendingStops::default(),
        };
        let span = tracing::info_span!("worker_stream", session = id, %tenant);
        self.tasks.spawn(
            session
                .run(request.into_inner(), self.shutdown.clone())
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type AckFuture = Pin<Box<dyn Future<Output = pb::Ack> + Send>>;

/// A validated hello.
struct Hello {
    worker_id: String,
    job_types: Vec<String>,
    queues: Vec<QueueName>,
    slots: u32,
    prefetch: u32,
    running: Vec<LeaseRef>,
    /// Schemas of served types, to register when they changed.
    schemas: Vec<NewJobType>,
}

fn validate_hello(hello: pb::Hello) -> Result<Hello, ApiError> {
    if hello.worker_id.is_empty() {
        return Err(ApiError::invalid("hello.worker_id", "must not be empty"));
    }
    validate::text("hello.worker_id", &hello.worker_id, MAX_WORKER_ID)?;
    if hello.job_types.is_empty() {
        return Err(ApiError::invalid(
            "hello.job_types",
            "must name at least one job type",
        ));
    }
    let job_types = hello
        .job_types
        .iter()
        .enumerate()
        .map(|(i, t)| validate::job_type(&format!("hello.job_types[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut queues = hello
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| validate::queue(&format!("hello.queues[{i}]"), q))
        .collect::<Result<Vec<_>, _>>()?;
    if queues.is_empty() {
        queues.push(QueueName::new_unchecked(validate::DEFAULT_QUEUE));
    }
    if !(1..=MAX_SLOTS).contains(&hello.slots) {
        return Err(ApiError::invalid(
            "hello.slots",
            format!("must be between 1 and {MAX_SLOTS}, got {}", hello.slots),
        ));
    }
    if !(0..=MAX_SLOTS).contains(&hello.prefetch) {
        return Err(ApiError::invalid(
            "hello.prefetch",
            format!("must be between 0 and {MAX_SLOTS}, got {}", hello.prefetch),
        ));
    }
    let running = hello
        .running
        .iter()
        .enumerate()
        .map(|(i, l)| validate::lease_ref(&format!("hello.running[{i}]"), Some(l)))
        .collect::<Result<Vec<_>, _>>()?;
    let schemas = hello
        .schemas
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("hello.schemas[{i}]");
            if !job_types.contains(&t.name) {
                return Err(ApiError::invalid(
                    format!("{at}.name"),
                    format!("{:?} is not among hello.job_types", t.name),
                ));
            }
            job_type_service::new_job_type(t, &at)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Hello {
        worker_id: hello.worker_id,
        job_types,
        queues,
        slots: hello.slots.unsigned_abs(),
        prefetch: hello.prefetch.unsigned_abs(),
        running,
        schemas,
    })
}

fn validate_release(release: &pb::ReleaseLeases) -> Result<Vec<LeaseRef>, ApiError> {
    let most = 2 * usize::try_from(MAX_SLOTS).unwrap_or(usize::MAX);
    if release.leases.is_empty() || release.leases.len() > most {
        return Err(ApiError::invalid(
            "release.leases",
            format!("must name 1 to {most} leases, got {}", release.leases.len()),
        ));
    }
    release
        .leases
        .iter()
        .enumerate()
        .map(|(i, l)| validate::lease_ref(&format!("release.leases[{i}]"), Some(l)))
        .collect()
}

fn lease_msg(lease: LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        job_id: lease.job_id.to_string(),
        attempt: lease.attempt,
    }
}

fn stop_job(lease: LeaseRef, reason: pb::StopReason, message: &str) -> pb::ConnectResponse {
    pb::ConnectResponse {
        message: Some(Out::StopJob(pb::StopJob {
            lease: Some(lease_msg(lease)),
            reason: reason.into(),
            message: message.to_owned(),
        })),
    }
}

fn stop_reason(stop: StopKind) -> (pb::StopReason, &'static str) {
    match stop {
        StopKind::Cancel => (pb::StopReason::Cancelled, "the job was cancelled"),
        StopKind::Pause => (
            pb::StopReason::Paused,
            "the job was paused: save a checkpoint and stop",
        ),
    }
}

/// The encoded size of a lease too large to send, if it is (with the few bytes of the
/// `ConnectResponse` around it).
fn oversize_lease(lease: &pb::Lease) -> Option<usize> {
    let size = prost::Message::encoded_len(lease) + 8;
    (size > MAX_MESSAGE_BYTES).then_some(size)
}

/// Cuts a string to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn ack(request_id: u64, code: Code, message: impl Into<String>) -> pb::Ack {
    pb::Ack {
        request_id,
        code: code as i32,
        message: message.into(),
    }
}

/// The owner of one worker stream.
struct Session {
    id: SessionId,
    tenant: TenantId,
    store: Store,
    registry: Registry,
    engine: Engine,
    config: SessionConfig,
    tx: Outbound,
    /// Leases this worker holds through this stream; each returns one slot when settled.
    held: HashSet<LeaseRef>,
    /// The worker said it drains: once it closes its side, it has nothing running.
    draining: bool,
    /// Stops for leases not held when they were asked, passed on if such a lease arrives.
    pending_stops: PendingStops,
}

/// Stops asked for leases a stream did not hold at the time, kept for [`PENDING_STOP_TTL`].
///
/// A stop is broadcast once, to the streams holding the lease. A lease claimed ahead and held
/// ready in the dispatcher, or in the channel to its stream, is held by none, so its worker
/// would hear of the stop only at its next heartbeat renewal (seconds later), by which time a
/// short job has run to the end despite a cancel.
#[derive(Debug, Default)]
struct PendingStops {
    by_lease: HashMap<LeaseRef, (StopKind, Instant)>,
    /// The same leases, oldest first, to forget them in order.
    order: VecDeque<(Instant, LeaseRef)>,
}

impl PendingStops {
    fn insert(&mut self, lease: LeaseRef, stop: StopKind, now: Instant) {
        self.forget_expired(now);
        if self.order.len() >= MAX_PENDING_STOPS
            && let Some((at, oldest)) = self.order.pop_front()
        {
            self.forget(oldest, at);
        }
        self.by_lease.insert(lease, (stop, now));
        self.order.push_back((now, lease));
    }

    /// The stop asked for `lease`, if one was asked within the last [`PENDING_STOP_TTL`].
    fn take(&mut self, lease: &LeaseRef, now: Instant) -> Option<StopKind> {
        self.forget_expired(now);
        self.by_lease.remove(lease).map(|(stop, _)| stop)
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some(&(at, lease)) = self.order.front() {
            if now.duration_since(at) < PENDING_STOP_TTL {
                break;
            }
            self.order.pop_front();
            self.forget(lease, at);
        }
    }

    /// Forgets the stop for `lease` asked at `at`; a later stop for it keeps its own entry.
    fn forget(&mut self, lease: LeaseRef, at: Instant) {
        if self
            .by_lease
            .get(&lease)
            .is_some_and(|&(_, seen)| seen == at)
        {
            self.by_lease.remove(&lease);
        }
    }
}

/// Why a session ended.
enum End {
    /// The worker closed its side, or its connection broke.
    WorkerLeft,
    /// The worker drained, then closed its side: whatever it still holds it never started.
    Drained,
    /// The server is shutting down; the worker should reconnect elsewhere.
    Shutdown,
}

impl Session {
    async fn send(&self, message: Out) -> bool {
        self.tx
            .send(Ok(pb::ConnectResponse {
                message: Some(message),
            }))
            .await
            .is_ok()
    }

    async fn run(
        mut self,
        mut inbound: Streaming<pb::ConnectRequest>,
        shutdown: CancellationToken,
    ) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::ConnectRequest {
                message: Some(In::Hello(hello)),
            }))) => validate_hello(hello),
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Ok(Ok(Some(_))) => Err(ApiError::invalid(
                "hello",
                "the first message must be hello",
            )),
            Err(_) => Err(ApiError::invalid("hello", "not received within 30s")),
        };
        let hello = match hello {
            Ok(hello) => hello,
            Err(error) => {
                let _ = self.tx.send(Err(error.into())).await;
                return;
            }
        };
        tracing::info!(worker = %hello.worker_id, slots = hello.slots, "worker connected");
        match self.serve(hello, &mut inbound, &shutdown).await {
            End::WorkerLeft => tracing::info!("worker disconnected"),
            End::Drained => tracing::info!("worker drained and disconnected"),
            End::Shutdown => {
                let _ = self
                    .tx
                    .send(Err(Status::unavailable(
                        "server is shutting down; reconnect",
                    )))
                    .await;
            }
        }
    }

    async fn serve(
        &mut self,
        hello: Hello,
        inbound: &mut Streaming<pb::ConnectRequest>,
        shutdown: &CancellationToken,
    ) -> End {
        let adopted = match self
            .store
            .renew(
                &self.tenant,
                &hello.running,
                &hello.worker_id,
                self.config.lease_duration,
                self.config.stop_grace,
            )
            .await
        {
            Ok(adopted) => adopted,
            Err(error) => {
                let _ = self.tx.send(Err(ApiError::from(error).into())).await;
                return End::WorkerLeft;
            }
        };
        self.held.extend(adopted.iter().map(|r| r.lease));
        // A queue a worker serves is in use: list it (so it can be limited) before its first job.
        if let Err(error) = self.store.ensure_queues(&self.tenant, &hello.queues).await {
            let _ = self.tx.send(Err(ApiError::from(error).into())).await;
            return End::WorkerLeft;
        }
        for schema in &hello.schemas {
            match self
                .store
                .register_job_type_from_worker(&self.tenant, schema)
                .await
            {
                Ok(Some(row)) => {
                    self.registry.forget_latest(&self.tenant, &schema.name);
                    tracing::info!(tenant = %self.tenant, job_type = %row.name,
                        version = row.version, worker = %hello.worker_id,
                        "job type registered by a worker");
                }
                Ok(None) => {}
                Err(error) => {
                    let _ = self.tx.send(Err(ApiError::from(error).into())).await;
                    return End::WorkerLeft;
                }
            }
        }
        let rejected: Vec<LeaseRef> = hello
            .running
            .iter()
            .filter(|l| !self.held.contains(l))
            .copied()
            .collect();
        let welcome = Out::Welcome(pb::Welcome {
            session_id: self.id.to_string(),
            heartbeat_interval: Some(convert::duration(self.config.heartbeat_interval)),
            lease_duration: Some(convert::duration(self.config.lease_duration)),
            rejected: rejected.iter().copied().map(lease_msg).collect(),
        });
        if !self.send(welcome).await {
            return End::WorkerLeft;
        }
        for lease in &rejected {
            let stop = stop_job(*lease, pb::StopReason::LeaseLost, "lease lapsed while away");
            if self.tx.send(Ok(stop)).await.is_err() {
                return End::WorkerLeft;
            }
        }
        if !self.pass_on_stops(&adopted).await {
            return End::WorkerLeft;
        }
        let mut stops = self.engine.stops.subscribe();
        let mut queue_holds = self.engine.queue_holds.subscribe();
        let prefetching = hello.prefetch > 0;

        let capacity = usize::try_from(hello.slots + hello.prefetch).unwrap_or(1);
        let (lease_tx, mut lease_rx) = mpsc::channel(capacity);
        self.engine
            .dispatcher
            .register(Registration {
                session: self.id,
                tenant: self.tenant.clone(),
                worker_id: hello.worker_id.clone(),
                queues: hello.queues.clone(),
                job_types: hello.job_types.clone(),
                slots: hello.slots,
                prefetch: hello.prefetch,
                held: u32::try_from(adopted.len()).unwrap_or(u32::MAX),
                leases: lease_tx,
            })
            .await;

        let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        let end = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break End::Shutdown,
                message = inbound.message() => match message {
                    Ok(Some(pb::ConnectRequest { message: Some(message) })) => {
                        if !self.handle(message, &hello.worker_id, &mut acks).await {
                            break End::WorkerLeft;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) if self.draining => break End::Drained,
                    Err(status) if budget::oversize(&status).is_some() => {
                        if let Some(status) = budget::oversize(&status) {
                            let _ = self.tx.send(Err(status)).await;
                        }
                        break End::WorkerLeft;
                    }
                    Ok(None) | Err(_) => break End::WorkerLeft,
                },
                signal = stops.recv() => match signal {
                    Ok(signal) => {
                        if !self.stop_signal(signal).await {
                            break End::WorkerLeft;
                        }
                    }
                    // Missed signals reach the worker with its next heartbeat.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break End::Shutdown,
                },
                Some(Outgoing { claimed, row }) = lease_rx.recv() => {
                    let lease = LeaseRef { job_id: JobId(row.job.id), attempt: row.job.attempt };
                    let message = convert::lease(row, claimed.elapsed());
                    self.held.insert(lease);
                    if let Some(size) = oversize_lease(&message) {
                        self.fail_undeliverable(lease, size).await;
                        continue;
                    }
                    tracing::debug!(job_id = %lease.job_id, attempt = lease.attempt, "lease sent");
                    if !self.send(Out::Lease(message)).await {
                        self.held.remove(&lease);
                        self.release(vec![lease]).await;
                        break End::WorkerLeft;
                    }
                    if let Some(stop) = self.pending_stops.take(&lease, Instant::now())
                        && !self.stop_signal(StopSignal { tenant: self.tenant.clone(), lease, stop }).await
                    {
                        break End::WorkerLeft;
                    }
                }
                hold = queue_holds.recv(), if prefetching => match hold {
                    Ok(hold) => {
                        if hold.tenant == self.tenant
                            && hello.queues.contains(&hold.queue)
                            && !self.send(Out::ReleaseQueued(pb::ReleaseQueued {
                                queue: hold.queue.as_str().to_owned(),
                            })).await
                        {
                            break End::WorkerLeft;
                        }
                    }
                    // Leases queued meanwhile start within 250 ms or go back unstarted.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break End::Shutdown,
                },
                Some(ack) = acks.next(), if !acks.is_empty() => {
                    if !self.send(Out::Ack(ack)).await {
                        break End::WorkerLeft;
                    }
                }
            }
        };
        self.engine.dispatcher.unregister(self.id).await;
        lease_rx.close();
        let mut undelivered = Vec::new();
        while let Some(Outgoing { row, .. }) = lease_rx.recv().await {
            undelivered.push(LeaseRef {
                job_id: JobId(row.job.id),
                attempt: row.job.attempt,
            });
        }
        // A drained worker closes only with nothing running or queued, so a lease still held
        // reached it after that (it was on its way as the worker went idle): without this it
        // would lapse, and its job run again only after the lease duration, as a second attempt.
        if matches!(end, End::Drained) {
            undelivered.extend(self.held.drain());
        }
        self.release(undelivered).await;
        // Outcomes already handed to the completer are written whatever happens; let the worker
        // hear about them if it is still listening, so it need not resend.
        while let Some(ack) = acks.next().await {
            if !self.send(Out::Ack(ack)).await {
                break;
            }
        }
        end
    }

    /// Fails a job whose lease is too large for any message (its payload and checkpoint were
    /// written by hand, or under another budget), rather than breaking the stream on every try.
    async fn fail_undeliverable(&mut self, lease: LeaseRef, size: usize) {
        tracing::error!(job_id = %lease.job_id, size, "a lease is too large to send; failing its job");
        if self.held.remove(&lease) {
            self.engine.dispatcher.credit(self.id, 1).await;
        }
        let failure = Failure {
            tenant: self.tenant.clone(),
            lease,
            message: format!(
                "the lease is {size} bytes, over the limit of {MAX_MESSAGE_BYTES} bytes per \
                 message: the job's payload and checkpoint together are too large to send to a \
                 worker"
            ),
            kind: "lease_too_large".to_owned(),
            non_retryable: true,
            retry_after: None,
        };
        if let Err(error) = self.engine.completer.settle(Settle::Fail(failure)).await {
            tracing::warn!(%error, job_id = %lease.job_id, "could not fail an undeliverable job; its lease will lapse");
        }
    }

    async fn release(&self, leases: Vec<LeaseRef>) {
        if leases.is_empty() {
            return;
        }
        if let Err(error) = self.store.release_undelivered(&self.tenant, &leases).await {
            tracing::warn!(%error, "could not hand back undelivered leases; they will lapse");
        }
    }

    /// Handles one message from the worker. Returns false when the worker is gone.
    async fn handle(
        &mut self,
        message: In,
        worker: &str,
        acks: &mut FuturesUnordered<AckFuture>,
    ) -> bool {
        match message {
            In::Hello(_) => {
                // The worker and the server no longer agree on the stream's state: end it, and
                // let the worker start over on a new one.
                let error = ApiError::invalid(
                    "hello",
                    "sent again on a stream already welcomed; a stream takes one hello, first",
                );
                let _ = self.tx.send(Err(error.into())).await;
                false
            }
            In::Heartbeat(heartbeat) => self.heartbeat(heartbeat, worker).await,
            In::Complete(complete) => {
                let request_id = complete.request_id;
                match self.completion(complete) {
                    Ok(completion) => {
                        self.settle(
                            request_id,
                            completion.lease,
                            Settle::Complete(completion),
                            acks,
                        )
                        .await;
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
            In::Fail(fail) => {
                let request_id = fail.request_id;
                match self.failure(fail) {
                    Ok(failure) => {
                        self.settle(request_id, failure.lease, Settle::Fail(failure), acks)
                            .await;
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
            In::Drain(_) => {
                tracing::info!("worker draining");
                self.draining = true;
                self.engine.dispatcher.drain(self.id).await;
                true
            }
            In::Progress(report) => {
                let request_id = report.request_id;
                match self.progress(report) {
                    Ok(update) => {
                        self.report(request_id, Settle::Progress(update), acks);
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
            In::Logs(report) => {
                let request_id = report.request_id;
                match self.logs(report) {
                    Ok(batch) => {
                        self.report(request_id, Settle::Logs(batch), acks);
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
            In::Checkpoint(save) => {
                let request_id = save.request_id;
                match self.checkpoint(save) {
                    Ok(checkpoint) => {
                        self.report(request_id, Settle::Checkpoint(checkpoint), acks);
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
            In::Release(release) => {
                let request_id = release.request_id;
                match validate_release(&release) {
                    Ok(leases) => {
                        self.release_unstarted(request_id, leases, acks).await;
                        true
                    }
                    Err(error) => self.reject(request_id, error).await,
                }
            }
        }
    }

    /// Hands back leases the worker held but did not start. Their places go back to the
    /// dispatcher at once; the jobs are available again when the statement commits, and the
    /// ack follows that commit. Leases another stream holds are handed back too: the attempt
    /// number fences them, as it does results.
    async fn release_unstarted(
        &mut self,
        request_id: u64,
        leases: Vec<LeaseRef>,
        acks: &mut FuturesUnordered<AckFuture>,
    ) {
        let returned = leases.iter().filter(|l| self.held.remove(l)).count();
        if returned > 0 {
            let returned = u32::try_from(returned).unwrap_or(u32::MAX);
            self.engine.dispatcher.released(self.id, returned).await;
        }
        let (store, tenant) = (self.store.clone(), self.tenant.clone());
        acks.push(Box::pin(async move {
            match store.release_undelivered(&tenant, &leases).await {
                Ok(_) => ack(request_id, Code::Ok, ""),
                Err(error) => {
                    let error = ApiError::from(error);
                    ack(request_id, error.code(), error.to_string())
                }
            }
        }));
    }

    /// Tells the worker of a stop requested for one of its leases, or remembers it for a while
    /// if the lease may still be on its way here.
    async fn stop_signal(&mut self, signal: StopSignal) -> bool {
        if signal.tenant != self.tenant {
            return true;
        }
        if !self.held.contains(&signal.lease) {
            self.pending_stops
                .insert(signal.lease, signal.stop, Instant::now());
            return true;
        }
        let (reason, message) = stop_reason(signal.stop);
        tracing::info!(job_id = %signal.lease.job_id, ?reason, "telling the worker to stop");
        self.tx
            .send(Ok(stop_job(signal.lease, reason, message)))
            .await
            .is_ok()
    }

    /// Repeats every stop that stands for the renewed leases.
    async fn pass_on_stops(&self, renewed: &[Renewed]) -> bool {
        for r in renewed {
            if let Some(stop) = r.stop {
                let (reason, message) = stop_reason(stop);
                if self
                    .tx
                    .send(Ok(stop_job(r.lease, reason, message)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
        true
    }

    fn progress(&self, report: pb::ReportProgress) -> Result<ProgressUpdate, ApiError> {
        let lease = validate::lease_ref("progress.lease", report.lease.as_ref())?;
        let progress = report
            .progress
            .ok_or_else(|| ApiError::invalid("progress.progress", "is required"))?;
        if let Some(f) = progress.fraction
            && !(0.0..=1.0).contains(&f)
        {
            return Err(ApiError::invalid(
                "progress.progress.fraction",
                format!("must be between 0.0 and 1.0, got {f}"),
            ));
        }
        if progress.items_done < 0 || progress.items_total < 0 {
            return Err(ApiError::invalid(
                "progress.progress.items_done",
                "item counts must not be negative",
            ));
        }
        if let Some(data) = &progress.data {
            if prost::Message::encoded_len(data) > MAX_PROGRESS_DATA {
                return Err(ApiError::invalid(
                    "progress.progress.data",
                    format!("must encode to at most {MAX_PROGRESS_DATA} bytes"),
                ));
            }
            validate::structure("progress.progress.data", data)?;
        }
        let progress = pb::Progress {
            message: truncate(progress.message, MAX_PROGRESS_TEXT),
            stage: truncate(progress.stage, MAX_PROGRESS_TEXT),
            ..progress
        };
        validate::text(
            "progress.progress.message",
            &progress.message,
            MAX_PROGRESS_TEXT,
        )?;
        validate::text(
            "progress.progress.stage",
            &progress.stage,
            MAX_PROGRESS_TEXT,
        )?;
        Ok(ProgressUpdate {
            tenant: self.tenant.clone(),
            lease,
            fraction: convert::progress_fraction(&progress),
            progress: convert::progress_to_json(&progress, chrono::Utc::now()),
        })
    }

    fn logs(&self, report: pb::ReportLogs) -> Result<LogBatch, ApiError> {
        let lease = validate::lease_ref("logs.lease", report.lease.as_ref())?;
        if report.lines.len() > MAX_LOG_LINES {
            return Err(ApiError::invalid(
                "logs.lines",
                format!("at most {MAX_LOG_LINES} lines per message"),
            ));
        }
        let text: usize = report.lines.iter().map(|l| l.message.len()).sum();
        if text > MAX_LOG_BATCH_BYTES {
            return Err(ApiError::invalid(
                "logs.lines",
                format!("at most {MAX_LOG_BATCH_BYTES} bytes of text per message, got {text}"),
            ));
        }
        let now = chrono::Utc::now();
        let lines = report
            .lines
            .into_iter()
            .enumerate()
            .map(|(i, line)| {
                let level = pb::LogLevel::try_from(line.level)
                    .unwrap_or(pb::LogLevel::Info)
                    .as_str_name();
                let time = line
                    .time
                    .map(|t| validate::timestamp(&format!("logs.lines[{i}].time"), &t))
                    .transpose()?
                    .unwrap_or(now);
                let message = truncate(line.message, MAX_LOG_LINE);
                validate::text(&format!("logs.lines[{i}].message"), &message, MAX_LOG_LINE)?;
                Ok(serde_json::json!({
                    "level": level,
                    "message": message,
                    "time": time.to_rfc3339(),
                }))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(LogBatch {
            tenant: self.tenant.clone(),
            lease,
            lines,
        })
    }

    fn checkpoint(&self, save: pb::SaveCheckpoint) -> Result<Checkpoint, ApiError> {
        let lease = validate::lease_ref("checkpoint.lease", save.lease.as_ref())?;
        if save.data.len() > self.config.max_payload_bytes {
            return Err(ApiError::invalid(
                "checkpoint.data",
                format!(
                    "is {} bytes, over the limit of {} bytes",
                    save.data.len(),
                    self.config.max_payload_bytes
                ),
            ));
        }
        Ok(Checkpoint {
            tenant: self.tenant.clone(),
            lease,
            data: save.data,
        })
    }

    async fn reject(&self, request_id: u64, error: ApiError) -> bool {
        self.send(Out::Ack(ack(request_id, error.code(), error.to_string())))
            .await
    }

    async fn heartbeat(&mut self, heartbeat: pb::Heartbeat, worker: &str) -> bool {
        let leases: Vec<LeaseRef> = heartbeat
            .running
            .iter()
            .filter_map(|l| validate::lease_ref("running", Some(l)).ok())
            .collect();
        let renewed = match self
            .store
            .renew(
                &self.tenant,
                &leases,
                worker,
                self.config.lease_duration,
                self.config.stop_grace,
            )
            .await
        {
            Ok(renewed) => renewed,
            Err(error) => {
                // The lease outlives a few missed heartbeats; the next one may get through.
                tracing::warn!(%error, "heartbeat renewal failed");
                return true;
            }
        };
        for lease in leases
            .iter()
            .filter(|l| !renewed.iter().any(|r| r.lease == **l))
        {
            let stop = stop_job(
                *lease,
                pb::StopReason::LeaseLost,
                "the lease is no longer held",
            );
            if self.tx.send(Ok(stop)).await.is_err() {
                return false;
            }
        }
        self.pass_on_stops(&renewed).await
    }

    fn completion(&self, complete: pb::CompleteJob) -> Result<Completion, ApiError> {
        let lease = validate::lease_ref("complete.lease", complete.lease.as_ref())?;
        if let Some(result) = &complete.result {
            validate::any_size("complete.result", result, self.config.max_payload_bytes)?;
        }
        let (result_type, result) = match complete.result {
            Some(any) => (Some(any.type_url), Some(any.value)),
            None => (None, None),
        };
        Ok(Completion {
            tenant: self.tenant.clone(),
            lease,
            result_type,
            result,
        })
    }

    fn failure(&self, fail: pb::FailJob) -> Result<Failure, ApiError> {
        let lease = validate::lease_ref("fail.lease", fail.lease.as_ref())?;
        let retry_after = fail
            .retry_after
            .as_ref()
            .map(|d| validate::duration("fail.retry_after", d))
            .transpose()?;
        let mut message = truncate(fail.message, MAX_FAILURE_MESSAGE);
        if message.is_empty() {
            message = "the handler failed without a message".to_owned();
        }
        validate::text("fail.message", &message, MAX_FAILURE_MESSAGE)?;
        let kind = truncate(fail.kind, MAX_FAILURE_KIND);
        validate::text("fail.kind", &kind, MAX_FAILURE_KIND)?;
        Ok(Failure {
            tenant: self.tenant.clone(),
            lease,
            message,
            kind,
            non_retryable: fail.non_retryable,
            retry_after,
        })
    }

    /// Frees the worker's slot for this lease, then queues the outcome with the completer; its
    /// acknowledgement is sent when the batch holding it has committed.
    async fn settle(
        &mut self,
        request_id: u64,
        lease: LeaseRef,
        settle: Settle,
        acks: &mut FuturesUnordered<AckFuture>,
    ) {
        if self.held.remove(&lease) {
            self.engine.dispatcher.credit(self.id, 1).await;
        }
        self.report(request_id, settle, acks);
    }

    /// Queues a report with the completer; the ack follows its commit.
    fn report(&self, request_id: u64, settle: Settle, acks: &mut FuturesUnordered<AckFuture>) {
        let lease = match &settle {
            Settle::Complete(c) => c.lease,
            Settle::Fail(f) => f.lease,
            Settle::Progress(p) => p.lease,
            Settle::Logs(l) => l.lease,
            Settle::Checkpoint(c) => c.lease,
        };
        let completer = self.engine.completer.clone();
        acks.push(Box::pin(async move {
            match completer.settle(settle).await {
                Ok(SettleResult::Applied(_)) | Ok(SettleResult::AlreadySettled) => {
                    ack(request_id, Code::Ok, "")
                }
                Ok(SettleResult::Stale) => ack(
                    request_id,
                    Code::Aborted,
                    format!(
                        "lease {}/{} is no longer held: the job has moved on; nothing changed",
                        lease.job_id, lease.attempt
                    ),
                ),
                Err(error @ (SettleError::ShuttingDown | SettleError::Unavailable(_))) => {
                    ack(request_id, Code::Unavailable, error.to_string())
                }
                Err(SettleError::Internal(detail)) => {
                    tracing::error!(%detail, "recording a report failed");
                    ack(request_id, Code::Internal, "internal error")
                }
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(n: u128) -> LeaseRef {
        LeaseRef {
            job_id: JobId(uuid::Uuid::from_u128(n)),
            attempt: 1,
        }
    }

    #[test]
    fn a_stop_for_a_lease_not_held_is_passed_on_once_while_it_is_recent() {
        let mut stops = PendingStops::default();
        let start = Instant::now();
        stops.insert(lease(1), StopKind::Cancel, start);
        stops.insert(lease(2), StopKind::Pause, start);
        assert_eq!(stops.take(&lease(1), start), Some(StopKind::Cancel));
        assert_eq!(stops.take(&lease(1), start), None, "passed on once");
        assert_eq!(stops.take(&lease(3), start), None);
        assert_eq!(
            stops.take(&lease(2), start + PENDING_STOP_TTL),
            None,
            "forgotten"
        );
        assert!(stops.by_lease.is_empty() && stops.order.is_empty());
    }

    #[test]
    fn a_stop_asked_again_lives_from_its_last_asking() {
        let mut stops = PendingStops::default();
        let start = Instant::now();
        let later = start + PENDING_STOP_TTL / 2;
        stops.insert(lease(1), StopKind::Pause, start);
        stops.insert(lease(1), StopKind::Cancel, later);
        assert_eq!(
            stops.take(&lease(1), start + PENDING_STOP_TTL),
            Some(StopKind::Cancel)
        );
    }

    #[test]
    fn a_bulk_of_stops_forgets_the_oldest_beyond_the_cap() {
        let mut stops = PendingStops::default();
        let now = Instant::now();
        for n in 0..=MAX_PENDING_STOPS as u128 {
            stops.insert(lease(n), StopKind::Cancel, now);
        }
        assert_eq!(stops.by_lease.len(), MAX_PENDING_STOPS);
        assert_eq!(stops.take(&lease(0), now), None, "the oldest went first");
        assert_eq!(
            stops.take(&lease(MAX_PENDING_STOPS as u128), now),
            Some(StopKind::Cancel)
        );
    }
}
