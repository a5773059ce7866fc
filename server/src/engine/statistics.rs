//! Statistics: keeps the planner's view of the busy tables in step with their growth.
//!
//! Runs on the leader only: one ANALYZE serves every replica, as it invalidates the cached plans
//! of every connection. See [`Store::analyze_outgrown`] for why autovacuum alone is too late.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::leader::Leadership;
use crate::store::Store;

/// How often table sizes are compared with their statistics: a cheap read of `pg_class`. A
/// table growing from empty doubles within a second or two under load, and a bulk enqueue
/// grows it at once: in W4, 500 jobs enqueued just after a check were first reported on 300 ms
/// later, and until the next check (a second) each batch of progress reports nested-loop
/// scanned the whole table per report (31 ms for 373 reports, against 10 ms by key).
const INTERVAL: Duration = Duration::from_millis(250);

pub struct Statistics {
    store: Store,
    leadership: Leadership,
}

impl Statistics {
    pub fn new(store: Store, leadership: Leadership) -> Self {
        Self { store, leadership }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                term = self.leadership.wait_leading() => if term.is_none() { return },
            }
            match self.store.analyze_outgrown().await {
                Ok(tables) if !tables.is_empty() => {
                    tracing::debug!(?tables, "analyzed tables that outgrew their statistics");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "refreshing table statistics failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }
}
