//! One module per workload. Each starts its own server on a fresh database and returns the JSON
//! object it prints; the helpers here keep the figures' shapes alike across workloads.
//!
//! - `bulk_drain` (W1): batch enqueue, then drain.
//! - `pickup_latency` (W2): open-loop single enqueues to idle workers; enqueue-to-start latency.
//! - `concurrent_enqueue` (W3): 8 producers while the workers run; end-to-end jobs/s.
//! - `watch_fanout` (W4): 500 WatchJob streams on jobs reporting progress.
//! - `cross_replica` (CR): progress on one replica, watched on another.
//! - `watch_abandon` (WA): watch streams opened and abandoned; server memory per round.
//! - `watch_kills` (WK): every watcher's events against the log over 1,000,000 events, with
//!   replicas killed and restarted.
//! - `soak` (SOAK): half of W3's rate for a long while with a short retention; latency, table
//!   sizes, dead tuples and autovacuums per window.

pub mod bulk_drain;
pub mod concurrent_enqueue;
pub mod cross_replica;
pub mod pickup_latency;
pub mod soak;
pub mod watch_abandon;
pub mod watch_fanout;
pub mod watch_kills;

use std::time::Duration;

use crate::cluster::Server;

pub type Report = serde_json::Map<String, serde_json::Value>;

/// A report with the keys every workload has.
fn report(workload: &str, jobs: usize) -> Report {
    let mut report = Report::new();
    report.insert("workload".into(), workload.into());
    report.insert("jobs".into(), jobs.into());
    report
}

/// `jobs` per second over `elapsed`, to one decimal as the peers print it.
fn per_second(jobs: usize, elapsed: Duration) -> f64 {
    let rate = jobs as f64 / elapsed.as_secs_f64().max(1e-9);
    (rate * 10.0).round() / 10.0
}

/// Adds `server_peak_rss_mib`, the highest VmHWM of `servers`, when it can be read.
fn insert_peak_rss<'a>(report: &mut Report, servers: impl IntoIterator<Item = &'a Server>) {
    if let Some(rss) = servers
        .into_iter()
        .filter_map(Server::peak_rss_mib)
        .reduce(f64::max)
    {
        report.insert(
            "server_peak_rss_mib".into(),
            ((rss * 10.0).round() / 10.0).into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_rounded_to_a_tenth() {
        assert_eq!(per_second(20_000, Duration::from_millis(1_500)), 13_333.3);
        assert!(per_second(1, Duration::ZERO).is_finite());
    }
}
