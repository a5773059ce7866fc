//! Prometheus metrics: their names, what each means, and the `/metrics` endpoint.
//!
//! The code records through the `metrics` facade; [`install`] puts the Prometheus recorder
//! behind it when `--metrics-listen` is given, and without it every record is a no-op. Counters
//! of job state changes are recorded by the store right after the statement that made the
//! change has committed, once per batch and per series (never a statement more per job), so a
//! count is the number of jobs that really reached that state on this replica. Figures that
//! need SQL (queue depth, the oldest available job, the pool) are read by one periodic loop
//! (`engine::sampler`), never per scrape.
//!
//! Cardinality: series are labelled by tenant, queue and job type, names that tenants choose.
//! The first [`MAX_SERIES`] distinct (tenant, queue, job type) triples a replica sees get series
//! of their own; any later one is recorded under the label value [`OTHER`] for all three, so a
//! tenant inventing names cannot grow a replica's memory or a Prometheus server without bound.
//! No label ever carries a job id, a worker id or a payload.
//!
//! docs/operations.md ("Metrics") lists every metric; tests/metrics.rs checks the counts.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Jobs created (EnqueueJob, EnqueueJobs, cron ticks, triggered schedules).
pub const JOBS_ENQUEUED: &str = "jobwire_jobs_enqueued_total";
/// Attempts leased to a worker: the job went RUNNING (at a claim, or at its enqueue when a
/// worker's slot was free).
pub const JOBS_STARTED: &str = "jobwire_jobs_started_total";
/// Jobs that ended SUCCEEDED.
pub const JOBS_SUCCEEDED: &str = "jobwire_jobs_succeeded_total";
/// Jobs that ended FAILED (attempts exhausted or not retryable).
pub const JOBS_FAILED: &str = "jobwire_jobs_failed_total";
/// Attempts that failed and were scheduled for another try (RETRYING).
pub const JOBS_RETRIED: &str = "jobwire_jobs_retried_total";
/// Jobs that ended CANCELLED (cancelled queued or running, or rejected).
pub const JOBS_CANCELLED: &str = "jobwire_jobs_cancelled_total";
/// From when a job was due to the start of its attempt.
pub const JOB_START_DELAY: &str = "jobwire_job_start_delay_seconds";
/// How long attempts ran, from their start to their end.
pub const JOB_RUN_TIME: &str = "jobwire_job_run_seconds";
/// Jobs per enqueue statement.
pub const ENQUEUE_BATCH: &str = "jobwire_enqueue_batch_size";
/// Jobs leased per claim statement.
pub const CLAIM_BATCH: &str = "jobwire_claim_batch_size";
/// Attempt ends per completer statement.
pub const COMPLETION_BATCH: &str = "jobwire_completion_batch_size";
/// Jobs per queue and non-terminal state.
pub const QUEUE_JOBS: &str = "jobwire_queue_jobs";
/// Age of the oldest AVAILABLE job per queue.
pub const QUEUE_OLDEST_AVAILABLE: &str = "jobwire_queue_oldest_available_age_seconds";
/// Open worker streams (WorkerService.Connect) on this replica.
pub const WORKER_STREAMS: &str = "jobwire_worker_streams";
/// Open watch streams (WatchJob, WatchJobs) on this replica.
pub const WATCH_STREAMS: &str = "jobwire_watch_streams";
/// Connections of this replica's pool, by state.
pub const DB_POOL_CONNECTIONS: &str = "jobwire_db_pool_connections";
/// The most connections the pool may open (`--db-max-connections`).
pub const DB_POOL_MAX: &str = "jobwire_db_pool_max_connections";
/// 1 while this replica holds the leader lease, else 0.
pub const LEADER: &str = "jobwire_leader";
/// Finished jobs the pruner removed past their queue's retention (archived first with
/// `--archive`).
pub const JOBS_PRUNED: &str = "jobwire_jobs_pruned_total";
/// Attempt rows removed with their pruned jobs.
pub const ATTEMPTS_PRUNED: &str = "jobwire_attempts_pruned_total";
/// Events of pruned jobs copied to `job_events_archive` (`--archive` only).
pub const EVENTS_ARCHIVED: &str = "jobwire_events_archived_total";
/// Partitions of the event log made ahead.
pub const EVENT_PARTITIONS_MADE: &str = "jobwire_event_partitions_made_total";
/// Partitions of the event log dropped whole, past the longest retention.
pub const EVENT_PARTITIONS_DROPPED: &str = "jobwire_event_partitions_dropped_total";
/// Pruner passes completed.
pub const PRUNE_PASSES: &str = "jobwire_prune_passes_total";

/// The most (tenant, queue, job type) triples given series of their own (see the module doc).
pub const MAX_SERIES: usize = 1000;
/// The label value of every series past [`MAX_SERIES`].
pub const OTHER: &str = "_other";

/// Bucket bounds of the duration histograms, in seconds: from a millisecond (a pickup by a
/// waiting worker) to an hour (a long job, or a backlog).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
/// Bucket bounds of the batch size histograms, up to the enqueuer's largest batch.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

/// Puts the Prometheus recorder behind the `metrics` facade and describes every metric.
/// Called once, at start-up, only when metrics are served.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    describe();
    // The pruner's unlabelled counters read 0 from the first scrape, so that an alert on
    // their rate sees a replica that never pruned (a follower, or a leader stuck before its
    // first pass) rather than no series at all.
    for name in [
        EVENT_PARTITIONS_MADE,
        EVENT_PARTITIONS_DROPPED,
        PRUNE_PASSES,
    ] {
        counter!(name).increment(0);
    }
    RECORDING.store(true, Ordering::Relaxed);
    Ok(handle)
}

/// Whether metrics are kept: set once by [`install`]. Until then the records of job changes
/// return before grouping their jobs into series, so a server without `--metrics-listen` pays
/// nothing per job (not even the label cap's lock).
static RECORDING: AtomicBool = AtomicBool::new(false);

fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

fn describe() {
    describe_counter!(
        JOBS_ENQUEUED,
        "Jobs created, by tenant, queue and job type."
    );
    describe_counter!(
        JOBS_STARTED,
        "Attempts leased to a worker (the job went RUNNING); a lease handed back unstarted \
         counts again when the job is leased anew."
    );
    describe_counter!(JOBS_SUCCEEDED, "Jobs that ended SUCCEEDED.");
    describe_counter!(
        JOBS_FAILED,
        "Jobs that ended FAILED: attempts exhausted, or a failure not retryable."
    );
    describe_counter!(
        JOBS_RETRIED,
        "Attempts that failed and left the job RETRYING."
    );
    describe_counter!(
        JOBS_CANCELLED,
        "Jobs that ended CANCELLED: cancelled while queued or running, or rejected."
    );
    describe_histogram!(
        JOB_START_DELAY,
        Unit::Seconds,
        "From when a job was due (its enqueue, run_at or retry time) to the start of its attempt."
    );
    describe_histogram!(
        JOB_RUN_TIME,
        Unit::Seconds,
        "How long attempts ran, from their lease to their end (succeeded, failed, timed out, \
         cancelled, paused or lapsed)."
    );
    describe_histogram!(ENQUEUE_BATCH, Unit::Count, "Jobs per enqueue statement.");
    describe_histogram!(CLAIM_BATCH, Unit::Count, "Jobs leased per claim statement.");
    describe_histogram!(
        COMPLETION_BATCH,
        Unit::Count,
        "Completions and failures written per completer statement."
    );
    describe_gauge!(
        QUEUE_JOBS,
        Unit::Count,
        "Jobs per queue in each non-terminal state, read every few seconds."
    );
    describe_gauge!(
        QUEUE_OLDEST_AVAILABLE,
        Unit::Seconds,
        "How long the oldest AVAILABLE job of each queue has been due (0 when none is)."
    );
    describe_gauge!(
        WORKER_STREAMS,
        Unit::Count,
        "Open worker streams on this replica."
    );
    describe_gauge!(
        WATCH_STREAMS,
        Unit::Count,
        "Open watch streams on this replica."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        Unit::Count,
        "Connections of this replica's PostgreSQL pool, idle or in use."
    );
    describe_gauge!(
        DB_POOL_MAX,
        Unit::Count,
        "The most connections this replica's pool may open."
    );
    describe_gauge!(
        LEADER,
        "1 while this replica holds the leader lease, else 0."
    );
    describe_counter!(
        JOBS_PRUNED,
        "Finished jobs removed by the pruner past their queue's retention (archived first \
         with --archive), by tenant and queue."
    );
    describe_counter!(
        ATTEMPTS_PRUNED,
        "Attempt rows removed with their pruned jobs, by tenant and queue."
    );
    describe_counter!(
        EVENTS_ARCHIVED,
        "Events of pruned jobs copied to the archive (--archive), by tenant and queue."
    );
    describe_counter!(
        EVENT_PARTITIONS_MADE,
        "Partitions of the event log made ahead of time."
    );
    describe_counter!(
        EVENT_PARTITIONS_DROPPED,
        "Partitions of the event log dropped whole once past the longest retention."
    );
    describe_counter!(PRUNE_PASSES, "Pruner passes completed on this replica.");
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(async move || handle.render()),
    );
    tracing::info!(?addr, "serving metrics on /metrics");
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "the metrics endpoint failed");
    }
}

/// The (tenant, queue, job type) triples given series of their own.
static SERIES: LazyLock<Mutex<HashSet<(String, String, String)>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));

/// The labels of one series: its own names while under [`MAX_SERIES`], else [`OTHER`].
fn labels(tenant: &str, queue: &str, job_type: &str) -> [(&'static str, String); 3] {
    let own = [
        ("tenant", tenant.to_owned()),
        ("queue", queue.to_owned()),
        ("job_type", job_type.to_owned()),
    ];
    // A poisoned lock only means another thread panicked mid-insert: the set is still a set.
    let mut series = SERIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = (tenant.to_owned(), queue.to_owned(), job_type.to_owned());
    if series.contains(&key) {
        return own;
    }
    if series.len() < MAX_SERIES {
        series.insert(key);
        return own;
    }
    [
        ("tenant", OTHER.to_owned()),
        ("queue", OTHER.to_owned()),
        ("job_type", OTHER.to_owned()),
    ]
}

/// The labels of a queue's series (its job type left empty); they share the cap.
fn queue_labels(tenant: &str, queue: &str) -> [(&'static str, String); 2] {
    let [tenant, queue, _] = labels(tenant, queue, "");
    [tenant, queue]
}

/// One job's series: its tenant, queue and job type.
pub type Series<'a> = (&'a str, &'a str, &'a str);

/// Adds one to `counter` per job, one increment per series.
fn count<'a>(name: &'static str, jobs: impl IntoIterator<Item = Series<'a>>) {
    if !recording() {
        return;
    }
    let mut tally: HashMap<Series<'a>, u64> = HashMap::new();
    for job in jobs {
        *tally.entry(job).or_default() += 1;
    }
    for ((tenant, queue, job_type), n) in tally {
        counter!(name, &labels(tenant, queue, job_type)).increment(n);
    }
}

/// Jobs created by one committed statement.
pub fn enqueued<'a>(jobs: impl IntoIterator<Item = Series<'a>>) {
    count(JOBS_ENQUEUED, jobs);
}

/// The size of one enqueue statement.
pub fn enqueue_batch(size: usize) {
    histogram!(ENQUEUE_BATCH).record(size as f64);
}

/// Attempts started by one committed statement, each with how long its job had been due.
pub fn started<'a>(jobs: impl IntoIterator<Item = (Series<'a>, f64)>) {
    if !recording() {
        return;
    }
    let mut delays: HashMap<Series<'a>, Vec<f64>> = HashMap::new();
    for (series, delay) in jobs {
        delays.entry(series).or_default().push(delay.max(0.0));
    }
    for ((tenant, queue, job_type), delays) in delays {
        let labels = labels(tenant, queue, job_type);
        counter!(JOBS_STARTED, &labels).increment(delays.len() as u64);
        let histogram = histogram!(JOB_START_DELAY, &labels);
        for delay in delays {
            histogram.record(delay);
        }
    }
}

/// The size of one claim statement (empty claims included: they show a worker asking in vain).
pub fn claim_batch(size: usize) {
    histogram!(CLAIM_BATCH).record(size as f64);
}

/// The size of one completer statement.
pub fn completion_batch(size: usize) {
    histogram!(COMPLETION_BATCH).record(size as f64);
}

/// How an attempt's end left its job, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    Failed,
    Retried,
    Cancelled,
    /// Paused, or handed back to AVAILABLE: no counter of its own.
    Other,
}

/// Attempts ended by one committed statement, each with how long it ran when it counted as
/// run (`None` for a lease handed back unstarted).
pub fn ended<'a>(ends: impl IntoIterator<Item = (Series<'a>, Ended, Option<f64>)>) {
    if !recording() {
        return;
    }
    let (mut succeeded, mut failed, mut retried, mut cancelled) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut runs: HashMap<Series<'a>, Vec<f64>> = HashMap::new();
    for (series, how, ran) in ends {
        if let Some(ran) = ran {
            runs.entry(series).or_default().push(ran.max(0.0));
        }
        match how {
            Ended::Succeeded => succeeded.push(series),
            Ended::Failed => failed.push(series),
            Ended::Retried => retried.push(series),
            Ended::Cancelled => cancelled.push(series),
            Ended::Other => {}
        }
    }
    for ((tenant, queue, job_type), runs) in runs {
        let histogram = histogram!(JOB_RUN_TIME, &labels(tenant, queue, job_type));
        for ran in runs {
            histogram.record(ran);
        }
    }
    count(JOBS_SUCCEEDED, succeeded);
    count(JOBS_FAILED, failed);
    count(JOBS_RETRIED, retried);
    count(JOBS_CANCELLED, cancelled);
}

/// A job cancelled (or rejected) before any worker ran it.
pub fn cancelled(series: Series<'_>) {
    count(JOBS_CANCELLED, [series]);
}

/// What one committed pruning batch removed from a queue.
pub fn pruned(tenant: &str, queue: &str, jobs: u64, attempts: u64, events_archived: u64) {
    if !recording() || jobs == 0 {
        return;
    }
    let labels = queue_labels(tenant, queue);
    counter!(JOBS_PRUNED, &labels).increment(jobs);
    counter!(ATTEMPTS_PRUNED, &labels).increment(attempts);
    if events_archived > 0 {
        counter!(EVENTS_ARCHIVED, &labels).increment(events_archived);
    }
}

/// Event partitions made ahead by one pass.
pub fn event_partitions_made(made: u64) {
    counter!(EVENT_PARTITIONS_MADE).increment(made);
}

/// One event partition dropped.
pub fn event_partition_dropped() {
    counter!(EVENT_PARTITIONS_DROPPED).increment(1);
}

/// One pruner pass completed.
pub fn prune_pass() {
    counter!(PRUNE_PASSES).increment(1);
}

/// Whether this replica leads.
pub fn leader(leads: bool) {
    gauge!(LEADER).set(if leads { 1.0 } else { 0.0 });
}

/// One queue's figures, as the sampler read them.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    pub tenant: String,
    pub queue: String,
    /// (state, jobs) for each non-terminal state holding any.
    pub states: Vec<(&'static str, f64)>,
    pub oldest_available_s: f64,
}

/// The states [`QueueDepth::states`] may name; a state a queue no longer holds reads 0.
pub const DEPTH_STATES: [&str; 7] = [
    "awaiting_approval",
    "pending",
    "scheduled",
    "available",
    "running",
    "retrying",
    "paused",
];

/// Sets the queue gauges from one reading. Queues of the last reading missing from this one
/// (no longer holding non-terminal jobs) are set to 0 rather than left at their last value.
pub fn queue_depths(depths: &[QueueDepth], last: &mut HashSet<(String, String)>) {
    let mut seen = HashSet::new();
    for depth in depths {
        set_queue(depth);
        seen.insert((depth.tenant.clone(), depth.queue.clone()));
    }
    for (tenant, queue) in last.difference(&seen) {
        set_queue(&QueueDepth {
            tenant: tenant.clone(),
            queue: queue.clone(),
            states: Vec::new(),
            oldest_available_s: 0.0,
        });
    }
    *last = seen;
}

fn set_queue(depth: &QueueDepth) {
    let [tenant, queue] = queue_labels(&depth.tenant, &depth.queue);
    for state in DEPTH_STATES {
        let n = depth
            .states
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0.0, |(_, n)| *n);
        gauge!(
            QUEUE_JOBS,
            &[tenant.clone(), queue.clone(), ("state", state.to_owned())]
        )
        .set(n);
    }
    gauge!(QUEUE_OLDEST_AVAILABLE, &[tenant, queue]).set(depth.oldest_available_s);
}

/// The pool's connections: idle, in use, and the most it may open.
pub fn pool(idle: usize, in_use: usize, max: u32) {
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
    gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set(in_use as f64);
    gauge!(DB_POOL_MAX).set(f64::from(max));
}

/// Which kind of stream an [`OpenStream`] counts.
#[derive(Debug, Clone, Copy)]
pub enum StreamKind {
    Worker,
    Watch,
}

/// Counts one open stream while it lives: made when the stream starts, dropped with it.
#[derive(Debug)]
pub struct OpenStream(StreamKind);

impl OpenStream {
    pub fn open(kind: StreamKind) -> Self {
        gauge!(Self::name(kind)).increment(1.0);
        Self(kind)
    }

    fn name(kind: StreamKind) -> &'static str {
        match kind {
            StreamKind::Worker => WORKER_STREAMS,
            StreamKind::Watch => WATCH_STREAMS,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        gauge!(Self::name(self.0)).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_past_the_cap_share_the_other_labels() {
        for i in 0..MAX_SERIES {
            let [_, queue, _] = labels("cap-test", &format!("q{i}"), "t");
            // Other tests in this process may hold places too; those past the cap are OTHER.
            assert!(queue.1 == format!("q{i}") || queue.1 == OTHER);
        }
        let [tenant, queue, job_type] = labels("cap-test", "one-too-many", "t");
        assert_eq!(
            (tenant.1.as_str(), queue.1.as_str(), job_type.1.as_str()),
            (OTHER, OTHER, OTHER)
        );
        let [_, queue, _] = labels("cap-test", "q0", "t");
        assert_eq!(queue.1, "q0", "a series seen before keeps its own labels");
    }
}
