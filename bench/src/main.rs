//! jobwire-bench: runs workloads against real jobwire-server processes on real PostgreSQL and
//! prints one JSON line per workload on stdout. Figures are counted from what happened (the
//! database, the handlers, the watchers), on a fresh database per workload, and the workloads
//! measure what the Graphile Worker peer (`/work/shared/peers`) measures, the same way.
//!
//! `cargo run --release -p jobwire-bench -- --workloads W1,W2,W3,W4`
//!
//! # Layout
//!
//! - `cluster`: the system under test: PostgreSQL, server processes, worker subprocesses.
//! - `worker`: the body of a worker subprocess (the hidden `worker` command): this binary
//!   re-executed, serving the bench's job types through the SDK.
//! - `jobs`: the bench's job types, shared by producers and workers.
//! - `ledger`: what the bench reads back from a workload's database.
//! - `clock`: wall-clock timestamps that cross processes; `stats`: percentiles.
//! - `cores`: how long each process group ran and waited for a core during a measured window.
//! - `workloads`: one module per workload.

mod clock;
mod cluster;
mod cores;
mod jobs;
mod ledger;
mod stats;
mod worker;
mod workloads;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// The longest a workload may run (SOAK: beyond its duration); one that runs over is reported as
/// failed and the rest run.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(900);

/// Benchmarks of jobwire.
#[derive(Debug, Parser)]
#[command(name = "jobwire-bench")]
struct Args {
    /// Comma-separated workloads, run in order, each on a fresh database and server.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "W1,W2,W3,W4",
        ignore_case = true
    )]
    workloads: Vec<Workload>,
    /// Leases each W1 and W3 worker holds beyond its slots (`Worker::prefetch`), as Graphile
    /// Worker's batched settings keep a local queue; 0 turns it off.
    #[arg(long, default_value_t = 20)]
    prefetch: usize,
    /// Runtime threads of the bench's own processes (the producers and watchers here, and each
    /// worker subprocess): 1 runs a current-thread runtime, 0 one thread per core.
    ///
    /// They share two cores with the server and PostgreSQL, and with a thread per core each
    /// process's threads wake one another across cores for every message, which slows W1's
    /// drain and W3 alike. One thread is also how the Graphile peer's producers and workers run
    /// (a Node.js process).
    #[arg(long, global = true, default_value_t = 1)]
    client_threads: usize,
    /// How long SOAK offers its load.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20m")]
    soak_duration: Duration,
    /// How often SOAK prints its figures (each over the window before).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    soak_window: Duration,
    /// The retention of finished jobs SOAK's server runs with (and its event partitions' span).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    soak_retention: Duration,
    /// Servers require API keys: each gets an admin key before it starts, which the
    /// producers, watchers and workers send (the cost of authentication on the hot path).
    #[arg(long)]
    api_keys: bool,
    /// Servers prune finished jobs this long after they end, checking as often and archiving
    /// them first, so that the pruner works throughout W1 and W3: the cost of retention under
    /// load. The workloads count pruned jobs in the archive. SOAK sets its own.
    #[arg(long, value_parser = humantime::parse_duration)]
    prune_after: Option<Duration>,
    /// With `--prune-after`: prune without archiving (the server's default). Event partitions
    /// then span an hour, so that none is dropped during a workload and the workloads count
    /// pruned jobs by their events.
    #[arg(long, requires = "prune_after")]
    prune_discard: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one bench job type through the SDK until stdin closes (started by the bench).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// What to measure (see `workloads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Bulk-enqueue 20,000 no-op jobs in chunks of 1,000, then drain them with 20 slots
    #[value(name = "W1")]
    BulkDrain,
    /// Enqueue 2,000 jobs at an open-loop 200/s to idle workers; enqueue-to-start latency
    #[value(name = "W2")]
    PickupLatency,
    /// 8 producers enqueue 20,000 jobs while 20 slots work; end-to-end jobs/s
    #[value(name = "W3")]
    ConcurrentEnqueue,
    /// 500 WatchJob streams on jobs reporting progress 10 times; delivery latency, lost events
    #[value(name = "W4")]
    WatchFanout,
    /// Progress reported to one replica, watched on another; delivery latency, lost events
    #[value(name = "CR")]
    CrossReplica,
    /// 10,000 WatchJobs streams opened and abandoned, five rounds; server RSS per round
    #[value(name = "WA")]
    WatchAbandon,
    /// Four watchers against the event log over 1,020,000 events while replicas are killed
    #[value(name = "WK")]
    WatchKills,
    /// Half of W3's rate for --soak-duration with a short retention; latency and table sizes
    /// each --soak-window
    #[value(name = "SOAK")]
    Soak,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = match args.client_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        0 => tokio::runtime::Runtime::new()?,
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Command::Worker(worker)) = args.command {
        return worker::run(worker).await;
    }
    if args.api_keys {
        cluster::require_api_keys();
    }
    if let Some(after) = args.prune_after {
        cluster::prune_after(after, !args.prune_discard);
    }
    let pg = cluster::Postgres::start().await?;
    let mut failed = None;
    for &workload in &args.workloads {
        let run = async {
            match workload {
                Workload::BulkDrain => workloads::bulk_drain::run(&pg, args.prefetch).await,
                Workload::PickupLatency => workloads::pickup_latency::run(&pg).await,
                Workload::ConcurrentEnqueue => {
                    workloads::concurrent_enqueue::run(&pg, args.prefetch).await
                }
                Workload::WatchFanout => workloads::watch_fanout::run(&pg).await,
                Workload::CrossReplica => workloads::cross_replica::run(&pg).await,
                Workload::WatchAbandon => workloads::watch_abandon::run(&pg).await,
                Workload::WatchKills => workloads::watch_kills::run(&pg, args.prefetch).await,
                Workload::Soak => {
                    let config = workloads::soak::SoakConfig {
                        duration: args.soak_duration,
                        window: args.soak_window,
                        retention: args.soak_retention,
                    };
                    workloads::soak::run(&pg, args.prefetch, config).await
                }
            }
        };
        // SOAK runs as long as it is told to, and is then given as long as any other.
        let timeout = match workload {
            Workload::Soak => args.soak_duration + WORKLOAD_TIMEOUT,
            _ => WORKLOAD_TIMEOUT,
        };
        let report = match tokio::time::timeout(timeout, run).await {
            Ok(report) => report,
            Err(_) => Err(anyhow::anyhow!("timed out after {timeout:?}")),
        };
        let name = workload
            .to_possible_value()
            .map(|v| v.get_name().to_owned());
        match report {
            Ok(report) => println!("{}", serde_json::Value::Object(report)),
            Err(error) => {
                eprintln!(
                    "workload {} failed: {error:#}",
                    name.as_deref().unwrap_or("?")
                );
                failed = Some(error);
            }
        }
    }
    pg.stop().await?;
    match failed {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
