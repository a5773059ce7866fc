//! The fanout: delivers committed events to this replica's watchers, in sequence order, once.
//!
//! One loop per replica reads the event log, whoever wrote it (so a watcher here sees progress
//! reported to any replica), and hands each event to every matching subscription. An event is
//! delivered once it is final, so that nothing is delivered out of order and nothing is skipped:
//! when it lies below a safe horizon (see `store::events`), a number below which every event has
//! committed or never will, or when it has committed and so has every number before it. The
//! second rule matters while statements overlap: the horizon read just after one commits is
//! held back by the next, already running, until that one commits too, although the next takes
//! its numbers only as it ends, so without the second rule each batch of progress events would
//! wait for the next batch's commit. While nobody watches the fanout only keeps the horizon
//! current, slowly; with watchers it polls at the watch interval.
//!
//! # Why a horizon is safe
//!
//! A horizon is a number `H` and the set `X` of transaction ids held in this database, read in
//! one statement in that order (`Store::event_watermark`). It becomes safe once every
//! transaction of `X` has ended. Then every event numbered at most `H` has committed or never
//! will, because:
//! 1. `H` is a number `nextval()` had really handed out when it was read. It is read with
//!    `pg_sequence_last_value()`, under the sequence's buffer lock ([`store::LAST_EVENT_NUMBER`]
//!    says why a plain read of the sequence can see up to 32 numbers ahead, which would let a
//!    watcher skip committed events).
//! 2. So each number `n <= H` was taken before `X` was read, by a transaction that already held
//!    its id: every statement that writes an event changes or locks a row first, and the id is
//!    assigned at that first change.
//! 3. When `X` was read, that transaction had ended (its event is final) or was in progress and
//!    so in `X`. Once all of `X` has ended, it has too.
//!
//! Past the horizon, the second rule needs numbers handed out in order: the sequence hands out
//! one number at a time (`CACHE 1`, checked at start-up), so when `n + 1` has committed, `n`
//! has been handed out already and no event can take a number below `n + 1` from then on.
//!
//! [`store::LAST_EVENT_NUMBER`]: crate::store::LAST_EVENT_NUMBER
//!
//! A subscription starts at the horizon it was registered at: its stream replays the stored
//! events up to there, then takes live ones from here. Events wait for its stream in a queue of
//! its own, bounded in time rather than in count: a burst committed at once (an EnqueueJobs of
//! up to 5,000 jobs, an event each) waits there whole for a stream that keeps up. A subscription
//! whose oldest waiting event has waited longer than the lag limit has fallen behind: it is
//! dropped (never blocking the others), and its stream tells the client to resume from its last
//! sequence (invariant 5 holds across the reconnect). [`MAX_QUEUED`] events waiting drop it as
//! well, however recent, to bound what one stalled subscription holds.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    domain::{EventKind, JobId, JobState, TenantId},
    store::{EventFilter, EventRow, JobRow, OpenTransaction, SnapshotXids, Store},
};

/// Events waiting for one subscription's stream beyond which it counts as too slow, however
/// recent they are: a bound on the memory a stalled subscription holds.
pub const MAX_QUEUED: usize = 100_000;
/// Events read per statement.
const PAGE: i64 = 2000;
/// Horizons kept waiting at most. A transaction that stays open (an hours-long migration or
/// import in the same database) keeps every horizon read after it began from becoming safe;
/// one per poll, they would pile up for as long as it lives. Past this the newest replaces the
/// last kept: any horizon is as safe once its own transactions end, only coarser.
const MAX_PENDING: usize = 64;
/// How often the horizon is refreshed while nobody watches.
const IDLE_INTERVAL: Duration = Duration::from_millis(100);
/// The most transactions a warning about held-up delivery names.
const NAMED_TRANSACTIONS: usize = 5;
/// The least time between two reads of the log. Each that finds it moved costs the database a
/// scan of its backends, not cheap under load, and this replica's commits can wake the loop
/// faster than that is worth.
const MIN_TICK_GAP: Duration = Duration::from_millis(1);

/// An event as delivered: the row, and for state changes the job as it is now.
#[derive(Debug)]
pub struct FanoutEvent {
    pub row: EventRow,
    pub job: Option<JobRow>,
}

impl FanoutEvent {
    /// The state a state-change event entered, if it is one.
    pub fn state(&self) -> Option<JobState> {
        (self.row.kind == EventKind::State)
            .then_some(self.row.state)
            .flatten()
    }
}

/// What a subscription wants.
#[derive(Debug, Clone)]
pub enum Target {
    Job(JobId),
    /// A job and its children. Matched on each event's job's parent, so it is offered every
    /// event, read with its job, as a filter is.
    Family(JobId),
    Filter(EventFilter),
}

impl Target {
    /// The job a subscription to one job (and maybe its children) watches.
    pub fn job(&self) -> Option<JobId> {
        match self {
            Target::Job(id) | Target::Family(id) => Some(*id),
            Target::Filter(_) => None,
        }
    }

    fn matches(&self, row: &EventRow) -> bool {
        match self {
            Target::Job(id) => id.0 == row.job_id,
            Target::Family(id) => id.0 == row.job_id || row.parent_id == Some(id.0),
            Target::Filter(f) => {
                f.queue
                    .as_ref()
                    .is_none_or(|q| row.queue.as_deref() == Some(q.as_str()))
                    && f.job_type
                        .as_ref()
                        .is_none_or(|t| row.job_type.as_ref() == Some(t))
                    && (f.states.is_empty()
                        || (row.kind == EventKind::State
                            && row.state.is_some_and(|s| f.states.contains(&s))))
                    && (f.labels.is_empty()
                        || row.labels.as_ref().is_some_and(|labels| {
                            f.labels
                                .iter()
                                .all(|(k, v)| labels.0.get(k).is_some_and(|x| x == v))
                        }))
            }
        }
    }
}

struct Subscriber {
    tenant: TenantId,
    target: Target,
    queue: Arc<Queue>,
}

impl Drop for Subscriber {
    /// A subscriber leaves the fanout when its stream drops its subscription, when it falls
    /// behind, or at shutdown: its stream then finds its queue closed.
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// The events waiting for one subscription's stream, each with when it was offered.
#[derive(Default)]
struct Queue {
    state: Mutex<Waiting>,
    /// Wakes the stream; a wake-up sent while it was not waiting is kept for its next wait.
    ready: Notify,
}

#[derive(Default)]
struct Waiting {
    events: VecDeque<(Instant, Arc<FanoutEvent>)>,
    closed: bool,
}

/// Why an event could not be queued for a subscription.
enum Refused {
    /// Its oldest waiting event is older than the lag limit, or too many wait.
    Behind,
    /// Its stream has gone.
    Closed,
}

impl Queue {
    fn offer(
        &self,
        event: Arc<FanoutEvent>,
        now: Instant,
        lag_limit: Duration,
    ) -> Result<(), Refused> {
        let Ok(mut waiting) = self.state.lock() else {
            return Err(Refused::Closed);
        };
        if waiting.closed {
            return Err(Refused::Closed);
        }
        let behind = waiting
            .events
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > lag_limit)
            || waiting.events.len() >= MAX_QUEUED;
        if behind {
            return Err(Refused::Behind);
        }
        waiting.events.push_back((now, event));
        drop(waiting);
        self.ready.notify_one();
        Ok(())
    }

    fn close(&self) {
        if let Ok(mut waiting) = self.state.lock() {
            waiting.closed = true;
            waiting.events.clear();
        }
        self.ready.notify_one();
    }
}

struct State {
    /// Every event at or below this number has been handed to the subscriptions of its time.
    horizon: i64,
    subscribers: HashMap<u64, Subscriber>,
    /// The subscriptions to one job, by job, and the filtered ones: an event is offered to its
    /// job's watchers and to the filters only, so delivering it costs what watches it, not
    /// a comparison with every watcher on the replica.
    by_job: HashMap<Uuid, Vec<u64>>,
    filtered: HashSet<u64>,
    next_id: u64,
}

impl State {
    fn new() -> Self {
        Self {
            horizon: 0,
            subscribers: HashMap::new(),
            by_job: HashMap::new(),
            filtered: HashSet::new(),
            next_id: 1,
        }
    }

    fn insert(&mut self, subscriber: Subscriber) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        match &subscriber.target {
            Target::Job(job) => self.by_job.entry(job.0).or_default().push(id),
            Target::Family(_) | Target::Filter(_) => {
                self.filtered.insert(id);
            }
        }
        self.subscribers.insert(id, subscriber);
        id
    }

    fn remove(&mut self, id: u64) {
        let Some(subscriber) = self.subscribers.remove(&id) else {
            return;
        };
        match subscriber.target {
            Target::Job(job) => {
                if let Some(ids) = self.by_job.get_mut(&job.0) {
                    ids.retain(|other| *other != id);
                    if ids.is_empty() {
                        self.by_job.remove(&job.0);
                    }
                }
            }
            Target::Family(_) | Target::Filter(_) => {
                self.filtered.remove(&id);
            }
        }
    }

    /// Hands an event to every subscription it matches; one that has fallen behind is dropped.
    fn offer(&mut self, event: &Arc<FanoutEvent>, now: Instant, lag_limit: Duration) {
        let mut lagging = Vec::new();
        let candidates = self
            .by_job
            .get(&event.row.job_id)
            .into_iter()
            .flatten()
            .chain(&self.filtered);
        for id in candidates {
            let Some(sub) = self.subscribers.get(id) else {
                continue;
            };
            if sub.tenant.as_str() != event.row.tenant_id || !sub.target.matches(&event.row) {
                continue;
            }
            match sub.queue.offer(event.clone(), now, lag_limit) {
                Ok(()) => {}
                Err(Refused::Behind) => lagging.push((*id, true)),
                Err(Refused::Closed) => lagging.push((*id, false)),
            }
        }
        for (id, behind) in lagging {
            if behind {
                tracing::info!(subscription = id, "watcher fell behind; disconnecting it");
            }
            self.remove(id);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the loop when the first watcher arrives, and when this replica has committed
    /// events that someone may watch.
    wake: Notify,
    /// Whether the loop has found its first safe horizon; see [`FanoutHandle::subscribe`].
    started: watch::Sender<bool>,
    /// Watchers waiting for it: the loop polls for them at the watch interval, as for watchers.
    starting: AtomicUsize,
}

/// Counts a watcher as waiting for the first safe horizon while it lives.
struct Starting<'a>(&'a AtomicUsize);

impl<'a> Starting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn watched(&self) -> bool {
        self.state
            .lock()
            .map(|s| !s.subscribers.is_empty())
            .unwrap_or(false)
    }

    /// Lets watchers waiting for the first safe horizon subscribe; only the first call wakes
    /// them.
    fn mark_started(&self) {
        self.started
            .send_if_modified(|started| !std::mem::replace(started, true));
    }

    /// Whether a WatchJobs filter is registered, which needs events' jobs read with them.
    fn filtered(&self) -> bool {
        self.state
            .lock()
            .map(|s| !s.filtered.is_empty())
            .unwrap_or(false)
    }
}

/// A cloneable handle for registering watchers.
#[derive(Clone)]
pub struct FanoutHandle {
    shared: Arc<Shared>,
}

/// A registered watcher. Dropping it unregisters.
pub struct Subscription {
    id: u64,
    /// Live events start after this sequence; the stream replays up to it from the store.
    pub horizon: i64,
    queue: Arc<Queue>,
    shared: Arc<Shared>,
}

impl Subscription {
    /// The next live event; `None` once the subscription was dropped for falling behind, or the
    /// fanout stopped.
    pub async fn recv(&self) -> Option<Arc<FanoutEvent>> {
        loop {
            {
                let Ok(mut waiting) = self.queue.state.lock() else {
                    return None;
                };
                if let Some((_, event)) = waiting.events.pop_front() {
                    return Some(event);
                }
                if waiting.closed {
                    return None;
                }
            }
            self.queue.ready.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.remove(self.id);
        }
    }
}

impl FanoutHandle {
    /// This replica has just committed events: read them now rather than at the next tick.
    /// A watcher of a burst of progress reports otherwise waits up to a poll interval after
    /// the last of its statements commits, on top of the statements. Nothing happens while
    /// nobody watches; events written by other replicas still arrive at the poll interval.
    pub fn committed(&self) {
        if self.shared.watched() {
            self.shared.wake.notify_one();
        }
    }

    /// Registers a watcher. Until the loop has found its first safe horizon (on a replica just
    /// started, once the transactions then in progress have ended) this waits, for as long as
    /// it takes; the caller's stream gives up on shutdown. A subscription taken before would
    /// start at 0: until those transactions ended it would get nothing anyway (any number
    /// missing from the log's history stops delivery past the horizon), and then the loop
    /// would read the whole log for it, which is why this does not give up after a timeout.
    pub async fn subscribe(&self, tenant: TenantId, target: Target) -> Subscription {
        let mut started = self.shared.started.subscribe();
        if !*started.borrow_and_update() {
            let _waiting = Starting::new(&self.shared.starting);
            self.shared.wake.notify_one();
            // The sender lives as long as this handle, so this ends only once started.
            let _ = started.wait_for(|started| *started).await;
        }
        let queue = Arc::new(Queue::default());
        let (id, horizon) = match self.shared.state.lock() {
            Ok(mut state) => {
                let id = state.insert(Subscriber {
                    tenant,
                    target,
                    queue: queue.clone(),
                });
                (id, state.horizon)
            }
            // A poisoned lock means the loop panicked: the subscription gets no live events and
            // its stream ends, so the client reconnects (possibly to a healthy replica).
            Err(_) => {
                queue.close();
                (0, 0)
            }
        };
        self.shared.wake.notify_one();
        Subscription {
            id,
            horizon,
            queue,
            shared: self.shared.clone(),
        }
    }
}

/// The fanout's timings, from the server's settings.
#[derive(Debug, Clone, Copy)]
pub struct FanoutConfig {
    /// How often the log is read while anyone watches.
    pub interval: Duration,
    /// How long delivery may be held up by transactions in progress before the loop logs which
    /// ones (and again each time as long again passes).
    pub stall_warning: Duration,
    /// How long an event may wait for a subscription's stream before the subscription counts
    /// as fallen behind.
    pub lag_limit: Duration,
}

pub struct Fanout {
    store: Store,
    interval: Duration,
    lag_limit: Duration,
    shared: Arc<Shared>,
    /// Horizons waiting for the transactions in progress when they were read to end.
    pending: VecDeque<(i64, SnapshotXids)>,
    /// The log's last number when last read.
    read: Option<i64>,
    stall: Stall,
}

impl Fanout {
    pub fn new(store: Store, config: FanoutConfig) -> (Self, FanoutHandle) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            wake: Notify::new(),
            started: watch::Sender::new(false),
            starting: AtomicUsize::new(0),
        });
        (
            Self {
                store,
                interval: config.interval,
                lag_limit: config.lag_limit,
                shared: shared.clone(),
                pending: VecDeque::new(),
                read: None,
                stall: Stall::new(config.stall_warning),
            },
            FanoutHandle { shared },
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        // Start at the current end of the log: watchers replay history from the store.
        match self.store.event_watermark(None).await {
            Ok((last, xips)) => {
                self.read = Some(last);
                self.pending.push_back((last, xips.unwrap_or_default()));
            }
            Err(error) => tracing::warn!(%error, "reading the event watermark failed"),
        }
        loop {
            let started = Instant::now();
            match self.tick().await {
                Ok(held) => self.watch_stall(held).await,
                Err(error) => tracing::warn!(%error, "event fanout failed; retrying"),
            }
            let pause = if self.shared.watched() || self.shared.starting.load(Ordering::Relaxed) > 0
            {
                self.interval
            } else {
                IDLE_INTERVAL
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
                _ = self.shared.wake.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(started + MIN_TICK_GAP) => {}
            }
        }
        // Ending every subscription ends every watch stream, so the server can stop.
        if let Ok(mut state) = self.shared.state.lock() {
            state.subscribers.clear();
            state.by_job.clear();
            state.filtered.clear();
        }
    }

    /// Advances the safe horizon, and delivers what is final when anyone watches: every event
    /// below the horizon, and beyond it the committed events that follow on without a gap.
    /// Returns, when watchers wait for something only the end of transactions in progress can
    /// give them, the ids of those transactions.
    async fn tick(&mut self) -> crate::store::Result<Option<SnapshotXids>> {
        // A horizon that delivery has already passed has nothing left to wait for.
        let delivered = self.horizon();
        while self.pending.front().is_some_and(|(h, _)| *h <= delivered) {
            self.pending.pop_front();
        }
        // With no horizon waiting and everything read passed on, only a log that has moved
        // since gives anything to do.
        let settled = self
            .read
            .filter(|read| self.pending.is_empty() && self.horizon() >= *read);
        let (last, xips) = self.store.event_watermark(settled).await?;
        self.read = Some(last);
        let Some(xips) = xips else { return Ok(None) };
        let in_progress: HashSet<i64> = xips.iter().copied().collect();
        queue_horizon(&mut self.pending, last, xips);
        let mut safe = None;
        while let Some((horizon, xids)) = self.pending.front() {
            if xids.iter().any(|x| in_progress.contains(x)) {
                break;
            }
            safe = Some(*horizon);
            self.pending.pop_front();
        }
        match safe {
            Some(safe) if self.advance_if_unwatched(safe) => {
                self.shared.mark_started();
                return Ok(None);
            }
            None if !self.shared.watched() => {
                let starting = !*self.shared.started.borrow()
                    && self.shared.starting.load(Ordering::Relaxed) > 0;
                return Ok(starting.then(|| blockers(&self.pending, i64::MIN, &in_progress)));
            }
            _ => {}
        }
        let missing = self.deliver_up_to(safe, last).await;
        // A safe horizon that delivery did not reach (a read failed, or a filter registered
        // meanwhile) is kept for the next pass rather than waiting for a newer one to be safe.
        if let Some(safe) = safe {
            if self.horizon() >= safe {
                self.shared.mark_started();
            } else {
                self.pending.push_front((safe, Vec::new()));
            }
        }
        Ok(missing?.map(|number| blockers(&self.pending, number, &in_progress)))
    }

    /// Logs, once delivery has been held up for the stall warning's time, which transactions
    /// hold it, and that it resumed once they end. A transaction that stays open (a migration,
    /// an import, a session idle in a transaction) otherwise leaves watchers silent with
    /// nothing to tell an operator why.
    async fn watch_stall(&mut self, held: Option<SnapshotXids>) {
        let horizon = self.horizon();
        match self.stall.observe(held.is_some(), horizon, Instant::now()) {
            Some(StallReport::Held(held_for)) => {
                let xids = held.unwrap_or_default();
                let transactions = match self.store.open_transactions(&xids).await {
                    Ok(transactions) => describe(&transactions),
                    Err(error) => format!("could not be read: {error}"),
                };
                tracing::warn!(
                    held_for = ?held_for,
                    horizon,
                    %transactions,
                    "watch delivery is held up by transactions in progress: watchers on this \
                     replica get no newer event until they end"
                );
            }
            Some(StallReport::Resumed(held_for)) => {
                tracing::info!(held_for = ?held_for, horizon, "watch delivery resumed");
            }
            None => {}
        }
    }

    /// Delivers what is final up to the log's `last` number: up to the `safe` horizon, and
    /// past it the committed events that follow on without a gap. Returns the missing number
    /// it stopped at, when committed events follow it.
    async fn deliver_up_to(
        &self,
        safe: Option<i64>,
        last: i64,
    ) -> crate::store::Result<Option<i64>> {
        let mut from = self.horizon();
        // Every number up to `reach` is final: delivered, committed, or never to commit.
        let mut reach = safe.unwrap_or(from).max(from);
        while from < last {
            let with_job = self.shared.filtered();
            let rows = self
                .store
                .events_between(from, last, PAGE, with_job)
                .await?;
            let full = rows.len() == PAGE as usize;
            let (count, extended) = final_run(rows.iter().map(|r| r.seq), reach);
            let gap = count < rows.len();
            reach = extended;
            let mut final_rows = rows;
            final_rows.truncate(count);
            // A full page leaves rows unread after its last: only what was read is passed.
            let upto = match final_rows.last() {
                Some(row) if full && !gap => row.seq,
                _ => reach,
            };
            if !self.deliver_final(final_rows, upto, with_job).await? {
                break;
            }
            from = upto;
            if gap {
                return Ok(Some(reach + 1));
            }
            if !full {
                break;
            }
        }
        Ok(None)
    }

    /// Reads the jobs that state events carry, then delivers; see [`Self::deliver`].
    async fn deliver_final(
        &self,
        rows: Vec<EventRow>,
        upto: i64,
        with_job: bool,
    ) -> crate::store::Result<bool> {
        let snapshot_ids: Vec<(&str, Uuid)> = rows
            .iter()
            .filter(|r| r.kind == EventKind::State)
            .map(|r| (r.tenant_id.as_str(), r.job_id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let jobs: HashMap<Uuid, JobRow> = if snapshot_ids.is_empty() {
            HashMap::new()
        } else {
            self.store
                .jobs_by_ids(&snapshot_ids)
                .await?
                .into_iter()
                .map(|j| (j.id, j))
                .collect()
        };
        tracing::debug!(
            upto,
            count = rows.len(),
            first = rows.first().map(|r| r.seq),
            "delivering events"
        );
        Ok(self.deliver(rows, &jobs, upto, with_job))
    }

    fn horizon(&self) -> i64 {
        self.shared.state.lock().map(|s| s.horizon).unwrap_or(0)
    }

    /// Moves the horizon without reading events when nobody watches; checked under the lock,
    /// so a watcher arriving meanwhile cannot miss the events skipped.
    fn advance_if_unwatched(&self, safe: i64) -> bool {
        match self.shared.state.lock() {
            Ok(mut state) if state.subscribers.is_empty() => {
                state.horizon = state.horizon.max(safe);
                true
            }
            _ => false,
        }
    }

    /// Hands events to matching subscriptions and moves the horizon, under one lock so that a
    /// subscription registered meanwhile starts exactly where delivery stopped. Events read
    /// without their jobs are not delivered (`false`) once a filter has been registered since
    /// the read: it could not match them, and it expects them live. They are read again.
    fn deliver(
        &self,
        rows: Vec<EventRow>,
        jobs: &HashMap<Uuid, JobRow>,
        upto: i64,
        with_job: bool,
    ) -> bool {
        let Ok(mut state) = self.shared.state.lock() else {
            return false;
        };
        if !with_job && !state.filtered.is_empty() {
            return false;
        }
        let now = Instant::now();
        for row in rows {
            let job = (row.kind == EventKind::State)
                .then(|| jobs.get(&row.job_id).cloned())
                .flatten();
            state.offer(&Arc::new(FanoutEvent { row, job }), now, self.lag_limit);
        }
        state.horizon = state.horizon.max(upto);
        true
    }
}

/// What [`Stall::observe`] found worth logging.
#[derive(Debug, PartialEq)]
enum StallReport {
    /// Delivery has been held up this long (first after the warning's time, then as often).
    Held(Duration),
    /// Delivery moved on after a warning, having been held up this long.
    Resumed(Duration),
}

/// Tracks how long delivery has been held up at one horizon.
#[derive(Debug)]
struct Stall {
    warn_after: Duration,
    /// The horizon delivery is held at, and since when.
    held: Option<(i64, Instant)>,
    /// When it was last reported as held.
    warned: Option<Instant>,
}

impl Stall {
    fn new(warn_after: Duration) -> Self {
        Self {
            warn_after,
            held: None,
            warned: None,
        }
    }

    /// Notes whether delivery is held up now, with the horizon where it stands. A horizon that
    /// moves is delivery going on, however briefly numbers go missing under load, so only time
    /// spent at one horizon counts.
    fn observe(&mut self, held: bool, horizon: i64, now: Instant) -> Option<StallReport> {
        let resumed = match self.held {
            Some((at, since)) if !held || at != horizon => {
                let warned = self.warned.take().is_some();
                self.held = None;
                warned.then(|| StallReport::Resumed(now - since))
            }
            _ => None,
        };
        if !held {
            return resumed;
        }
        let since = self.held.get_or_insert((horizon, now)).1;
        let held_for = now - since;
        let due = held_for >= self.warn_after
            && self
                .warned
                .is_none_or(|warned| now - warned >= self.warn_after);
        if due {
            self.warned = Some(now);
            Some(StallReport::Held(held_for))
        } else {
            resumed
        }
    }
}

/// The transactions still in progress that the first waiting horizon at or past `number` waits
/// for: once they end, delivery passes the number (or reaches it, for `i64::MIN`). A missing
/// number's owner held its transaction id before it took the number, so it is among them while
/// it lives; a horizon read earlier would name only older transactions, which need not hold it.
fn blockers(
    pending: &VecDeque<(i64, SnapshotXids)>,
    number: i64,
    in_progress: &HashSet<i64>,
) -> SnapshotXids {
    pending
        .iter()
        .find(|(horizon, _)| *horizon >= number)
        .map(|(_, xids)| {
            xids.iter()
                .copied()
                .filter(|x| in_progress.contains(x))
                .collect()
        })
        .unwrap_or_default()
}

/// The transactions a warning names, oldest first.
fn describe(transactions: &[OpenTransaction]) -> String {
    if transactions.is_empty() {
        return "none found (they ended meanwhile)".into();
    }
    let mut named: Vec<String> = transactions
        .iter()
        .take(NAMED_TRANSACTIONS)
        .map(|t| {
            format!(
                "pid {} (user {:?}, application {:?}, client {}, {}, open {:.1}s): {:?}",
                t.pid, t.user_name, t.application_name, t.client, t.state, t.open_secs, t.query
            )
        })
        .collect();
    if transactions.len() > NAMED_TRANSACTIONS {
        named.push(format!(
            "and {} more",
            transactions.len() - NAMED_TRANSACTIONS
        ));
    }
    named.join("; ")
}

/// Queues the horizon `last`, read just before the transaction ids `xips`, to wait for them.
/// One no further than the last kept adds nothing: the kept one's transactions include every
/// one that can hold a number below it. Past [`MAX_PENDING`] the newest replaces the last kept.
fn queue_horizon(pending: &mut VecDeque<(i64, SnapshotXids)>, last: i64, xips: SnapshotXids) {
    if pending.back().is_none_or(|(kept, _)| *kept < last) {
        if pending.len() >= MAX_PENDING {
            pending.pop_back();
        }
        pending.push_back((last, xips));
    }
}

/// How many of `seqs` (ascending) are final, given that every number up to `reach` is: those
/// up to `reach`, then those that follow on without a missing number. Past the horizon a
/// committed event is final when every number before it is, as no event can take a smaller
/// number from then on; a missing number may belong to a transaction still in progress, so the
/// run stops there until the horizon passes it. Returns the count and how far numbers are final.
fn final_run(seqs: impl IntoIterator<Item = i64>, mut reach: i64) -> (usize, i64) {
    let mut count = 0;
    for seq in seqs {
        if seq == reach + 1 {
            reach = seq;
        } else if seq > reach {
            break;
        }
        count += 1;
    }
    (count, reach)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use sqlx::types::Json;

    use super::*;
    use crate::domain::QueueName;

    fn row(seq: i64, tenant: &str, job: Uuid, queue: &str) -> Arc<FanoutEvent> {
        Arc::new(FanoutEvent {
            row: EventRow {
                seq,
                tenant_id: tenant.into(),
                job_id: job,
                kind: EventKind::Progress,
                state: None,
                attempt: 1,
                data: Json(serde_json::json!({})),
                created_at: Utc::now(),
                queue: Some(queue.into()),
                job_type: Some("noop".into()),
                labels: Some(Json(HashMap::new())),
                parent_id: None,
            },
            job: None,
        })
    }

    fn child_row(seq: i64, job: Uuid, parent: Uuid) -> Arc<FanoutEvent> {
        let mut row = row(seq, "t", job, "default").row.clone();
        row.parent_id = Some(parent);
        Arc::new(FanoutEvent { row, job: None })
    }

    const LAG: Duration = Duration::from_secs(10);

    fn subscribe(state: &mut State, tenant: &str, target: Target) -> (u64, Arc<Queue>) {
        let queue = Arc::new(Queue::default());
        let id = state.insert(Subscriber {
            tenant: TenantId::new_unchecked(tenant),
            target,
            queue: queue.clone(),
        });
        (id, queue)
    }

    /// Takes what waits in a queue, and whether it was closed.
    fn received(queue: &Queue) -> Vec<i64> {
        let mut waiting = queue.state.lock().expect("lock");
        waiting.events.drain(..).map(|(_, e)| e.row.seq).collect()
    }

    fn closed(queue: &Queue) -> bool {
        queue.state.lock().expect("lock").closed
    }

    #[test]
    fn a_family_watch_gets_the_job_and_its_children_only() {
        let (parent, child, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut state = State::new();
        let (_, family) = subscribe(&mut state, "t", Target::Family(JobId(parent)));
        let (_, job_only) = subscribe(&mut state, "t", Target::Job(JobId(parent)));

        let now = Instant::now();
        state.offer(&row(1, "t", parent, "default"), now, LAG);
        state.offer(&child_row(2, child, parent), now, LAG);
        state.offer(&child_row(3, other, child), now, LAG);
        state.offer(&row(4, "t", other, "default"), now, LAG);

        assert_eq!(received(&family), [1, 2]);
        assert_eq!(received(&job_only), [1]);
    }

    #[test]
    fn events_reach_their_jobs_watchers_and_matching_filters_only() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut state = State::new();
        let (_, watches_a) = subscribe(&mut state, "t", Target::Job(JobId(a)));
        let (_, also_a) = subscribe(&mut state, "t", Target::Job(JobId(a)));
        let (_, other_tenant) = subscribe(&mut state, "u", Target::Job(JobId(a)));
        let mut emails = EventFilter {
            queue: Some(QueueName::new_unchecked("emails")),
            ..EventFilter::default()
        };
        let (_, filter) = subscribe(&mut state, "t", Target::Filter(emails.clone()));
        emails.queue = None;
        let (_, everything) = subscribe(&mut state, "t", Target::Filter(emails));

        let now = Instant::now();
        state.offer(&row(1, "t", a, "emails"), now, LAG);
        state.offer(&row(2, "t", b, "emails"), now, LAG);
        state.offer(&row(3, "t", b, "default"), now, LAG);

        assert_eq!(received(&watches_a), [1]);
        assert_eq!(received(&also_a), [1]);
        assert_eq!(received(&other_tenant), Vec::<i64>::new());
        assert_eq!(received(&filter), [1, 2]);
        assert_eq!(received(&everything), [1, 2, 3]);
    }

    #[test]
    fn a_burst_waits_whole_and_only_falling_behind_in_time_drops_a_subscription() {
        let job = Uuid::now_v7();
        let mut state = State::new();
        let (_, slow) = subscribe(&mut state, "t", Target::Job(JobId(job)));
        let (gone, _) = subscribe(&mut state, "t", Target::Filter(EventFilter::default()));
        let (_, keeps_up) = subscribe(&mut state, "t", Target::Job(JobId(job)));
        state.remove(gone);
        assert!(state.filtered.is_empty());

        let start = Instant::now();
        for seq in 1..=5000 {
            state.offer(&row(seq, "t", job, "default"), start, LAG);
        }
        assert_eq!(received(&keeps_up).len(), 5000, "a burst waits whole");
        state.offer(&row(5001, "t", job, "default"), start + LAG, LAG);
        assert_eq!(received(&keeps_up), [5001]);
        assert_eq!(
            state.subscribers.len(),
            2,
            "waiting exactly the limit is not behind"
        );

        let later = start + LAG + Duration::from_millis(1);
        state.offer(&row(5002, "t", job, "default"), later, LAG);
        assert!(closed(&slow), "its oldest event waited past the limit");
        assert!(received(&slow).is_empty(), "a dropped queue holds nothing");
        assert_eq!(received(&keeps_up), [5002]);
        assert_eq!(state.subscribers.len(), 1);
        assert_eq!(state.by_job.get(&job).map(Vec::len), Some(1));
    }

    #[test]
    fn too_many_waiting_events_drop_a_subscription_however_recent() {
        let job = Uuid::now_v7();
        let mut state = State::new();
        let (_, stalled) = subscribe(&mut state, "t", Target::Job(JobId(job)));
        let now = Instant::now();
        for seq in 0..=i64::try_from(MAX_QUEUED).expect("small") {
            state.offer(&row(seq, "t", job, "default"), now, LAG);
        }
        assert!(closed(&stalled));
        assert!(state.subscribers.is_empty());
    }

    #[test]
    fn horizons_waiting_on_a_long_transaction_stay_bounded() {
        let mut pending = VecDeque::new();
        for _ in 0..10 {
            queue_horizon(&mut pending, 100, vec![7]);
        }
        assert_eq!(pending.len(), 1, "an unmoved log adds no horizon");

        for last in 101..1_000 {
            queue_horizon(&mut pending, last, vec![7, last]);
        }
        assert_eq!(pending.len(), MAX_PENDING);
        assert_eq!(
            pending.front().map(|(h, _)| *h),
            Some(100),
            "the oldest are kept"
        );
        assert_eq!(
            pending.get(MAX_PENDING - 2).map(|(h, _)| *h),
            Some(100 + MAX_PENDING as i64 - 2)
        );
        assert_eq!(
            pending.back(),
            Some(&(999, vec![7, 999])),
            "the newest replaces the last kept"
        );
    }

    #[test]
    fn a_run_of_events_is_final_up_to_its_first_missing_number() {
        assert_eq!(final_run([11, 12, 13], 10), (3, 13), "no number missing");
        assert_eq!(
            final_run([11, 12, 14, 15], 10),
            (2, 12),
            "13 may still commit"
        );
        assert_eq!(
            final_run([11, 14, 15, 16, 18], 15),
            (4, 16),
            "up to the horizon, missing numbers never commit; past it, 16 follows on, 18 does not"
        );
        assert_eq!(final_run([12], 10), (0, 10), "11 may still commit");
        assert_eq!(final_run([], 10), (0, 10));
    }

    #[test]
    fn a_stall_is_reported_after_its_time_then_as_often_and_its_end_once() {
        let warn = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut stall = Stall::new(warn);
        assert_eq!(stall.observe(false, 5, at(0)), None, "nothing held");
        assert_eq!(
            stall.observe(true, 5, at(1)),
            None,
            "held, not yet for long"
        );
        assert_eq!(stall.observe(true, 5, at(10)), None, "9 s at this horizon");
        assert_eq!(
            stall.observe(true, 5, at(11)),
            Some(StallReport::Held(Duration::from_secs(10)))
        );
        assert_eq!(stall.observe(true, 5, at(15)), None, "reported 4 s ago");
        assert_eq!(
            stall.observe(true, 5, at(21)),
            Some(StallReport::Held(Duration::from_secs(20))),
            "still held, reported again"
        );
        assert_eq!(
            stall.observe(false, 5, at(22)),
            Some(StallReport::Resumed(Duration::from_secs(21)))
        );
        assert_eq!(
            stall.observe(false, 5, at(23)),
            None,
            "its end is told once"
        );
    }

    #[test]
    fn a_horizon_that_moves_is_no_stall() {
        let warn = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut stall = Stall::new(warn);
        // Under load numbers go missing for a moment at every read, but delivery moves on.
        for (i, horizon) in (1..30).zip(100..) {
            assert_eq!(stall.observe(true, horizon, at(i)), None, "at {i} s");
        }
        assert_eq!(
            stall.observe(false, 200, at(31)),
            None,
            "never reported, no end told"
        );

        assert_eq!(stall.observe(true, 300, at(40)), None);
        assert!(matches!(
            stall.observe(true, 300, at(50)),
            Some(StallReport::Held(_))
        ));
        assert_eq!(
            stall.observe(true, 301, at(51)),
            Some(StallReport::Resumed(Duration::from_secs(11))),
            "moved on after a report, though held again at once"
        );
        assert_eq!(
            stall.observe(true, 301, at(60)),
            None,
            "held 9 s at the new one"
        );
        assert!(matches!(
            stall.observe(true, 301, at(61)),
            Some(StallReport::Held(_))
        ));
    }

    #[test]
    fn the_transactions_named_are_those_the_first_horizon_past_the_gap_waits_for() {
        let pending: VecDeque<(i64, SnapshotXids)> =
            [(10, vec![1, 2]), (20, vec![2, 3]), (30, vec![3, 4])].into();
        let in_progress: HashSet<i64> = [2, 3, 4].into();
        assert_eq!(
            blockers(&pending, i64::MIN, &in_progress),
            [2],
            "the first horizon"
        );
        assert_eq!(blockers(&pending, 15, &in_progress), [2, 3]);
        assert_eq!(blockers(&pending, 30, &in_progress), [3, 4]);
        assert_eq!(blockers(&pending, 31, &in_progress), SnapshotXids::new());
    }
}
