//! The enqueuer: group-commits concurrent EnqueueJob calls.
//!
//! A job queue is a server here, not a library, so the single enqueues of many callers can share
//! one transaction: each EnqueueJob hands its (already validated) job to this loop and waits.
//! Whatever queued up while earlier batches were being written goes out as one `enqueue_many`
//! statement per tenant, and each caller is answered once that statement has committed
//! (invariant 1: an OK still means durable). The collection window is the time the previous
//! commit took, so a lone caller waits for no timer; under load, up to [`MAX_IN_FLIGHT`]
//! batches are written at once so that commits overlap.
//!
//! Validation happens before a job joins a batch, so one caller's bad input cannot fail another's.
//! A batch that fails on the database fails its callers with a retryable error.

use std::collections::HashMap;

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use crate::{
    domain::TenantId,
    store::{self, EnqueueOutcome, NewJob, Store},
};

/// The most jobs written by one statement.
const MAX_BATCH: usize = 1000;
/// Batches written at the same time.
const MAX_IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<EnqueueOutcome, EnqueueError>>;

/// Why a job could not be enqueued.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EnqueueError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Internal(String),
}

impl From<store::Error> for EnqueueError {
    fn from(error: store::Error) -> Self {
        if error.is_transient() {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(error.to_string())
        }
    }
}

/// A cloneable handle for enqueueing one job.
#[derive(Debug, Clone)]
pub struct EnqueuerHandle {
    tx: mpsc::Sender<(TenantId, NewJob, Reply)>,
}

impl EnqueuerHandle {
    /// Enqueues one job in the next batch, returning once that batch has committed.
    pub async fn enqueue(
        &self,
        tenant: TenantId,
        job: NewJob,
    ) -> Result<EnqueueOutcome, EnqueueError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((tenant, job, reply))
            .await
            .map_err(|_| EnqueueError::ShuttingDown)?;
        answer.await.map_err(|_| EnqueueError::ShuttingDown)?
    }
}

pub struct Enqueuer {
    store: Store,
    rx: mpsc::Receiver<(TenantId, NewJob, Reply)>,
}

impl Enqueuer {
    pub fn new(store: Store) -> (Self, EnqueuerHandle) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        (Self { store, rx }, EnqueuerHandle { tx })
    }

    /// Runs until every handle is dropped, then finishes the batches in flight.
    pub async fn run(mut self) {
        let mut writing = JoinSet::new();
        loop {
            // Take what is queued once a writer is free; while all are busy, calls accumulate
            // into the next batch.
            if writing.len() >= MAX_IN_FLIGHT {
                writing.join_next().await;
                continue;
            }
            let first = tokio::select! {
                biased;
                Some(_) = writing.join_next(), if !writing.is_empty() => continue,
                first = self.rx.recv() => first,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            writing.spawn(flush(self.store.clone(), batch));
        }
        while writing.join_next().await.is_some() {}
    }
}

/// Writes one batch, one statement per tenant, and answers its callers.
async fn flush(store: Store, batch: Vec<(TenantId, NewJob, Reply)>) {
    let mut by_tenant: HashMap<TenantId, (Vec<NewJob>, Vec<Reply>)> = HashMap::new();
    for (tenant, job, reply) in batch {
        let group = by_tenant.entry(tenant).or_default();
        group.0.push(job);
        group.1.push(reply);
    }
    for (tenant, (jobs, replies)) in by_tenant {
        tracing::debug!(%tenant, jobs = jobs.len(), "group-committing enqueues");
        match store.enqueue_many(&tenant, &jobs).await {
            Ok(outcomes) => {
                for (outcome, reply) in outcomes.into_iter().zip(replies) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                let error = EnqueueError::from(error);
                tracing::warn!(%error, "group-committed enqueue failed");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
