//! The item-based job type the end-to-end tests run, shared by the tests and the `item-worker`
//! binary: each item's run is written to the `item_runs` table of the test's database, a side
//! channel that survives the worker's SIGKILL and says how often each item ran, and by which
//! attempt.

use std::time::Duration;

use jobwire::items::{ItemJob, ItemResults};
use jobwire::{HandlerError, JobContext, JobType};
use sqlx::PgPool;

/// `count` items, numbered from 0. Item `hang_at` hangs on the first attempt (until the worker
/// is killed or told to stop), so a test can kill the worker with the items before it done;
/// the items in `fail` fail (fatally, kind `item_fail`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemBatch {
    #[prost(uint32, tag = "1")]
    pub count: u32,
    #[prost(uint32, optional, tag = "2")]
    pub hang_at: Option<u32>,
    #[prost(uint32, repeated, tag = "3")]
    pub fail: Vec<u32>,
}

impl prost::Name for ItemBatch {
    const NAME: &'static str = "ItemBatch";
    const PACKAGE: &'static str = "jobwire.tests";
}

impl JobType for ItemBatch {
    const JOB_TYPE: &'static str = "test.items";
    type Output = ItemResults;
}

/// One item of an [`ItemBatch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchItem {
    pub index: u32,
    pub hang: bool,
    pub fail: bool,
}

impl ItemJob for ItemBatch {
    type Item = BatchItem;

    fn items(&self) -> Vec<BatchItem> {
        (0..self.count)
            .map(|index| BatchItem {
                index,
                hang: self.hang_at == Some(index),
                fail: self.fail.contains(&index),
            })
            .collect()
    }
}

/// What a done item returns: which item, run by which attempt.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRun {
    #[prost(uint32, tag = "1")]
    pub index: u32,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

/// Creates the side-channel table.
pub async fn create_item_runs(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS item_runs (job_id text NOT NULL, item int NOT NULL, \
         attempt int NOT NULL, phase text NOT NULL, worker text NOT NULL)",
    )
    .execute(pool)
    .await
    .expect("create item_runs");
}

async fn record(
    pool: &PgPool,
    ctx: &JobContext,
    item: u32,
    phase: &str,
) -> Result<(), HandlerError> {
    sqlx::query(
        "INSERT INTO item_runs (job_id, item, attempt, phase, worker) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(ctx.job_id().as_str())
    .bind(i32::try_from(item).unwrap_or(i32::MAX))
    .bind(i32::try_from(ctx.attempt()).unwrap_or(i32::MAX))
    .bind(phase)
    .bind(ctx.worker_id())
    .execute(pool)
    .await?;
    Ok(())
}

/// The per-item handler of [`ItemBatch`].
pub async fn run_item(
    pool: PgPool,
    ctx: JobContext,
    item: BatchItem,
) -> Result<ItemRun, HandlerError> {
    if item.hang && ctx.attempt() == 1 {
        record(&pool, &ctx, item.index, "hang").await?;
        ctx.cancelled().await;
        return Err(HandlerError::retryable("stopped while hanging"));
    }
    // A little work, so progress has something to show between items.
    tokio::time::sleep(Duration::from_millis(5)).await;
    if item.fail {
        record(&pool, &ctx, item.index, "fail").await?;
        return Err(
            HandlerError::fatal(format!("item {} failed as asked", item.index))
                .with_kind("item_fail"),
        );
    }
    record(&pool, &ctx, item.index, "done").await?;
    Ok(ItemRun {
        index: item.index,
        attempt: ctx.attempt(),
    })
}
