//! A worker process for fault tests: serves `test.sleep` until SIGTERM (then drains) or SIGKILL.
//!
//! Settings come from the environment: `JOBWIRE_URL`, `WORKER_ID` and `CONCURRENCY`.

use jobwire::{JobContext, Worker};
use jobwire_tests::jobs::{self, Sleep};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("JOBWIRE_URL")?;
    let worker_id = std::env::var("WORKER_ID").unwrap_or_else(|_| "test-worker".into());
    let concurrency = std::env::var("CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(4);
    let id = worker_id.clone();
    let worker = Worker::builder(url)
        .worker_id(worker_id)
        .concurrency(concurrency)
        .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
            let worker = id.clone();
            async move { jobs::run_sleep(ctx, job, worker).await }
        })
        .build()?;
    worker
        .run(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
