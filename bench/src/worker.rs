//! The worker subprocess, `jobwire-bench worker ...`: this binary re-executed so that the
//! workers run through the SDK in a process of their own, as they would in production, and do
//! not share a runtime (or CPU accounting) with the producers and watchers that measure them.
//!
//! It serves one job type with a `jobwire::Worker` until its stdin reaches end of file (the
//! parent closing the pipe, or dying), then drains and exits; so an orphaned worker never
//! outlives its bench. What the database cannot tell goes to stdout, one line per job:
//! `start <seq> <enqueued_unix_nanos> <started_unix_nanos>` for each [`Stamp`] job. Everything
//! else a workload reports is read from the database or seen by its watchers. Logs go to stderr.

use std::{
    io::{Read, Write},
    time::Duration,
};

use jobwire::{HandlerError, Progress, Worker};
use tokio::sync::oneshot;

use crate::{
    clock,
    jobs::{Beat, Noop, SENT_KEY, Stamp},
};

/// `jobwire-bench worker`: flags the parent passes (see `cluster::WorkerProcess`).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The server to work for.
    #[arg(long)]
    pub url: String,
    /// Handler slots.
    #[arg(long)]
    pub concurrency: usize,
    /// Leases held beyond the slots.
    #[arg(long, default_value_t = 0)]
    pub prefetch: usize,
    /// The job type to serve.
    #[arg(long, value_enum)]
    pub handler: Handler,
    /// The SDK's shortest time between two progress reports of one lease, in milliseconds
    /// (default: the SDK's).
    #[arg(long)]
    pub progress_interval_ms: Option<u64>,
    /// The API key to send, when the server requires one (from the environment, so that it
    /// shows in no process list).
    #[arg(long, env = "JOBWIRE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Which handler the worker registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Handler {
    /// [`Noop`]: returns at once.
    Noop,
    /// [`Stamp`]: prints its start time next to its enqueue time.
    Stamp,
    /// [`Beat`]: reports timestamped progress, then returns.
    Beat,
}

/// Serves jobs until stdin closes.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut builder = Worker::builder(args.url)
        .worker_id(format!("bench-{}", std::process::id()))
        .concurrency(args.concurrency)
        .prefetch(args.prefetch);
    if let Some(interval) = args.progress_interval_ms {
        builder = builder.progress_interval(Duration::from_millis(interval));
    }
    if let Some(key) = args.api_key {
        builder = builder.api_key(key);
    }
    let builder = match args.handler {
        Handler::Noop => builder.register::<Noop, _, _>(|_ctx, _job: Noop| async { Ok(()) }),
        Handler::Stamp => builder.register::<Stamp, _, _>(|_ctx, job: Stamp| async move {
            let started = clock::unix_nanos();
            // One write per line (stdout is line-buffered), so lines of concurrent handlers
            // never interleave.
            writeln!(
                std::io::stdout().lock(),
                "start {} {} {started}",
                job.seq,
                job.enqueued_unix_nanos
            )
            .map_err(|error| HandlerError::fatal(format!("stdout: {error}")))
        }),
        Handler::Beat => builder.register::<Beat, _, _>(|ctx, job: Beat| async move {
            let spacing = Duration::from_millis(u64::from(job.spacing_ms));
            for done in 1..=job.reports {
                let mut data = prost_types::Struct::default();
                data.fields.insert(
                    SENT_KEY.into(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(
                            clock::unix_nanos() as f64
                        )),
                    },
                );
                ctx.progress(Progress::items(done.into(), job.reports.into()).data(data));
                tokio::time::sleep(spacing).await;
            }
            Ok(())
        }),
    };
    builder.build()?.run(stdin_closed()).await?;
    Ok(())
}

/// Resolves when stdin reaches end of file (or fails).
///
/// Read on a plain thread rather than `tokio::io::stdin`, whose blocking read cannot be
/// cancelled and would hold up the runtime's shutdown; the thread ends with the process.
fn stdin_closed() -> impl Future<Output = ()> + Send {
    let (closed, on_close) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = [0_u8; 64];
        while let Ok(1..) = stdin.read(&mut buffer) {}
        // The receiver is gone only when the worker has already stopped.
        let _ = closed.send(());
    });
    async {
        // A dropped sender also means the pipe is gone.
        let _ = on_close.await;
    }
}
