//! Item-based jobs: a job whose payload declares a list of items, run one by one, each done or
//! failed on its own, resumed from the first unfinished item after a crash, a pause or a
//! retry, and ending with every item's outcome as its result.
//!
//! Built on what the server offers every job: durable checkpoints, progress counted in items
//! (from which the server derives an ETA) and the job's result. Nothing here needs a server
//! feature of its own.
//!
//! ```no_run
//! use jobwire::items::{ItemJob, ItemOptions, ItemResults, OnItemFailure};
//! use jobwire::{HandlerError, JobType, Worker};
//!
//! #[derive(Clone, PartialEq, prost::Message)]
//! struct Notify {
//!     #[prost(string, repeated, tag = "1")]
//!     users: Vec<String>,
//! }
//! impl prost::Name for Notify {
//!     const NAME: &'static str = "Notify";
//!     const PACKAGE: &'static str = "example.v1";
//! }
//! impl JobType for Notify {
//!     const JOB_TYPE: &'static str = "notify.users";
//!     type Output = ItemResults;
//! }
//! impl ItemJob for Notify {
//!     type Item = String;
//!     fn items(&self) -> Vec<String> {
//!         self.users.clone()
//!     }
//! }
//!
//! # fn demo() -> Result<(), jobwire::Error> {
//! let worker = Worker::builder("http://127.0.0.1:50051")
//!     .register_items::<Notify, _, _, _>(
//!         ItemOptions::new().on_failure(OnItemFailure::Collect),
//!         |_ctx, user: String| async move {
//!             if user.is_empty() {
//!                 return Err(HandlerError::fatal("no user name"));
//!             }
//!             Ok(()) // or any protobuf message: the item's output
//!         },
//!     )
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! # Checkpoints, and what may run twice
//!
//! The checkpoint is the results so far: the outcome of every finished item, in order, so the
//! next attempt starts at the item after the last one recorded. By default it is saved after
//! every item, and the next item starts only once the server has stored it
//! ([`JobContext::checkpoint`] waits for that). So an item runs again only when the worker
//! died, or lost its lease, after the item ran and before its checkpoint was stored; every
//! item before it runs exactly once. [`ItemOptions::checkpoint_every`] and
//! [`ItemOptions::checkpoint_interval`] save less often for jobs of many quick items, at the
//! price of re-running up to that many items (or that much time's worth) after a crash.
//!
//! Each checkpoint carries every outcome so far, so its size grows with the items: a done item
//! with an empty output takes 4 bytes (a checkpoint holds about 250,000 of them), a failure its
//! message and kind. The server keeps at most 1 MiB (or its lower `--max-payload-bytes`); a job
//! whose outcomes outgrow that fails (kind `items_too_large`) rather than losing them. Keep item
//! outputs small (ids, counts) and split jobs of hundreds of thousands of items; saving every
//! item also sends that many checkpoints, which is why
//! [`checkpoint_every`](ItemOptions::checkpoint_every) exists.

use std::future::Future;
use std::time::{Duration, Instant};

use prost::Message as _;

use crate::Error;
use crate::context::JobContext;
use crate::error::HandlerError;
use crate::job::JobType;
use crate::report::Progress;

/// The most checkpoint bytes the server accepts (its `--max-payload-bytes` may be lower).
const MAX_CHECKPOINT_BYTES: usize = 1024 * 1024;

/// A job type whose payload declares items, each run by the handler registered with
/// [`WorkerBuilder::register_items`](crate::WorkerBuilder::register_items); its output is
/// the [`ItemResults`].
pub trait ItemJob: JobType<Output = ItemResults> {
    /// One item, as the per-item handler receives it.
    type Item: Send + 'static;

    /// The job's items, in the order they run. Must give the same list on every attempt (it
    /// is read from the payload, which does not change), since a resumed attempt skips the
    /// items its checkpoint records by position.
    fn items(&self) -> Vec<Self::Item>;
}

/// What a failed item does to its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnItemFailure {
    /// The failure is recorded as the item's outcome and the job goes on with the next item;
    /// the job succeeds with every outcome in its result.
    #[default]
    Collect,
    /// The attempt fails with the item's error (its message prefixed with the item's index).
    /// A retryable error retries the job from that item, a fatal one fails the job; the items
    /// before it keep their outcomes either way.
    FailJob,
}

/// How an item-based job runs its items: what a failed item does and how often the progress
/// is checkpointed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ItemOptions {
    on_failure: OnItemFailure,
    every: u32,
    interval: Option<Duration>,
}

impl Default for ItemOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ItemOptions {
    /// Failures collected, a checkpoint after every item.
    pub fn new() -> Self {
        Self {
            on_failure: OnItemFailure::Collect,
            every: 1,
            interval: None,
        }
    }

    /// What a failed item does to the job (default: [`OnItemFailure::Collect`]).
    pub fn on_failure(mut self, on_failure: OnItemFailure) -> Self {
        self.on_failure = on_failure;
        self
    }

    /// Saves a checkpoint once `items` items have finished since the last one (default 1;
    /// 0 counts as 1). After a crash, up to that many finished items may run again.
    pub fn checkpoint_every(mut self, items: u32) -> Self {
        self.every = items.max(1);
        self
    }

    /// Also saves a checkpoint once `interval` has passed since the last one with an item
    /// finished since, whatever [`checkpoint_every`](Self::checkpoint_every) says: bounds the
    /// work a crash can undo in time rather than in items.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Runs `items` in order with `handler`, resuming after the items that `ctx`'s last
    /// checkpoint records, reporting progress in items, and checkpointing as set. Usable in
    /// any handler; [`WorkerBuilder::register_items`](crate::WorkerBuilder::register_items)
    /// calls it for [`ItemJob`]s.
    ///
    /// Between items it checks the context's cancellation: told to stop (a pause, a cancel, a
    /// drain running out), it saves what is unsaved and fails the attempt, so the next one
    /// resumes at the next item. An item that fails after a stop is not recorded either.
    ///
    /// # Errors
    ///
    /// The item's error, as [`OnItemFailure::FailJob`] says; a retryable failure when the
    /// attempt was told to stop; a fatal one (kind `items_checkpoint`) when the last
    /// checkpoint is not this job's results or records more items than `items` holds, and
    /// (kind `items_too_large`) when the outcomes outgrow a checkpoint.
    pub async fn run<T, F, Fut, R>(
        &self,
        ctx: &JobContext,
        items: Vec<T>,
        mut handler: F,
    ) -> Result<ItemResults, HandlerError>
    where
        F: FnMut(JobContext, T) -> Fut,
        Fut: Future<Output = Result<R, HandlerError>>,
        R: prost::Message,
    {
        let mut results = resumed(ctx, items.len())?;
        let total = to_u64(items.len());
        report(ctx, &results, total);
        let mut saved = Saved::new(results.len());
        let start = results.len();
        for (index, item) in items.into_iter().enumerate().skip(start) {
            if let Some(reason) = ctx.stop_reason() {
                saved.flush(ctx, &results).await?;
                return Err(HandlerError::retryable(format!(
                    "stopped before item {index}: {reason}"
                )));
            }
            match handler(ctx.clone(), item).await {
                Ok(output) => results.outcomes.push(ItemOutcome::done(&output)),
                Err(error) if ctx.is_cancelled() => {
                    // Stopped mid-item: the item did not finish, so it runs again on resume.
                    saved.flush(ctx, &results).await?;
                    return Err(error);
                }
                Err(error) => match self.on_failure {
                    OnItemFailure::Collect => results.outcomes.push(ItemOutcome::failed(&error)),
                    OnItemFailure::FailJob => {
                        saved.flush(ctx, &results).await?;
                        return Err(error.in_context(&format!("item {index}")));
                    }
                },
            }
            report(ctx, &results, total);
            if saved.is_due(self, results.len()) {
                saved.flush(ctx, &results).await?;
            }
        }
        Ok(results)
    }
}

/// The results a previous attempt checkpointed, or none.
fn resumed(ctx: &JobContext, items: usize) -> Result<ItemResults, HandlerError> {
    let corrupt = |what: String| {
        HandlerError::fatal(format!("the job's checkpoint {what}")).with_kind("items_checkpoint")
    };
    let results = match ctx.last_checkpoint_msg::<ItemResults>() {
        Ok(results) => results.unwrap_or_default(),
        Err(error) => return Err(corrupt(format!("is not its item results: {error}"))),
    };
    if results.len() > items {
        return Err(corrupt(format!(
            "records {} items, but the job has {items}",
            results.len()
        )));
    }
    Ok(results)
}

/// Reports the items finished so far.
fn report(ctx: &JobContext, results: &ItemResults, total: u64) {
    let failed = results.failed_count();
    let progress = Progress::items(to_u64(results.len()), total);
    ctx.progress(if failed == 0 {
        progress
    } else {
        progress.message(format!("{failed} failed"))
    });
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// What the server holds: how many outcomes, and since when.
struct Saved {
    items: usize,
    at: Instant,
}

impl Saved {
    fn new(items: usize) -> Self {
        Self {
            items,
            at: Instant::now(),
        }
    }

    /// Whether the outcomes not saved yet call for a checkpoint now.
    fn is_due(&self, options: &ItemOptions, finished: usize) -> bool {
        let unsaved = finished.saturating_sub(self.items);
        unsaved > 0
            && (unsaved >= options.every as usize
                || options
                    .interval
                    .is_some_and(|interval| self.at.elapsed() >= interval))
    }

    /// Saves `results` unless the server has them all, and waits until it stored them.
    ///
    /// A stream that broke mid-way is no reason to fail the attempt (the worker reconnects
    /// and the handler keeps its lease): the outcomes stay unsaved and go with the next
    /// checkpoint.
    async fn flush(&mut self, ctx: &JobContext, results: &ItemResults) -> Result<(), HandlerError> {
        if results.len() == self.items {
            return Ok(());
        }
        let data = results.encode_to_vec();
        if data.len() > MAX_CHECKPOINT_BYTES {
            return Err(HandlerError::fatal(format!(
                "the outcomes of {} items take {} bytes, more than a checkpoint holds \
                 ({MAX_CHECKPOINT_BYTES}): split the job or make item outputs smaller",
                results.len(),
                data.len()
            ))
            .with_kind("items_too_large"));
        }
        match ctx.checkpoint(data).await {
            Ok(()) => {
                self.items = results.len();
                self.at = Instant::now();
                Ok(())
            }
            Err(Error::Disconnected { .. }) => Ok(()),
            Err(error @ Error::LeaseLost { .. }) => Err(HandlerError::from_error(error)),
            Err(error) if error.code() == Some(tonic::Code::InvalidArgument) => Err(
                HandlerError::fatal(format!("the server refused the checkpoint: {error}"))
                    .with_kind("items_too_large"),
            ),
            Err(error) => Err(HandlerError::from_error(error)),
        }
    }
}

/// Every item's outcome, in item order: an item-based job's result, and the checkpoint from
/// which its next attempt resumes (the outcomes recorded so far).
///
/// Stored as the protobuf message `jobwire.sdk.v1.ItemResults`:
/// `repeated ItemOutcome outcomes = 1`, where `ItemOutcome` is `oneof { bytes output = 1;
/// ItemFailure failure = 2; }` and `ItemFailure` is `{ string message = 1; string kind = 2; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemResults {
    #[prost(message, repeated, tag = "1")]
    outcomes: Vec<ItemOutcome>,
}

impl prost::Name for ItemResults {
    const NAME: &'static str = "ItemResults";
    const PACKAGE: &'static str = "jobwire.sdk.v1";
}

impl ItemResults {
    /// The outcomes, one per item finished, in item order.
    pub fn outcomes(&self) -> &[ItemOutcome] {
        &self.outcomes
    }

    /// How many items finished (done or failed).
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether no item finished.
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// How many items are done.
    pub fn done_count(&self) -> usize {
        self.outcomes.iter().filter(|o| o.is_done()).count()
    }

    /// How many items failed.
    pub fn failed_count(&self) -> usize {
        self.len() - self.done_count()
    }
}

/// How one item ended: done with its output, or failed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemOutcome {
    #[prost(oneof = "Outcome", tags = "1, 2")]
    outcome: Option<Outcome>,
}

/// The two outcomes of an item, as the protobuf `oneof`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum Outcome {
    /// The item's output, encoded (empty for `()`).
    #[prost(bytes, tag = "1")]
    Output(Vec<u8>),
    #[prost(message, tag = "2")]
    Failure(ItemFailure),
}

impl ItemOutcome {
    fn done(output: &impl prost::Message) -> Self {
        Self {
            outcome: Some(Outcome::Output(output.encode_to_vec())),
        }
    }

    fn failed(error: &HandlerError) -> Self {
        Self {
            outcome: Some(Outcome::Failure(ItemFailure {
                message: error.message().to_owned(),
                kind: error.kind().unwrap_or_default().to_owned(),
            })),
        }
    }

    /// Whether the item is done.
    pub fn is_done(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Output(_)))
    }

    /// The item's output, decoded as `R`; `None` when the item failed.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the output is not an `R`.
    pub fn output<R: prost::Message + Default>(&self) -> Result<Option<R>, Error> {
        match &self.outcome {
            Some(Outcome::Output(bytes)) => {
                R::decode(bytes.as_slice())
                    .map(Some)
                    .map_err(|source| Error::Decode {
                        what: "item output",
                        source,
                    })
            }
            _ => Ok(None),
        }
    }

    /// Why the item failed, when it did.
    pub fn failure(&self) -> Option<&ItemFailure> {
        match &self.outcome {
            Some(Outcome::Failure(failure)) => Some(failure),
            _ => None,
        }
    }
}

/// Why an item failed: its handler's error message and kind.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemFailure {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(string, tag = "2")]
    kind: String,
}

impl ItemFailure {
    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The class of failure, if the handler named one.
    pub fn kind(&self) -> Option<&str> {
        (!self.kind.is_empty()).then_some(self.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(outcomes: Vec<ItemOutcome>) -> ItemResults {
        ItemResults { outcomes }
    }

    #[test]
    fn outcomes_round_trip_and_count() {
        let original = results(vec![
            ItemOutcome::done(&7u32),
            ItemOutcome::failed(&HandlerError::fatal("gone").with_kind("http_4xx")),
            ItemOutcome::done(&()),
        ]);
        let decoded =
            ItemResults::decode(original.encode_to_vec().as_slice()).expect("decodes back");
        assert_eq!(decoded, original);
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded.done_count(), 2);
        assert_eq!(decoded.failed_count(), 1);
        assert_eq!(decoded.outcomes()[0].output::<u32>().ok(), Some(Some(7)));
        assert_eq!(decoded.outcomes()[1].output::<u32>().ok(), Some(None));
        let failure = decoded.outcomes()[1].failure().expect("failed");
        assert_eq!(
            (failure.message(), failure.kind()),
            ("gone", Some("http_4xx"))
        );
        assert!(decoded.outcomes()[2].is_done());
        assert!(decoded.outcomes()[2].failure().is_none());
    }

    #[test]
    fn a_done_item_without_output_takes_four_bytes() {
        let one = results(vec![ItemOutcome::done(&())]);
        assert_eq!(one.encode_to_vec().len(), 4);
        let many = results((0..1000).map(|_| ItemOutcome::done(&())).collect());
        assert_eq!(many.encode_to_vec().len(), 4 * 1000);
    }

    #[test]
    fn the_bytes_are_the_python_sdks() {
        // sdk-python's test_item_results_have_the_rust_sdks_bytes pins the same bytes.
        let results = results(vec![
            ItemOutcome::done(&()),
            ItemOutcome::failed(&HandlerError::fatal("gone").with_kind("http_4xx")),
        ]);
        assert_eq!(
            results.encode_to_vec(),
            b"\x0a\x02\x0a\x00\x0a\x12\x12\x10\x0a\x04gone\x12\x08http_4xx"
        );
    }

    #[test]
    fn checkpoints_fall_due_by_count_or_time() {
        let saved = Saved::new(3);
        let every_item = ItemOptions::new();
        assert!(!every_item.clone().checkpoint_every(0).every.eq(&0));
        assert!(!saved.is_due(&every_item, 3), "nothing unsaved");
        assert!(saved.is_due(&every_item, 4));
        let every_ten = ItemOptions::new().checkpoint_every(10);
        assert!(!saved.is_due(&every_ten, 12));
        assert!(saved.is_due(&every_ten, 13));
        let timed = every_ten.checkpoint_interval(Duration::ZERO);
        assert!(saved.is_due(&timed, 4), "the interval has passed");
        assert!(!saved.is_due(&timed, 3));
    }
}
