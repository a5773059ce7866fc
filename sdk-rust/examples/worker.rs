//! Serves `image.resize` jobs until SIGINT or SIGTERM, then drains and exits.
//!
//! `JOBWIRE_URL=http://127.0.0.1:50051 cargo run -p jobwire --example worker`; optional
//! `JOBWIRE_QUEUES` (comma-separated, default `default`) and `JOBWIRE_CONCURRENCY` (default 4).

mod common;

use std::time::Duration;

use common::{Resize, ResizeOutput};
use jobwire::{HandlerError, JobContext, Worker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let queues: Vec<String> = std::env::var("JOBWIRE_QUEUES")
        .unwrap_or_else(|_| "default".to_owned())
        .split(',')
        .map(str::trim)
        .filter(|queue| !queue.is_empty())
        .map(str::to_owned)
        .collect();
    let concurrency = std::env::var("JOBWIRE_CONCURRENCY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);

    let worker = Worker::builder(common::server_url())
        .queues(queues)
        .concurrency(concurrency)
        .register::<Resize, _, _>(resize)
        .build()?;
    tracing::info!(worker = worker.worker_id(), "serving image.resize");
    worker.run(shutdown_signal()).await?;
    Ok(())
}

/// Pretends to resize an image; the pause stands in for real work and shows how a handler
/// gives way when the job is cancelled or the worker shuts down.
async fn resize(ctx: JobContext, job: Resize) -> Result<ResizeOutput, HandlerError> {
    if job.width == 0 {
        return Err(HandlerError::fatal("width must be positive").with_kind("invalid_payload"));
    }
    tokio::select! {
        () = ctx.cancelled() => {
            return Err(HandlerError::retryable(format!("stopped: {:?}", ctx.stop_reason())));
        }
        () = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    tracing::info!(job_id = %ctx.job_id(), attempt = ctx.attempt(), url = %job.url, "resized");
    Ok(ResizeOutput {
        url: format!("{}?w={}", job.url, job.width),
        width: job.width,
        height: job.width * 3 / 4,
    })
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM; the worker then drains.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
