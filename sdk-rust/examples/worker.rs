//! Serves `image.resize` and `demo.countdown` jobs until SIGINT or SIGTERM, then drains and
//! exits.
//!
//! `JOBWIRE_URL=http://127.0.0.1:50051 cargo run -p jobwire --example worker`; optional
//! `JOBWIRE_QUEUES` (comma-separated, default `default`) and `JOBWIRE_CONCURRENCY` (default 4).
//! The countdown shows a handler's side of progress, logs, checkpoints and cooperative stops;
//! watch one with the `progress` example.

mod common;

use std::time::Duration;

use common::{Countdown, CountdownCheckpoint, CountdownOutput, Resize, ResizeOutput};
use jobwire::{HandlerError, JobContext, Progress, StopReason, Worker};

/// A countdown logs a line every this many steps.
const LOG_EVERY: u32 = 5;
/// A countdown saves a checkpoint every this many steps.
const CHECKPOINT_EVERY: u32 = 5;

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

    let mut builder = Worker::builder(common::server_url());
    if let Some(key) = common::api_key() {
        builder = builder.api_key(key);
    }
    let worker = builder
        .queues(queues)
        .concurrency(concurrency)
        .register::<Resize, _, _>(resize)
        .register::<Countdown, _, _>(countdown)
        .build()?;
    tracing::info!(
        worker = worker.worker_id(),
        "serving image.resize and demo.countdown"
    );
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

/// Counts down, one step per `step_millis`, reporting each step as progress. It starts from
/// the last checkpoint (after a pause, a crash or a retry), saves one every few steps, and
/// stops as soon as it is told to: after saving its place when the job is being paused.
async fn countdown(ctx: JobContext, job: Countdown) -> Result<CountdownOutput, HandlerError> {
    let total = job.steps;
    let resumed_from = match ctx.last_checkpoint_msg::<CountdownCheckpoint>() {
        Ok(checkpoint) => checkpoint.map_or(0, |c| c.done).min(total),
        Err(error) => {
            ctx.warn(format!(
                "starting over: the checkpoint is unreadable ({error})"
            ));
            0
        }
    };
    if resumed_from > 0 {
        ctx.info(format!("resuming at step {resumed_from} of {total}"));
    } else {
        ctx.info(format!("counting down from {total}"));
    }
    let step = Duration::from_millis(job.step_millis.into());
    for done in resumed_from..total {
        ctx.progress(countdown_progress(done, total));
        tokio::select! {
            () = ctx.cancelled() => return Err(stop(&ctx, done).await),
            () = tokio::time::sleep(step) => {}
        }
        let done = done + 1;
        if done % LOG_EVERY == 0 {
            ctx.info(format!("T-minus {}", total - done));
        }
        if done % CHECKPOINT_EVERY == 0 && done < total {
            save(&ctx, done).await?;
        }
    }
    ctx.progress(countdown_progress(total, total));
    ctx.info("lift-off");
    Ok(CountdownOutput {
        steps: total,
        resumed_from,
        attempt: ctx.attempt(),
    })
}

/// The progress of a countdown with `done` of `total` steps done.
fn countdown_progress(done: u32, total: u32) -> Progress {
    let left = total - done;
    let stage = match left {
        0 => "lift-off",
        1..=3 => "ignition",
        _ => "countdown",
    };
    Progress::items(done.into(), total.into())
        .stage(stage)
        .message(format!("T-minus {left}"))
}

/// Saves the countdown's place. Only a lost lease stops the handler: a checkpoint that did not
/// make it just means a resumed countdown repeats a few steps.
async fn save(ctx: &JobContext, done: u32) -> Result<(), HandlerError> {
    match ctx.checkpoint_msg(&CountdownCheckpoint { done }).await {
        Ok(()) => Ok(()),
        Err(error @ jobwire::Error::LeaseLost { .. }) => Err(error.into()),
        Err(error) => {
            ctx.warn(format!("checkpoint at step {done} not saved: {error}"));
            Ok(())
        }
    }
}

/// What to report when told to stop with `done` steps done; a pause saves the place first, so
/// the resumed job goes on from there.
async fn stop(ctx: &JobContext, done: u32) -> HandlerError {
    let reason = ctx.stop_reason();
    if reason == Some(StopReason::Paused) {
        // A failure here leaves the previous checkpoint, which is still a valid place.
        if let Err(error) = ctx.checkpoint_msg(&CountdownCheckpoint { done }).await {
            tracing::warn!(%error, "could not save the countdown before pausing");
        }
    }
    let reason = reason.map_or_else(|| "stopped".to_owned(), |r| r.to_string());
    ctx.info(format!("stopping at step {done}: {reason}"));
    HandlerError::retryable(format!("stopped at step {done}: {reason}"))
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
