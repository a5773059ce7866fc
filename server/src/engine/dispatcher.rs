//! The dispatcher: hands available jobs to this replica's connected workers.
//!
//! One task per replica owns the table of worker sessions and their free slots. It claims only
//! when a worker has free slots and there may be work for it: a NOTIFY for one of its queues, a
//! slot freed, a new registration, or the jittered safety-net poll (the notification is only a
//! wake-up; the table is the truth). Each claim is one statement for up to a worker's free slots,
//! so a worker never holds more leases than it asked for.
//!
//! A busy worker frees its slots one completion at a time; claiming for each would cost a round
//! trip per job. So a worker whose slots are partly free waits up to [`CLAIM_DEBOUNCE`] for more
//! to free up (or until half are free) before the next claim. An idle worker claims at once.
//!
//! Queues with a concurrency or rate limit are claimed one at a time under the queue's row lock
//! ([`Store::claim_limited`]); the dispatcher keeps the set of limited queues (re-read when a
//! queue's settings change and on every poll) so that the common, unlimited case keeps its
//! single-statement claim. A claim held back by a limit is tried again when a token is due, or
//! after a short backoff for a concurrency limit (a job finishing on another replica sends no
//! wake-up; one finishing here frees a slot, which does).
//!
//! Leases go to a session through a channel whose capacity is the worker's slot count, which the
//! free-slot accounting never exceeds, so a send can only fail because the session has gone; the
//! lease is then handed back at once instead of waiting for it to lapse.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    domain::{JobId, LeaseRef, QueueName, TenantId},
    store::{HeldBack, LeasedRow, Store, Worker as LeaseTo},
};

/// How long a partly busy worker's freed slots may accumulate before a claim.
const CLAIM_DEBOUNCE: Duration = Duration::from_millis(2);
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
    /// Slots free at registration (slots minus leases adopted from an earlier stream).
    pub free: u32,
    /// Where leases are delivered; capacity at least the worker's slot count.
    pub leases: mpsc::Sender<LeasedRow>,
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
    leases: mpsc::Sender<LeasedRow>,
}

impl Reservation {
    /// Hands the started job to the worker's session. False if the session has gone: the
    /// lease is then the caller's to hand back.
    pub fn deliver(&self, row: LeasedRow) -> bool {
        self.leases.try_send(row).is_ok()
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
    free: u32,
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
    rx: mpsc::Receiver<Command>,
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
                rx,
            },
            DispatcherHandle { tx },
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_poll = Instant::now() + self.jittered_poll();
        loop {
            let debounce = self.debouncing().then(|| self.next_debounce());
            let retry = self.next_retry();
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
            }
            if self.limits_stale {
                self.refresh_limits().await;
            }
            self.dispatch().await;
        }
    }

    fn debouncing(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.freed_at.is_some() && w.hungry)
    }

    /// When the earliest waiting claim is due.
    fn next_debounce(&self) -> Instant {
        self.workers
            .values()
            .filter_map(|w| w.freed_at)
            .min()
            .map_or_else(Instant::now, |at| at + CLAIM_DEBOUNCE)
    }

    /// When the earliest claim held back by a limit is to be tried again.
    fn next_retry(&self) -> Option<Instant> {
        self.workers.values().filter_map(|w| w.retry_at).min()
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
                let (free, slots) = (registration.free, registration.slots);
                self.workers.insert(
                    registration.session,
                    Worker {
                        registration,
                        slots,
                        free,
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
                            worker.free += 1;
                        }
                    }
                }
            }
            Command::Credit { session, slots } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.free = worker.free.saturating_add(slots);
                    worker.freed_at.get_or_insert_with(Instant::now);
                    // A freed slot is worth a claim only if work may be waiting: the last
                    // claim came back full, or a limit held it back. Work that arrived since
                    // has sent a wake-up (and the poll covers a missed one); claiming on every
                    // completion would cost an empty claim per job started at its enqueue.
                    worker.hungry |= worker.backlog || worker.retry_at.is_some();
                }
            }
            Command::Drain { session } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.draining = true;
                }
            }
            Command::Unregister { session } => {
                self.workers.remove(&session);
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
                w.free > 0
                    && !w.draining
                    && !w.backlog
                    && r.tenant == *tenant
                    && r.queues.contains(&job.queue)
                    && r.job_types.contains(&job.job_type)
            })
            .max_by_key(|w| w.free)?;
        worker.free -= 1;
        let r = &worker.registration;
        Some(Reservation {
            session: r.session,
            worker_id: r.worker_id.clone(),
            lease: self.lease_duration,
            leases: r.leases.clone(),
        })
    }

    /// Claims for every worker that has free slots and may find work: first from its
    /// unlimited queues in one statement, then from each limited queue in turn.
    async fn dispatch(&mut self) {
        let mut failed = false;
        for worker in self.workers.values_mut() {
            if !worker.hungry || worker.draining || worker.free == 0 {
                continue;
            }
            let settled = worker.free == worker.slots
                || worker.free * 2 >= worker.slots
                || worker
                    .freed_at
                    .is_none_or(|at| at.elapsed() >= CLAIM_DEBOUNCE);
            if !settled {
                continue;
            }
            worker.freed_at = None;
            if let Err(error) =
                claim_for(&self.store, &self.limited, self.lease_duration, worker).await
            {
                tracing::warn!(%error, worker = %worker.registration.worker_id, "claim failed");
                failed = true;
                break;
            }
        }
        if failed {
            // The poll retries; hammering a failing database helps no one.
            for worker in self.workers.values_mut() {
                worker.hungry = false;
            }
        }
    }
}

/// Claims up to the worker's free slots and hands the leases over. Leaves the worker hungry
/// only when some claim came back full (there may be more), and sets its retry time when a
/// limit held a claim back.
async fn claim_for(
    store: &Store,
    limited: &HashSet<(TenantId, QueueName)>,
    lease: Duration,
    worker: &mut Worker,
) -> crate::store::Result<()> {
    let r = &worker.registration;
    let to = LeaseTo {
        id: &r.worker_id,
        lease,
    };
    let (limited_queues, unlimited): (Vec<QueueName>, Vec<QueueName>) = r
        .queues
        .iter()
        .cloned()
        .partition(|q| limited.contains(&(r.tenant.clone(), q.clone())));
    let mut more = false;
    let mut retry: Option<Duration> = None;
    let mut rows = Vec::new();
    if !unlimited.is_empty() {
        let want = worker.free;
        rows = store
            .claim(&r.tenant, &unlimited, &r.job_types, i64::from(want), &to)
            .await?;
        more |= rows.len() >= want as usize;
    }
    for queue in &limited_queues {
        let want = worker
            .free
            .saturating_sub(u32::try_from(rows.len()).unwrap_or(u32::MAX));
        if want == 0 {
            more = true;
            break;
        }
        let claim = store
            .claim_limited(&r.tenant, queue, &r.job_types, i64::from(want), &to)
            .await?;
        more |= claim.rows.len() >= want as usize;
        match claim.held_back {
            None | Some(HeldBack::Paused) => {}
            Some(HeldBack::Rate(wait)) => {
                retry = Some(retry.map_or(wait, |r| r.min(wait)));
            }
            Some(HeldBack::Concurrency) => {
                let wait = worker.limit_backoff;
                worker.limit_backoff = (wait * 2).min(LIMIT_BACKOFF_MAX);
                retry = Some(retry.map_or(wait, |r| r.min(wait)));
            }
        }
        if !claim.rows.is_empty() {
            worker.limit_backoff = LIMIT_BACKOFF_MIN;
        }
        rows.extend(claim.rows);
    }
    worker.hungry = more;
    worker.backlog = more;
    worker.retry_at = retry.map(|wait| Instant::now() + wait);
    deliver(store, worker, rows).await;
    Ok(())
}

/// Sends leases to the worker's session; any it can no longer take are handed back at once.
async fn deliver(store: &Store, worker: &mut Worker, rows: Vec<LeasedRow>) {
    let r = &worker.registration;
    let count = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    worker.free = worker.free.saturating_sub(count);
    if count > 0 {
        tracing::debug!(worker = %r.worker_id, count, "leased jobs");
    }
    let mut undelivered = Vec::new();
    for row in rows {
        let lease = LeaseRef {
            job_id: JobId(row.job.id),
            attempt: row.job.attempt,
        };
        if r.leases.try_send(row).is_err() {
            undelivered.push(lease);
        }
    }
    if !undelivered.is_empty() {
        worker.free = worker
            .free
            .saturating_add(u32::try_from(undelivered.len()).unwrap_or(u32::MAX));
        worker.hungry = false;
        worker.retry_at = None;
        if let Err(error) = store.release_undelivered(&r.tenant, &undelivered).await {
            tracing::warn!(%error, "could not hand back undelivered leases; they will lapse");
        }
    }
}
