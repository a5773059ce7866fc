//! One `Connect` stream to the server, from `Hello` to its end.
//!
//! The session is the stream's only owner: one loop that `select!`s over the server's messages,
//! the heartbeat ticker, handlers finishing, handlers' reports (a wake-up from the reports hub,
//! the reporter's flush deadline, checkpoints), queued leases going stale and the worker's
//! lifecycle, and writes through a bounded channel (its capacity is the backpressure on a server
//! that stops reading). It holds no state of its own that must survive: leases run (or wait) on
//! in the executor, unsent reports stay in their buffers, and unacknowledged results and
//! hand-backs stay in the outbox and the releases, so when the stream breaks the worker simply
//! starts a new session, which names the leases it still holds in its `Hello` and sends those
//! results and hand-backs again.
//!
//! A session ends when the stream breaks ([`Broken`], and the worker reconnects), when a drain
//! completes (every handler returned and every result was acknowledged), or when the lifecycle
//! finishes. A drain starts with the worker's shutdown or when the server sends `drain`
//! (DrainWorker): the same drain either way.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use crate::context::StopReason;
use crate::proto::v1 as pb;
use crate::proto::v1::connect_request::Message as Outbound;
use crate::proto::v1::connect_response::Message as Inbound;
use crate::proto::v1::worker_service_client::WorkerServiceClient;
use crate::worker::executor::{Executor, Stopping};
use crate::worker::lifecycle::{Lifecycle, Phase};
use crate::worker::outbox::Acknowledged;
use crate::worker::reporter::ReportAck;
use crate::worker::{Config, MAX_QUEUED_WAIT, Work};

/// Messages that may wait to be written; beyond this the session waits for the transport.
const OUTBOUND_CAPACITY: usize = 64;
/// How long the server has to answer a `Hello` before the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The heartbeat interval when the server's welcome names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long to wait for the server to end the stream after the worker closed its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the hello says the worker runs, for the server's ListWorkers.
const SDK_VERSION: &str = concat!("jobwire-rust/", env!("CARGO_PKG_VERSION"));

/// How a session ended without breaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The drain completed and the stream was closed.
    Drained,
    /// The lifecycle finished: the drain ran out of time.
    Finished,
}

/// Why a stream broke.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error("the server returned {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rpc(tonic::Status),
    #[error("the server closed the stream")]
    Closed,
    #[error("the server did not answer the hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the server's first message was not a welcome")]
    NoWelcome,
    #[error("the transport stopped taking messages")]
    OutboundClosed,
}

impl From<tonic::Status> for StreamError {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc(status)
    }
}

/// A broken stream, and whether the server had welcomed the worker on it (which shows the
/// server is up, so the reconnect backoff starts over).
#[derive(Debug)]
pub(super) struct Broken {
    pub(super) error: StreamError,
    pub(super) welcomed: bool,
}

/// The writing half of a session.
struct Writer<'a> {
    tx: &'a mpsc::Sender<pb::ConnectRequest>,
}

impl Writer<'_> {
    /// Queues a message for the server; fails only when the stream is gone.
    async fn send(&self, message: pb::ConnectRequest) -> Result<(), StreamError> {
        self.tx
            .send(message)
            .await
            .map_err(|_| StreamError::OutboundClosed)
    }

    async fn send_message(&self, message: Outbound) -> Result<(), StreamError> {
        self.send(pb::ConnectRequest {
            message: Some(message),
        })
        .await
    }

    /// Queues messages in order.
    async fn send_all(&self, messages: Vec<pb::ConnectRequest>) -> Result<(), StreamError> {
        for message in messages {
            self.send(message).await?;
        }
        Ok(())
    }
}

/// Wraps a stream error, noting whether the server had welcomed the worker.
fn broken(welcomed: bool) -> impl Fn(StreamError) -> Broken {
    move |error| Broken { error, welcomed }
}

/// Runs one stream until it breaks, the drain completes, or the lifecycle finishes.
pub(super) async fn run(
    client: &mut WorkerServiceClient<Channel>,
    config: &Config,
    work: &mut Work,
    lifecycle: &mut Lifecycle<'_>,
) -> Result<Ended, Broken> {
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let out = Writer { tx: &tx };

    // Handlers that finished while no stream was up must not be named as running.
    work.collect_finished();
    let hello = pb::Hello {
        worker_id: config.worker_id.to_string(),
        job_types: work.executor.job_types(),
        queues: config.queues.clone(),
        slots: i32::try_from(work.executor.slots()).unwrap_or(i32::MAX),
        running: work.executor.live_leases(),
        schemas: work.executor.job_schemas(),
        prefetch: i32::try_from(work.executor.prefetch()).unwrap_or(i32::MAX),
        reports_started: true,
        version: SDK_VERSION.to_owned(),
        host: config.host.to_string(),
    };
    out.send_message(Outbound::Hello(hello))
        .await
        .map_err(broken(false))?;
    if lifecycle.phase().is_stopping() {
        // Back only to deliver results: ask for no leases from the start.
        out.send_message(Outbound::Drain(pb::Drain {}))
            .await
            .map_err(broken(false))?;
    }

    let request = config.headers.request(ReceiverStream::new(rx));
    let handshake = async {
        let mut inbound = client.connect(request).await?.into_inner();
        match inbound.message().await? {
            Some(pb::ConnectResponse {
                message: Some(Inbound::Welcome(welcome)),
            }) => Ok((inbound, welcome)),
            Some(_) => Err(StreamError::NoWelcome),
            None => Err(StreamError::Closed),
        }
    };
    tokio::pin!(handshake);
    let deadline = tokio::time::sleep(HANDSHAKE_TIMEOUT);
    tokio::pin!(deadline);
    let (mut inbound, welcome) = loop {
        tokio::select! {
            result = &mut handshake => break result.map_err(broken(false))?,
            () = &mut deadline => {
                return Err(broken(false)(StreamError::HandshakeTimeout(HANDSHAKE_TIMEOUT)));
            }
            phase = lifecycle.changed() => {
                work.on_phase(phase);
                match phase {
                    Phase::Draining => out
                        .send_message(Outbound::Drain(pb::Drain {}))
                        .await
                        .map_err(broken(false))?,
                    Phase::Finished => return Ok(Ended::Finished),
                    Phase::Serving | Phase::Aborting => {}
                }
            }
        }
    };

    let period = heartbeat_period(&welcome);
    welcomed(&welcome, period, work);
    out.send_all(work.outgoing()).await.map_err(broken(true))?;
    work.reporter.connected(Instant::now());
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let hub = work.reporter.hub();

    loop {
        if lifecycle.phase().is_stopping() && work.is_idle() {
            drop(tx);
            close(&mut inbound).await;
            return Ok(Ended::Drained);
        }
        let flush_at = work.reporter.flush_at();
        let stale_at = work.executor.stale_at(MAX_QUEUED_WAIT);
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(pb::ConnectResponse { message: Some(Inbound::Drain(_)) })) => {
                    // An operator asked (DrainWorker): drain as on our own shutdown.
                    if lifecycle.drain() {
                        tracing::info!("the server asked this worker to drain");
                        work.on_phase(Phase::Draining);
                        out.send_message(Outbound::Drain(pb::Drain {}))
                            .await
                            .map_err(broken(true))?;
                        out.send_all(work.outgoing()).await.map_err(broken(true))?;
                    }
                }
                Ok(Some(pb::ConnectResponse { message: Some(message) })) => {
                    receive(message, &out, work, lifecycle.phase())
                        .await
                        .map_err(broken(true))?;
                }
                Ok(Some(pb::ConnectResponse { message: None })) => {
                    tracing::debug!("ignoring an empty message from the server");
                }
                Ok(None) => return Err(broken(true)(StreamError::Closed)),
                Err(status) => return Err(broken(true)(status.into())),
            },
            _ = ticker.tick() => {
                let running = work.executor.live_leases();
                out.send_message(Outbound::Heartbeat(pb::Heartbeat { running }))
                    .await
                    .map_err(broken(true))?;
            }
            finished = work.executor.next_finished() => {
                work.record(finished);
                out.send_all(work.outgoing()).await.map_err(broken(true))?;
            }
            () = hub.woken() => {
                let reports = work.reporter.woken(Instant::now(), &mut work.ids);
                out.send_all(reports).await.map_err(broken(true))?;
            }
            () = due(flush_at) => {
                let reports = work.reporter.flush(Instant::now(), &mut work.ids);
                out.send_all(reports).await.map_err(broken(true))?;
            }
            () = due(stale_at) => {
                work.release_stale();
                out.send_all(work.outgoing()).await.map_err(broken(true))?;
            }
            request = work.reporter.next_checkpoint() => {
                if let Some(message) = work.reporter.checkpoint(request, &mut work.ids) {
                    out.send(message).await.map_err(broken(true))?;
                }
            }
            phase = lifecycle.changed() => {
                work.on_phase(phase);
                match phase {
                    Phase::Draining => {
                        out.send_message(Outbound::Drain(pb::Drain {}))
                            .await
                            .map_err(broken(true))?;
                        out.send_all(work.outgoing()).await.map_err(broken(true))?;
                    }
                    Phase::Finished => return Ok(Ended::Finished),
                    Phase::Serving | Phase::Aborting => {}
                }
            }
        }
    }
}

/// Resolves at `at`; pending while there is none.
async fn due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies a welcome: leases of the hello that the server no longer honours are stopped.
fn welcomed(welcome: &pb::Welcome, heartbeat: Duration, work: &mut Work) {
    let lease_duration = welcome
        .lease_duration
        .and_then(|duration| Duration::try_from(duration).ok());
    tracing::info!(
        session = %welcome.session_id,
        ?heartbeat,
        ?lease_duration,
        running = work.executor.len(),
        unacknowledged = work.outbox.len(),
        "connected to the server"
    );
    for lease in &welcome.rejected {
        match work.executor.stop(lease, StopReason::LeaseLost) {
            Stopping::NotRunning => {}
            // Not renewed is not yet ended (a stop asked too long ago, say): handing it back
            // settles it now rather than when the lease lapses.
            Stopping::Unstarted => work.releases.add([lease.clone()]),
            Stopping::Asked | Stopping::AlreadyAsked => tracing::warn!(
                job_id = %lease.job_id,
                attempt = lease.attempt,
                "the server no longer honours this lease; its handler was asked to stop"
            ),
        }
    }
}

/// Handles one message from the server.
async fn receive(
    message: Inbound,
    out: &Writer<'_>,
    work: &mut Work,
    phase: Phase,
) -> Result<(), StreamError> {
    match message {
        Inbound::Lease(lease) => {
            if phase.is_stopping() {
                // Sent before the server read our drain: hand it straight back, unstarted, to
                // run elsewhere.
                work.releases.add([pb::LeaseRef {
                    job_id: lease.job_id,
                    attempt: lease.attempt,
                }]);
                out.send_all(work.outgoing()).await?;
            } else {
                if let Err(refusal) = work.executor.start(lease) {
                    work.refuse(*refusal);
                }
                // The server counts an attempt once it knows its handler started.
                out.send_all(work.outgoing()).await?;
            }
        }
        Inbound::StopJob(stop) => {
            let Some(lease) = stop.lease else {
                tracing::warn!("ignoring a stop_job without a lease");
                return Ok(());
            };
            let reason = stop_reason(stop.reason);
            match work.executor.stop(&lease, reason) {
                Stopping::Asked => tracing::info!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    ?reason,
                    message = %stop.message,
                    "the server asked to stop a job"
                ),
                // The server repeats a standing stop with every heartbeat.
                Stopping::AlreadyAsked => tracing::debug!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    ?reason,
                    "the server repeated a stop"
                ),
                Stopping::Unstarted => {
                    tracing::info!(
                        job_id = %lease.job_id,
                        attempt = lease.attempt,
                        ?reason,
                        "the server asked to stop a job that had not started; handing it back"
                    );
                    work.releases.add([lease]);
                    out.send_all(work.outgoing()).await?;
                }
                Stopping::NotRunning => tracing::debug!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    ?reason,
                    "the server asked to stop a job that does not run here"
                ),
            }
        }
        Inbound::Ack(ack) => {
            if work.releases.acknowledge(&ack) {
                return Ok(());
            }
            match work.reporter.acknowledge(&ack) {
                Some(outcome) => report_acknowledged(outcome, &mut work.executor),
                None => acknowledged(work.outbox.acknowledge(&ack)),
            }
        }
        Inbound::ReleaseQueued(release) => {
            let leases = work.executor.take_queued_of(&release.queue);
            if !leases.is_empty() {
                tracing::info!(
                    queue = %release.queue,
                    count = leases.len(),
                    "the queue was paused or limited; handing back its queued leases"
                );
                work.releases.add(leases);
                out.send_all(work.outgoing()).await?;
            }
        }
        Inbound::Welcome(_) => tracing::warn!("ignoring a second welcome on the same stream"),
        // Handled by the session's loop, which owns the lifecycle.
        Inbound::Drain(_) => {}
    }
    Ok(())
}

/// The reason of a `StopJob`; an unspecified or unknown one (from a newer server) is taken as
/// a lost lease, the one reason under which nothing the handler does can still count.
fn stop_reason(reason: i32) -> StopReason {
    match pb::StopReason::try_from(reason) {
        Ok(pb::StopReason::Cancelled) => StopReason::Cancelled,
        Ok(pb::StopReason::Paused) => StopReason::Paused,
        Ok(pb::StopReason::TimedOut) => StopReason::TimedOut,
        Ok(pb::StopReason::LeaseLost | pb::StopReason::Unspecified) | Err(_) => {
            StopReason::LeaseLost
        }
    }
}

/// Acts on the acknowledgement of a report: a stale lease stops its handler.
fn report_acknowledged(outcome: ReportAck, executor: &mut Executor) {
    match outcome {
        ReportAck::Applied => {}
        ReportAck::LeaseLost(lease) => match executor.stop(&lease, StopReason::LeaseLost) {
            Stopping::Asked => tracing::warn!(
                job_id = %lease.job_id,
                attempt = lease.attempt,
                "a report was refused as stale; the handler was asked to stop"
            ),
            Stopping::AlreadyAsked | Stopping::NotRunning | Stopping::Unstarted => tracing::debug!(
                job_id = %lease.job_id,
                attempt = lease.attempt,
                "a report was refused as stale"
            ),
        },
        ReportAck::Refused {
            lease,
            kind,
            code,
            message,
        } => tracing::warn!(
            job_id = %lease.job_id,
            attempt = lease.attempt,
            ?kind,
            ?code,
            %message,
            "a report was refused by the server"
        ),
    }
}

/// Logs what an acknowledgement settled; nothing is ever sent again after one.
fn acknowledged(outcome: Acknowledged) {
    match outcome {
        Acknowledged::Applied(pending) => tracing::debug!(
            job_id = %pending.lease.job_id,
            attempt = pending.lease.attempt,
            job_type = %pending.job_type,
            "result acknowledged"
        ),
        Acknowledged::Stale(pending, message) => tracing::warn!(
            job_id = %pending.lease.job_id,
            attempt = pending.lease.attempt,
            job_type = %pending.job_type,
            %message,
            "result refused: the lease was stale"
        ),
        Acknowledged::Refused(pending, code, message) => tracing::error!(
            job_id = %pending.lease.job_id,
            attempt = pending.lease.attempt,
            job_type = %pending.job_type,
            ?code,
            %message,
            "result refused by the server"
        ),
        Acknowledged::Unknown(request_id) => {
            tracing::debug!(request_id, "ignoring an ack for no pending result");
        }
    }
}

/// The heartbeat period the server asked for.
fn heartbeat_period(welcome: &pb::Welcome) -> Duration {
    match welcome
        .heartbeat_interval
        .and_then(|interval| Duration::try_from(interval).ok())
    {
        Some(period) if !period.is_zero() => period,
        _ => {
            tracing::warn!(
                "the welcome names no heartbeat interval; using {:?}",
                DEFAULT_HEARTBEAT
            );
            DEFAULT_HEARTBEAT
        }
    }
}

/// Waits, briefly, for the server to end the stream after the worker closed its side, so that
/// the server sees a clean close rather than a reset.
async fn close(inbound: &mut Streaming<pb::ConnectResponse>) {
    let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(response)) = inbound.message().await {
            if let Some(Inbound::Lease(lease)) = response.message {
                tracing::warn!(
                    job_id = %lease.job_id,
                    attempt = lease.attempt,
                    "a lease arrived after the drain completed; the server hands it back"
                );
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::debug!("the server did not end the stream; dropping it");
    }
    tracing::info!("drained; stream closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_period_comes_from_the_welcome() {
        let welcome = pb::Welcome {
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(heartbeat_period(&welcome), Duration::from_secs(2));
        assert_eq!(heartbeat_period(&pb::Welcome::default()), DEFAULT_HEARTBEAT);
    }

    #[test]
    fn every_stop_reason_reaches_the_handler() {
        assert_eq!(
            stop_reason(pb::StopReason::Cancelled as i32),
            StopReason::Cancelled
        );
        assert_eq!(
            stop_reason(pb::StopReason::Paused as i32),
            StopReason::Paused
        );
        assert_eq!(
            stop_reason(pb::StopReason::TimedOut as i32),
            StopReason::TimedOut
        );
        assert_eq!(
            stop_reason(pb::StopReason::LeaseLost as i32),
            StopReason::LeaseLost
        );
        assert_eq!(stop_reason(0), StopReason::LeaseLost);
        assert_eq!(stop_reason(42), StopReason::LeaseLost);
    }
}
