//! The enqueuer: group-commits concurrent EnqueueJob calls.
//!
//! A job queue is a server here, not a library, so the single enqueues of many callers can share
//! one transaction: each EnqueueJob hands its (already validated) job to this loop and waits.
//! Whatever queued up while earlier batches were being written goes out as one `enqueue_many`
//! statement per tenant, and each caller is answered once that statement has committed
//! (invariant 1: an OK still means durable). The collection window is the time the previous
//! commit took, so a lone caller waits for no timer. While a batch is being written, the next
//! one starts beside it only once it holds [`OVERLAP_MIN`] jobs, up to [`MAX_IN_FLIGHT`] at
//! once: a statement costs the database about as much for one job as for a dozen, so a few
//! callers are served best by one batch at a time, and a crowd by batches whose commits overlap.
//!
//! Callers that each wait for their own commit before enqueueing again come back together, a
//! round trip after their batch commits. A batch started at the first of them would leave the
//! rest to the batch after it, and the crowd would split into two halves taking turns. So when
//! more callers have lately waited at once than are pending, a batch that could start waits up
//! to [`HOLD_MAX`] for them, so that the whole crowd goes out in one batch. A lone caller, or a
//! crowd that has gone, waits for nothing.
//!
//! Validation happens before a job joins a batch, so one caller's bad input cannot fail another's.
//! A batch that fails on the database anyway is written again in parts when the failure may be
//! one job's doing ([`batch::isolate`]), so only that job's caller gets the error; one that
//! fails because the database is unavailable fails its callers with a retryable error.
//!
//! A job that is due goes straight to a worker when one of this replica's workers has a slot
//! free for it and knows of no backlog it would overtake: the dispatcher sets the slot aside,
//! the enqueue statement inserts the job RUNNING under a lease to that worker (unless its queue
//! is paused or limited, which the statement checks), and the lease is sent once the statement
//! has committed. The job's start then costs no NOTIFY and no claim: one commit, not two.
//! Slots set aside for jobs that did not start are given back.

use std::{collections::HashMap, panic::AssertUnwindSafe, time::Duration};

use futures::{
    FutureExt,
    stream::{FuturesUnordered, StreamExt},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use chrono::Utc;

use super::{
    Error, batch,
    dispatcher::{DispatcherHandle, Reservation, Startable},
    ending,
};
use crate::{
    domain::{JobId, JobState, LeaseRef, TenantId},
    store::{EnqueueOutcome, Handoff, LeasedRow, NewJob, Store},
};

/// The most jobs written by one statement.
const MAX_BATCH: usize = 1000;
/// Batches written at the same time.
const MAX_IN_FLIGHT: usize = 4;
/// The jobs a batch must hold to be written beside one in flight rather than after it. The
/// enqueue statement's fixed cost is about that of a dozen jobs, so batches started at once
/// would each carry a job or two and cost the database far more in all than fewer, fuller
/// batches written one after another.
const OVERLAP_MIN: usize = 16;

/// The longest a batch that could start waits for the rest of the crowd: a crowd coming back
/// together usually gathers well within it, and a lone caller never waits.
const HOLD_MAX: Duration = Duration::from_micros(500);
/// How long a crowd is remembered: many of its round trips, so that it is not forgotten
/// between them, yet a crowd that has gone stops holding batches back within tens of ms.
const CROWD_WINDOW: Duration = Duration::from_millis(20);

type Reply = oneshot::Sender<Result<EnqueueOutcome, Error>>;

/// A cloneable handle for enqueueing one job.
#[derive(Debug, Clone)]
pub struct EnqueuerHandle {
    tx: mpsc::Sender<(TenantId, NewJob, Reply)>,
}

impl EnqueuerHandle {
    /// Enqueues one job in the next batch, returning once that batch has committed.
    pub async fn enqueue(&self, tenant: TenantId, job: NewJob) -> Result<EnqueueOutcome, Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((tenant, job, reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }
}

pub struct Enqueuer {
    store: Store,
    dispatcher: DispatcherHandle,
    rx: mpsc::Receiver<(TenantId, NewJob, Reply)>,
}

impl Enqueuer {
    pub fn new(store: Store, dispatcher: DispatcherHandle) -> (Self, EnqueuerHandle) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (
            Self {
                store,
                dispatcher,
                rx,
            },
            EnqueuerHandle { tx },
        )
    }

    /// Runs until every handle is dropped, then finishes the batches in flight.
    pub async fn run(mut self) {
        // Batches are written inside this task rather than spawned, so that a statement's answer
        // wakes the task that already holds the batch instead of another thread, a wake-up that
        // a closed-loop caller would otherwise pay for on every call.
        let mut writing = FuturesUnordered::new();
        // The calls in the batches being written.
        let mut in_flight = 0;
        let mut pending = Vec::new();
        let mut crowd = Crowd::default();
        let mut hold: Option<Instant> = None;
        let mut open = true;
        while open || !pending.is_empty() || !writing.is_empty() {
            let now = Instant::now();
            crowd.observe(now, in_flight + pending.len());
            if writing.is_empty() && !pending.is_empty() && hold.is_none() {
                hold = Some(now + HOLD_MAX);
            }
            let held = open && holds(pending.len(), crowd.size(), hold, now);
            if !held && starts_now(writing.len(), pending.len(), open) {
                while pending.len() < MAX_BATCH {
                    match self.rx.try_recv() {
                        Ok(item) => pending.push(item),
                        Err(_) => break,
                    }
                }
                let batch = std::mem::take(&mut pending);
                hold = None;
                let size = batch.len();
                in_flight += size;
                let write = flush(self.store.clone(), self.dispatcher.clone(), batch);
                writing.push(async move {
                    // A batch that panics fails its own callers (their replies are dropped), not
                    // the enqueuer.
                    if AssertUnwindSafe(write).catch_unwind().await.is_err() {
                        tracing::error!(calls = size, "a group-committed enqueue panicked");
                    }
                    size
                });
                continue;
            }
            // Calls accumulate into the next batch while the ones in flight are written.
            tokio::select! {
                biased;
                Some(size) = writing.next(), if !writing.is_empty() => in_flight -= size,
                item = self.rx.recv(), if open && pending.len() < MAX_BATCH => match item {
                    Some(item) => pending.push(item),
                    None => open = false,
                },
                () = tokio::time::sleep_until(hold.unwrap_or(now)), if held => {}
            }
        }
    }
}

/// How many callers have lately been waiting at once (in batches being written or pending), as
/// the most seen in the current or the previous [`CROWD_WINDOW`].
#[derive(Debug)]
struct Crowd {
    window_start: Instant,
    current: usize,
    previous: usize,
}

impl Default for Crowd {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            current: 0,
            previous: 0,
        }
    }
}

impl Crowd {
    fn observe(&mut self, now: Instant, waiting: usize) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= CROWD_WINDOW {
            self.previous = if elapsed < 2 * CROWD_WINDOW {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.window_start = now;
        }
        self.current = self.current.max(waiting);
    }

    fn size(&self) -> usize {
        self.current.max(self.previous)
    }
}

/// Whether `pending` calls wait for more of a `crowd` that has lately waited at once, until
/// `hold` (when the batch could first have started, plus [`HOLD_MAX`]).
fn holds(pending: usize, crowd: usize, hold: Option<Instant>, now: Instant) -> bool {
    pending < crowd && hold.is_some_and(|until| now < until)
}

/// Whether the `pending` calls go out now as a batch, with `in_flight` batches being written and
/// more calls still able to arrive while `open`: at once when nothing is being written, beside
/// the batches in flight when there are enough of them, and without waiting once the enqueuer
/// is closing.
fn starts_now(in_flight: usize, pending: usize, open: bool) -> bool {
    pending > 0 && in_flight < MAX_IN_FLIGHT && (in_flight == 0 || pending >= OVERLAP_MIN || !open)
}

/// Writes one batch, one statement per tenant, and answers its callers.
async fn flush(store: Store, dispatcher: DispatcherHandle, batch: Vec<(TenantId, NewJob, Reply)>) {
    let mut by_tenant: HashMap<TenantId, (Vec<NewJob>, Vec<Reply>)> = HashMap::new();
    for (tenant, job, reply) in batch {
        let group = by_tenant.entry(tenant).or_default();
        group.0.push(job);
        group.1.push(reply);
    }
    for (tenant, (mut jobs, replies)) in by_tenant {
        tracing::debug!(%tenant, jobs = jobs.len(), "group-committing enqueues");
        let now = Utc::now();
        let startable = jobs
            .iter()
            .map(|job| {
                (!job.needs_approval && job.run_at.is_none_or(|at| at <= now)).then(|| Startable {
                    queue: job.queue.clone(),
                    job_type: job.job_type.clone(),
                })
            })
            .collect();
        let reserved = dispatcher.reserve(tenant.clone(), startable).await;
        for (job, reservation) in jobs.iter_mut().zip(&reserved) {
            job.handoff = reservation.as_ref().map(|r| Handoff {
                worker: r.worker_id.clone(),
                lease: r.lease,
                reports_started: r.reports_started,
            });
        }
        let started = std::time::Instant::now();
        // Each caller is answered for its own job: a statement that fails for one job's sake
        // is written again in parts (see `batch`), so the others still commit.
        let outcomes = batch::isolate(
            jobs.len(),
            |range| {
                let (store, tenant, jobs) = (&store, &tenant, &jobs[range]);
                async move { store.enqueue_many(tenant, jobs).await.map_err(Error::from) }
            },
            |error| matches!(error, Error::Internal(_)),
        )
        .await;
        if let Some(Err(error)) = outcomes.iter().find(|o| o.is_err()) {
            tracing::warn!(%error, "group-committed enqueue failed");
        }
        hand_over(&store, &dispatcher, &tenant, &outcomes, reserved, started).await;
        for (outcome, reply) in outcomes.into_iter().zip(replies) {
            let _ = reply.send(outcome);
        }
    }
}

/// Sends each job that started at its enqueue to the worker whose slot was set aside for it,
/// and gives back the slots of jobs that did not start (a paused or limited queue, an
/// idempotency key that named an earlier job, or a failed write). A lease whose worker has
/// gone is handed back.
async fn hand_over(
    store: &Store,
    dispatcher: &DispatcherHandle,
    tenant: &TenantId,
    outcomes: &[Result<EnqueueOutcome, Error>],
    reserved: Vec<Option<Reservation>>,
    started: std::time::Instant,
) {
    let mut unused = Vec::new();
    let mut undelivered = Vec::new();
    for (outcome, reservation) in outcomes.iter().zip(reserved) {
        let Some(reservation) = reservation else {
            continue;
        };
        let Ok(outcome) = outcome else {
            unused.push(Some(reservation));
            continue;
        };
        let job = &outcome.job;
        if !(outcome.created && job.state == JobState::Running) {
            unused.push(Some(reservation));
            continue;
        }
        let row = LeasedRow {
            job: job.clone(),
            checkpoint: None,
            signals: Default::default(),
        };
        if !reservation.deliver(row, started) {
            undelivered.push(LeaseRef {
                job_id: JobId(job.id),
                attempt: job.attempt,
            });
        }
    }
    give_back(dispatcher, unused).await;
    if !undelivered.is_empty()
        && let Err(error) = ending::release(store, tenant, &undelivered).await
    {
        tracing::warn!(%error, "could not hand back undelivered leases; they will lapse");
    }
}

async fn give_back(dispatcher: &DispatcherHandle, reserved: Vec<Option<Reservation>>) {
    for reservation in reserved.into_iter().flatten() {
        dispatcher.credit(reservation.session, 1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waits_briefly_for_the_rest_of_a_crowd_only() {
        let now = Instant::now();
        let until = Some(now + HOLD_MAX);
        assert!(holds(3, 8, until, now), "5 of the crowd are still to come");
        assert!(!holds(8, 8, until, now), "the whole crowd is here");
        assert!(!holds(1, 1, until, now), "a lone caller waits for nothing");
        assert!(
            !holds(3, 8, until, now + HOLD_MAX),
            "no longer than HOLD_MAX"
        );
        assert!(!holds(3, 8, None, now), "no batch could start yet");
    }

    #[test]
    fn a_crowd_is_the_most_seen_waiting_lately_and_is_forgotten() {
        let start = Instant::now();
        let mut crowd = Crowd {
            window_start: start,
            current: 0,
            previous: 0,
        };
        crowd.observe(start, 8);
        crowd.observe(start + Duration::from_millis(1), 2);
        assert_eq!(crowd.size(), 8);
        crowd.observe(start + CROWD_WINDOW, 1);
        assert_eq!(crowd.size(), 8, "the last window still counts");
        crowd.observe(start + 2 * CROWD_WINDOW, 1);
        assert_eq!(crowd.size(), 1, "two windows on, it is forgotten");
        crowd.observe(start + 5 * CROWD_WINDOW, 0);
        assert_eq!(crowd.size(), 0, "after a long quiet nothing is remembered");
    }

    #[test]
    fn a_lone_call_goes_at_once_and_a_few_wait_for_the_batch_in_flight() {
        assert!(starts_now(0, 1, true), "nothing in flight: no wait");
        assert!(!starts_now(0, 0, true), "nothing to write");
        assert!(
            !starts_now(1, OVERLAP_MIN - 1, true),
            "a few calls wait for the next turn"
        );
        assert!(
            starts_now(1, OVERLAP_MIN, true),
            "a crowd overlaps the batch in flight"
        );
        assert!(starts_now(3, OVERLAP_MIN, true));
        assert!(
            !starts_now(MAX_IN_FLIGHT, MAX_BATCH, true),
            "at most MAX_IN_FLIGHT at once"
        );
        assert!(
            starts_now(1, 1, false),
            "a closing enqueuer writes what is left at once"
        );
        assert!(!starts_now(MAX_IN_FLIGHT, 1, false));
    }
}
