//! Event streams that survive the connection: `WatchJob` and `WatchJobs`, reopened from the last
//! sequence seen whenever they break.
//!
//! The server promises that a watch resumed after sequence N delivers every later event, in
//! order, once (invariant 5 of docs/architecture.md). [`JobEvents`] keeps that promise across
//! reconnects by remembering the sequence of the last event it took (yielded, or skipped as
//! unreadable) and reopening after it; it also drops any event at or below it, so a server that
//! repeats itself cannot make the consumer see an event twice.
//!
//! Reconnects wait 50 ms, doubling to 2 s (jittered, so that the watchers of a restarted server
//! do not all return at once). A stream gives up, yielding one error and then
//! ending, when the server answers `NotFound`, `InvalidArgument`, `PermissionDenied` or
//! `Unimplemented` (retrying cannot change those), or when it has failed without a break for
//! longer than its outage limit (60 s unless set with [`JobEvents::give_up_after`]). A watcher
//! the server disconnects for being slow (`ResourceExhausted`) simply resumes.
//!
//! A job's stream ends after the job's terminal state change. A stream the server ends cleanly
//! is reopened, at once when it brought events and after a delay when it did not; in the latter
//! case a job's stream first reads the job, so that a job which finished out of the stream's
//! reach (a resume point past its last event) ends the stream instead of reopening it forever.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::time::Instant;

use crate::Error;
use crate::backoff::Backoff;
use crate::client::Client;
use crate::event::JobEvent;
use crate::job::{JobId, JobInfo, JobState};
use crate::proto::v1 as pb;

/// The first delay before reopening a broken stream.
const REOPEN_MIN: Duration = Duration::from_millis(50);
/// The longest delay before reopening.
const REOPEN_MAX: Duration = Duration::from_secs(2);
/// The share of each reopen delay drawn at random.
const REOPEN_JITTER: f64 = 0.5;
/// How long a stream keeps failing before it gives up, unless set otherwise.
const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// A live stream of job events that reconnects by itself and resumes where it left off, so
/// every event arrives exactly once and in order.
///
/// Made by [`JobHandle::watch`](crate::JobHandle::watch) (one job's events, ending after its
/// terminal state change) or [`WatchJobs::stream`] (every matching job's events, never ending
/// by itself). Nothing is sent until it is first polled.
///
/// An `Err` item means the stream gave up (see [`give_up_after`](Self::give_up_after)); it
/// ends after it. Resume later with [`last_sequence`](Self::last_sequence).
///
/// ```no_run
/// # async fn demo<J: jobwire::JobType>(handle: jobwire::JobHandle<J>) -> Result<(), jobwire::Error> {
/// use futures::StreamExt;
/// use jobwire::JobEventKind;
///
/// let mut events = handle.watch();
/// while let Some(event) = events.next().await {
///     match event?.kind() {
///         JobEventKind::Progress(progress) => println!("{:?}", progress.fraction()),
///         JobEventKind::StateChanged { state, .. } => println!("now {state}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct JobEvents {
    state: State,
    /// The sequence of the last event taken, kept here too so it can be read mid-poll.
    last_sequence: i64,
}

/// What one poll of a watcher yields: the next item, and the watcher back.
type Polled = (Box<Watcher>, Option<Result<JobEvent, Error>>);

enum State {
    /// Between polls: the watcher is here.
    Idle(Box<Watcher>),
    /// A poll is under way: the watcher is inside the future and comes back with its item.
    Polling(BoxFuture<'static, Polled>),
    Done,
}

impl JobEvents {
    fn new(source: Source, after_sequence: i64) -> Self {
        Self {
            state: State::Idle(Box::new(Watcher::new(source, after_sequence))),
            last_sequence: after_sequence,
        }
    }

    /// How long the stream may keep failing (the server unreachable, or answering with
    /// retryable errors) before it gives up with the last error. Default 60 s;
    /// [`Duration::MAX`] never gives up. Set it before the first poll: it has no effect on a
    /// poll under way.
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        if let State::Idle(watcher) = &mut self.state {
            watcher.give_up_after = limit;
        }
        self
    }

    /// The sequence of the last event taken from the server (0 before any): resume after it to
    /// continue where this stream left off.
    pub fn last_sequence(&self) -> i64 {
        self.last_sequence
    }
}

impl Stream for JobEvents {
    type Item = Result<JobEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Idle(mut watcher) => {
                    self.state = State::Polling(Box::pin(async move {
                        let item = watcher.next().await;
                        (watcher, item)
                    }));
                }
                State::Polling(mut next) => match next.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.state = State::Polling(next);
                        return Poll::Pending;
                    }
                    Poll::Ready((watcher, item)) => {
                        self.last_sequence = watcher.after;
                        if item.is_some() {
                            self.state = State::Idle(watcher);
                        }
                        return Poll::Ready(item);
                    }
                },
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

impl fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Idle(_) => "idle",
            State::Polling(_) => "polling",
            State::Done => "done",
        };
        f.debug_struct("JobEvents")
            .field("state", &state)
            .field("last_sequence", &self.last_sequence)
            .finish()
    }
}

/// A `WatchJobs` stream about to be opened: set filters, then call [`stream`](Self::stream).
///
/// ```no_run
/// # async fn demo(client: jobwire::Client) -> Result<(), jobwire::Error> {
/// use futures::StreamExt;
/// use jobwire::JobState;
///
/// let mut failures = client
///     .watch_jobs()
///     .queue("emails")
///     .state(JobState::Failed)
///     .state(JobState::Cancelled)
///     .stream();
/// while let Some(event) = failures.next().await {
///     let event = event?;
///     println!("{} {:?}", event.job_id(), event.state());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a watch does nothing until streamed"]
pub struct WatchJobs {
    client: Client,
    request: pb::WatchJobsRequest,
}

impl WatchJobs {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            request: pb::WatchJobsRequest::default(),
        }
    }

    /// Only jobs of this queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.request.queue = queue.into();
        self
    }

    /// Only jobs of this type.
    pub fn job_type(mut self, job_type: impl Into<String>) -> Self {
        self.request.job_type = job_type.into();
        self
    }

    /// Only state changes into this state; may be repeated to accept several. Once set, other
    /// kinds of events (progress, logs, stop requests) are left out.
    pub fn state(mut self, state: JobState) -> Self {
        self.request.states.push(state.to_proto() as i32);
        self
    }

    /// Only jobs carrying this label; may be repeated, and a job must carry every one.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.labels.insert(key.into(), value.into());
        self
    }

    /// Only events after this sequence, such as the [`last_sequence`](JobEvents::last_sequence)
    /// of an earlier stream. Default 0: from the start of the server's retained history.
    pub fn after_sequence(mut self, sequence: i64) -> Self {
        self.request.after_sequence = sequence;
        self
    }

    /// The stream of matching events; it never ends by itself (see [`JobEvents`] for when it
    /// gives up).
    pub fn stream(self) -> JobEvents {
        let after = self.request.after_sequence;
        JobEvents::new(
            Source::Filter {
                client: self.client,
                request: self.request,
            },
            after,
        )
    }
}

/// The stream of one job's events after `after_sequence`.
pub(super) fn job_events(client: Client, id: JobId, after_sequence: i64) -> JobEvents {
    JobEvents::new(
        Source::Job {
            client,
            id,
            include_children: false,
        },
        after_sequence,
    )
}

/// The stream of one job's events and its children's after `after_sequence`.
pub(super) fn family_events(client: Client, id: JobId, after_sequence: i64) -> JobEvents {
    JobEvents::new(
        Source::Job {
            client,
            id,
            include_children: true,
        },
        after_sequence,
    )
}

/// What a watcher (re)opens.
enum Source {
    /// One job (and its children, when asked): `WatchJob`, which ends after the job's terminal
    /// state change.
    Job {
        client: Client,
        id: JobId,
        include_children: bool,
    },
    /// A filter: `WatchJobs`, which never ends.
    Filter {
        client: Client,
        request: pb::WatchJobsRequest,
    },
}

/// One opened stream, of either RPC, as the events it carries.
type Opened = BoxStream<'static, Result<Option<pb::JobEvent>, tonic::Status>>;

impl Source {
    async fn open(&self, after_sequence: i64) -> Result<Opened, tonic::Status> {
        match self {
            Self::Job {
                client,
                id,
                include_children,
            } => {
                let request = pb::WatchJobRequest {
                    id: id.as_str().to_owned(),
                    after_sequence,
                    include_children: *include_children,
                };
                let stream = client
                    .jobs
                    .clone()
                    .watch_job(client.headers.request(request))
                    .await?
                    .into_inner();
                Ok(stream.map(|response| response.map(|r| r.event)).boxed())
            }
            Self::Filter { client, request } => {
                let request = pb::WatchJobsRequest {
                    after_sequence,
                    ..request.clone()
                };
                let stream = client
                    .jobs
                    .clone()
                    .watch_jobs(client.headers.request(request))
                    .await?
                    .into_inner();
                Ok(stream.map(|response| response.map(|r| r.event)).boxed())
            }
        }
    }

    /// Whether the stream ends after this event: the watched job's own terminal state change
    /// (a child's does not end it).
    fn ends_with(&self, event: &JobEvent) -> bool {
        match self {
            Self::Job { id, .. } => event.job_id() == id && event.is_terminal(),
            Self::Filter { .. } => false,
        }
    }

    /// Whether the watched job has finished, read directly; `false` for a filter.
    async fn job_finished(&self) -> Result<bool, tonic::Status> {
        match self {
            Self::Job { client, id, .. } => {
                let response = client.fetch_raw(id.as_str(), pb::JobView::Basic).await?;
                Ok(response
                    .job
                    .and_then(|job| JobInfo::from_proto(job).ok())
                    .is_some_and(|job| job.state().is_terminal()))
            }
            Self::Filter { .. } => Ok(false),
        }
    }
}

/// Whether an error status is worth retrying: any but those the same request would get again.
fn is_fatal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unimplemented
    )
}

/// How long the server has been failing without a break, against the limit.
#[derive(Debug)]
struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// Records a failure at `now`; true when failures have lasted longer than `limit`.
    fn failed(&mut self, now: Instant, limit: Duration) -> bool {
        let since = *self.since.get_or_insert(now);
        now.saturating_duration_since(since) > limit
    }

    /// The server answered: the outage is over.
    fn ended(&mut self) {
        self.since = None;
    }
}

/// The state of one reconnecting watch; one event per call of [`next`](Self::next).
struct Watcher {
    source: Source,
    /// The sequence of the last event taken; the stream reopens after it.
    after: i64,
    stream: Option<Opened>,
    /// Whether the open stream brought any event.
    fruitful: bool,
    /// Wait this long before the next open.
    delay: Option<Duration>,
    backoff: Backoff,
    outage: Outage,
    give_up_after: Duration,
    finished: bool,
}

impl Watcher {
    fn new(source: Source, after_sequence: i64) -> Self {
        Self {
            source,
            after: after_sequence,
            stream: None,
            fruitful: false,
            delay: None,
            backoff: Backoff::new(REOPEN_MIN, REOPEN_MAX).with_jitter(REOPEN_JITTER),
            outage: Outage { since: None },
            give_up_after: DEFAULT_GIVE_UP_AFTER,
            finished: false,
        }
    }

    /// The next event; `None` once the stream ended.
    async fn next(&mut self) -> Option<Result<JobEvent, Error>> {
        loop {
            if self.finished {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Some(delay) = self.delay.take() {
                    tokio::time::sleep(delay).await;
                }
                match self.source.open(self.after).await {
                    Ok(stream) => {
                        self.outage.ended();
                        self.stream = Some(stream);
                        self.fruitful = false;
                    }
                    Err(status) => {
                        if let Some(error) = self.failed(status) {
                            return Some(Err(error));
                        }
                    }
                }
                continue;
            };
            match stream.next().await {
                Some(Ok(Some(event))) => {
                    self.backoff.reset();
                    self.fruitful = true;
                    if let Some(event) = self.take(event) {
                        return Some(Ok(event));
                    }
                }
                Some(Ok(None)) => tracing::debug!("ignoring a watch response without an event"),
                Some(Err(status)) => {
                    self.stream = None;
                    if let Some(error) = self.failed(status) {
                        return Some(Err(error));
                    }
                }
                None => {
                    self.stream = None;
                    if let Some(error) = self.closed().await {
                        return Some(Err(error));
                    }
                }
            }
        }
    }

    /// Takes an event: advances the resume point, and converts it unless it is one already
    /// seen or one this SDK cannot read.
    fn take(&mut self, event: pb::JobEvent) -> Option<JobEvent> {
        if event.sequence <= self.after {
            tracing::debug!(
                sequence = event.sequence,
                after = self.after,
                "ignoring an event already seen"
            );
            return None;
        }
        self.after = event.sequence;
        let sequence = event.sequence;
        let Some(event) = JobEvent::from_proto(event) else {
            tracing::warn!(sequence, "skipping an event this SDK cannot read");
            return None;
        };
        if self.source.ends_with(&event) {
            self.finished = true;
            self.stream = None;
        }
        Some(event)
    }

    /// Handles a failed open or a broken stream: the error to end with, or `None` to reopen
    /// after a delay.
    fn failed(&mut self, status: tonic::Status) -> Option<Error> {
        let code = status.code();
        if is_fatal(code) || self.outage.failed(Instant::now(), self.give_up_after) {
            self.finished = true;
            return Some(status.into());
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(?code, message = status.message(), retry_in = ?delay, "watch interrupted; resuming");
        self.delay = Some(delay);
        None
    }

    /// Handles a stream the server ended without a terminal event: one that brought events
    /// reopens at once; one that brought nothing reopens after a delay, unless its job turns
    /// out to have finished.
    async fn closed(&mut self) -> Option<Error> {
        if self.fruitful {
            return None;
        }
        match self.source.job_finished().await {
            Ok(true) => {
                tracing::debug!(
                    after = self.after,
                    "the job finished before the resume point"
                );
                self.finished = true;
                None
            }
            Ok(false) => {
                self.delay = Some(self.backoff.next_delay());
                None
            }
            Err(status) => self.failed(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_a_retry_cannot_change_are_fatal() {
        for code in [
            tonic::Code::NotFound,
            tonic::Code::InvalidArgument,
            tonic::Code::PermissionDenied,
            tonic::Code::Unimplemented,
        ] {
            assert!(is_fatal(code), "{code:?}");
        }
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::ResourceExhausted,
            tonic::Code::Internal,
            tonic::Code::Cancelled,
            tonic::Code::DeadlineExceeded,
        ] {
            assert!(!is_fatal(code), "{code:?}");
        }
    }

    #[test]
    fn an_outage_gives_up_only_after_its_limit() {
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        let mut outage = Outage { since: None };
        assert!(!outage.failed(start, limit));
        assert!(!outage.failed(start + limit, limit));
        assert!(outage.failed(start + limit + Duration::from_millis(1), limit));
        outage.ended();
        assert!(!outage.failed(start + limit * 2, limit));
        assert!(!Outage { since: Some(start) }.failed(start + limit * 100, Duration::MAX));
    }

    fn watcher(source_is_job: bool, after: i64) -> Watcher {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = Client::from_channel(channel);
        let source = if source_is_job {
            Source::Job {
                client,
                id: JobId::from("j1"),
                include_children: false,
            }
        } else {
            Source::Filter {
                client,
                request: pb::WatchJobsRequest::default(),
            }
        };
        Watcher::new(source, after)
    }

    fn event(sequence: i64, state: pb::JobState) -> pb::JobEvent {
        pb::JobEvent {
            sequence,
            job_id: "j1".into(),
            event: Some(pb::job_event::Event::StateChanged(pb::StateChanged {
                state: state as i32,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_at_or_before_the_resume_point_are_dropped() {
        let mut watcher = watcher(true, 10);
        assert!(watcher.take(event(9, pb::JobState::Running)).is_none());
        assert!(watcher.take(event(10, pb::JobState::Running)).is_none());
        let taken = watcher.take(event(11, pb::JobState::Running));
        assert_eq!(taken.map(|e| e.sequence()), Some(11));
        assert!(watcher.take(event(11, pb::JobState::Running)).is_none());
        assert_eq!(watcher.after, 11);
    }

    #[tokio::test]
    async fn unreadable_events_still_move_the_resume_point() {
        let mut watcher = watcher(true, 0);
        let mut unknown = event(5, pb::JobState::Running);
        unknown.event = None;
        assert!(watcher.take(unknown).is_none());
        assert_eq!(watcher.after, 5);
    }

    #[tokio::test]
    async fn a_jobs_stream_ends_after_its_terminal_change_and_a_filters_does_not() {
        let mut job = watcher(true, 0);
        job.take(event(1, pb::JobState::Running));
        assert!(!job.finished);
        job.take(event(2, pb::JobState::Succeeded));
        assert!(job.finished);
        assert!(job.next().await.is_none());

        let mut filter = watcher(false, 0);
        filter.take(event(2, pb::JobState::Succeeded));
        assert!(!filter.finished);
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_back_off_and_fatal_ones_end_the_stream() {
        let mut watcher = watcher(false, 0);
        assert!(watcher.failed(tonic::Status::unavailable("down")).is_none());
        assert!(watcher.delay.is_some_and(|d| d <= REOPEN_MIN));
        assert!(
            watcher
                .failed(tonic::Status::resource_exhausted("too slow"))
                .is_none()
        );
        assert!(
            watcher
                .delay
                .is_some_and(|d| d <= REOPEN_MIN * 2 && d >= REOPEN_MIN)
        );
        let error = watcher
            .failed(tonic::Status::permission_denied("no"))
            .expect("fatal");
        assert_eq!(error.code(), Some(tonic::Code::PermissionDenied));
        assert!(watcher.finished);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_outage_ends_the_stream_with_its_last_error() {
        let mut watcher = watcher(false, 0);
        watcher.give_up_after = Duration::from_secs(5);
        assert!(watcher.failed(tonic::Status::unavailable("down")).is_none());
        tokio::time::advance(Duration::from_secs(6)).await;
        let error = watcher
            .failed(tonic::Status::unavailable("still down"))
            .expect("gave up");
        assert_eq!(error.code(), Some(tonic::Code::Unavailable));
    }

    #[tokio::test]
    async fn the_outage_limit_is_set_before_polling() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let events = Client::from_channel(channel)
            .watch_jobs()
            .after_sequence(7)
            .stream()
            .give_up_after(Duration::from_secs(1));
        assert_eq!(events.last_sequence(), 7);
        let State::Idle(watcher) = &events.state else {
            panic!("not polled yet");
        };
        assert_eq!(watcher.give_up_after, Duration::from_secs(1));
    }
}
