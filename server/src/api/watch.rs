//! The bodies of the WatchJob and WatchJobs streams.
//!
//! Each stream is one task writing into a bounded channel (its size is the backpressure). It
//! subscribes to the fanout first, then replays stored events up to the subscription's horizon,
//! then forwards live events after it, skipping any it has already sent: so every event after the
//! client's `after_sequence` arrives once, in order (invariant 5). When the fanout drops the
//! subscription for falling behind, the stream ends with RESOURCE_EXHAUSTED naming the sequence
//! to resume after.

use std::sync::Arc;

use jobwire_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{ApiError, convert, payloads};
use crate::{
    domain::TenantId,
    engine::fanout::{FanoutEvent, FanoutHandle, Subscription, Target},
    registry::Registry,
    store::{EventRow, JobRow, Store},
};

/// Events read per replay statement.
const REPLAY_PAGE: i64 = 500;
/// Messages converted ahead of what the client has taken. Each is the stream's own copy (a
/// state change carries the whole job), while events waiting in the fanout's buffer are shared
/// by every stream: so a slow stream waits there, not here. With 256, the server watched by 200
/// WatchJobs streams over 5,000 jobs (tests/watch.rs) peaked at 160 MiB; with 16, at 66 MiB.
const AHEAD: usize = 16;

/// Where a stream's events go; wraps the two response types.
pub trait Sink: Send + 'static {
    type Item: Send + 'static;
    fn wrap(event: pb::JobEvent) -> Self::Item;
}

pub struct JobSink;
impl Sink for JobSink {
    type Item = pb::WatchJobResponse;
    fn wrap(event: pb::JobEvent) -> Self::Item {
        pb::WatchJobResponse { event: Some(event) }
    }
}

pub struct JobsSink;
impl Sink for JobsSink {
    type Item = pb::WatchJobsResponse;
    fn wrap(event: pb::JobEvent) -> Self::Item {
        pb::WatchJobsResponse { event: Some(event) }
    }
}

/// Where a watch reads: the event log and jobs, and the registry that renders payloads as JSON.
#[derive(Clone)]
pub struct Reads {
    pub store: Store,
    pub registry: Registry,
}

/// A running watch: what to read, and where the client stands.
pub struct Watch<S: Sink> {
    pub store: Store,
    pub registry: Registry,
    pub tenant: TenantId,
    pub target: Target,
    /// The last sequence the client has.
    pub after: i64,
    pub tx: mpsc::Sender<Result<S::Item, Status>>,
}

/// How a watch ended.
enum End {
    /// The terminal event was sent, or the client left.
    Done,
    /// The server is shutting down.
    Shutdown,
    /// The subscription fell behind; the client resumes after this sequence.
    Lagged(i64),
    Failed(ApiError),
}

impl<S: Sink> Watch<S> {
    async fn send(&self, mut event: pb::JobEvent) -> bool {
        if let Some(pb::job_event::Event::StateChanged(change)) = &mut event.event
            && let Some(job) = &mut change.job
        {
            payloads::render(&self.registry, &self.tenant, job).await;
        }
        self.tx.send(Ok(S::wrap(event))).await.is_ok()
    }

    /// Subscribes, then runs the stream to its end. The subscription is taken before any replay
    /// read, so that replay and live delivery meet at its horizon.
    pub async fn run(mut self, fanout: FanoutHandle, shutdown: CancellationToken) {
        // The shutdown is checked first: the fanout ends every subscription once it sees the
        // shutdown, and a stream that found its subscription ended before it looked at the
        // shutdown told its client it had fallen behind.
        let end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => End::Shutdown,
            end = async {
                let mut subscription = fanout
                    .subscribe(self.tenant.clone(), self.target.clone())
                    .await;
                self.stream(&mut subscription).await
            } => end,
        };
        let status = match end {
            End::Done => return,
            End::Shutdown => Status::unavailable(format!(
                "server is shutting down; resume after sequence {}",
                self.after
            )),
            End::Lagged(after) => Status::resource_exhausted(format!(
                "watcher fell behind; resume after sequence {after}"
            )),
            End::Failed(error) => error.into(),
        };
        let _ = self.tx.send(Err(status)).await;
    }

    async fn stream(&mut self, subscription: &mut Subscription) -> End {
        let horizon = subscription.horizon;
        // Replay what is stored up to where live delivery starts.
        let mut last_state = None;
        while self.after < horizon {
            let rows = match self.replay(horizon).await {
                Ok(rows) => rows,
                Err(error) => return End::Failed(error),
            };
            if rows.is_empty() {
                break;
            }
            let snapshot = match self.snapshot(&rows).await {
                Ok(snapshot) => snapshot,
                Err(error) => return End::Failed(error),
            };
            for row in &rows {
                if row.kind == "state" {
                    last_state = row.state;
                }
                if !self.send(convert::event(row, snapshot.as_ref())).await {
                    return End::Done;
                }
                // Only once sent: a shutdown can drop this future mid-page, and the status
                // it ends with tells the client where to resume.
                self.after = row.seq;
            }
        }
        if let Target::Job(id) = &self.target {
            // A finished job whose last event the client already has ends the stream now. The
            // row alone is not enough: it can turn terminal before the fanout's horizon reaches
            // the terminal event, which then arrives live.
            let finished = match last_state {
                Some(state) => state.is_terminal(),
                None => match self.store.get_job(&self.tenant, *id).await {
                    Ok(job) if job.state.is_terminal() => {
                        match self.store.last_job_event(&self.tenant, *id).await {
                            Ok(last) => last <= self.after,
                            Err(error) => return End::Failed(error.into()),
                        }
                    }
                    Ok(_) => false,
                    Err(error) => return End::Failed(error.into()),
                },
            };
            if finished {
                return End::Done;
            }
        }
        // Live events.
        while let Some(event) = subscription.events.recv().await {
            if event.row.seq <= self.after {
                continue;
            }
            if !self.forward(&event).await {
                return End::Done;
            }
            if matches!(self.target, Target::Job(_))
                && event.state().is_some_and(|s| s.is_terminal())
            {
                return End::Done;
            }
        }
        End::Lagged(self.after)
    }

    /// Sends a live event; `after` moves only once it is sent (see the replay above).
    async fn forward(&mut self, event: &Arc<FanoutEvent>) -> bool {
        let sent = self.send(convert::fanout_event(event)).await;
        if sent {
            self.after = event.row.seq;
        }
        sent
    }

    async fn replay(&self, horizon: i64) -> Result<Vec<EventRow>, ApiError> {
        Ok(match &self.target {
            Target::Job(id) => {
                self.store
                    .job_events(&self.tenant, *id, self.after, horizon, REPLAY_PAGE)
                    .await?
            }
            Target::Filter(filter) => {
                self.store
                    .filtered_events(&self.tenant, filter, self.after, horizon, REPLAY_PAGE)
                    .await?
            }
        })
    }

    /// For a single job's replay, its current row, so state events carry a snapshot. (Replays
    /// of many jobs leave it out rather than read a row per event.)
    async fn snapshot(&self, rows: &[EventRow]) -> Result<Option<JobRow>, ApiError> {
        match &self.target {
            Target::Job(id) if rows.iter().any(|r| r.kind == "state") => {
                Ok(Some(self.store.get_job(&self.tenant, *id).await?))
            }
            _ => Ok(None),
        }
    }
}

/// Starts a watch of one job, or of every job matching a filter, on `tasks`.
pub fn start<S: Sink>(
    reads: Reads,
    fanout: &FanoutHandle,
    tenant: TenantId,
    target: Target,
    after: i64,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> mpsc::Receiver<Result<S::Item, Status>> {
    let (tx, rx) = mpsc::channel(AHEAD);
    let watch = Watch::<S> {
        store: reads.store,
        registry: reads.registry,
        tenant,
        target,
        after,
        tx,
    };
    tasks.spawn(watch.run(fanout.clone(), shutdown));
    rx
}
