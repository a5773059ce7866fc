//! The bodies of the WatchJob and WatchJobs streams.
//!
//! Each stream is one task writing into a bounded channel (its size is the backpressure). It
//! subscribes to the fanout first, then replays stored events up to the subscription's horizon,
//! then forwards live events after it, skipping any it has already sent: so every event after the
//! client's `after_sequence` arrives once, in order (invariant 5). When the fanout drops the
//! subscription for falling behind, the stream ends with RESOURCE_EXHAUSTED naming the sequence
//! to resume after. A client resuming from a sequence whose successors were pruned (their
//! partition of the log dropped) gets OUT_OF_RANGE naming the oldest retained sequence, never a
//! history with a hole in it.
//!
//! What bounds them: a stream ends as soon as its client has gone (it holds nothing after), one
//! client connection may hold [`Watches`]' limit of streams open, and the database reads of
//! every stream (their replays above all: a thousand dashboards reconnecting at once each read
//! the history) take turns on a quarter of the pool, waiting rather than failing, so that they
//! never starve the rest of the server of connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use jobwire_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;

use super::{ApiError, convert, payloads};
use crate::{
    domain::{EventKind, TenantId},
    engine::fanout::{FanoutEvent, FanoutHandle, Subscription, Target},
    memory::Ended,
    metrics::{OpenStream, StreamKind},
    registry::Registry,
    store::{EventRow, JobRow, Store},
};

/// Events read per replay statement.
const REPLAY_PAGE: i64 = 500;
/// Messages converted ahead of what the client has taken. Each is the stream's own copy (a
/// state change carries the whole job), while events waiting in the fanout's buffer are shared
/// by every stream: so a slow stream waits there, not here, and a few messages ahead keep many
/// streams' memory small while still sparing a fast client a wait per message.
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

/// Starts and bounds the watch streams of one server.
#[derive(Clone)]
pub struct Watches {
    reads: Reads,
    fanout: FanoutHandle,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Open streams by client connection, and how many one may hold.
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    max_per_connection: usize,
    ended: Ended,
}

/// Where a watch reads: the event log and jobs, the registry that renders payloads as JSON, and
/// the turns its reads take on the database.
#[derive(Clone)]
pub struct Reads {
    pub store: Store,
    pub registry: Registry,
    turns: Arc<Semaphore>,
}

impl Reads {
    /// Waits for a turn to read; the read is made while the permit lives.
    pub async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        self.turns.clone().acquire_owned().await.ok()
    }
}

/// A watch stream's place on its connection, given back when the stream ends.
struct Place {
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    peer: SocketAddr,
    ended: Ended,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.ended.stream_ended();
        if let Ok(mut open) = self.open.lock()
            && let Some(count) = open.get_mut(&self.peer)
        {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl Watches {
    /// `db_connections` is the pool's size: the watches' reads take turns on a quarter of it.
    pub fn new(
        store: Store,
        registry: Registry,
        fanout: FanoutHandle,
        (shutdown, tasks): (CancellationToken, TaskTracker),
        db_connections: u32,
        (max_per_connection, ended): (usize, Ended),
    ) -> Self {
        let turns = usize::try_from(db_connections / 4).unwrap_or(1).max(1);
        Self {
            reads: Reads {
                store,
                registry,
                turns: Arc::new(Semaphore::new(turns)),
            },
            fanout,
            shutdown,
            tasks,
            open: Arc::new(Mutex::new(HashMap::new())),
            max_per_connection,
            ended,
        }
    }

    /// The reads a watch makes, for the handler's own checks before it starts one.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Starts a watch of one job, or of every job matching a filter, for the client at `peer`;
    /// refused when that connection holds as many streams as it may.
    pub fn start<S: Sink>(
        &self,
        peer: Option<SocketAddr>,
        tenant: TenantId,
        target: Target,
        after: i64,
    ) -> Result<mpsc::Receiver<Result<S::Item, Status>>, ApiError> {
        let place = peer.map(|peer| self.take_place(peer)).transpose()?;
        let (tx, rx) = mpsc::channel(AHEAD);
        let watch = Watch::<S> {
            reads: self.reads.clone(),
            tenant,
            target,
            after,
            tx,
            _place: place,
            _open: OpenStream::open(StreamKind::Watch),
        };
        self.tasks
            .spawn(watch.run(self.fanout.clone(), self.shutdown.clone()));
        Ok(rx)
    }

    fn take_place(&self, peer: SocketAddr) -> Result<Place, ApiError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| ApiError::Internal("the watch places' lock is poisoned".into()))?;
        let count = open.entry(peer).or_insert(0);
        if *count >= self.max_per_connection {
            return Err(ApiError::ResourceExhausted(format!(
                "this connection already holds {} watch streams, the most one may hold \
                 (--max-watches-per-connection); end one, or open another connection",
                self.max_per_connection
            )));
        }
        *count += 1;
        Ok(Place {
            open: self.open.clone(),
            peer,
            ended: self.ended.clone(),
        })
    }
}

/// A running watch: what to read, and where the client stands.
struct Watch<S: Sink> {
    reads: Reads,
    tenant: TenantId,
    target: Target,
    /// The last sequence the client has.
    after: i64,
    tx: mpsc::Sender<Result<S::Item, Status>>,
    /// Held while the stream runs.
    _place: Option<Place>,
    /// Counts the stream in the metrics while it runs.
    _open: OpenStream,
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
            payloads::render(&self.reads.registry, &self.tenant, job).await;
        }
        self.tx.send(Ok(S::wrap(event))).await.is_ok()
    }

    /// Subscribes, then runs the stream to its end. The subscription is taken before any replay
    /// read, so that replay and live delivery meet at its horizon.
    async fn run(mut self, fanout: FanoutHandle, shutdown: CancellationToken) {
        // The shutdown is checked first: the fanout ends every subscription once it sees the
        // shutdown, and a stream that found its subscription ended before it looked at the
        // shutdown told its client it had fallen behind. A client that has gone ends the
        // stream at once, whatever it waits for, so that it holds nothing after.
        let gone = self.tx.clone();
        let end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => End::Shutdown,
            _ = gone.closed() => End::Done,
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
        // A client resuming (after > 0) needs every event after its sequence; one starting
        // from 0 asked for the retained history, and its first page, read in one snapshot, is
        // that history's start whatever was pruned before.
        let mut continuing = self.after > 0;
        while self.after < horizon {
            let (rows, pruned_through) = match self.replay(horizon).await {
                Ok(read) => read,
                Err(error) => return End::Failed(error),
            };
            // Events after `after` pruned before this page was read would be missing from it.
            if continuing && self.after < pruned_through {
                return End::Failed(ApiError::EventsPruned {
                    field: "after_sequence".into(),
                    through: pruned_through,
                });
            }
            continuing = true;
            if rows.is_empty() {
                break;
            }
            let snapshot = match self.snapshot(&rows).await {
                Ok(snapshot) => snapshot,
                Err(error) => return End::Failed(error),
            };
            let watched = self.target.job();
            for row in &rows {
                if row.kind == EventKind::State && watched.is_some_and(|id| id.0 == row.job_id) {
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
        if let Some(id) = &self.target.job() {
            // A finished job whose last event the client already has ends the stream now. The
            // row alone is not enough: it can turn terminal before the fanout's horizon reaches
            // the terminal event, which then arrives live.
            let finished = match last_state {
                Some(state) => state.is_terminal(),
                None => match self.job_row(*id).await {
                    Ok(job) if job.state.is_terminal() => {
                        let _turn = self.reads.turn().await;
                        match self.reads.store.last_job_event(&self.tenant, *id).await {
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
        while let Some(event) = subscription.recv().await {
            if event.row.seq <= self.after {
                continue;
            }
            if !self.forward(&event).await {
                return End::Done;
            }
            if self.target.job().is_some_and(|id| id.0 == event.row.job_id)
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

    /// The job's row, read in turn.
    async fn job_row(&self, id: crate::domain::JobId) -> crate::store::Result<JobRow> {
        let _turn = self.reads.turn().await;
        self.reads.store.get_job(&self.tenant, id).await
    }

    /// The next page of stored events, and then the number through which events may have been
    /// pruned, read after the page.
    async fn replay(&self, horizon: i64) -> Result<(Vec<EventRow>, i64), ApiError> {
        let _turn = self.reads.turn().await;
        let rows = match &self.target {
            Target::Job(id) => {
                self.reads
                    .store
                    .job_events(&self.tenant, *id, self.after, horizon, REPLAY_PAGE)
                    .await?
            }
            Target::Family(id) => {
                self.reads
                    .store
                    .family_events(&self.tenant, *id, self.after, horizon, REPLAY_PAGE)
                    .await?
            }
            Target::Filter(filter) => {
                self.reads
                    .store
                    .filtered_events(&self.tenant, filter, self.after, horizon, REPLAY_PAGE)
                    .await?
            }
        };
        let pruned_through = self.reads.store.events_pruned_through().await?;
        Ok((rows, pruned_through))
    }

    /// For a single job's replay, its current row, so state events carry a snapshot. (Replays
    /// of many jobs leave it out rather than read a row per event.)
    async fn snapshot(&self, rows: &[EventRow]) -> Result<Option<JobRow>, ApiError> {
        match &self.target {
            Target::Job(id) if rows.iter().any(|r| r.kind == EventKind::State) => {
                Ok(Some(self.job_row(*id).await?))
            }
            _ => Ok(None),
        }
    }
}
