//! Queue administration through `QueueService`: a queue's figures, its pause, and the global
//! limits on how many of its jobs run and how fast they start.
//!
//! A queue lives on the server (in PostgreSQL), so a pause or a limit set here holds on every
//! replica and for every worker at once; nothing is kept or enforced on this side. As for
//! enqueues, ranges are left to the server, which names the field at fault.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::Error;
use crate::client::Client;
use crate::job::{self, JobState};
use crate::proto::v1 as pb;

/// How fast a queue's jobs may start, over every replica: a token bucket refilled at
/// `per_second` tokens a second and holding at most `burst`, each job started taking one.
///
/// ```
/// let limit = jobwire::RateLimit::per_second(20.0).burst(5);
/// assert_eq!((limit.per_second, limit.burst), (20.0, 5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
#[must_use]
pub struct RateLimit {
    /// Jobs started per second (greater than 0, at most 100000).
    pub per_second: f64,
    /// How many jobs may start at once after a quiet spell (1 to 100000).
    pub burst: u32,
}

/// How a queue keeps up: the wait of its oldest available job against the queue's thresholds
/// ([`UpdateQueue::warn_after`], [`UpdateQueue::critical_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueHealth {
    /// No threshold is crossed, or none is set.
    Ok,
    /// The oldest available job has waited at least the warning threshold.
    Warning,
    /// The oldest available job has waited at least the critical threshold.
    Critical,
    /// The server did not say, or said something this SDK does not know.
    Unknown,
}

/// One second's worth of starts, as the server defaults it.
fn default_burst(per_second: f64) -> u32 {
    if per_second.is_finite() && per_second > 1.0 {
        per_second.ceil().min(f64::from(u32::MAX)) as u32
    } else {
        1
    }
}

impl RateLimit {
    /// A limit of `per_second` with the server's default burst: one second's worth
    /// (`ceil(per_second)`, at least 1), so starts that a busy dispatcher makes late are made
    /// up rather than lost. `burst(1)` spreads starts evenly instead.
    pub fn per_second(per_second: f64) -> Self {
        Self {
            per_second,
            burst: default_burst(per_second),
        }
    }

    /// Lets up to `burst` jobs start at once after a quiet spell.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    fn to_proto(self) -> pb::RateLimit {
        pb::RateLimit {
            per_second: self.per_second,
            burst: super::saturating_int32(self.burst),
        }
    }

    fn from_proto(limit: pb::RateLimit) -> Self {
        Self {
            per_second: limit.per_second,
            burst: job::count(limit.burst),
        }
    }
}

/// A snapshot of a queue: its settings, and its figures as the server read them when it
/// answered.
///
/// [`as_proto`](Self::as_proto) gives the whole message, including counts of states this SDK
/// does not know yet.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    queue: pb::Queue,
}

impl QueueInfo {
    pub(super) fn from_proto(queue: pb::Queue) -> Self {
        Self { queue }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.queue.name
    }

    /// Whether a pause holds the queue's jobs from starting.
    pub fn is_paused(&self) -> bool {
        self.queue.paused
    }

    /// When the queue was paused, while it is.
    pub fn paused_at(&self) -> Option<SystemTime> {
        job::system_time(self.queue.paused_at.as_ref())
    }

    /// Why the queue was paused, if it is and a reason was given.
    pub fn pause_reason(&self) -> Option<&str> {
        job::non_empty(&self.queue.pause_reason)
    }

    /// At most this many of the queue's jobs run at once, over every replica; `None` for no
    /// limit.
    pub fn concurrency_limit(&self) -> Option<u32> {
        self.queue.concurrency_limit.map(job::count)
    }

    /// How fast the queue's jobs may start; `None` for no limit.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.queue.rate_limit.map(RateLimit::from_proto)
    }

    /// How many of the queue's jobs are in `state` (0 when none are).
    pub fn count(&self, state: JobState) -> i64 {
        let state = state.to_proto() as i32;
        self.state_counts()
            .iter()
            .filter(|count| count.state == state)
            .map(|count| count.count)
            .sum()
    }

    /// The states that have jobs, with how many each has; states this SDK does not know are
    /// left out.
    pub fn counts(&self) -> impl Iterator<Item = (JobState, i64)> + '_ {
        self.state_counts().iter().filter_map(|count| {
            JobState::from_proto(count.state)
                .ok()
                .map(|state| (state, count.count))
        })
    }

    /// How long the oldest AVAILABLE job has waited to start; `None` when none is available.
    /// A growing age with idle workers points at a pause or a limit.
    pub fn oldest_available_age(&self) -> Option<Duration> {
        self.stats()
            .and_then(|stats| stats.oldest_available_age)
            .and_then(|age| Duration::try_from(age).ok())
    }

    /// Jobs AVAILABLE and waiting for a worker.
    pub fn backlog(&self) -> i64 {
        self.stats().map_or(0, |stats| stats.backlog)
    }

    /// The queue's health against its thresholds.
    pub fn health(&self) -> QueueHealth {
        match self.stats().map(|stats| stats.health()) {
            Some(pb::QueueHealth::Ok) => QueueHealth::Ok,
            Some(pb::QueueHealth::Warning) => QueueHealth::Warning,
            Some(pb::QueueHealth::Critical) => QueueHealth::Critical,
            Some(pb::QueueHealth::Unspecified) | None => QueueHealth::Unknown,
        }
    }

    /// The wait of the oldest available job at which the queue turns WARNING.
    pub fn warn_after(&self) -> Option<Duration> {
        self.queue
            .warn_after
            .and_then(|d| Duration::try_from(d).ok())
    }

    /// The wait of the oldest available job at which the queue turns CRITICAL.
    pub fn critical_after(&self) -> Option<Duration> {
        self.queue
            .critical_after
            .and_then(|d| Duration::try_from(d).ok())
    }

    /// How long the queue's finished jobs are kept; `None`: the server's default.
    pub fn retention(&self) -> Option<Duration> {
        self.queue
            .retention
            .and_then(|d| Duration::try_from(d).ok())
    }

    /// Jobs that finished (succeeded or failed) in the last 60 seconds.
    pub fn finished_last_minute(&self) -> i64 {
        self.stats().map_or(0, |stats| stats.finished_last_minute)
    }

    /// Jobs finished per second, averaged over the last minute.
    pub fn throughput_per_second(&self) -> f64 {
        self.stats()
            .map_or(0.0, |stats| stats.throughput_per_second)
    }

    /// When the queue was first used.
    pub fn created_at(&self) -> Option<SystemTime> {
        job::system_time(self.queue.created_at.as_ref())
    }

    /// When the queue's settings last changed.
    pub fn updated_at(&self) -> Option<SystemTime> {
        job::system_time(self.queue.updated_at.as_ref())
    }

    /// The whole message as the server sent it.
    pub fn as_proto(&self) -> &pb::Queue {
        &self.queue
    }

    /// The whole message as the server sent it.
    pub fn into_proto(self) -> pb::Queue {
        self.queue
    }

    fn stats(&self) -> Option<&pb::QueueStats> {
        self.queue.stats.as_ref()
    }

    fn state_counts(&self) -> &[pb::StateCount] {
        self.stats().map_or(&[], |stats| &stats.counts)
    }
}

/// A queue of the client's tenant, by name; nothing is checked until it is used.
#[derive(Debug, Clone)]
pub struct QueueRef {
    client: Client,
    name: String,
}

impl QueueRef {
    pub(super) fn new(client: Client, name: String) -> Self {
        Self { client, name }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue with its figures.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the queue was never used in this tenant.
    pub async fn get(&self) -> Result<QueueInfo, Error> {
        let request = pb::GetQueueRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .queues
            .clone()
            .get_queue(self.client.headers.request(request))
            .await?
            .into_inner();
        queue_info(response.queue)
    }

    /// Stops the queue's jobs from starting, on every replica, until [`resume`](Self::resume).
    /// Running jobs carry on, and new jobs are still accepted and wait. Returns the queue
    /// after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the queue was never used, [`Error::BadRequest`] when
    /// `reason` is longer than 1024 characters.
    pub async fn pause(&self, reason: impl Into<String>) -> Result<QueueInfo, Error> {
        let request = pb::PauseQueueRequest {
            name: self.name.clone(),
            reason: reason.into(),
        };
        let response = self
            .client
            .queues
            .clone()
            .pause_queue(self.client.headers.request(request))
            .await?
            .into_inner();
        queue_info(response.queue)
    }

    /// Lets the queue's jobs start again. Returns the queue after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the queue was never used.
    pub async fn resume(&self) -> Result<QueueInfo, Error> {
        let request = pb::ResumeQueueRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .queues
            .clone()
            .resume_queue(self.client.headers.request(request))
            .await?
            .into_inner();
        queue_info(response.queue)
    }

    /// Starts a change of the queue's limits; set the ones to change on the builder, then await
    /// it (or call [`UpdateQueue::send`]).
    pub fn update(&self) -> UpdateQueue {
        UpdateQueue::new(self.client.clone(), self.name.clone())
    }
}

/// A change of a queue's limits about to be sent; await it (or call [`send`](Self::send)).
///
/// Only the limits set on the builder change: each setter names its field in the request's
/// update mask, so a limit set concurrently by someone else survives an update of the other.
///
/// ```no_run
/// # async fn demo(client: jobwire::Client) -> Result<(), jobwire::Error> {
/// use jobwire::RateLimit;
/// let queue = client
///     .queue("emails")
///     .update()
///     .concurrency_limit(Some(20))
///     .rate_limit(Some(RateLimit::per_second(50.0).burst(10)))
///     .create_if_missing()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "an update does nothing until it is awaited or sent"]
pub struct UpdateQueue {
    client: Client,
    queue: pb::Queue,
    update_mask: prost_types::FieldMask,
    allow_missing: bool,
}

impl UpdateQueue {
    fn new(client: Client, name: String) -> Self {
        Self {
            client,
            queue: pb::Queue {
                name,
                ..Default::default()
            },
            update_mask: prost_types::FieldMask::default(),
            allow_missing: false,
        }
    }

    /// At most `limit` of the queue's jobs run at once, over every replica and worker (1 to
    /// 1000000); `None` removes the limit.
    pub fn concurrency_limit(mut self, limit: Option<u32>) -> Self {
        self.queue.concurrency_limit = limit.map(super::saturating_int32);
        super::mask_path(&mut self.update_mask, "concurrency_limit");
        self
    }

    /// How fast the queue's jobs may start; `None` removes the limit.
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.queue.rate_limit = limit.map(RateLimit::to_proto);
        super::mask_path(&mut self.update_mask, "rate_limit");
        self
    }

    /// The queue's health turns WARNING once its oldest available job has waited this long
    /// (1 second to 365 days); `None` removes the threshold.
    pub fn warn_after(mut self, wait: Option<Duration>) -> Self {
        self.queue.warn_after = wait.map(proto_duration);
        super::mask_path(&mut self.update_mask, "warn_after");
        self
    }

    /// The queue's health turns CRITICAL once its oldest available job has waited this long
    /// (1 second to 365 days); `None` removes the threshold.
    pub fn critical_after(mut self, wait: Option<Duration>) -> Self {
        self.queue.critical_after = wait.map(proto_duration);
        super::mask_path(&mut self.update_mask, "critical_after");
        self
    }

    /// The queue's finished jobs are pruned this long after they finish (1 second to 3650
    /// days), with their attempts, and their idempotency keys released; `None` leaves it to the
    /// server's default (30 days unless the server sets another).
    pub fn retention(mut self, kept: Option<Duration>) -> Self {
        self.queue.retention = kept.map(proto_duration);
        super::mask_path(&mut self.update_mask, "retention");
        self
    }

    /// Creates the queue if it was never used, so that its limits hold from its first job.
    pub fn create_if_missing(mut self) -> Self {
        self.allow_missing = true;
        self
    }

    /// Applies the change and returns the queue after it.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the queue was never used and
    /// [`create_if_missing`](Self::create_if_missing) was not set, [`Error::BadRequest`]
    /// (naming the field) when a limit is out of range or no limit was set.
    pub async fn send(self) -> Result<QueueInfo, Error> {
        let request = self.client.headers.request(self.to_request());
        let response = self
            .client
            .queues
            .clone()
            .update_queue(request)
            .await?
            .into_inner();
        queue_info(response.queue)
    }

    /// The request as it goes on the wire, apart from the tenant header.
    fn to_request(&self) -> pb::UpdateQueueRequest {
        pb::UpdateQueueRequest {
            queue: Some(self.queue.clone()),
            update_mask: Some(self.update_mask.clone()),
            allow_missing: self.allow_missing,
        }
    }
}

impl IntoFuture for UpdateQueue {
    type Output = Result<QueueInfo, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// The queue every single-queue response carries.
/// A wait as the proto carries it; one too long for it saturates (the server refuses it).
fn proto_duration(wait: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
    }
}

fn queue_info(queue: Option<pb::Queue>) -> Result<QueueInfo, Error> {
    queue
        .map(QueueInfo::from_proto)
        .ok_or_else(|| Error::Protocol("the response has no queue".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client whose channel never connects: the builders only need one to exist.
    fn client() -> Client {
        Client::from_channel(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        )
    }

    #[tokio::test]
    async fn an_update_names_only_the_limits_it_sets() {
        let queue = client().queue("emails");

        let request = queue.update().concurrency_limit(Some(20)).to_request();
        let mask = request.update_mask.expect("mask");
        assert_eq!(mask.paths, ["concurrency_limit"]);
        let sent = request.queue.expect("queue");
        assert_eq!(sent.name, "emails");
        assert_eq!(sent.concurrency_limit, Some(20));
        assert!(!request.allow_missing);

        let request = queue
            .update()
            .rate_limit(Some(RateLimit::per_second(2.5).burst(4)))
            .rate_limit(None)
            .concurrency_limit(None)
            .create_if_missing()
            .to_request();
        let mask = request.update_mask.expect("mask");
        assert_eq!(mask.paths, ["rate_limit", "concurrency_limit"]);
        let sent = request.queue.expect("queue");
        assert_eq!((sent.concurrency_limit, sent.rate_limit), (None, None));
        assert!(request.allow_missing);
    }

    #[test]
    fn rate_limits_round_trip_and_saturate() {
        let limit = RateLimit::per_second(2.5).burst(4);
        assert_eq!(RateLimit::from_proto(limit.to_proto()), limit);
        assert_eq!(RateLimit::per_second(1.0).burst, 1);
        assert_eq!(RateLimit::per_second(20.0).burst, 20);
        assert_eq!(RateLimit::per_second(2.5).burst, 3);
        assert_eq!(
            RateLimit::per_second(1.0).burst(u32::MAX).to_proto().burst,
            i32::MAX
        );
    }

    #[test]
    fn queue_info_reads_figures_and_maps_unset_to_none() {
        let info = QueueInfo::from_proto(pb::Queue {
            name: "emails".into(),
            paused: true,
            pause_reason: "maintenance".into(),
            concurrency_limit: Some(8),
            stats: Some(pb::QueueStats {
                counts: vec![
                    pb::StateCount {
                        state: pb::JobState::Available as i32,
                        count: 12,
                    },
                    pb::StateCount {
                        state: pb::JobState::Running as i32,
                        count: 3,
                    },
                    pb::StateCount {
                        state: 99,
                        count: 1,
                    },
                ],
                oldest_available_age: Some(prost_types::Duration {
                    seconds: 4,
                    nanos: 0,
                }),
                finished_last_minute: 120,
                throughput_per_second: 2.0,
                backlog: 12,
                health: pb::QueueHealth::Warning as i32,
            }),
            ..Default::default()
        });
        assert_eq!(info.name(), "emails");
        assert!(info.is_paused());
        assert_eq!(info.pause_reason(), Some("maintenance"));
        assert_eq!(info.concurrency_limit(), Some(8));
        assert_eq!((info.backlog(), info.health()), (12, QueueHealth::Warning));
        assert_eq!(info.rate_limit(), None);
        assert_eq!(info.count(JobState::Available), 12);
        assert_eq!(info.count(JobState::Failed), 0);
        assert_eq!(
            info.counts().collect::<Vec<_>>(),
            [(JobState::Available, 12), (JobState::Running, 3)]
        );
        assert_eq!(info.oldest_available_age(), Some(Duration::from_secs(4)));
        assert_eq!(info.finished_last_minute(), 120);
        assert_eq!(info.throughput_per_second(), 2.0);

        let bare = QueueInfo::from_proto(pb::Queue::default());
        assert_eq!(bare.pause_reason(), None);
        assert_eq!(bare.paused_at(), None);
        assert_eq!(bare.count(JobState::Available), 0);
        assert_eq!(bare.counts().count(), 0);
        assert_eq!(bare.oldest_available_age(), None);
        assert_eq!(bare.finished_last_minute(), 0);
    }
}
