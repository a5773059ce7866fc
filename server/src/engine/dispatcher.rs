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
//! Leases go to a session through a channel whose capacity is the worker's slot count, which the
//! free-slot accounting never exceeds, so a send can only fail because the session has gone; the
//! lease is then handed back at once instead of waiting for it to lapse.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    domain::{JobId, LeaseRef, QueueName, TenantId},
    store::{LeasedRow, Store},
};

/// How long a partly busy worker's freed slots may accumulate before a claim.
const CLAIM_DEBOUNCE: Duration = Duration::from_millis(2);

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

#[derive(Debug)]
enum Command {
    Register(Registration),
    Credit { session: SessionId, slots: u32 },
    Drain { session: SessionId },
    Unregister { session: SessionId },
    Wake { tenant: TenantId, queue: QueueName },
    WakeAll,
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
}

/// The dispatcher task's state.
pub struct Dispatcher {
    store: Store,
    lease_duration: Duration,
    poll_interval: Duration,
    workers: BTreeMap<SessionId, Worker>,
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
                rx,
            },
            DispatcherHandle { tx },
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_poll = Instant::now() + self.jittered_poll();
        loop {
            let debounce = self.debouncing().then(|| self.next_debounce());
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
                    for worker in self.workers.values_mut() {
                        worker.hungry = true;
                    }
                }
                _ = tokio::time::sleep_until(debounce.unwrap_or(next_poll).into()), if debounce.is_some() => {}
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
                    },
                );
            }
            Command::Credit { session, slots } => {
                if let Some(worker) = self.workers.get_mut(&session) {
                    worker.free = worker.free.saturating_add(slots);
                    worker.freed_at.get_or_insert_with(Instant::now);
                    worker.hungry = true;
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
        }
    }

    /// Claims for every worker that has free slots and may find work.
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
            let r = &worker.registration;
            let claimed = self
                .store
                .claim(
                    &r.tenant,
                    &r.queues,
                    &r.job_types,
                    i64::from(worker.free),
                    &r.worker_id,
                    self.lease_duration,
                )
                .await;
            let rows = match claimed {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, worker = %r.worker_id, "claim failed");
                    failed = true;
                    break;
                }
            };
            let count = u32::try_from(rows.len()).unwrap_or(u32::MAX);
            if count < worker.free {
                worker.hungry = false;
            }
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
                if let Err(error) = self
                    .store
                    .release_undelivered(&r.tenant, &undelivered)
                    .await
                {
                    tracing::warn!(%error, "could not hand back undelivered leases; they will lapse");
                }
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
