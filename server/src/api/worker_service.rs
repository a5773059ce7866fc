//! `jobwire.v1.WorkerService`: the stream between the server and each worker process.
//!
//! A translator: each stream's task reads the worker's messages, validates them into the
//! engine's terms and hands them to the stream's [`WorkerSession`] (the owner of every lease the
//! worker holds), and writes what the session decides (leases, stops, acks) back as protocol
//! messages. A message that does not validate is refused in its ack, naming the field; a failed
//! write means the worker left.
//!
//! ListWorkers and DrainWorker act on the fleet through the store, whichever replica serves
//! each worker: the streams are recorded in the `workers` table by their sessions, and a drain
//! is a request on their rows that the serving replica hears of and passes on.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use jobwire_proto::{
    limits::MAX_MESSAGE_BYTES,
    v1::{
        self as pb, connect_request::Message as In, connect_response::Message as Out,
        worker_service_server::WorkerService,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{ApiError, budget, convert, paging::PageRequest, tenant_of, validate, worker_messages};
use crate::{
    domain::{LeaseRef, TenantId},
    engine::{
        self, Engine,
        session::{Close, Inbound, Outbound, SessionConfig, StopReason, WorkerSession},
    },
    metrics::{OpenStream, StreamKind},
    registry::Registry,
    store::{NewJobType, Store},
};

/// Messages buffered towards one worker before its stream waits for the worker to read.
const OUTBOUND_CAPACITY: usize = 256;
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

pub struct WorkerApi {
    store: Store,
    registry: Registry,
    engine: Engine,
    config: SessionConfig,
    max_payload_bytes: usize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    next_session: AtomicU64,
}

impl WorkerApi {
    pub fn new(
        store: Store,
        registry: Registry,
        engine: Engine,
        (config, max_payload_bytes): (SessionConfig, usize),
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            store,
            registry,
            engine,
            config,
            max_payload_bytes,
            shutdown,
            tasks,
            next_session: AtomicU64::new(1),
        }
    }
}

type Writer = mpsc::Sender<Result<pb::ConnectResponse, Status>>;

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
        let stream = Stream {
            tenant: tenant.clone(),
            store: self.store.clone(),
            registry: self.registry.clone(),
            engine: self.engine.clone(),
            config: self.config.clone(),
            max_payload: self.max_payload_bytes,
            tx,
        };
        let span = tracing::info_span!("worker_stream", session = id, %tenant);
        let open = OpenStream::open(StreamKind::Worker);
        let run = stream.run(id, request.into_inner(), self.shutdown.clone());
        self.tasks.spawn(
            async move {
                run.await;
                drop(open);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<uuid::Uuid, ()>::parse(
            req.page_size,
            &req.page_token,
            (),
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        // A stream unheard for a lease duration has lost its leases: its replica is gone.
        let views = self
            .store
            .list_workers(
                &tenant,
                self.config.lease_duration,
                paging.after,
                paging.limit(),
            )
            .await
            .map_err(ApiError::from)?;
        let candidates = views.into_iter().map(convert::worker).collect();
        let (workers, next_page_token) =
            paging.page(candidates, false, |worker: &pb::Worker| {
                uuid::Uuid::parse_str(&worker.stream_id)
                    .map_err(|e| ApiError::Internal(format!("a stream id that is no UUID: {e}")))
            })?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers,
            next_page_token,
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let worker_id = &request.get_ref().worker_id;
        if worker_id.is_empty() {
            return Err(ApiError::invalid("worker_id", "must not be empty").into());
        }
        validate::text("worker_id", worker_id, worker_messages::MAX_WORKER_ID)?;
        let views = self
            .store
            .request_drain(&tenant, worker_id, self.config.lease_duration)
            .await
            .map_err(|e| {
                ApiError::from_store(e, || format!("no worker {worker_id:?} is connected"))
            })?;
        tracing::info!(%tenant, worker = %worker_id, streams = views.len(), "worker drain asked");
        Ok(Response::new(pb::DrainWorkerResponse {
            workers: views.into_iter().map(convert::worker).collect(),
        }))
    }
}

/// One worker stream, from its hello to its end.
struct Stream {
    tenant: TenantId,
    store: Store,
    registry: Registry,
    engine: Engine,
    config: SessionConfig,
    max_payload: usize,
    tx: Writer,
}

impl Stream {
    async fn send(&self, message: Out) -> bool {
        self.tx
            .send(Ok(pb::ConnectResponse {
                message: Some(message),
            }))
            .await
            .is_ok()
    }

    async fn fail(&self, error: impl Into<Status>) {
        let _ = self.tx.send(Err(error.into())).await;
    }

    async fn run(
        self,
        id: u64,
        mut inbound: Streaming<pb::ConnectRequest>,
        shutdown: CancellationToken,
    ) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::ConnectRequest {
                message: Some(In::Hello(hello)),
            }))) => worker_messages::hello(&self.tenant, hello),
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Ok(Ok(Some(_))) => Err(ApiError::invalid(
                "hello",
                "the first message must be hello",
            )),
            Err(_) => Err(ApiError::invalid("hello", "not received within 30s")),
        };
        let hello = match hello {
            Ok(hello) => hello,
            Err(error) => return self.fail(error).await,
        };
        let worker = hello.spec.worker_id.clone();
        tracing::info!(%worker, slots = hello.spec.slots, "worker connected");
        if let Err(error) = self.register_schemas(&worker, &hello.schemas).await {
            return self.fail(error).await;
        }
        let opened = WorkerSession::open(
            &self.engine,
            &self.store,
            self.config.clone(),
            id,
            hello.spec,
        )
        .await;
        let (mut session, welcome) = match opened {
            Ok(opened) => opened,
            Err(error) => return self.fail(ApiError::from(error)).await,
        };
        let welcome = Out::Welcome(pb::Welcome {
            session_id: welcome.session.to_string(),
            heartbeat_interval: Some(convert::duration(session.heartbeat_interval())),
            lease_duration: Some(convert::duration(session.lease_duration())),
            rejected: welcome.rejected.into_iter().map(lease_msg).collect(),
        });
        let close = if self.send(welcome).await {
            self.serve(&mut session, &mut inbound, &shutdown).await
        } else {
            Close::WorkerLeft
        };
        match close {
            Close::WorkerLeft => tracing::info!("worker disconnected"),
            Close::Drained => tracing::info!("worker drained and disconnected"),
            Close::Shutdown => {}
        }
        let acks = session.close(close).await;
        if close == Close::Shutdown {
            self.fail(Status::unavailable("server is shutting down; reconnect"))
                .await;
            return;
        }
        // Outcomes already handed to the completer are written whatever happens; let the worker
        // hear about them if it is still listening, so it need not resend.
        for (request_id, result) in acks {
            if !self.send(Out::Ack(ack(request_id, result))).await {
                break;
            }
        }
    }

    /// Registers the schemas of the types the worker serves, where they changed.
    async fn register_schemas(&self, worker: &str, schemas: &[NewJobType]) -> Result<(), ApiError> {
        for schema in schemas {
            if let Some(row) = self
                .store
                .register_job_type_from_worker(&self.tenant, schema)
                .await?
            {
                self.registry.forget_latest(&self.tenant, &schema.name);
                tracing::info!(tenant = %self.tenant, job_type = %row.name,
                    version = row.version, %worker, "job type registered by a worker");
            }
        }
        Ok(())
    }

    async fn serve(
        &self,
        session: &mut WorkerSession,
        inbound: &mut Streaming<pb::ConnectRequest>,
        shutdown: &CancellationToken,
    ) -> Close {
        let mut draining = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Close::Shutdown,
                message = inbound.message() => match message {
                    Ok(Some(pb::ConnectRequest { message: Some(message) })) => {
                        if matches!(message, In::Drain(_)) {
                            draining = true;
                        }
                        if !self.handle(session, message).await {
                            return Close::WorkerLeft;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) if draining || session.is_draining() => return Close::Drained,
                    Err(status) if budget::oversize(&status).is_some() => {
                        if let Some(status) = budget::oversize(&status) {
                            self.fail(status).await;
                        }
                        return Close::WorkerLeft;
                    }
                    Ok(None) | Err(_) => return Close::WorkerLeft,
                },
                out = session.next() => match out {
                    Some(out) => {
                        if !self.deliver(session, out).await {
                            return Close::WorkerLeft;
                        }
                    }
                    None => return Close::Shutdown,
                },
            }
        }
    }

    /// Writes one message of the session's to the worker. False when the worker has gone.
    async fn deliver(&self, session: &mut WorkerSession, out: Outbound) -> bool {
        match out {
            Outbound::Lease { row, held } => {
                let lease = LeaseRef {
                    job_id: crate::domain::JobId(row.job.id),
                    attempt: row.job.attempt,
                };
                let message = convert::lease(*row, held);
                if let Some(size) = oversize_lease(&message) {
                    let why = format!(
                        "the lease is {size} bytes, over the limit of {MAX_MESSAGE_BYTES} bytes \
                         per message: the job's payload and checkpoint together are too large \
                         to send to a worker"
                    );
                    session.undeliverable(lease, why).await;
                    return true;
                }
                tracing::debug!(job_id = %lease.job_id, attempt = lease.attempt, "lease sent");
                if self.send(Out::Lease(message)).await {
                    true
                } else {
                    session.not_sent(lease).await;
                    false
                }
            }
            Outbound::Stop {
                lease,
                reason,
                message,
            } => {
                let reason = match reason {
                    StopReason::LeaseLost => pb::StopReason::LeaseLost,
                    StopReason::Cancelled => pb::StopReason::Cancelled,
                    StopReason::Paused => pb::StopReason::Paused,
                    StopReason::TimedOut => pb::StopReason::TimedOut,
                };
                self.send(Out::StopJob(pb::StopJob {
                    lease: Some(lease_msg(lease)),
                    reason: reason.into(),
                    message: message.to_owned(),
                }))
                .await
            }
            Outbound::ReleaseQueued(queue) => {
                self.send(Out::ReleaseQueued(pb::ReleaseQueued {
                    queue: queue.as_str().to_owned(),
                }))
                .await
            }
            Outbound::Drain => {
                tracing::info!("telling the worker to drain");
                self.send(Out::Drain(pb::Drain {})).await
            }
            Outbound::Ack(request_id, result) => self.send(Out::Ack(ack(request_id, result))).await,
        }
    }

    /// Translates one message from the worker for its session. False when the stream must end.
    async fn handle(&self, session: &mut WorkerSession, message: In) -> bool {
        let (request_id, inbound) = match message {
            In::Hello(_) => {
                // The worker and the server no longer agree on the stream's state: end it, and
                // let the worker start over on a new one.
                let error = ApiError::invalid(
                    "hello",
                    "sent again on a stream already welcomed; a stream takes one hello, first",
                );
                self.fail(error).await;
                return false;
            }
            In::Heartbeat(heartbeat) => {
                let leases = heartbeat
                    .running
                    .iter()
                    .filter_map(|l| validate::lease_ref("running", Some(l)).ok())
                    .collect();
                (None, Ok(Inbound::Heartbeat(leases)))
            }
            In::Started(started) => {
                let leases = started
                    .leases
                    .iter()
                    .filter_map(|l| validate::lease_ref("started", Some(l)).ok())
                    .collect();
                (None, Ok(Inbound::Started(leases)))
            }
            In::Drain(_) => (None, Ok(Inbound::Drain)),
            In::Complete(m) => (
                Some(m.request_id),
                worker_messages::completion(&self.tenant, self.max_payload, m)
                    .map(|c| Inbound::Complete(0, c)),
            ),
            In::Fail(m) => (
                Some(m.request_id),
                worker_messages::failure(&self.tenant, m).map(|f| Inbound::Fail(0, f)),
            ),
            In::Progress(m) => (
                Some(m.request_id),
                worker_messages::progress(&self.tenant, m).map(|p| Inbound::Progress(0, p)),
            ),
            In::Logs(m) => (
                Some(m.request_id),
                worker_messages::logs(&self.tenant, m).map(|l| Inbound::Logs(0, l)),
            ),
            In::Checkpoint(m) => (
                Some(m.request_id),
                worker_messages::checkpoint(&self.tenant, self.max_payload, m)
                    .map(|c| Inbound::Checkpoint(0, c)),
            ),
            In::Release(m) => (
                Some(m.request_id),
                worker_messages::release(&m).map(|leases| Inbound::Release(0, leases)),
            ),
        };
        match (request_id, inbound) {
            (_, Ok(inbound)) => {
                session
                    .handle(with_request_id(inbound, request_id.unwrap_or(0)))
                    .await;
                true
            }
            (request_id, Err(error)) => {
                let reply = pb::Ack {
                    request_id: request_id.unwrap_or(0),
                    code: error.code() as i32,
                    message: error.to_string(),
                };
                self.send(Out::Ack(reply)).await
            }
        }
    }
}

/// The message's request id, into the engine's form of it.
fn with_request_id(inbound: Inbound, request_id: u64) -> Inbound {
    match inbound {
        Inbound::Complete(_, c) => Inbound::Complete(request_id, c),
        Inbound::Fail(_, f) => Inbound::Fail(request_id, f),
        Inbound::Progress(_, p) => Inbound::Progress(request_id, p),
        Inbound::Logs(_, l) => Inbound::Logs(request_id, l),
        Inbound::Checkpoint(_, c) => Inbound::Checkpoint(request_id, c),
        Inbound::Release(_, leases) => Inbound::Release(request_id, leases),
        other => other,
    }
}

/// An ack: OK, or the engine's error mapped to its status code (`api::error`).
fn ack(request_id: u64, result: Result<(), engine::Error>) -> pb::Ack {
    match result {
        Ok(()) => pb::Ack {
            request_id,
            code: Code::Ok as i32,
            message: String::new(),
        },
        Err(error) => {
            let error = ApiError::from(error);
            let status = Status::from(error);
            pb::Ack {
                request_id,
                code: status.code() as i32,
                message: status.message().to_owned(),
            }
        }
    }
}

/// The encoded size of a lease too large to send, if it is (with the few bytes of the
/// `ConnectResponse` around it).
fn oversize_lease(lease: &pb::Lease) -> Option<usize> {
    let size = prost::Message::encoded_len(lease) + 8;
    (size > MAX_MESSAGE_BYTES).then_some(size)
}

fn lease_msg(lease: LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        job_id: lease.job_id.to_string(),
        attempt: lease.attempt,
    }
}
