//! The pruner: keeps finished jobs only as long as their queue's retention, and the event log
//! only as long as the longest retention, so that the tables stop growing once the retention
//! is reached (issue 30; DESIGN's retention pruner).
//!
//! Runs on the leader only, each pass under its term: it makes the event log's partitions
//! ahead of time (again between batches when a backlog keeps it longer than a pass), prunes
//! each queue's finished jobs past its retention in batches of [`BATCH`] (each its own short
//! transaction taking only unlocked rows, so claims, enqueues and settles never wait for it),
//! then drops the partitions of the event log whose events are all older than the longest
//! retention of any queue. Events of pruned jobs stay in the log until then: the log is never
//! deleted from row by row.
//!
//! It stops between batches on shutdown or when leadership is lost; what it has done so far is
//! counted in [`PrunerProgress`] and in the Prometheus counters of [`crate::metrics`]
//! (`jobwire_jobs_pruned_total` and its siblings), each batch once it has committed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::leader::Leadership;
use crate::metrics;
use crate::store::{Archive, Pruned, QueueRetention, Store, Term};

/// Jobs deleted per transaction: small enough that each batch's locks and WAL are brief (the
/// locks are on finished jobs only, which the hot path does not take), large enough that a
/// pruner keeping pace with a saturated drain commits seldom beside it.
const BATCH: i64 = 2000;

/// How the pruner is set up, from the server's flags.
#[derive(Debug, Clone, Copy)]
pub struct PrunerConfig {
    /// Retention of finished jobs in queues that set none (`--retention`).
    pub default_retention: Duration,
    /// Whether pruned rows are copied to the archive tables first (`--archive`).
    pub archive: Archive,
    /// Time between passes (`--prune-interval`).
    pub interval: Duration,
    /// The span of each event partition (`--event-partition-interval`).
    pub partition_interval: Duration,
}

impl PrunerConfig {
    /// How far ahead partitions are made: three partitions, three passes, and at least
    /// [`MIN_PARTITIONS_AHEAD`], so that writers never find the partition they need missing
    /// while a leader is being elected or a pruning batch runs long under load (a long pass
    /// makes them again between its batches).
    pub fn partitions_ahead(&self) -> Duration {
        (self.partition_interval * 3)
            .max(self.interval * 3)
            .max(MIN_PARTITIONS_AHEAD)
    }
}

/// The least time ahead the event log's partitions reach: with second-long partitions (a
/// short retention) three of them are gone in the time a leader takes to be elected.
const MIN_PARTITIONS_AHEAD: Duration = Duration::from_secs(60);

/// Running totals of what the pruner removed, since this process started.
#[derive(Debug, Default)]
pub struct PrunerProgress {
    pub jobs: AtomicU64,
    pub attempts: AtomicU64,
    pub events_archived: AtomicU64,
    pub partitions_made: AtomicU64,
    pub partitions_dropped: AtomicU64,
    /// Passes completed.
    pub passes: AtomicU64,
}

impl PrunerProgress {
    fn add(&self, pruned: Pruned) {
        self.jobs.fetch_add(pruned.jobs, Ordering::Relaxed);
        self.attempts.fetch_add(pruned.attempts, Ordering::Relaxed);
        self.events_archived
            .fetch_add(pruned.events_archived, Ordering::Relaxed);
    }
}

pub struct Pruner {
    store: Store,
    config: PrunerConfig,
    leadership: Leadership,
    progress: Arc<PrunerProgress>,
}

impl Pruner {
    pub fn new(
        store: Store,
        config: PrunerConfig,
        leadership: Leadership,
    ) -> (Self, Arc<PrunerProgress>) {
        let progress = Arc::new(PrunerProgress::default());
        (
            Self {
                store,
                config,
                leadership,
                progress: progress.clone(),
            },
            progress,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let term = tokio::select! {
                _ = shutdown.cancelled() => return,
                term = self.leadership.wait_leading() => match term {
                    Some(term) => term,
                    None => return,
                },
            };
            self.pass(term, &shutdown).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }

    /// Whether to go on: not shutting down, and still leading under `term`.
    fn leading(&self, term: Term, shutdown: &CancellationToken) -> bool {
        !shutdown.is_cancelled() && self.leadership.current() == Some(term)
    }

    /// Makes the event log's partitions ahead, as far as [`PrunerConfig::partitions_ahead`]
    /// says, and notes when in `made_at`.
    async fn make_partitions(&self, made_at: &mut Instant) {
        *made_at = Instant::now();
        match self
            .store
            .ensure_event_partitions(
                self.config.partition_interval,
                self.config.partitions_ahead(),
            )
            .await
        {
            Ok(0) => {}
            Ok(made) => {
                tracing::debug!(made, "event partitions made");
                let made = u64::try_from(made).unwrap_or(0);
                self.progress
                    .partitions_made
                    .fetch_add(made, Ordering::Relaxed);
                metrics::event_partitions_made(made);
            }
            Err(error) => tracing::warn!(%error, "making event partitions failed"),
        }
    }

    async fn pass(&self, term: Term, shutdown: &CancellationToken) {
        let mut made_at = Instant::now();
        self.make_partitions(&mut made_at).await;
        let queues = match self
            .store
            .queue_retentions(self.config.default_retention)
            .await
        {
            Ok(queues) => queues,
            Err(error) => {
                tracing::warn!(%error, "reading the queues' retention failed");
                return;
            }
        };
        for queue in &queues {
            if !self.leading(term, shutdown) {
                return;
            }
            self.prune_queue(term, queue, shutdown, &mut made_at).await;
        }
        // Events are kept as long as the longest retention, so that the log still holds every
        // event of each finished job that is kept.
        let longest = queues
            .iter()
            .filter_map(|q| u64::try_from(q.retention_ms).ok())
            .map(Duration::from_millis)
            .fold(self.config.default_retention, Duration::max);
        if self.leading(term, shutdown) {
            self.drop_partitions(term, longest).await;
        }
        self.progress.passes.fetch_add(1, Ordering::Relaxed);
        metrics::prune_pass();
    }

    /// Prunes a queue's expired jobs batch by batch until none is left. A backlog can take
    /// longer than the partitions made ahead reach (a retention first set over a large table),
    /// so partitions are made between batches once a pass interval has gone by since the last
    /// time: events never lack a partition however long this runs.
    async fn prune_queue(
        &self,
        term: Term,
        queue: &QueueRetention,
        shutdown: &CancellationToken,
        made_at: &mut Instant,
    ) {
        let mut total = Pruned::default();
        loop {
            if made_at.elapsed() >= self.config.interval {
                self.make_partitions(made_at).await;
            }
            match self
                .store
                .prune_jobs(term, queue, BATCH, self.config.archive)
                .await
            {
                Ok(pruned) => {
                    self.progress.add(pruned);
                    metrics::pruned(
                        &queue.tenant_id,
                        &queue.queue,
                        pruned.jobs,
                        pruned.attempts,
                        pruned.events_archived,
                    );
                    total.jobs += pruned.jobs;
                    total.attempts += pruned.attempts;
                    total.events_archived += pruned.events_archived;
                    if pruned.jobs < BATCH as u64 || !self.leading(term, shutdown) {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, tenant = %queue.tenant_id, queue = %queue.queue,
                        "pruning failed");
                    break;
                }
            }
        }
        if total.jobs > 0 {
            tracing::info!(
                tenant = %queue.tenant_id,
                queue = %queue.queue,
                jobs = total.jobs,
                attempts = total.attempts,
                events_archived = total.events_archived,
                "finished jobs past their retention pruned"
            );
        }
    }

    async fn drop_partitions(&self, term: Term, retention: Duration) {
        if let Err(error) = self.store.drop_detached_event_partitions().await {
            tracing::warn!(%error, "dropping detached event partitions failed");
        }
        let expired = match self.store.expired_event_partitions(retention).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "reading the event partitions failed");
                return;
            }
        };
        for partition in &expired {
            match self.store.drop_event_partition(term, partition).await {
                Ok(true) => {
                    self.progress
                        .partitions_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::event_partition_dropped();
                    tracing::info!(
                        partition = %partition.name,
                        until = %partition.upper_bound,
                        "event partition past retention dropped"
                    );
                }
                Ok(false) => return,
                Err(error) => {
                    tracing::warn!(%error, partition = %partition.name,
                        "dropping an event partition failed");
                    return;
                }
            }
        }
    }
}
