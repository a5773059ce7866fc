//! W1: bulk-enqueue 20,000 no-op jobs with `EnqueueJobs` in chunks of 1,000, then start a worker
//! subprocess with 20 slots and time the drain.
//!
//! As the Graphile peer measures it: `enqueue_per_s` spans the first chunk's call to the last
//! chunk's reply; `drain_per_s` spans the worker's spawn (its start-up and connection count)
//! to the first poll (every 10 ms) that finds no job waiting or running in the database. Both
//! ends of each span are read on this process's monotonic clock; the database must then hold
//! exactly 20,000 succeeded jobs. The cores' figures ([`Window`]) are the drain's.
//!
//! The enqueue span starts once the server has settled ([`SETTLE`]): the peer's span starts
//! after its migrations, with its pool made, so neither counts its own start-up.

use std::time::Duration;

use tokio::time::Instant;

use super::Report;
use crate::{
    cluster::{self, Postgres, Server, WorkerProcess},
    cores::Window,
    jobs::Noop,
    ledger::Ledger,
    worker::Handler,
};

const JOBS: usize = 20_000;
const CHUNK: usize = 1_000;
const SLOTS: usize = 20;
/// A server just started is still opening connections and running its loops' first passes: a
/// first chunk sent into that took 52-60 ms, against about 20 ms a second later. The peer's own runs pause a second to let a runner settle likewise.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(pg: &Postgres, prefetch: usize) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_w1").await?;
    let server = Server::start(&url, &[])?;
    let mut ledger = Ledger::connect(&url).await?;
    let client = server.client().await?;

    tokio::time::sleep(SETTLE).await;
    let enqueue_start = Instant::now();
    for _ in 0..JOBS / CHUNK {
        client.enqueue_many((0..CHUNK).map(|_| Noop {})).await?;
    }
    let enqueued = enqueue_start.elapsed();
    let states = ledger.states().await?;
    if states.get("available").copied().unwrap_or_default() != i64::try_from(JOBS)? {
        anyhow::bail!("expected {JOBS} available jobs before the drain, found {states:?}");
    }

    // Pruning under the drain: it is over before any of its own jobs is a second old.
    let expired = if cluster::pruning() {
        ledger.seed_expired(JOBS).await?;
        JOBS
    } else {
        0
    };

    let drain_start = Instant::now();
    let mut worker = WorkerProcess::start(&server, Handler::Noop, (SLOTS, prefetch), None)?;
    let cores = Window::open(&server, &worker);
    let drained = worker.while_running(ledger.wait_until_settled()).await? - drain_start;
    let mut report = super::report("W1", JOBS);
    cores.close(&mut report);
    let expired_pruned = i64::try_from(expired)? - ledger.expired_left().await?;
    let pruned = ledger.ensure_succeeded(JOBS).await?;
    worker.stop().await?;

    report.insert(
        "enqueue_per_s".into(),
        super::per_second(JOBS, enqueued).into(),
    );
    report.insert(
        "drain_per_s".into(),
        super::per_second(JOBS, drained).into(),
    );
    // Finished jobs the pruner took while the workload ran (`--prune-after`).
    report.insert("jobs_pruned".into(), pruned.into());
    // Of as many jobs finished an hour before the drain (`--prune-after`), those pruned by its
    // end.
    report.insert("expired_pruned".into(), expired_pruned.into());
    super::insert_peak_rss(&mut report, [&server]);
    Ok(report)
}
