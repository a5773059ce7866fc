//! A worker's session: the one owner of the leases a worker holds through one stream.
//!
//! The gRPC handler (`api::worker_service`) only translates: it turns the worker's messages into
//! [`Inbound`] calls here and sends what [`WorkerSession::next`] yields. Everything a lease goes
//! through on this replica happens here or in the parts it drives: it is delivered (from the
//! dispatcher's claims, or straight from an enqueue), noted as started, renewed, told to stop
//! (a cancel, a pause, its timeout, a lost lease), ended (a completion or a failure, through the
//! completer), handed back unstarted, and its worker's slot credited back to the dispatcher
//! exactly once (invariants 2, 3 and 9).
//!
//! A session keeps the set of leases its worker holds: a slot is credited once per lease, when
//! the worker reports its outcome or hands it back. Stop requests reach the worker at once when
//! their notification arrives, and again with every heartbeat while they stand, so a missed
//! notification or a reconnect loses nothing. At its deadline a lease is told TIMED_OUT; a result
//! after it is refused. When the stream ends, leases not yet delivered are handed back at once;
//! leases the worker holds stay until it reconnects and adopts them, or until they lapse.
//!
//! A session also keeps its stream's row in the `workers` table (written at the hello and with
//! each heartbeat, deleted at the end), which is how every replica lists every worker. A drain
//! asked by DrainWorker on any replica reaches the session through a notification, or through
//! that row at its next heartbeat should the notification be missed; the session then takes no
//! more leases and tells the worker to drain, as it would on the worker's own shutdown.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    pin::Pin,
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use std::time::Instant;

use tokio::sync::{broadcast, mpsc};

use super::{
    Engine, Error,
    completer::Settle,
    dispatcher::{Outgoing, Registration, SessionId},
    ending::{self, Completion, Failure},
    notifier::{DrainSignal, StopSignal},
};
use crate::{
    domain::{JobId, LeaseRef, QueueName, TenantId},
    store::{
        Checkpoint, LeasedRow, LogBatch, ProgressUpdate, Renewed, SettleResult, StopKind, Store,
        WorkerRecord,
    },
};

/// How long a stream remembers a stop for a lease it does not hold, in case the lease is on its
/// way to it: claimed ahead, a lease waits at most 250 ms in the dispatcher, then a moment in
/// the channel to the stream.
const PENDING_STOP_TTL: Duration = Duration::from_secs(1);
/// The most such stops a stream remembers; beyond it (a bulk cancel) the oldest are forgotten,
/// and their leases learn of the stop at their next heartbeat, as before.
const MAX_PENDING_STOPS: usize = 65_536;

/// Timings a session enforces.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub lease_duration: Duration,
    pub heartbeat_interval: Duration,
    /// How long a worker has to stop a job after a cancel, a pause or its deadline before its
    /// lease is no longer renewed.
    pub stop_grace: Duration,
    /// This replica's name, recorded with each stream it serves for ListWorkers.
    pub replica: String,
}

/// What a worker says it is, in its first message.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub tenant: TenantId,
    pub worker_id: String,
    pub job_types: Vec<String>,
    pub queues: Vec<QueueName>,
    pub slots: u32,
    pub prefetch: u32,
    /// Leases from an earlier stream that it still holds.
    pub running: Vec<LeaseRef>,
    pub reports_started: bool,
    /// What the worker runs and where, as its hello said (may be empty), for ListWorkers.
    pub version: String,
    pub host: String,
}

/// Why the worker must stop running a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    LeaseLost,
    Cancelled,
    Paused,
    TimedOut,
}

impl StopReason {
    fn message(self) -> &'static str {
        match self {
            Self::LeaseLost => "the lease is no longer held",
            Self::Cancelled => "the job was cancelled",
            Self::Paused => "the job was paused: save a checkpoint and stop",
            Self::TimedOut => "the attempt ran past its timeout: stop it and fail it timed out",
        }
    }
}

impl From<StopKind> for StopReason {
    fn from(stop: StopKind) -> Self {
        match stop {
            StopKind::Cancel => Self::Cancelled,
            StopKind::Pause => Self::Paused,
        }
    }
}

/// A message from the worker, validated.
#[derive(Debug)]
pub enum Inbound {
    /// The leases the worker holds (running or queued), to renew.
    Heartbeat(Vec<LeaseRef>),
    Complete(u64, Completion),
    Fail(u64, Failure),
    Progress(u64, ProgressUpdate),
    Logs(u64, LogBatch),
    Checkpoint(u64, Checkpoint),
    /// Leases the worker holds but did not start.
    Release(u64, Vec<LeaseRef>),
    /// Leases whose handlers have just started.
    Started(Vec<LeaseRef>),
    /// The worker wants no more leases.
    Drain,
}

/// A message for the worker.
#[derive(Debug)]
pub enum Outbound {
    Lease {
        row: Box<LeasedRow>,
        /// How long this server held it between its claim and now.
        held: Duration,
    },
    Stop {
        lease: LeaseRef,
        reason: StopReason,
        message: &'static str,
    },
    /// Leases of this queue that the worker holds queued must go back unstarted.
    ReleaseQueued(QueueName),
    /// An operator asked the worker to drain (DrainWorker).
    Drain,
    Ack(u64, Result<(), Error>),
}

/// What the worker is told when its session opens.
#[derive(Debug)]
pub struct Welcome {
    pub session: SessionId,
    /// Leases of its hello that are no longer its own (each is also told LEASE_LOST).
    pub rejected: Vec<LeaseRef>,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The worker closed its side, or its connection broke.
    WorkerLeft,
    /// The worker drained, then closed its side: whatever it still holds it never started.
    Drained,
    /// The server is shutting down; the worker should reconnect elsewhere.
    Shutdown,
}

/// A report being written, and the ack its request waits for (`None`: not acknowledged).
type AckFuture = Pin<Box<dyn Future<Output = Option<(u64, Result<(), Error>)>> + Send>>;

/// A lease this worker holds through this session.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Told TIMED_OUT at this instant, if the job has a timeout.
    deadline: Option<Instant>,
}

/// The owner of one worker's leases; see the module's documentation.
pub struct WorkerSession {
    id: SessionId,
    spec: SessionSpec,
    store: Store,
    engine: Engine,
    config: SessionConfig,
    held: HashMap<LeaseRef, Held>,
    /// Deadlines of held leases, soonest first.
    deadlines: BinaryHeap<Reverse<(Instant, LeaseRef)>>,
    pending_stops: PendingStops,
    draining: bool,
    leases: mpsc::Receiver<Outgoing>,
    stops: broadcast::Receiver<StopSignal>,
    queue_holds: broadcast::Receiver<crate::engine::notifier::QueueHold>,
    drains: broadcast::Receiver<DrainSignal>,
    /// The stream's row in the `workers` table.
    record: WorkerRecord,
    /// Whether the worker was told to drain (it is told once).
    drain_sent: bool,
    acks: FuturesUnordered<AckFuture>,
    /// Messages decided while handling one and not yet taken by [`Self::next`].
    outbox: VecDeque<Outbound>,
}

impl WorkerSession {
    /// Opens a session: adopts the leases the worker still holds from an earlier stream, makes
    /// its queues known (so they can be limited before their first job), and registers it with
    /// the dispatcher.
    pub async fn open(
        engine: &Engine,
        store: &Store,
        config: SessionConfig,
        id: SessionId,
        spec: SessionSpec,
    ) -> Result<(Self, Welcome), Error> {
        let adopted = store
            .renew(
                &spec.tenant,
                &spec.running,
                &spec.worker_id,
                config.lease_duration,
                config.stop_grace,
            )
            .await?;
        store.ensure_queues(&spec.tenant, &spec.queues).await?;
        let record = WorkerRecord {
            id: uuid::Uuid::now_v7(),
            tenant: spec.tenant.clone(),
            worker_id: spec.worker_id.clone(),
            version: spec.version.clone(),
            host: spec.host.clone(),
            replica: config.replica.clone(),
            queues: spec.queues.iter().map(|q| q.as_str().to_owned()).collect(),
            job_types: spec.job_types.clone(),
            slots: i32::try_from(spec.slots).unwrap_or(i32::MAX),
            prefetch: i32::try_from(spec.prefetch).unwrap_or(i32::MAX),
        };
        // Subscribed before the row exists, so a drain asked the moment it appears is heard.
        let drains = engine.drains.subscribe();
        // Rows a dead replica left a lease duration ago serve no one now; prune them.
        store
            .record_worker(&record, Some(config.lease_duration))
            .await?;
        let capacity = usize::try_from(spec.slots + spec.prefetch)
            .unwrap_or(1)
            .max(1);
        let (lease_tx, leases) = mpsc::channel(capacity);
        let mut session = Self {
            id,
            store: store.clone(),
            engine: engine.clone(),
            config,
            held: HashMap::new(),
            deadlines: BinaryHeap::new(),
            pending_stops: PendingStops::default(),
            draining: false,
            leases,
            stops: engine.stops.subscribe(),
            queue_holds: engine.queue_holds.subscribe(),
            drains,
            record,
            drain_sent: false,
            acks: FuturesUnordered::new(),
            outbox: VecDeque::new(),
            spec,
        };
        let now = Instant::now();
        for renewed in &adopted {
            session.hold(renewed.lease, renewed.deadline_in.map(|d| now + d));
        }
        let rejected: Vec<LeaseRef> = session
            .spec
            .running
            .iter()
            .filter(|l| !session.held.contains_key(l))
            .copied()
            .collect();
        for lease in &rejected {
            session.stop(*lease, StopReason::LeaseLost);
        }
        session.pass_on_stops(&adopted);
        engine
            .dispatcher
            .register(Registration {
                session: id,
                tenant: session.spec.tenant.clone(),
                worker_id: session.spec.worker_id.clone(),
                queues: session.spec.queues.clone(),
                job_types: session.spec.job_types.clone(),
                slots: session.spec.slots,
                prefetch: session.spec.prefetch,
                held: u32::try_from(adopted.len()).unwrap_or(u32::MAX),
                reports_started: session.spec.reports_started,
                leases: lease_tx,
            })
            .await;
        Ok((
            session,
            Welcome {
                session: id,
                rejected,
            },
        ))
    }

    /// The next message for the worker: a lease, a stop, a queue to hand back, or an ack.
    /// `None` once the engine is shutting down.
    pub async fn next(&mut self) -> Option<Outbound> {
        loop {
            if let Some(out) = self.outbox.pop_front() {
                return Some(out);
            }
            let deadline = self.deadlines.peek().map(|Reverse((at, _))| *at);
            let prefetching = self.spec.prefetch > 0;
            tokio::select! {
                Some(Outgoing { claimed, row }) = self.leases.recv() => {
                    let lease = LeaseRef { job_id: JobId(row.job.id), attempt: row.job.attempt };
                    let deadline = row.job.timeout_ms
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map(|ms| claimed + Duration::from_millis(ms));
                    self.hold(lease, deadline);
                    if let Some(stop) = self.pending_stops.take(&lease, Instant::now()) {
                        self.outbox.push_back(Outbound::Lease {
                            row: Box::new(row),
                            held: claimed.elapsed(),
                        });
                        self.stop(lease, stop.into());
                        continue;
                    }
                    return Some(Outbound::Lease { row: Box::new(row), held: claimed.elapsed() });
                }
                signal = self.stops.recv() => match signal {
                    Ok(signal) => self.stop_signal(signal),
                    // Missed signals reach the worker with its next heartbeat.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                hold = self.queue_holds.recv(), if prefetching => match hold {
                    Ok(hold) => {
                        if hold.tenant == self.spec.tenant && self.spec.queues.contains(&hold.queue) {
                            return Some(Outbound::ReleaseQueued(hold.queue));
                        }
                    }
                    // Leases queued meanwhile start within 250 ms or go back unstarted.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                drain = self.drains.recv(), if !self.drain_sent => match drain {
                    Ok(drain) => {
                        if drain.tenant == self.spec.tenant && drain.worker_id == self.spec.worker_id {
                            self.begin_drain().await;
                            return Some(Outbound::Drain);
                        }
                    }
                    // The request stays on the stream's row: the next heartbeat reads it.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                Some(ack) = self.acks.next(), if !self.acks.is_empty() => {
                    if let Some((request_id, result)) = ack {
                        return Some(Outbound::Ack(request_id, result));
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    self.deadline_passed(Instant::now());
                }
            }
        }
    }

    /// Acts on a message from the worker; what it decides for the worker comes from
    /// [`Self::next`].
    pub async fn handle(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Heartbeat(leases) => self.heartbeat(leases).await,
            Inbound::Complete(request_id, completion) => {
                let lease = completion.lease;
                self.end(request_id, lease, Settle::Complete(completion))
                    .await;
            }
            Inbound::Fail(request_id, failure) => {
                let lease = failure.lease;
                self.end(request_id, lease, Settle::Fail(failure)).await;
            }
            Inbound::Progress(request_id, update) => {
                self.record(request_id, Settle::Progress(update));
            }
            Inbound::Logs(request_id, batch) => self.record(request_id, Settle::Logs(batch)),
            Inbound::Checkpoint(request_id, checkpoint) => {
                self.record(request_id, Settle::Checkpoint(checkpoint));
            }
            Inbound::Release(request_id, leases) => {
                self.release_unstarted(request_id, leases).await
            }
            Inbound::Started(leases) => {
                for lease in leases {
                    let completer = self.engine.completer.clone();
                    let started = Settle::Started(self.spec.tenant.clone(), lease);
                    // Not acknowledged: a start not noted only means a lapse would not count.
                    self.acks.push(Box::pin(async move {
                        let _ = completer.settle(started).await;
                        None
                    }));
                }
            }
            Inbound::Drain => {
                if !self.draining {
                    tracing::info!("worker draining");
                    self.draining = true;
                    self.engine.dispatcher.drain(self.id).await;
                }
            }
        }
    }

    /// Fails a job whose lease cannot be sent (too large for any message: its payload and
    /// checkpoint were written by hand, or under another budget), rather than breaking the
    /// stream on every try. `why` is the failure's message.
    pub async fn undeliverable(&mut self, lease: LeaseRef, why: String) {
        tracing::error!(job_id = %lease.job_id, %why, "a lease cannot be sent; failing its job");
        self.unhold(&lease).await;
        let failure = Failure {
            tenant: self.spec.tenant.clone(),
            lease,
            message: why,
            kind: "lease_too_large".to_owned(),
            non_retryable: true,
            retry_after: None,
            timed_out: false,
        };
        if let Err(error) = self.engine.completer.settle(Settle::Fail(failure)).await {
            tracing::warn!(%error, job_id = %lease.job_id, "could not fail an undeliverable job; its lease will lapse");
        }
    }

    /// A lease whose sending failed (the worker has gone): handed back at once.
    pub async fn not_sent(&mut self, lease: LeaseRef) {
        self.held.remove(&lease);
        self.release(vec![lease]).await;
    }

    /// Ends the session: leases not yet delivered are handed back, and after a drain so are
    /// those the worker still holds (they reached it as it went idle, and it never started
    /// them). Returns the acks of outcomes already handed to the completer, which are written
    /// whatever happens: the worker may still hear of them and need not resend.
    pub async fn close(mut self, how: Close) -> Vec<(u64, Result<(), Error>)> {
        self.engine.dispatcher.unregister(self.id).await;
        if let Err(error) = self
            .store
            .forget_worker(&self.spec.tenant, self.record.id)
            .await
        {
            tracing::warn!(%error, "could not forget the stream's row; it ages out unheard");
        }
        self.leases.close();
        let mut undelivered = Vec::new();
        while let Some(Outgoing { row, .. }) = self.leases.recv().await {
            undelivered.push(LeaseRef {
                job_id: JobId(row.job.id),
                attempt: row.job.attempt,
            });
        }
        self.release(undelivered).await;
        // The worker's reports first: its start marks among them.
        let mut acks = Vec::new();
        while let Some(ack) = self.acks.next().await {
            acks.extend(ack);
        }
        // Without this a lease that reached a drained worker as it went idle would lapse, and
        // its job run again only after the lease duration. Only those no handler started go
        // back: a started one counts, so it is left to lapse.
        if how == Close::Drained {
            let held: Vec<LeaseRef> = self.held.drain().map(|(lease, _)| lease).collect();
            if !held.is_empty()
                && let Err(error) = ending::hand_back(&self.store, &self.spec.tenant, &held).await
            {
                tracing::warn!(%error, "could not hand back a drained worker's leases; they will lapse");
            }
        }
        acks
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Whether the session takes no more leases: the worker asked, or was told, to drain. A
    /// draining worker that closes its side has drained.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Stops leasing to the worker, which is told (once) to drain: an operator asked.
    async fn begin_drain(&mut self) {
        self.drain_sent = true;
        if !self.draining {
            tracing::info!("draining the worker, as DrainWorker asked");
            self.draining = true;
            self.engine.dispatcher.drain(self.id).await;
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval
    }

    pub fn lease_duration(&self) -> Duration {
        self.config.lease_duration
    }

    fn hold(&mut self, lease: LeaseRef, deadline: Option<Instant>) {
        self.held.insert(lease, Held { deadline });
        if let Some(at) = deadline {
            self.deadlines.push(Reverse((at, lease)));
        }
    }

    /// Forgets a lease the worker no longer holds, and credits its slot back once.
    async fn unhold(&mut self, lease: &LeaseRef) -> bool {
        let held = self.held.remove(lease).is_some();
        if held {
            self.engine.dispatcher.credit(self.id, 1).await;
        }
        held
    }

    fn stop(&mut self, lease: LeaseRef, reason: StopReason) {
        tracing::info!(job_id = %lease.job_id, ?reason, "telling the worker to stop");
        self.outbox.push_back(Outbound::Stop {
            lease,
            reason,
            message: reason.message(),
        });
    }

    /// Tells the worker of the held leases whose deadline has passed.
    fn deadline_passed(&mut self, now: Instant) {
        while let Some(Reverse((at, lease))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if self
                .held
                .get(&lease)
                .is_some_and(|held| held.deadline == Some(at))
            {
                self.stop(lease, StopReason::TimedOut);
            }
        }
    }

    /// Tells the worker of a stop requested for one of its leases, or remembers it for a while
    /// if the lease may still be on its way here.
    fn stop_signal(&mut self, signal: StopSignal) {
        if signal.tenant != self.spec.tenant {
            return;
        }
        if self.held.contains_key(&signal.lease) {
            self.stop(signal.lease, signal.stop.into());
        } else {
            self.pending_stops
                .insert(signal.lease, signal.stop, Instant::now());
        }
    }

    /// Repeats every stop that stands for the renewed leases.
    fn pass_on_stops(&mut self, renewed: &[Renewed]) {
        for r in renewed {
            if let Some(stop) = r.stop {
                self.stop(r.lease, stop.into());
            }
        }
    }

    async fn heartbeat(&mut self, leases: Vec<LeaseRef>) {
        let renewed = match self
            .store
            .renew(
                &self.spec.tenant,
                &leases,
                &self.spec.worker_id,
                self.config.lease_duration,
                self.config.stop_grace,
            )
            .await
        {
            Ok(renewed) => renewed,
            Err(error) => {
                // The lease outlives a few missed heartbeats; the next one may get through.
                tracing::warn!(%error, "heartbeat renewal failed");
                return;
            }
        };
        // The stream's row says it is alive, and carries a drain request the notification of
        // which this replica missed.
        match self.store.record_worker(&self.record, None).await {
            Ok(true) if !self.drain_sent => {
                self.begin_drain().await;
                self.outbox.push_back(Outbound::Drain);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not record the worker's heartbeat"),
        }
        let renewed_leases: HashSet<LeaseRef> = renewed.iter().map(|r| r.lease).collect();
        for lease in leases.iter().filter(|l| !renewed_leases.contains(l)) {
            self.stop(*lease, StopReason::LeaseLost);
        }
        self.pass_on_stops(&renewed);
    }

    /// Frees the worker's slot for the lease, then queues its end with the completer; the ack
    /// follows the commit of the batch holding it.
    async fn end(&mut self, request_id: u64, lease: LeaseRef, settle: Settle) {
        self.unhold(&lease).await;
        self.record(request_id, settle);
    }

    /// Queues a report with the completer; the ack follows its commit.
    fn record(&self, request_id: u64, settle: Settle) {
        let lease = settle.lease();
        let completer = self.engine.completer.clone();
        self.acks.push(Box::pin(async move {
            let result = match completer.settle(settle).await {
                Ok(SettleResult::Applied(_) | SettleResult::AlreadySettled) => Ok(()),
                Ok(SettleResult::Stale) => Err(Error::Stale(lease)),
                Ok(SettleResult::Late) => Err(Error::Late(lease)),
                Err(error) => Err(error),
            };
            Some((request_id, result))
        }));
    }

    /// Hands back leases the worker held but did not start. Their slots go back to the
    /// dispatcher at once; the jobs are available again when the statement commits, and the ack
    /// follows that commit. Leases another stream holds are handed back too: the attempt number
    /// fences them, as it does results.
    async fn release_unstarted(&mut self, request_id: u64, leases: Vec<LeaseRef>) {
        let mut returned = 0;
        for lease in &leases {
            if self.held.remove(lease).is_some() {
                returned += 1;
            }
        }
        if returned > 0 {
            self.engine.dispatcher.released(self.id, returned).await;
        }
        let (store, tenant) = (self.store.clone(), self.spec.tenant.clone());
        self.acks.push(Box::pin(async move {
            let result = ending::release(&store, &tenant, &leases)
                .await
                .map(|_| ())
                .map_err(Error::from);
            Some((request_id, result))
        }));
    }

    async fn release(&mut self, leases: Vec<LeaseRef>) {
        if leases.is_empty() {
            return;
        }
        if let Err(error) = ending::release(&self.store, &self.spec.tenant, &leases).await {
            tracing::warn!(%error, "could not hand back undelivered leases; they will lapse");
        }
    }
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
