//! A worker process for the item-based job tests: serves `test.items` until SIGTERM (then
//! drains) or SIGKILL, each item's run recorded in the test database's `item_runs` table.
//!
//! Settings come from the environment: `JOBWIRE_URL`, `WORKER_ID` and `ITEMS_DATABASE_URL`
//! (the test's database).

use jobwire::items::{ItemOptions, OnItemFailure};
use jobwire::{JobContext, Worker};
use jobwire_tests::items::{self, BatchItem, ItemBatch};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("JOBWIRE_URL")?;
    let worker_id = std::env::var("WORKER_ID").unwrap_or_else(|_| "item-worker".into());
    let pool = sqlx::PgPool::connect(&std::env::var("ITEMS_DATABASE_URL")?).await?;
    let worker = Worker::builder(url)
        .worker_id(worker_id)
        .concurrency(1)
        .register_items::<ItemBatch, _, _, _>(
            ItemOptions::new().on_failure(OnItemFailure::Collect),
            move |ctx: JobContext, item: BatchItem| items::run_item(pool.clone(), ctx, item),
        )
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
