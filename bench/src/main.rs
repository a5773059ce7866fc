//! jobwire-bench: runs workloads against real jobwire-server processes on real PostgreSQL and
//! prints one JSON line per workload on stdout. Figures are counted from what happened (the
//! database, the handlers, the watchers), on a fresh database per workload.
//!
//! `cargo run --release -p jobwire-bench -- --workloads CR`

mod cluster;
mod stats;
mod workloads;

use clap::Parser;

/// Benchmarks of jobwire.
#[derive(Debug, Parser)]
#[command(name = "jobwire-bench")]
struct Args {
    /// Comma-separated workloads: CR (cross-replica watch delay).
    #[arg(long, value_delimiter = ',', default_value = "CR")]
    workloads: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let pg = cluster::Postgres::start().await?;
    let mut failed = None;
    for workload in &args.workloads {
        let report = match workload.as_str() {
            "CR" => workloads::cross_replica::run(&pg).await,
            other => Err(anyhow::anyhow!("unknown workload {other:?}")),
        };
        match report {
            Ok(report) => println!("{}", serde_json::Value::Object(report)),
            Err(error) => {
                eprintln!("workload {workload} failed: {error:#}");
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
