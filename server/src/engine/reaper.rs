//! The reaper: ends attempts whose worker stopped heartbeating (invariant 2).
//!
//! Runs on the leader only. Each tick reaps lapsed leases in batches until none is left, each
//! ending as `domain::ending` decides: RETRYING (the scheduler makes it available after its
//! backoff) or FAILED when a handler had started the attempt, AVAILABLE again, uncounted, when
//! none had (a lease claimed ahead and lost with its server, or a claim whose commit was lost).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{
    ending,
    leader::Leadership,
    signals::{Signal, Signals},
};
use crate::store::Store;

const BATCH: i64 = 1000;

pub struct Reaper {
    store: Store,
    interval: Duration,
    leadership: Leadership,
    signals: Signals,
}

impl Reaper {
    pub fn new(store: Store, interval: Duration, leadership: Leadership) -> Self {
        Self {
            store,
            interval,
            leadership,
            signals: Signals::default(),
        }
    }

    /// Announces each pass with how many attempts it ended, for a test to await.
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let term = tokio::select! {
                _ = shutdown.cancelled() => return,
                term = self.leadership.wait_leading() => match term {
                    Some(term) => term,
                    None => return,
                },
            };
            let mut reaped = 0;
            loop {
                match ending::reap(&self.store, term, BATCH).await {
                    Ok(0) => break,
                    Ok(n) => {
                        tracing::info!(reaped = n, "expired leases reaped");
                        reaped += n;
                        if n < BATCH as usize {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "reaping failed");
                        break;
                    }
                }
            }
            self.signals.send(|| Signal::Reaped { leases: reaped });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
