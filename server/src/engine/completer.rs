//! The completer: records the outcomes of attempts in batches.
//!
//! Worker streams hand it completions and failures; it coalesces whatever has queued up while the
//! previous batch was being written into one `complete_many` and one `fail_many` statement, so
//! the database sees one round trip per batch, not per job. The queue is bounded: when it is full,
//! streams wait (backpressure reaches the workers through their unacknowledged results).
//!
//! A transient database failure is retried with backoff; a caller is answered only once its
//! outcome has committed. The task stops when every handle is gone, after flushing what is
//! queued, so nothing a worker reported is dropped on a graceful shutdown.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{self, Completion, Failure, SettleResult, Store};

/// The most outcomes written by one statement.
const MAX_BATCH: usize = 1000;
/// How long a batch is retried on transient errors before its callers get an error.
const RETRY_BUDGET: Duration = Duration::from_secs(30);

/// An outcome to record.
#[derive(Debug)]
pub enum Settle {
    Complete(Completion),
    Fail(Failure),
}

type Reply = oneshot::Sender<Result<SettleResult, SettleError>>;

/// Why an outcome could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettleError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Internal(String),
}

/// A cloneable handle for submitting outcomes.
#[derive(Debug, Clone)]
pub struct CompleterHandle {
    tx: mpsc::Sender<(Settle, Reply)>,
}

impl CompleterHandle {
    /// Records one outcome, waiting until it has committed.
    pub async fn settle(&self, settle: Settle) -> Result<SettleResult, SettleError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((settle, reply))
            .await
            .map_err(|_| SettleError::ShuttingDown)?;
        answer.await.map_err(|_| SettleError::ShuttingDown)?
    }
}

pub struct Completer {
    store: Store,
    rx: mpsc::Receiver<(Settle, Reply)>,
}

impl Completer {
    pub fn new(store: Store) -> (Self, CompleterHandle) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (Self { store, rx }, CompleterHandle { tx })
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
            self.flush(&mut batch).await;
        }
    }

    async fn flush(&self, batch: &mut Vec<(Settle, Reply)>) {
        let mut completions = Vec::new();
        let mut completion_replies = Vec::new();
        let mut failures = Vec::new();
        let mut failure_replies = Vec::new();
        for (settle, reply) in batch.drain(..) {
            match settle {
                Settle::Complete(c) => {
                    completions.push(c);
                    completion_replies.push(reply);
                }
                Settle::Fail(f) => {
                    failures.push(f);
                    failure_replies.push(reply);
                }
            }
        }
        tracing::debug!(
            completions = completions.len(),
            failures = failures.len(),
            "flushing batch"
        );
        let (done, failed) = tokio::join!(
            with_retries(|| self.store.complete_many(&completions)),
            with_retries(|| self.store.fail_many(&failures)),
        );
        answer(done, completion_replies);
        answer(failed, failure_replies);
    }
}

fn answer(outcome: Result<Vec<SettleResult>, SettleError>, replies: Vec<Reply>) {
    match outcome {
        Ok(results) => {
            for (result, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Runs a batch statement, retrying transient failures with exponential backoff.
async fn with_retries<F, Fut>(mut op: F) -> Result<Vec<SettleResult>, SettleError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = store::Result<Vec<SettleResult>>>,
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
                return Err(SettleError::Unavailable(error.to_string()));
            }
            Err(error) => return Err(SettleError::Internal(error.to_string())),
        }
    }
}
