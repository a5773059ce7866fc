//! The typed vocabulary that producers and workers share: what a job type is, how jobs are
//! named, which states they pass through, how they are retried, and what a snapshot of one
//! looks like.
//!
//! Protocol values are mapped to these types in one place (here), so the rest of the SDK never
//! compares raw enum numbers or empty strings.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use prost_types::Any;

use crate::Error;
use crate::proto::v1 as pb;
use crate::report::ProgressInfo;

/// Ties a payload message to a job type name and to the message its handler returns.
///
/// The payload travels as a `google.protobuf.Any` built from the message's [`prost::Name`], so
/// producers and workers in any language agree on it by type URL. Use `()` as the output
/// (`google.protobuf.Empty`) for jobs whose only result is that they finished.
///
/// ```
/// #[derive(Clone, PartialEq, prost::Message)]
/// struct Fetch {
///     #[prost(string, tag = "1")]
///     url: String,
/// }
///
/// impl prost::Name for Fetch {
///     const NAME: &'static str = "Fetch";
///     const PACKAGE: &'static str = "download.v1";
/// }
///
/// impl jobwire::JobType for Fetch {
///     const JOB_TYPE: &'static str = "download.fetch";
///     type Output = ();
/// }
/// ```
pub trait JobType: prost::Message + prost::Name + Default + Send + Sync + 'static {
    /// The job type's name on the wire, such as `download.fetch`: letters, digits, `.`, `_`,
    /// `-` and `:`, at most 128 characters. Workers subscribe to these names.
    ///
    /// Not called `NAME`, which `prost::Name` already uses for the message's protobuf name.
    const JOB_TYPE: &'static str;

    /// The message a successful attempt returns.
    type Output: prost::Message + prost::Name + Default + Send + Sync + 'static;
}

/// A job's id: a UUID chosen by the server.
///
/// A newtype rather than a bare `String` so that an id cannot be mixed up with a queue or job
/// type name. It is not parsed: the server is the judge of what a valid id is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for JobId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for JobId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Where a job is in its lifecycle; see the state diagram in the protocol's `JobState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for an operator to approve or reject it.
    AwaitingApproval,
    /// Waiting for its dependencies or children to finish.
    Pending,
    /// Waiting for its run-at time.
    Scheduled,
    /// Ready to be leased by a worker.
    Available,
    /// Leased by a worker.
    Running,
    /// Failed an attempt and waits out its backoff before the next one.
    Retrying,
    /// Held until resumed.
    Paused,
    /// Finished with a result.
    Succeeded,
    /// Finished without a result: attempts exhausted or a non-retryable failure.
    Failed,
    /// Stopped by a cancel; never starts again.
    Cancelled,
}

impl JobState {
    /// Whether the job has finished for good (until an explicit retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The state as the protocol numbers it.
    pub fn to_proto(self) -> pb::JobState {
        match self {
            Self::AwaitingApproval => pb::JobState::AwaitingApproval,
            Self::Pending => pb::JobState::Pending,
            Self::Scheduled => pb::JobState::Scheduled,
            Self::Available => pb::JobState::Available,
            Self::Running => pb::JobState::Running,
            Self::Retrying => pb::JobState::Retrying,
            Self::Paused => pb::JobState::Paused,
            Self::Succeeded => pb::JobState::Succeeded,
            Self::Failed => pb::JobState::Failed,
            Self::Cancelled => pb::JobState::Cancelled,
        }
    }

    /// The state for a protocol number; unspecified or unknown numbers are a protocol error
    /// because the server always sets a state.
    pub(crate) fn from_proto(value: i32) -> Result<Self, Error> {
        match pb::JobState::try_from(value) {
            Ok(pb::JobState::AwaitingApproval) => Ok(Self::AwaitingApproval),
            Ok(pb::JobState::Pending) => Ok(Self::Pending),
            Ok(pb::JobState::Scheduled) => Ok(Self::Scheduled),
            Ok(pb::JobState::Available) => Ok(Self::Available),
            Ok(pb::JobState::Running) => Ok(Self::Running),
            Ok(pb::JobState::Retrying) => Ok(Self::Retrying),
            Ok(pb::JobState::Paused) => Ok(Self::Paused),
            Ok(pb::JobState::Succeeded) => Ok(Self::Succeeded),
            Ok(pb::JobState::Failed) => Ok(Self::Failed),
            Ok(pb::JobState::Cancelled) => Ok(Self::Cancelled),
            Ok(pb::JobState::Unspecified) | Err(_) => {
                Err(Error::Protocol(format!("unknown job state {value}")))
            }
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.to_proto().as_str_name();
        f.write_str(name.strip_prefix("JOB_STATE_").unwrap_or(name))
    }
}

/// How a job's failed attempts are retried. Unset settings take the server's defaults (3
/// attempts, 5 s initial backoff doubling up to 1 h, 10 % jitter); the server checks the
/// ranges.
///
/// ```
/// use std::time::Duration;
/// let policy = jobwire::RetryPolicy::new()
///     .max_attempts(5)
///     .initial_backoff(Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[must_use]
pub struct RetryPolicy {
    max_attempts: Option<u32>,
    initial_backoff: Option<Duration>,
    max_backoff: Option<Duration>,
    backoff_multiplier: Option<f64>,
    jitter: Option<f64>,
}

impl RetryPolicy {
    /// A policy that leaves every setting to the server's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// A policy with a single attempt: the job fails on its first failure.
    pub fn no_retries() -> Self {
        Self::new().max_attempts(1)
    }

    /// Attempts in all, the first included (1 to 1000).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// The delay before the second attempt.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = Some(delay);
        self
    }

    /// The upper bound of any delay.
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = Some(delay);
        self
    }

    /// The growth of the delay per attempt (1.0 to 10.0).
    pub fn backoff_multiplier(mut self, multiplier: f64) -> Self {
        self.backoff_multiplier = Some(multiplier);
        self
    }

    /// The fraction of each delay drawn at random and added or removed (0.0 to 1.0).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = Some(fraction);
        self
    }

    pub(crate) fn to_proto(self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            // Saturating keeps an absurd value absurd, so the server names the field.
            max_attempts: self
                .max_attempts
                .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            initial_backoff: self.initial_backoff.map(duration_to_proto),
            max_backoff: self.max_backoff.map(duration_to_proto),
            backoff_multiplier: self.backoff_multiplier,
            jitter: self.jitter,
        }
    }
}

/// Why one attempt of a job failed, as the worker reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    message: String,
    kind: Option<String>,
    retryable: bool,
    attempt: u32,
    occurred_at: Option<SystemTime>,
}

impl JobError {
    pub(crate) fn from_proto(error: &pb::JobError) -> Self {
        Self {
            message: error.message.clone(),
            kind: non_empty(&error.kind).map(str::to_owned),
            retryable: error.retryable,
            attempt: count(error.attempt),
            occurred_at: system_time(error.occurred_at.as_ref()),
        }
    }

    /// The worker's description of the failure.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The class of failure the worker named, if any.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// False when the failure was declared non-retryable.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The attempt that failed (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the failure was recorded.
    pub fn occurred_at(&self) -> Option<SystemTime> {
        self.occurred_at
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(kind) = &self.kind {
            write!(f, "{kind}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// A snapshot of a job as the server stored it when asked.
///
/// The common fields have typed accessors; [`as_proto`](Self::as_proto) gives the whole
/// message (attempt history, retry policy in force, lease details).
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    id: JobId,
    state: JobState,
    last_error: Option<JobError>,
    progress: Option<ProgressInfo>,
    job: pb::Job,
}

impl JobInfo {
    /// Checks what the typed accessors rely on: the job's state must be a known one.
    pub(crate) fn from_proto(job: pb::Job) -> Result<Self, Error> {
        Ok(Self {
            id: JobId(job.id.clone()),
            state: JobState::from_proto(job.state)?,
            last_error: job.last_error.as_ref().map(JobError::from_proto),
            progress: job.progress.clone().map(ProgressInfo::from_proto),
            job,
        })
    }

    /// The job's id.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// The job's state when the snapshot was taken.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// The tenant that owns the job.
    pub fn tenant(&self) -> &str {
        &self.job.tenant
    }

    /// The queue the job is in.
    pub fn queue(&self) -> &str {
        &self.job.queue
    }

    /// The job type's name.
    pub fn job_type(&self) -> &str {
        &self.job.job_type
    }

    /// 0 to 100, higher first.
    pub fn priority(&self) -> i32 {
        self.job.priority
    }

    /// Attempts started so far (0 before the first).
    pub fn attempt(&self) -> u32 {
        count(self.job.attempt)
    }

    /// Attempts in all under the retry policy in force, when the server reported it.
    pub fn max_attempts(&self) -> Option<u32> {
        self.job
            .retry_policy
            .and_then(|policy| policy.max_attempts)
            .map(count)
    }

    /// Attempts that count against the retry policy's `max_attempts`: paused attempts do not.
    pub fn attempts_counted(&self) -> u32 {
        count(self.job.attempts_counted)
    }

    /// The most recent failure, if any.
    pub fn last_error(&self) -> Option<&JobError> {
        self.last_error.as_ref()
    }

    /// The latest progress of the current (or last) attempt, if its handler reported any.
    pub fn progress(&self) -> Option<&ProgressInfo> {
        self.progress.as_ref()
    }

    /// How long one attempt may run before it is stopped and counted as failed; `None` for
    /// no limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.job
            .timeout
            .and_then(|timeout| Duration::try_from(timeout).ok())
    }

    /// Whether a checkpoint is stored, which the next attempt receives.
    pub fn has_checkpoint(&self) -> bool {
        self.job.has_checkpoint
    }

    /// When a cancel of the running job was requested, while its worker has not stopped yet.
    pub fn cancel_requested_at(&self) -> Option<SystemTime> {
        system_time(self.job.cancel_requested_at.as_ref())
    }

    /// When a pause of the running job was requested, while its worker has not stopped yet.
    pub fn pause_requested_at(&self) -> Option<SystemTime> {
        system_time(self.job.pause_requested_at.as_ref())
    }

    /// Why the job was cancelled, if it was and a reason was given.
    pub fn cancel_reason(&self) -> Option<&str> {
        non_empty(&self.job.cancel_reason)
    }

    /// The key the job was enqueued with, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        non_empty(&self.job.idempotency_key)
    }

    /// The job's labels.
    pub fn labels(&self) -> &HashMap<String, String> {
        &self.job.labels
    }

    /// The worker holding the current lease, while the job runs.
    pub fn lease_owner(&self) -> Option<&str> {
        non_empty(&self.job.lease_owner)
    }

    /// The earliest time of the next attempt.
    pub fn run_at(&self) -> Option<SystemTime> {
        system_time(self.job.run_at.as_ref())
    }

    /// When the job was enqueued.
    pub fn created_at(&self) -> Option<SystemTime> {
        system_time(self.job.created_at.as_ref())
    }

    /// When the first attempt started.
    pub fn started_at(&self) -> Option<SystemTime> {
        system_time(self.job.started_at.as_ref())
    }

    /// When the job reached a terminal state.
    pub fn finished_at(&self) -> Option<SystemTime> {
        system_time(self.job.finished_at.as_ref())
    }

    /// The schedule that created the job, if one did: its
    /// [`ScheduleInfo::id`](crate::ScheduleInfo::id).
    pub fn schedule_id(&self) -> Option<&str> {
        non_empty(&self.job.schedule_id)
    }

    /// The tick of the schedule the job is for; `None` for a job a trigger created, or no
    /// schedule. The server creates at most one job per tick, so this tells catch-up runs apart.
    pub fn schedule_tick(&self) -> Option<SystemTime> {
        system_time(self.job.schedule_tick.as_ref())
    }

    /// The payload, decoded as `J`; fails when the job is of another type.
    pub fn payload<J: JobType>(&self) -> Result<J, Error> {
        decode(self.job.payload.as_ref(), "job payload")
    }

    /// The result, decoded as `J::Output`, once the job SUCCEEDED; `None` before.
    pub fn result<J: JobType>(&self) -> Result<Option<J::Output>, Error> {
        self.job
            .result
            .as_ref()
            .map(|result| decode(Some(result), "job result"))
            .transpose()
    }

    /// The whole message as the server sent it.
    pub fn as_proto(&self) -> &pb::Job {
        &self.job
    }

    /// The whole message as the server sent it.
    pub fn into_proto(self) -> pb::Job {
        self.job
    }
}

/// Decodes a message carried as `Any`; a missing one is an error because every caller expects
/// one to be there.
pub(crate) fn decode<M: prost::Message + prost::Name + Default>(
    any: Option<&Any>,
    what: &'static str,
) -> Result<M, Error> {
    let any = any.ok_or_else(|| Error::Protocol(format!("the {what} is missing")))?;
    any.to_msg::<M>()
        .map_err(|source| Error::Decode { what, source })
}

/// Encodes a message as `Any`, under its [`prost::Name`] type URL.
pub(crate) fn encode<M: prost::Message + prost::Name>(
    message: &M,
    what: &'static str,
) -> Result<Any, Error> {
    Any::from_msg(message).map_err(|source| Error::Encode { what, source })
}

/// A protocol duration for `delay`; one beyond the protocol's range (about 292 billion years)
/// saturates rather than failing, since it means "never" either way.
pub(crate) fn duration_to_proto(delay: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(delay).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

/// A protocol timestamp as `SystemTime`; one out of range is treated as absent.
pub(crate) fn system_time(timestamp: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    timestamp.and_then(|t| SystemTime::try_from(*t).ok())
}

/// A count the protocol carries as `int32`; a negative one (never sent) reads as 0.
pub(crate) fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Proto3 strings are empty when unset; the typed API says `None` instead.
pub(crate) fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_protocol() {
        for state in [
            JobState::AwaitingApproval,
            JobState::Pending,
            JobState::Scheduled,
            JobState::Available,
            JobState::Running,
            JobState::Retrying,
            JobState::Paused,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            let number = state.to_proto() as i32;
            assert_eq!(JobState::from_proto(number).ok(), Some(state));
        }
        assert!(JobState::from_proto(0).is_err());
        assert!(JobState::from_proto(99).is_err());
        assert_eq!(JobState::AwaitingApproval.to_string(), "AWAITING_APPROVAL");
    }

    #[test]
    fn retry_policy_sets_only_what_was_given() {
        let policy = RetryPolicy::new()
            .max_attempts(5)
            .initial_backoff(Duration::from_millis(1500))
            .to_proto();
        assert_eq!(policy.max_attempts, Some(5));
        assert_eq!(
            policy.initial_backoff,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(policy.max_backoff, None);
        assert_eq!(policy.backoff_multiplier, None);
        assert_eq!(policy.jitter, None);
        assert_eq!(RetryPolicy::no_retries().to_proto().max_attempts, Some(1));
    }

    #[test]
    fn job_info_maps_empty_strings_to_none() {
        let info = JobInfo::from_proto(pb::Job {
            id: "j1".into(),
            state: pb::JobState::Failed as i32,
            attempt: 3,
            last_error: Some(pb::JobError {
                message: "boom".into(),
                kind: String::new(),
                retryable: false,
                attempt: 3,
                occurred_at: None,
            }),
            ..Default::default()
        })
        .expect("valid job");
        assert_eq!(info.id().as_str(), "j1");
        assert_eq!(info.state(), JobState::Failed);
        assert_eq!(info.attempt(), 3);
        assert_eq!(info.cancel_reason(), None);
        assert_eq!(info.idempotency_key(), None);
        let error = info.last_error().expect("last error");
        assert_eq!((error.message(), error.kind()), ("boom", None));
        assert!(!error.is_retryable());
    }

    #[test]
    fn job_info_reads_progress_timeout_and_stop_requests() {
        let info = JobInfo::from_proto(pb::Job {
            id: "j1".into(),
            state: pb::JobState::Running as i32,
            progress: Some(pb::Progress {
                fraction: Some(0.5),
                stage: "render".into(),
                ..Default::default()
            }),
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            pause_requested_at: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            attempts_counted: 1,
            attempt: 2,
            has_checkpoint: true,
            ..Default::default()
        })
        .expect("valid job");
        let progress = info.progress().expect("progress");
        assert_eq!(progress.fraction(), Some(0.5));
        assert_eq!(progress.stage(), Some("render"));
        assert_eq!(info.timeout(), Some(Duration::from_secs(30)));
        assert_eq!(
            info.pause_requested_at(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(info.cancel_requested_at(), None);
        assert_eq!((info.attempt(), info.attempts_counted()), (2, 1));
        assert!(info.has_checkpoint());

        let bare = JobInfo::from_proto(pb::Job {
            state: pb::JobState::Available as i32,
            ..Default::default()
        })
        .expect("valid job");
        assert_eq!(bare.progress(), None);
        assert_eq!(bare.timeout(), None);
        assert!(!bare.has_checkpoint());
    }

    #[test]
    fn unknown_state_is_a_protocol_error() {
        let job = pb::Job {
            state: 0,
            ..Default::default()
        };
        assert!(matches!(JobInfo::from_proto(job), Err(Error::Protocol(_))));
    }
}
