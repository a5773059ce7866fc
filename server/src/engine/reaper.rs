//! The reaper: ends attempts whose worker stopped heartbeating (invariant 2).
//!
//! Runs on the leader only. Each tick reaps lapsed leases in batches until none is left; the
//! jobs go to RETRYING (the scheduler makes them available after their backoff) or FAILED.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::leader::Leadership;
use crate::store::Store;

const BATCH: i64 = 1000;

pub struct Reaper {
    store: Store,
    interval: Duration,
    leadership: Leadership,
}

impl Reaper {
    pub fn new(store: Store, interval: Duration, leadership: Leadership) -> Self {
        Self {
            store,
            interval,
            leadership,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                leading = self.leadership.wait_leading() => if !leading { return },
            }
            loop {
                match self.store.reap_expired(BATCH).await {
                    Ok(0) => break,
                    Ok(n) => {
                        tracing::info!(reaped = n, "expired leases reaped");
                        if n < BATCH as u64 {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "reaping failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}
