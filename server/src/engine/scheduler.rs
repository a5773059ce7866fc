//! The scheduler: makes SCHEDULED and RETRYING jobs AVAILABLE when their time comes.
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
use crate::store::{Store, Term};

const BATCH: i64 = 1000;

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

    /// Promotes what is due and returns how long to sleep.
    async fn tick(&self, term: Term) -> Duration {
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
