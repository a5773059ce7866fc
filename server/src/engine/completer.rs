//! The completer: records what workers report, in batches.
//!
//! Worker streams hand it completions, failures, progress, log lines and checkpoints; it
//! coalesces whatever has queued up while the previous batch was being written into one
//! statement per kind, so the database sees a few round trips per batch, not one per job.
//! Progress is coalesced further: of several reports for one lease in a batch only the latest is
//! written (all are acknowledged). Within a batch, log lines are written before progress (a
//! worker sends a lease's lines ahead of its progress, so events keep the handler's order), and
//! progress, logs and checkpoints before completions and failures, so a job's last progress
//! never lands after its end. The queue is bounded: when it is full,
//! streams wait (backpressure reaches the workers through their unacknowledged results).
//!
//! A transient database failure is retried with backoff; a caller is answered only once its
//! outcome has committed. The task stops when every handle is gone, after flushing what is
//! queued, so nothing a worker reported is dropped on a graceful shutdown.

use std::{ops::Range, time::Duration};

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use std::collections::HashMap;

use super::{
    Error, batch,
    ending::{self, Completion, Failure},
    fanout::FanoutHandle,
    signals::{Signal, Signals},
};
use crate::{
    domain::{JobState, LeaseRef, TenantId},
    store::{self, Checkpoint, LogBatch, ProgressUpdate, SettleResult, Store},
};

/// The most outcomes written by one statement.
const MAX_BATCH: usize = 1000;
/// A burst of progress reports (500 jobs reporting at once) is split into up to this many
/// statements of at least [`PROGRESS_MIN_ROWS`] rows, run side by side on their own
/// connections, so the database's cores share the burst instead of one backend writing it all.
const PROGRESS_STATEMENTS: usize = 4;
const PROGRESS_MIN_ROWS: usize = 125;
/// How long a batch is retried on transient errors before its callers get an error.
const RETRY_BUDGET: Duration = Duration::from_secs(30);

/// A report to record.
#[derive(Debug)]
pub enum Settle {
    Complete(Completion),
    Fail(Failure),
    /// A lease's handler has started (answered at once: nobody waits for it).
    Started(TenantId, LeaseRef),
    Progress(ProgressUpdate),
    Logs(LogBatch),
    Checkpoint(Checkpoint),
}

impl Settle {
    /// The lease the report is about.
    pub fn lease(&self) -> LeaseRef {
        match self {
            Settle::Complete(c) => c.lease,
            Settle::Fail(f) => f.lease,
            Settle::Progress(p) => p.lease,
            Settle::Logs(l) => l.lease,
            Settle::Checkpoint(c) => c.lease,
            Settle::Started(_, lease) => *lease,
        }
    }
}

type Reply = oneshot::Sender<Result<SettleResult, Error>>;

/// A cloneable handle for submitting outcomes.
#[derive(Debug, Clone)]
pub struct CompleterHandle {
    tx: mpsc::Sender<(Settle, Reply)>,
}

impl CompleterHandle {
    /// Records one outcome, waiting until it has committed.
    pub async fn settle(&self, settle: Settle) -> Result<SettleResult, Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((settle, reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }
}

pub struct Completer {
    store: Store,
    fanout: FanoutHandle,
    rx: mpsc::Receiver<(Settle, Reply)>,
    signals: Signals,
}

impl Completer {
    pub fn new(store: Store, fanout: FanoutHandle) -> (Self, CompleterHandle) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let completer = Self {
            store,
            fanout,
            rx,
            signals: Signals::default(),
        };
        (completer, CompleterHandle { tx })
    }

    /// Announces each batch written, with its size, for a test to await.
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    /// Runs until every handle is dropped and the queue is empty.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = self.rx.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let reports = batch.len();
            self.flush(&mut batch).await;
            self.signals.send(|| Signal::Flushed { reports });
        }
    }

    async fn flush(&self, batch: &mut Vec<(Settle, Reply)>) {
        let mut completions = (Vec::new(), Vec::new());
        let mut failures = (Vec::new(), Vec::new());
        let mut logs = (Vec::new(), Vec::new());
        let mut checkpoints = (Vec::new(), Vec::new());
        let mut started = Vec::new();
        // The latest progress per lease, and every caller waiting on any report for it.
        let mut progress: HashMap<LeaseRef, (ProgressUpdate, Vec<Reply>)> = HashMap::new();
        for (settle, reply) in batch.drain(..) {
            match settle {
                Settle::Complete(c) => push(&mut completions, c, reply),
                Settle::Fail(f) => push(&mut failures, f, reply),
                Settle::Logs(l) => push(&mut logs, l, reply),
                Settle::Checkpoint(c) => push(&mut checkpoints, c, reply),
                Settle::Started(tenant, lease) => {
                    let _ = reply.send(Ok(SettleResult::Applied(JobState::Running)));
                    started.push((tenant, lease));
                }
                Settle::Progress(p) => match progress.get_mut(&p.lease) {
                    Some((latest, replies)) => {
                        *latest = p;
                        replies.push(reply);
                    }
                    None => {
                        progress.insert(p.lease, (p, vec![reply]));
                    }
                },
            }
        }
        // An attempt that ends in this batch needs no note that it started: its end counts it.
        let ending: std::collections::HashSet<LeaseRef> = completions
            .0
            .iter()
            .map(|c: &Completion| c.lease)
            .chain(failures.0.iter().map(|f: &Failure| f.lease))
            .collect();
        started.retain(|(_, lease)| !ending.contains(lease));
        let (updates, progress_replies): (Vec<_>, Vec<_>) = progress.into_values().unzip();
        tracing::debug!(
            completions = completions.0.len(),
            failures = failures.0.len(),
            progress = updates.len(),
            logs = logs.0.len(),
            checkpoints = checkpoints.0.len(),
            "flushing batch"
        );
        let chunk = updates
            .len()
            .div_ceil(PROGRESS_STATEMENTS)
            .max(PROGRESS_MIN_ROWS);
        // Each statement of a burst is answered, and its events offered to the fanout, as soon
        // as it commits: they are final then, whatever the others still write.
        let mut progress_replies = progress_replies.into_iter();
        let groups: Vec<Vec<Vec<Reply>>> = updates
            .chunks(chunk)
            .map(|rows| progress_replies.by_ref().take(rows.len()).collect())
            .collect();
        // Log lines before progress: a worker sends a lease's lines ahead of its progress, so
        // their events keep the order its handler wrote them in.
        let (logged, saved, noted) = tokio::join!(
            self.write(logs.0.len(), |r| self.store.record_logs_many(&logs.0[r])),
            self.write(checkpoints.0.len(), |r| {
                self.store.save_checkpoints(&checkpoints.0[r])
            }),
            self.write(started.len(), |r| self.store.mark_started(&started[r])),
        );
        join_all(
            updates
                .chunks(chunk)
                .zip(groups)
                .map(|(rows, replies)| self.write_progress(rows, replies)),
        )
        .await;
        if let Some(Err(error)) = noted.iter().find(|r| r.is_err()) {
            // A start not noted only means that a lapse of that lease would not count.
            tracing::warn!(%error, "could not note started handlers");
        }
        if logged.iter().any(Result::is_ok) {
            self.fanout.committed();
        }
        answer_matched(logged, logs.1.into_iter().map(|r| vec![r]).collect());
        answer_matched(saved, checkpoints.1.into_iter().map(|r| vec![r]).collect());
        // Completions and failures end in one statement; failures are decided from their
        // attempts' facts, read first (see `ending`).
        let mut ends: Vec<_> = completions.0.iter().map(ending::completion).collect();
        let mut replies = completions.1;
        if !failures.0.is_empty() {
            match with_retries(|| ending::failures(&self.store, &failures.0)).await {
                Ok(failed) => {
                    ends.extend(failed);
                    replies.extend(failures.1);
                }
                Err(error) => {
                    for reply in failures.1 {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
        crate::metrics::completion_batch(ends.len());
        let ended = self
            .write(ends.len(), |r| self.store.end_attempts(&ends[r]))
            .await;
        if ended.iter().any(Result::is_ok) {
            self.fanout.committed();
        }
        answer(ended, replies);
    }

    /// Writes one statement of progress reports, answers them, and wakes the fanout.
    async fn write_progress(&self, rows: &[ProgressUpdate], replies: Vec<Vec<Reply>>) {
        let outcome = self
            .write(rows.len(), |r| self.store.record_progress_many(&rows[r]))
            .await;
        let wrote = outcome.iter().any(Result::is_ok);
        answer_matched(outcome, replies);
        if wrote {
            self.fanout.committed();
        }
    }

    /// Writes `len` rows with one batch statement (given the range of rows to write), retried
    /// while the database is unavailable; a batch that fails otherwise is written again in
    /// parts, so that only the reports at fault fail (see [`batch::isolate`]). One answer per
    /// row, in order.
    async fn write<R, Fut>(
        &self,
        len: usize,
        statement: impl Fn(Range<usize>) -> Fut,
    ) -> Vec<Result<R, Error>>
    where
        Fut: Future<Output = store::Result<Vec<R>>>,
    {
        if len == 0 {
            return Vec::new();
        }
        let statement = &statement;
        batch::isolate(
            len,
            |range| with_retries(move || statement(range.clone())),
            |error| matches!(error, Error::Internal(_)),
        )
        .await
    }
}

fn push<T>(group: &mut (Vec<T>, Vec<Reply>), item: T, reply: Reply) {
    group.0.push(item);
    group.1.push(reply);
}

/// Answers reports whose statement says, per row, whether the lease was current; each row has
/// the group of callers whose reports it stands for.
fn answer_matched(outcomes: Vec<Result<bool, Error>>, groups: Vec<Vec<Reply>>) {
    for (outcome, replies) in outcomes.into_iter().zip(groups) {
        let result = outcome.map(|current| {
            if current {
                SettleResult::Applied(JobState::Running)
            } else {
                SettleResult::Stale
            }
        });
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}

fn answer(outcomes: Vec<Result<SettleResult, Error>>, replies: Vec<Reply>) {
    for (outcome, reply) in outcomes.into_iter().zip(replies) {
        let _ = reply.send(outcome);
    }
}

/// Runs a batch statement, retrying transient failures with exponential backoff.
async fn with_retries<T, F, Fut>(mut op: F) -> Result<Vec<T>, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = store::Result<Vec<T>>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        match op().await {
            Ok(results) => return Ok(results),
            Err(error) if error.is_transient() && started.elapsed() < RETRY_BUDGET => {
                tracing::warn!(%error, ?delay, "batch write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) if error.is_transient() => {
                return Err(Error::Unavailable(error.to_string()));
            }
            Err(error) => return Err(Error::Internal(error.to_string())),
        }
    }
}
