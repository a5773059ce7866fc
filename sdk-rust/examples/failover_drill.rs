//! The clients of a failover drill (`scripts/chaos-failover.sh`): producers enqueue no-op jobs
//! without pause through every server given, and a worker per server drains them, while the
//! script kills the database's primary under them and promotes its standby.
//!
//! Every id whose enqueue returned OK is appended to `DRILL_ACKED` (one per line, flushed as it
//! comes), so the script can check each against the database afterwards: an acknowledged
//! enqueue must survive the failover and end SUCCEEDED. After `DRILL_SECONDS` of producing it
//! prints one JSON line on stdout: how many enqueues were acknowledged and how many failed, and
//! the outage the producers saw (from the first failed enqueue to the first acknowledged one
//! that was sent after it). The workers then go on draining until SIGTERM or SIGINT.
//!
//! `JOBWIRE_URLS=http://127.0.0.1:50051,http://127.0.0.1:50052 DRILL_ACKED=acked.txt
//! cargo run --release -p jobwire --example failover_drill`; optional `DRILL_SECONDS` (default
//! 30), `DRILL_PRODUCERS` (default 4) and `DRILL_CONCURRENCY` (worker slots per server, 16).

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jobwire::{Client, HandlerError, JobContext, JobType, Worker};
use tokio_util::sync::CancellationToken;

/// A job that does nothing: the drill is about what the queue keeps, not the work.
#[derive(Clone, PartialEq, prost::Message)]
struct Drill {
    #[prost(uint64, tag = "1")]
    seq: u64,
}

impl prost::Name for Drill {
    const NAME: &'static str = "Drill";
    const PACKAGE: &'static str = "jobwire.examples";
}

/// Nothing comes back.
#[derive(Clone, PartialEq, prost::Message)]
struct Done {}

impl prost::Name for Done {
    const NAME: &'static str = "Done";
    const PACKAGE: &'static str = "jobwire.examples";
}

impl JobType for Drill {
    const JOB_TYPE: &'static str = "drill.noop";
    type Output = Done;
}

/// A producer's pause after a failed enqueue, so a dead database is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What the producers saw of the outage.
#[derive(Default)]
struct Outage {
    /// When the first enqueue failed.
    first_failure: Option<Instant>,
    /// When the first enqueue sent after that failure was acknowledged.
    recovered: Option<Instant>,
    failures: u64,
    first_error: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let urls: Vec<String> = std::env::var("JOBWIRE_URLS")
        .unwrap_or_else(|_| common::server_url())
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!urls.is_empty(), "JOBWIRE_URLS names no server");
    let acked_path = std::env::var("DRILL_ACKED")
        .map_err(|_| anyhow::anyhow!("DRILL_ACKED: the file for acknowledged ids"))?;
    let seconds: u64 = env_or("DRILL_SECONDS", 30);
    let producers: usize = env_or("DRILL_PRODUCERS", 4);
    let concurrency: usize = env_or("DRILL_CONCURRENCY", 16);

    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for url in &urls {
        let worker = Worker::builder(url.clone())
            .concurrency(concurrency)
            .register::<Drill, _, _>(|_ctx: JobContext, _job: Drill| async {
                Ok::<Done, HandlerError>(Done {})
            })
            .build()?;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            worker.run(stop.cancelled_owned()).await
        }));
    }

    let acked = Arc::new(Mutex::new(std::io::BufWriter::new(std::fs::File::create(
        &acked_path,
    )?)));
    let outage = Arc::new(Mutex::new(Outage::default()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for p in 0..producers {
        let client = Client::connect(urls[p % urls.len()].clone()).await?;
        let (acked, outage) = (acked.clone(), outage.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = p as u64;
            let mut count = 0u64;
            while Instant::now() < until {
                let sent = Instant::now();
                match client.enqueue(Drill { seq }).await {
                    Ok(handle) => {
                        count += 1;
                        if let Ok(mut file) = acked.lock() {
                            // Flushed per id: a crash of this process keeps what was acked.
                            let _ = writeln!(file, "{}", handle.id().as_str());
                            let _ = file.flush();
                        }
                        if let Ok(mut outage) = outage.lock()
                            && outage.recovered.is_none()
                            && outage.first_failure.is_some_and(|failed| sent > failed)
                        {
                            outage.recovered = Some(Instant::now());
                        }
                    }
                    Err(error) => {
                        if let Ok(mut outage) = outage.lock() {
                            outage.failures += 1;
                            if outage.first_failure.is_none() {
                                outage.first_failure = Some(sent);
                                outage.first_error = Some(error.to_string());
                            }
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                seq += producers as u64;
            }
            count
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await?;
    }
    let summary = {
        let outage = outage
            .lock()
            .map_err(|_| anyhow::anyhow!("a producer panicked"))?;
        let outage_ms = match (outage.first_failure, outage.recovered) {
            (Some(failed), Some(recovered)) => {
                recovered.duration_since(failed).as_millis().to_string()
            }
            _ => "null".to_owned(),
        };
        let first_error = outage
            .first_error
            .as_deref()
            .unwrap_or("")
            .replace(['"', '\\', '\n'], " ");
        format!(
            "{{\"acked\":{total},\"failed_enqueues\":{},\"outage_ms\":{outage_ms},\"first_error\":\"{first_error}\"}}",
            outage.failures
        )
    };
    println!("{summary}");
    std::io::stdout().flush()?;

    shutdown_signal().await;
    stop.cancel();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
