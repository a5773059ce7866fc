//! The scheduler: makes SCHEDULED and RETRYING jobs AVAILABLE when their time comes, and
//! PENDING jobs whose dependencies (or children) have ended AVAILABLE (or CANCELLED, when a
//! dependency failed), cancels the unfinished children of parents that ended CANCELLED or
//! FAILED, makes jobs whose signal arrived (or whose wait for it timed out) AVAILABLE, and ends
//! approvals whose timeout has passed.
//!
//! The ending of a job another waits for (a dependency, a child, a parent) notifies the due
//! channel (a trigger, so that no path to an ending can forget it), which wakes this loop like
//! a new due time does.
//!
//! Runs on the leader only. After promoting what is due it sleeps until the next run_at it knows
//! of, but never longer than the poll interval. A job enqueued meanwhile for an earlier time, on
//! any replica, notifies the due channel, which cuts the sleep short so the new time is honoured
//! (a missed notification costs at most one poll interval). Promotion notifies the queue, which
//! wakes the dispatchers of every replica.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{
    leader::{Leadership, lead_on_timer, sleep_until},
    notifier::DueSignal,
    signals::{Signal, Signals},
};
use crate::{
    domain::waits,
    store::{Store, Term},
};

const BATCH: i64 = 1000;
/// Rounds of ending waits per pass: a chain longer than this goes on at the next pass.
const MAX_WAIT_ROUNDS: usize = 64;

pub struct Scheduler {
    store: Store,
    poll_interval: Duration,
    leadership: Leadership,
    due: DueSignal,
    signals: Signals,
}

impl Scheduler {
    pub fn new(
        store: Store,
        poll_interval: Duration,
        leadership: Leadership,
        due: DueSignal,
    ) -> Self {
        Self {
            store,
            poll_interval,
            leadership,
            due,
            signals: Signals::default(),
        }
    }

    /// Announces each pass with how many jobs it promoted, for a test to await.
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let (leadership, due) = (self.leadership.clone(), self.due.clone());
        lead_on_timer(leadership, &due, shutdown, |term| self.tick(term)).await;
    }

    /// Ends the waits that can be decided, again while deciding some lets others be decided
    /// (a cancel cascading down a chain), within [`MAX_WAIT_ROUNDS`].
    async fn end_waits(&self, term: Term) {
        for _ in 0..MAX_WAIT_ROUNDS {
            let waiting = match self.store.decidable_waits(term, BATCH).await {
                Ok(waiting) if waiting.is_empty() => return,
                Ok(waiting) => waiting,
                Err(error) => {
                    tracing::warn!(%error, "reading waiting jobs failed");
                    return;
                }
            };
            let ends: Vec<_> = waiting
                .iter()
                .map(|w| (w.tenant.clone(), w.id, waits::decide(&w.waiting)))
                .collect();
            match self.store.end_waits(term, &ends).await {
                Ok(0) => return,
                Ok(n) => tracing::debug!(jobs = n, "waits ended"),
                Err(error) => {
                    tracing::warn!(%error, "ending waits failed");
                    return;
                }
            }
        }
    }

    /// Cancels the unfinished children of parents that ended CANCELLED or FAILED, again while
    /// cancelling some leaves their own children orphaned, within [`MAX_WAIT_ROUNDS`].
    async fn cancel_orphans(&self, term: Term) {
        for _ in 0..MAX_WAIT_ROUNDS {
            let orphans = match self.store.orphaned_children(term, BATCH).await {
                Ok(orphans) if orphans.is_empty() => return,
                Ok(orphans) => orphans,
                Err(error) => {
                    tracing::warn!(%error, "reading orphaned children failed");
                    return;
                }
            };
            let cancels: Vec<_> = orphans
                .into_iter()
                .map(|o| (o.tenant, o.id, waits::orphan_reason(&o.parent)))
                .collect();
            match self.store.cancel_orphans(term, &cancels).await {
                Ok(0) => return,
                Ok(n) => tracing::debug!(jobs = n, "children of ended parents cancelled"),
                Err(error) => {
                    tracing::warn!(%error, "cancelling orphaned children failed");
                    return;
                }
            }
        }
    }

    /// Ends the waits for signals that arrived or timed out.
    async fn end_signal_waits(&self, term: Term) {
        let waiting = match self.store.decidable_signal_waits(term, BATCH).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(%error, "reading jobs waiting for signals failed");
                return;
            }
        };
        let ends: Vec<_> = waiting
            .iter()
            .map(|w| {
                let end = waits::signal_wait(w.received, w.past_deadline);
                (w.tenant.clone(), w.id, end)
            })
            .collect();
        match self.store.end_signal_waits(term, &ends).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(jobs = n, "signal waits ended"),
            Err(error) => tracing::warn!(%error, "ending signal waits failed"),
        }
    }

    /// Promotes what is due and returns how long to sleep.
    async fn tick(&self, term: Term) -> Duration {
        self.cancel_orphans(term).await;
        self.end_waits(term).await;
        self.end_signal_waits(term).await;
        match self.store.expire_approvals(term, BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "approvals timed out"),
            Err(error) => tracing::warn!(%error, "ending timed-out approvals failed"),
        }
        let mut promoted = 0;
        loop {
            match self.store.promote_due(term, BATCH).await {
                Ok(n) if n >= BATCH as u64 => promoted += n,
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(promoted = n, "due jobs promoted");
                    }
                    promoted += n;
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "promoting due jobs failed");
                    return self.poll_interval;
                }
            }
        }
        self.signals.send(|| Signal::Promoted { jobs: promoted });
        match self.store.next_due().await {
            Ok(next) => sleep_until(next, self.poll_interval),
            Err(error) => {
                tracing::warn!(%error, "reading the next due time failed");
                self.poll_interval
            }
        }
    }
}
