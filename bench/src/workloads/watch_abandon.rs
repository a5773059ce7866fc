//! WA: watch streams opened and abandoned, round after round; the server's resident memory is
//! printed after each round's opening and after its abandonment. Every stream a client leaves
//! must give back what it held: after the rounds, RSS should be within 1.5x of its baseline.
//!
//! Each round opens [`STREAMS`] WatchJobs streams over [`CONNECTIONS`] connections (within the
//! server's default of 1,000 watch streams per connection), waits for each to be answered, then
//! drops them all at once, as a fleet of dashboards that went away would. The connections stay
//! open through the rounds (what HTTP/2 set up for their streams stays with them), and are
//! closed at the end: `connections_closed_rss_mib`.

use std::time::Duration;

use futures::future::try_join_all;
use jobwire_proto::v1::{self as pb, job_service_client::JobServiceClient};

use super::{Report, report};
use crate::cluster::{Postgres, Server, channel};

const STREAMS: usize = 10_000;
const CONNECTIONS: usize = 10;
const ROUNDS: usize = 5;
/// How long the server is given to notice the streams have gone before RSS is read.
const SETTLE: Duration = Duration::from_secs(3);

pub async fn run(pg: &Postgres) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_wa").await?;
    let server = Server::start(&url, &[])?;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(JobServiceClient::new(channel(&server.url).await?));
    }
    // One stream opened and dropped first, so that the baseline includes what every server
    // allocates once (the fanout's first horizon, the connections' buffers).
    open(&clients, CONNECTIONS).await?;
    tokio::time::sleep(SETTLE).await;
    let baseline = server.rss_mib().unwrap_or(f64::NAN);
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        let streams = open(&clients, STREAMS).await?;
        let open_rss = server.rss_mib().unwrap_or(f64::NAN);
        drop(streams);
        tokio::time::sleep(SETTLE).await;
        let after = server.rss_mib().unwrap_or(f64::NAN);
        eprintln!(
            "WA round {round}: {open_rss:.1} MiB with {STREAMS} streams open, {after:.1} MiB after they were abandoned"
        );
        rounds.push(serde_json::json!({
            "round": round,
            "open_rss_mib": round1(open_rss),
            "after_rss_mib": round1(after),
        }));
    }
    let last = server.rss_mib().unwrap_or(f64::NAN);
    // The connections keep what HTTP/2 set up for their streams while they stay open.
    drop(clients);
    tokio::time::sleep(SETTLE).await;
    let closed = server.rss_mib().unwrap_or(f64::NAN);
    let mut report = report("WA", 0);
    report.insert("streams_per_round".into(), STREAMS.into());
    report.insert("baseline_rss_mib".into(), round1(baseline).into());
    report.insert("rounds".into(), rounds.into());
    report.insert("final_rss_mib".into(), round1(last).into());
    report.insert(
        "final_over_baseline".into(),
        ((last / baseline * 100.0).round() / 100.0).into(),
    );
    report.insert("connections_closed_rss_mib".into(), round1(closed).into());
    Ok(report)
}

/// Opens `n` WatchJobs streams spread over `clients`, each answered by the server.
async fn open(
    clients: &[JobServiceClient<tonic::transport::Channel>],
    n: usize,
) -> anyhow::Result<Vec<tonic::Streaming<pb::WatchJobsResponse>>> {
    let calls = (0..n).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        async move {
            let stream = client
                .watch_jobs(pb::WatchJobsRequest {
                    queue: format!("abandoned-{}", i % 100),
                    ..Default::default()
                })
                .await?
                .into_inner();
            anyhow::Ok(stream)
        }
    });
    try_join_all(calls).await
}

fn round1(mib: f64) -> f64 {
    (mib * 10.0).round() / 10.0
}
