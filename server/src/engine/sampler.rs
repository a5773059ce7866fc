//! The sampler: reads the figures the metrics cannot count as they happen (queue depth by
//! state, the age of each queue's oldest available job, the pool's connections) every
//! [`INTERVAL`], in one statement, and sets their gauges. Scrapes only render what it last
//! read, so any number of scrapers costs the database nothing more.
//!
//! Runs on every replica that serves metrics (each reports the same queue figures: aggregate
//! them with `max`, not `sum`), and stops on shutdown. It also runs the recorder's upkeep, which
//! keeps histograms from holding samples no scrape has taken.

use std::{collections::HashSet, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{self, QueueDepth},
    store::{QueueDepthRow, Store},
};

/// How often the figures are read: often enough for an alert on a growing backlog, seldom
/// enough that even thousands of queues cost the database little.
const INTERVAL: Duration = Duration::from_secs(5);

pub struct Sampler {
    store: Store,
    max_connections: u32,
    handle: PrometheusHandle,
    /// The queues of the last reading, so that one that drains to nothing reads 0.
    last: HashSet<(String, String)>,
}

impl Sampler {
    pub fn new(store: Store, max_connections: u32, handle: PrometheusHandle) -> Self {
        Self {
            store,
            max_connections,
            handle,
            last: HashSet::new(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            self.sample().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    async fn sample(&mut self) {
        let (idle, in_use) = self.store.pool_use();
        metrics::pool(idle, in_use, self.max_connections);
        match self.store.queue_depths().await {
            Ok(rows) => {
                let depths: Vec<QueueDepth> = rows.into_iter().map(depth).collect();
                metrics::queue_depths(&depths, &mut self.last);
            }
            Err(error) => tracing::warn!(%error, "reading queue depths for the metrics failed"),
        }
        self.handle.run_upkeep();
    }
}

fn depth(row: QueueDepthRow) -> QueueDepth {
    QueueDepth {
        states: row
            .states
            .iter()
            .zip(&row.counts)
            .map(|(state, n)| (state.as_str(), *n as f64))
            .collect(),
        tenant: row.tenant_id,
        queue: row.queue,
        oldest_available_s: row.oldest_available_s,
    }
}
