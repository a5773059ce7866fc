//! The dispatcher: hands available jobs to this replica's connected workers.
//!
//! One task per replica owns the table of worker sessions and their free slots. It claims only
//! when a worker has free slots and there may be work for it: a NOTIFY for one of its queues, a
//! slot freed, a new registration, or the jittered safety-net poll (the notification is only a
//! wake-up; the table is the truth). Each claim is one statement, run beside the loop.
//!
//! A busy worker frees its slots one completion at a time; claiming for each would cost a round
//! trip per job. So a worker whose slots are partly free waits up to [`CLAIM_DEBOUNCE`] for more
//! to free up (or until half are free) before the next claim. An idle worker claims at once.
//!
//! A worker whose jobs finish faster than a claim's round trip would still idle for that round
//! trip on every claim, so its slots cap its rate at one slotful per claim cycle however cheap
//! the jobs are. So the dispatcher measures each worker's pace and claims that many round trips'
//! worth of leases ahead of its free slots (see [`Pace`]). These wait here
//! and go to the worker as its slots free. A lease that waits longer than [`MAX_READY_AGE`] (the
//! worker slowed down) is handed back, as are a queue's ready leases when it is paused or its
//! limits change. An attempt starts at its claim (its lease, timeout and start time count from
//! there), so a lease claimed ahead starts its clocks up to that long before its handler.
//!
//! Even a lease held ready here reaches a freed slot only after the worker's completion has
//! come in and the lease has gone out: a round trip per job, in which the slot idles. A worker
//! that declares a prefetch queue takes that many leases beyond its slots and starts each the
//! moment a slot frees. The dispatcher fills that queue from the leases it claims ahead, so only
//! while the worker keeps pace (a slow worker's queue would hold jobs another worker could run);
//! the worker hands back, with a release, leases that waited too long in it (by then its slots
//! have freed nothing for that long, so its pace has dropped to nothing and no more are sent).
//!
//! Queues with a concurrency or rate limit are claimed one at a time under the queue's row lock
//! ([`Store::claim_limited`]); the dispatcher keeps the set of limited queues (re-read when a
//! queue's settings change and on every poll) so that the common, unlimited case keeps its
//! single-statement claim. A claim held back by a limit is tried again when a token is due, or
//! after a short backoff for a concurrency limit (a job finishing on another replica sends no
//! wake-up; one finishing here frees a slot, which does).
//!
//! Leases go to a session through a channel whose capacity is the worker's slots plus its
//! prefetch, which the accounting of held leases never exceeds, so a send can only fail because
//! the session has gone; the lease is then handed back at once instead of waiting for it to
//! lapse.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use rand::Rng;
use tokio::{
    sync::{mpsc, oneshot},
    task::{self, JoinError, JoinSet},
};
use tokio_util::sync::CancellationToken;

use super::{
    ending,
    signals::{Signal, Signals},
};
use crate::{
    domain::{JobId, LeaseRef, QueueName, TenantId},
    store::{HeldBack, LeasedRow, Store, Worker as LeaseTo},
};

/// How long a partly busy worker's freed slots may accumulate before a claim.
const CLAIM_DEBOUNCE: Duration = Duration::from_millis(2);
/// How many claim round trips of a worker's pace are claimed ahead of its free slots.
const AHEAD_ROUND_TRIPS: f64 = 8.0;
/// At most this many leases per slot are held ready, whatever the pace. A claim tops up once
/// half are spent, so half must outlast a claim's round trip: with too low a cap, a fast worker
/// runs through the half left while a large claim is still on its way, and waits on every claim.
/// Even 50 per slot is a few tens of milliseconds of such a worker's jobs, far inside
/// [`MAX_READY_AGE`].
const MAX_AHEAD_PER_SLOT: u32 = 50;
/// Over how long a worker's pace is measured: a few claim round trips, so that a worker that
/// speeds up is claimed for within tens of milliseconds.
const PACE_WINDOW: Duration = Duration::from_millis(25);
/// The first window of a worker with no pace (new, or one that stalled). Until its pace is known
/// a worker claims only for its free slots, a round trip per slotful, far below the pace it
/// reaches once it claims ahead; so the first window is short.
const FIRST_PACE_WINDOW: Duration = Duration::from_millis(10);
/// The longest a lease claimed ahead waits for a slot before it is handed back. An attempt's
/// clocks (its lease, its timeout, its start time) run from the claim, so this is what a job
/// claimed ahead can lose of its timeout at worst; a worker that keeps its pace starts it within
/// a few claim round trips.
const MAX_READY_AGE: Duration = Duration::from_millis(250);
/// The first and the longest wait before a claim held back by a concurrency limit is tried again.
const LIMIT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const LIMIT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Identifies one worker stream on this replica.
pub type SessionId = u64;

/// A worker stream asking for leases.
#[derive(Debug)]
pub struct Registration {
    pub session: SessionId,
    pub tenant: TenantId,
    pub worker_id: String,
    pub queues: Vec<QueueName>,
    pub job_types: Vec<String>,
    /// How many jobs the worker runs at once.
    pub slots: u32,
    /// How many leases beyond its slots the worker holds queued.
    pub prefetch: u32,
    /// Leases it holds at registration (those adopted from an earlier stream).
    pub held: u32,
    /// Whether the worker says when its handlers start (see `domain::ending`).
    pub reports_started: bool,
    /// Where leases are delivered; capacity at least the worker's slots plus its prefetch.
    pub leases: mpsc::Sender<Outgoing>,
}

/// A lease on its way to a worker's stream, with when it was claimed: its attempt's clocks
/// (lease, deadline) run from the claim, and a worker that queues it needs to know how much of
/// its wait the server has already used.
#[derive(Debug)]
pub struct Outgoing {
    pub claimed: Instant,
    pub row: LeasedRow,
}

/// A free slot of a worker on this replica, set aside for a job being enqueued: the job is
/// inserted RUNNING under a lease to that worker, then sent to it here, with no claim between.
/// A reservation not used (the job did not start) must be returned with
/// [`DispatcherHandle::credit`].
#[derive(Debug)]
pub struct Reservation {
    pub session: SessionId,
    pub worker_id: String,
    pub lease: Duration,
    pub reports_started: bool,
    leases: mpsc::Sender<Outgoing>,
}

impl Reservation {
    /// Hands the job, started by a statement that began at `claimed`, to the worker's session.
    /// False if the session has gone: the lease is then the caller's to hand back.
    pub fn deliver(&self, row: LeasedRow, claimed: Instant) -> bool {
        self.leases.try_send(Outgoing { claimed, row }).is_ok()
    }
}

/// A job that could start at its enqueue, if a worker is free for it.
#[derive(Debug, Clone)]
pub struct Startable {
    pub queue: QueueName,
    pub job_type: String,
}

#[derive(Debug)]
enum Command {
    Register(Registration),
    Reserve {
        tenant: TenantId,
        jobs: Vec<Option<Startable>>,
        reply: oneshot::Sender<Vec<Option<Reservation>>>,
    },
    Credit {
        session: SessionId,
        slots: u32,
    },
    Released {
        session: SessionId,
        leases: u32,
    },
    Drain {
        session: SessionId,
    },
    Unregister {
        session: SessionId,
    },
    Wake {
        tenant: TenantId,
        queue: QueueName,
    },
    WakeAll,
    QueueChanged {
        tenant: TenantId,
        queue: QueueName,
    },
}

/// A cloneable handle to the dispatcher task.
#[derive(Debug, Clone)]
pub struct DispatcherHandle {
    tx: mpsc::Sender<Command>,
}

impl DispatcherHandle {
    /// Sends are dropped silently once the dispatcher has stopped: the server is shutting down
    /// and the stream that called is about to end too.
    async fn send(&self, cmd: Command) {
        let _ = self.tx.send(cmd).await;
    }

    pub async fn register(&self, registration: Registration) {
        self.send(Command::Register(registration)).await;
    }

    /// Sets aside a free slot for each startable job, where a worker of this replica serves
    /// its queue and type, has a slot free and knows of no backlog that the job would overtake.
    /// Nothing is set aside once the dispatcher has stopped.
    pub async fn reserve(
        &self,
        tenant: TenantId,
        jobs: Vec<Option<Startable>>,
    ) -> Vec<Option<Reservation>> {
        let len = jobs.len();
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reserve {
            tenant,
            jobs,
            reply,
        })
        .await;
        answer
            .await
            .unwrap_or_else(|_| std::iter::repeat_with(|| None).take(len).collect())
    }

    /// The worker finished `slots` of the leases it held.
    pub async fn credit(&self, session: SessionId, slots: u32) {
        self.send(Command::Credit { session, slots }).await;
    }

    /// The worker handed back `leases` it held but did not start.
    pub async fn released(&self, session: SessionId, leases: u32) {
        self.send(Command::Released { session, leases }).await;
    }

    /// The worker wants no more leases.
    pub async fn drain(&self, session: SessionId) {
        self.send(Command::Drain { session }).await;
    }

    pub async fn unregister(&self, session: SessionId) {
        self.send(Command::Unregister { session }).await;
    }

    /// Work may be available in a queue.
    pub async fn wake(&self, tenant: TenantId, queue: QueueName) {
        self.send(Command::Wake { tenant, queue }).await;
    }

    /// Work may be available anywhere (notifications may have been missed).
    pub async fn wake_all(&self) {
        self.send(Command::WakeAll).await;
    }

    /// A queue's pause or limits changed.
    pub async fn queue_changed(&self, tenant: TenantId, queue: QueueName) {
        self.send(Command::QueueChanged { tenant, queue }).await;
    }
}

struct Worker {
    registration: Registration,
    /// The worker's slot count.
    slots: u32,
    /// How many leases beyond its slots the worker holds queued.
    prefetch: u32,
    /// Leases delivered and not yet settled or handed back: those running, and beyond the
    /// slots, those in the worker's prefetch queue.
    held: u32,
    /// Leases claimed ahead of free slots, oldest first, with the time of their claim. Never
    /// non-empty while the worker has room: a lease goes to it as soon as it has.
    ready: VecDeque<(Instant, LeasedRow)>,
    /// Whether a claim for this worker is in flight.
    claiming: bool,
    pace: Pace,
    /// Since when freed slots have waited for a claim.
    freed_at: Option<Instant>,
    draining: bool,
    /// Whether a claim may find work; cleared when a claim comes back short.
    hungry: bool,
    /// Whether the last claim came back full, so that older jobs may be waiting: a new job is
    /// then not handed to the worker at its enqueue, where it would overtake them.
    backlog: bool,
    /// When to claim again for a queue whose limit held the last claim back.
    retry_at: Option<Instant>,
    /// The next wait after a claim held back by a concurrency limit.
    limit_backoff: Duration,
}

impl Worker {
    /// Slots holding no delivered lease.
    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.held)
    }

    /// Leases claimed and not running: held ready here, or queued at the worker.
    fn waiting(&self) -> u32 {
        let ready = u32::try_from(self.ready.len()).unwrap_or(u32::MAX);
        ready.saturating_add(self.held.saturating_sub(self.slots))
    }

    /// Hands ready leases to free slots, and to the worker's prefetch queue as far as its pace
    /// calls for leases ahead. Returns those the session could not take (it has gone), which
    /// are the caller's to hand back.
    fn feed(&mut self) -> Vec<LeaseRef> {
        let room = self
            .slots
            .saturating_add(self.prefetch.min(self.pace.ahead(self.slots)));
        let mut undelivered = Vec::new();
        while self.held < room {
            let Some((claimed, row)) = self.ready.pop_front() else {
                break;
            };
            let lease = lease_of(&row);
            if self
                .registration
                .leases
                .try_send(Outgoing { claimed, row })
                .is_ok()
            {
                self.held += 1;
            } else {
                undelivered.push(lease);
            }
        }
        if !undelivered.is_empty() {
            undelivered.extend(self.ready.drain(..).map(|(_, row)| lease_of(&row)));
            self.hungry = false;
            self.retry_at = None;
        }
        undelivered
    }

    /// Removes the ready leases `take` picks and returns them, for handing back.
    fn take_ready(&mut self, mut take: impl FnMut(&LeasedRow) -> bool) -> Vec<LeaseRef> {
        let mut taken = Vec::new();
        self.ready.retain(|(_, row)| {
            let hit = take(row);
            if hit {
                taken.push(lease_of(row));
            }
            !hit
        });
        taken
    }
}

fn lease_of(row: &LeasedRow) -> LeaseRef {
    LeaseRef {
        job_id: JobId(row.job.id),
        attempt: row.job.attempt,
    }
}

/// A worker's pace (slots freed per second) and its claims' round trip, both smoothed. Their
/// product is how many slots free up while a claim is in flight: a worker whose jobs are shorter
/// than a claim would otherwise idle that long on every claim, so that many leases (times
/// [`AHEAD_ROUND_TRIPS`]) are claimed ahead. A worker whose jobs are longer gets none.
#[derive(Debug)]
struct Pace {
    freed: u32,
    since: Instant,
    per_sec: f64,
    round_trip_secs: f64,
}

impl Pace {
    fn new() -> Self {
        Self {
            freed: 0,
            since: Instant::now(),
            per_sec: 0.0,
            round_trip_secs: 0.0,
        }
    }

    /// Counts freed slots; each closed window's rate is averaged with the pace so far, except
    /// the first, which is taken as it is.
    fn freed(&mut self, slots: u32) {
        self.freed = self.freed.saturating_add(slots);
        let elapsed = self.since.elapsed();
        let known = self.per_sec > 0.0;
        let window = if known {
            PACE_WINDOW
        } else {
            FIRST_PACE_WINDOW
        };
        if elapsed >= window {
            let rate = f64::from(self.freed) / elapsed.as_secs_f64();
            self.per_sec = if known {
                (self.per_sec + rate) / 2.0
            } else {
                rate
            };
            self.freed = 0;
            self.since = Instant::now();
        }
    }

    fn claimed(&mut self, took: Duration) {
        let took = took.as_secs_f64();
        self.round_trip_secs = if self.round_trip_secs > 0.0 {
            (self.round_trip_secs + took) / 2.0
        } else {
            took
        };
    }

    /// Forgets the pace: the worker held leases it did not start in time.
    fn stalled(&mut self) {
        self.per_sec = 0.0;
        self.freed = 0;
        self.since = Instant::now();
    }

    /// Slots freed per second. A window that has run past [`PACE_WINDOW`] without closing (no
    /// slot freed since) counts as it stands: a worker whose slots all went to long jobs slows
    /// to nothing at once, rather than keeping the pace of its last closed window.
    fn rate(&self) -> f64 {
        let elapsed = self.since.elapsed();
        if elapsed >= PACE_WINDOW {
            self.per_sec
                .min(f64::from(self.freed) / elapsed.as_secs_f64())
        } else {
            self.per_sec
        }
    }

    /// How many leases to hold ready beyond the worker's slots.
    fn ahead(&self, slots: u32) -> u32 {
        let cap = slots.saturating_mul(MAX_AHEAD_PER_SLOT);
        let want = (self.rate() * self.round_trip_secs * AHEAD_ROUND_TRIPS).floor();
        if want >= f64::from(cap) {
            cap
        } else {
            // In range: non-negative and below a u32.
            want as u32
        }
    }
}

/// The dispatcher task's state.
pub struct Dispatcher {
    store: Store,
    lease_duration: Duration,
    poll_interval: Duration,
    workers: BTreeMap<SessionId, Worker>,
    /// Queues with a concurrency or rate limit.
    limited: HashSet<(TenantId, QueueName)>,
    /// Whether `limited` must be re-read before the next claim.
    limits_stale: bool,
    /// Claims in flight, at most one per worker, run beside the loop so that a freed slot is
    /// filled from the ready leases while the next claim is on its way.
    claims: JoinSet<(SessionId, ClaimOutcome)>,
    /// Which worker each claim task is for, to clear its flag if the task dies.
    claim_tasks: HashMap<task::Id, SessionId>,
    /// Leases to hand back, by tenant, gathered while applying commands.
    returned: Vec<(TenantId, Vec<LeaseRef>)>,
    rx: mpsc::Receiver<Command>,
    signals: Signals,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        lease_duration: Duration,
        poll_interval: Duration,
    ) -> (Self, DispatcherHandle) {
        let (tx, rx) = mpsc::channel(4096);
        (
            Self {
                store,
                lease_duration,
                poll_interval,
                workers: BTreeMap::new(),
                limited: HashSet::new(),
                limits_stale: true,
                claims: JoinSet::new(),
                claim_tasks: HashMap::new(),
                returned: Vec::new(),
                rx,
                signals: Signals::default(),
            },
            DispatcherHandle { tx },
        )
    }

    /// Announces each claim's leases and each hand-back, for a test to await.
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_poll = Instant::now() + self.jittered_poll();
        loop {
            let debounce = self.next_debounce();
            let retry = self.next_retry();
            let stale = self.next_stale();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.apply(cmd);
                    while let Ok(cmd) = self.rx.try_recv() {
                        self.apply(cmd);
                    }
                }
                Some(done) = self.claims.join_next_with_id(), if !self.claims.is_empty() => {
                    self.claim_done(done);
                }
                _ = tokio::time::sleep_until(next_poll.into()) => {
                    next_poll = Instant::now() + self.jittered_poll();
                    self.limits_stale = true;
                    for worker in self.workers.values_mut() {
                        worker.hungry = true;
                    }
                }
                _ = tokio::time::sleep_until(debounce.unwrap_or(next_poll).into()), if debounce.is_some() => {}
                _ = tokio::time::sleep_until(retry.unwrap_or(next_poll).into()), if retry.is_some() => {
                    let now = Instant::now();
                    for worker in self.workers.values_mut() {
                        if worker.retry_at.is_some_and(|at| at <= now) {
                            worker.retry_at = None;
                            worker.hungry = true;
                        }
                    }
                }
                _ = tokio::time::sleep_until(stale.unwrap_or(next_poll).into()), if stale.is_some() => {
                    self.take_stale();
                }
            }
            self.hand_back().await;
            if self.limits_stale {
                self.refresh_limits().await;
            }
            self.dispatch();
        }
        for worker in self.workers.values_mut() {
            let leases = worker.take_ready(|_| true);
            self.returned
                .push((worker.registration.tenant.clone(), leases));
        }
        self.hand_back().await;
    }

    /// When the earliest claim waiting for freed slots to gather is due: only workers that
    /// would claim count, or a timer already past would wake the loop over and over.
    fn next_debounce(&self) -> Option<Instant> {
        self.workers
            .values()
            .filter(|w| w.hungry && !w.claiming && !w.draining)
            .filter_map(|w| w.freed_at)
            .min()
            .map(|at| at + CLAIM_DEBOUNCE)
    }

    /// When the earliest claim held back by a limit is to be tried again.
    fn next_retry(&self) -> Option<Instant> {
        self.workers.values().filter_map(|w| w.retry_at).min()
    }

    /// When the oldest ready lease has waited too long for a slot.
    fn next_stale(&self) -> Option<Instant> {
        self.workers
            .values()
            .filter_map(|w| w.ready.front().map(|(at, _)| *at + MAX_READY_AGE))
            .min()
    }

    /// Sets aside, for handing back, the ready leases that have waited too long: their worker
    /// has slowed down, and another may run them sooner.
    fn take_stale(&mut self) {
        let now = Instant::now();
        for worker in self.workers.values_mut() {
            let mut stale = Vec::new();
            while worker
                .ready
                .front()
                .is_some_and(|(at, _)| *at + MAX_READY_AGE <= now)
            {
                if let Some((_, row)) = worker.ready.pop_front() {
                    stale.push(lease_of(&row));
                }
            }
            if !stale.is_empty() {
                worker.pace.stalled();
                tracing::debug!(worker = %worker.registration.worker_id, count = stale.len(), "handing back leases that waited too long for a slot");
                self.returned
                    .push((worker.registration.tenant.clone(), stale));
            }
        }
    }

    /// Hands back the leases set aside: the jobs are available again at once instead of
    /// waiting for their leases to lapse.
    async fn hand_back(&mut self) {
        for (tenant, leases) in std::mem::take(&mut self.returned) {
            if leases.is_empty() {
                continue;
            }
            match ending::release(&self.store, &tenant, &leases).await {
                Ok(released) => self
                    .signals
                    .send(|| Signal::HandedBack { leases: released }),
                Err(error) => {
                    tracing::warn!(%error, "could not hand back undelivered leases; they will lapse")
                }
            }
        }
    }

    async fn refresh_limits(&mut self) {
        match self.store.limited_queues().await {
            Ok(limited) => {
                self.limited = limited.into_iter().collect();
                self.limits_stale = false;
            }
            // The claim statement skips limited queues by itself, so a stale set never
            // oversteps a limit; the next poll retries.
            Err(error) => tracing::warn!(%error, "reading the limited queues failed"),
        }
    }

    /// The poll interval ±10%, so replicas started together do not poll in lockstep.
    fn jittered_poll(&self) -> Duration {
        self.poll_interval
            .mul_f64(rand::rng().random_range(0.9..1.1))
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Register(registration) => {
                let (slots, prefetch, held) =
                    (registration.slots, registration.prefetch, registration.held);
                self.workers.insert(
                    registration.session,
                    Worker {
                        registration,
                        slots,
                        prefetch,
                        held,
                        ready: VecDeque::new(),
                        claiming: false,
                        pace: Pace::new(),
                        freed_at: None,
                        draining: false,
                        hungry: true,
                        backlog: true,
                        retry_at: None,
                        limit_backoff: LIMIT_BACKOFF_MIN,
                    },
                );
            }
            Command::Reserve {
                tenant,
                jobs,
                reply,
            } => {
                let reserved = jobs
                    .into_iter()
                    .map(|job| job.and_then(|job| self.reserve(&tenant, &job)))
                    .collect();
                // A caller that has gone returns nothing: its reservations are dropped with the
                // reply, so give their slots back.
                if let Err(unused) = reply.send(reserved) {
                    for r in unused.into_iter().flatten() {
                        if let Some(worker) = self.workers.get_mut(&r.session) {
                            worker.held = worker.held.saturating_sub(1);
                        }
                    }
                }
            }
            Command::Credit { session, slots } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.held = worker.held.saturating_sub(slots);
                    worker.pace.freed(slots);
                    worker.freed_at.get_or_insert_with(Instant::now);
                    // A freed slot is worth a claim only if work may be waiting: the last
                    // claim came back full, or a limit held it back. Work that arrived since
                    // has sent a wake-up (and the poll covers a missed one); claiming on every
                    // completion would cost an empty claim per job started at its enqueue.
                    worker.hungry |= worker.backlog || worker.retry_at.is_some();
                    let undelivered = worker.feed();
                    self.returned
                        .push((worker.registration.tenant.clone(), undelivered));
                }
            }
            // A worker hands back queued leases that waited too long only once all its slots
            // have been busy that long, by which time its pace has already dropped to nothing
            // (see `Pace::rate`): nothing more to forget. Other hand-backs (a stop, a drain, a
            // queue's change) say nothing about its pace.
            Command::Released { session, leases } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.held = worker.held.saturating_sub(leases);
                    // A stop or a queue change freed room that ready leases may fill now.
                    let undelivered = worker.feed();
                    self.returned
                        .push((worker.registration.tenant.clone(), undelivered));
                }
            }
            Command::Drain { session } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.draining = true;
                    let ready = worker.take_ready(|_| true);
                    self.returned
                        .push((worker.registration.tenant.clone(), ready));
                }
            }
            Command::Unregister { session } => {
                if let Some(mut worker) = self.workers.remove(&session) {
                    let ready = worker.take_ready(|_| true);
                    self.returned.push((worker.registration.tenant, ready));
                }
            }
            Command::Wake { tenant, queue } => {
                for worker in self.workers.values_mut() {
                    let r = &worker.registration;
                    if r.tenant == tenant && r.queues.contains(&queue) {
                        worker.hungry = true;
                    }
                }
            }
            Command::WakeAll => {
                for worker in self.workers.values_mut() {
                    worker.hungry = true;
                }
            }
            Command::QueueChanged { tenant, queue } => {
                self.limits_stale = true;
                for worker in self.workers.values_mut() {
                    let r = &worker.registration;
                    if r.tenant == tenant && r.queues.contains(&queue) {
                        worker.hungry = true;
                        worker.limit_backoff = LIMIT_BACKOFF_MIN;
                        // Leases claimed ahead have not started: a paused or newly limited
                        // queue's jobs go back rather than start after the change.
                        let ready = worker.take_ready(|row| row.job.queue == queue.as_str());
                        self.returned.push((tenant.clone(), ready));
                    }
                }
            }
        }
    }

    /// The worker with the most free slots that can start `job` now, its slot taken.
    fn reserve(&mut self, tenant: &TenantId, job: &Startable) -> Option<Reservation> {
        if self.limited.contains(&(tenant.clone(), job.queue.clone())) {
            return None;
        }
        let worker = self
            .workers
            .values_mut()
            .filter(|w| {
                let r = &w.registration;
                w.free() > 0
                    && !w.draining
                    && !w.backlog
                    && w.ready.is_empty()
                    && r.tenant == *tenant
                    && r.queues.contains(&job.queue)
                    && r.job_types.contains(&job.job_type)
            })
            .max_by_key(|w| w.free())?;
        worker.held += 1;
        let r = &worker.registration;
        Some(Reservation {
            session: r.session,
            worker_id: r.worker_id.clone(),
            lease: self.lease_duration,
            reports_started: r.reports_started,
            leases: r.leases.clone(),
        })
    }

    /// Starts a claim for every worker that has none in flight, may find work, and is short of
    /// leases: its free slots plus those it should hold ahead (ready here or queued at the
    /// worker). A worker that holds none ahead lets freed slots gather (see
    /// [`CLAIM_DEBOUNCE`]); one that claims ahead tops up once half of those are spent, so the
    /// claim lands before they run out.
    fn dispatch(&mut self) {
        for (&session, worker) in &mut self.workers {
            if worker.claiming || !worker.hungry || worker.draining {
                continue;
            }
            let ahead = worker.pace.ahead(worker.slots);
            let (free, waiting) = (worker.free(), worker.waiting());
            let want = (free + ahead).saturating_sub(waiting);
            if want == 0 {
                worker.freed_at = None;
                continue;
            }
            let settled = if ahead > 0 {
                waiting * 2 <= ahead
            } else {
                free == worker.slots
                    || free * 2 >= worker.slots
                    || worker
                        .freed_at
                        .is_none_or(|at| at.elapsed() >= CLAIM_DEBOUNCE)
            };
            if !settled {
                // Topping up ready leases waits for slots to free, not for a timer.
                if ahead > 0 {
                    worker.freed_at = None;
                }
                continue;
            }
            worker.freed_at = None;
            worker.claiming = true;
            let r = &worker.registration;
            let (limited, unlimited): (Vec<QueueName>, Vec<QueueName>) = r
                .queues
                .iter()
                .cloned()
                .partition(|q| self.limited.contains(&(r.tenant.clone(), q.clone())));
            let request = ClaimRequest {
                tenant: r.tenant.clone(),
                worker_id: r.worker_id.clone(),
                reports_started: r.reports_started,
                job_types: r.job_types.clone(),
                unlimited,
                limited,
                want,
                free,
                lease: self.lease_duration,
            };
            let store = self.store.clone();
            let handle = self
                .claims
                .spawn(async move { (session, claim(&store, request).await) });
            self.claim_tasks.insert(handle.id(), session);
        }
    }

    /// Takes a finished claim's leases into the worker's ready list and feeds its free slots;
    /// leases whose worker has gone or is draining are handed back.
    fn claim_done(&mut self, done: Result<(task::Id, (SessionId, ClaimOutcome)), JoinError>) {
        let (session, outcome) = match done {
            Ok((id, (session, outcome))) => {
                self.claim_tasks.remove(&id);
                (session, outcome)
            }
            Err(error) => {
                tracing::error!(%error, "a claim task died");
                if let Some(worker) = self
                    .claim_tasks
                    .remove(&error.id())
                    .and_then(|session| self.workers.get_mut(&session))
                {
                    worker.claiming = false;
                    worker.hungry = false;
                }
                return;
            }
        };
        let Some(worker) = self.workers.get_mut(&session) else {
            if let Ok(claimed) = outcome.result {
                let leases = claimed.rows.iter().map(lease_of).collect();
                self.returned.push((outcome.tenant, leases));
            }
            return;
        };
        worker.claiming = false;
        let claimed = match outcome.result {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, worker = %worker.registration.worker_id, "claim failed");
                // The poll retries; hammering a failing database helps no one.
                worker.hungry = false;
                return;
            }
        };
        worker.pace.claimed(claimed.took);
        worker.hungry = claimed.more;
        worker.backlog = claimed.more;
        let mut retry = claimed.rate_wait;
        if claimed.concurrency_held {
            let wait = worker.limit_backoff;
            worker.limit_backoff = (wait * 2).min(LIMIT_BACKOFF_MAX);
            retry = Some(retry.map_or(wait, |r| r.min(wait)));
        }
        if claimed.limited_rows {
            worker.limit_backoff = LIMIT_BACKOFF_MIN;
        }
        worker.retry_at = retry.map(|wait| Instant::now() + wait);
        if worker.draining {
            let leases = claimed.rows.iter().map(lease_of).collect();
            self.returned.push((outcome.tenant, leases));
            return;
        }
        if !claimed.rows.is_empty() {
            tracing::debug!(worker = %worker.registration.worker_id, count = claimed.rows.len(), "leased jobs");
        }
        // Dated from the claim's start, as the database dates the attempt (its `now()`).
        let now = Instant::now();
        let at = now.checked_sub(claimed.took).unwrap_or(now);
        let leases = claimed.rows.len();
        worker
            .ready
            .extend(claimed.rows.into_iter().map(|row| (at, row)));
        let undelivered = worker.feed();
        self.returned.push((outcome.tenant, undelivered));
        self.signals.send(|| Signal::Claimed { session, leases });
    }
}

/// What one claim is for; owned, as the claim runs beside the dispatcher's loop.
struct ClaimRequest {
    tenant: TenantId,
    worker_id: String,
    reports_started: bool,
    job_types: Vec<String>,
    unlimited: Vec<QueueName>,
    limited: Vec<QueueName>,
    /// Leases wanted from the unlimited queues: free slots plus those to hold ready.
    want: u32,
    /// Free slots: limited queues fill these only, as a lease held ready would count against
    /// the queue's limit before its job runs.
    free: u32,
    lease: Duration,
}

struct ClaimOutcome {
    tenant: TenantId,
    result: crate::store::Result<Claimed>,
}

struct Claimed {
    rows: Vec<LeasedRow>,
    /// Some claim came back full: more work may be waiting.
    more: bool,
    /// The soonest a rate limit lets a held-back queue be claimed again.
    rate_wait: Option<Duration>,
    /// A concurrency limit held some queue back.
    concurrency_held: bool,
    /// Some limited queue gave jobs.
    limited_rows: bool,
    took: Duration,
}

/// Claims from the unlimited queues in one statement, then from each limited queue in turn
/// under its row lock. A failure after some leases were taken keeps them (they are committed)
/// and stops there; the next claim tries again.
async fn claim(store: &Store, request: ClaimRequest) -> ClaimOutcome {
    let started = Instant::now();
    let to = LeaseTo {
        id: &request.worker_id,
        lease: request.lease,
        reports_started: request.reports_started,
    };
    let tenant = &request.tenant;
    let mut claimed = Claimed {
        rows: Vec::new(),
        more: false,
        rate_wait: None,
        concurrency_held: false,
        limited_rows: false,
        took: Duration::ZERO,
    };
    if !request.unlimited.is_empty() {
        match store
            .claim(
                tenant,
                &request.unlimited,
                &request.job_types,
                i64::from(request.want),
                &to,
            )
            .await
        {
            Ok(rows) => {
                claimed.more |= rows.len() >= request.want as usize;
                claimed.rows = rows;
            }
            Err(error) => {
                return ClaimOutcome {
                    tenant: request.tenant,
                    result: Err(error),
                };
            }
        }
    }
    for queue in &request.limited {
        let want = request
            .free
            .saturating_sub(u32::try_from(claimed.rows.len()).unwrap_or(u32::MAX));
        if want == 0 {
            claimed.more = true;
            break;
        }
        let limited = match store
            .claim_limited(tenant, queue, &request.job_types, i64::from(want), &to)
            .await
        {
            Ok(limited) => limited,
            Err(error) if claimed.rows.is_empty() => {
                return ClaimOutcome {
                    tenant: request.tenant,
                    result: Err(error),
                };
            }
            Err(error) => {
                tracing::warn!(%error, %queue, "claiming from a limited queue failed");
                break;
            }
        };
        claimed.more |= limited.rows.len() >= want as usize;
        match limited.held_back {
            None | Some(HeldBack::Paused) => {}
            Some(HeldBack::Rate(wait)) => {
                claimed.rate_wait = Some(claimed.rate_wait.map_or(wait, |r| r.min(wait)));
            }
            Some(HeldBack::Concurrency) => claimed.concurrency_held = true,
        }
        claimed.limited_rows |= !limited.rows.is_empty();
        claimed.rows.extend(limited.rows);
    }
    claimed.took = started.elapsed();
    ClaimOutcome {
        tenant: request.tenant,
        result: Ok(claimed),
    }
}
