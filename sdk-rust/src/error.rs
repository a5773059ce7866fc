//! Errors, split by direction.
//!
//! [`Error`] is what the SDK returns to its caller: a call that failed, or a job waited on that
//! ended FAILED or CANCELLED ([`JobFailure`]). [`HandlerError`] goes the other way: a handler
//! returns it to the worker runtime to say how its attempt failed and whether retrying can help.
//! Keeping them apart means a handler cannot accidentally report a transport error as a job
//! failure without choosing whether it is retryable.
//!
//! When the server refuses a request because of its content, it names the fields at fault in a
//! `google.rpc.BadRequest` detail of its status; [`Error::field_violations`] reads them back as
//! [`FieldViolation`]s (field path and description), so a caller can point at the input to fix
//! without parsing the message.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic_types::StatusExt as _;

use crate::job::{JobError, JobId, JobInfo, JobState};

/// Why a call into the SDK failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached, or the TLS handshake with it failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// The server answered with a non-OK status; `code` and `message` are the server's. A
    /// status that names the fields at fault comes as [`Error::BadRequest`] instead; use
    /// [`Error::code`] to read the code of either.
    #[error("server returned {code:?}: {message}")]
    Rpc {
        /// The gRPC status code, such as [`tonic::Code::NotFound`].
        code: tonic::Code,
        /// The server's message, which names the field at fault for `InvalidArgument`.
        message: String,
    },

    /// The server refused the request because of the fields it names: a non-OK status (from
    /// jobwire, always `InvalidArgument`) carrying a `google.rpc.BadRequest` detail with at
    /// least one field violation. See [`Error::field_violations`].
    #[error("server returned {code:?}: {message}")]
    BadRequest {
        /// The gRPC status code, [`tonic::Code::InvalidArgument`] from a jobwire server.
        code: tonic::Code,
        /// The server's message, which names the first field at fault.
        message: String,
        /// Every field the server named, in its order; never empty.
        field_violations: Vec<FieldViolation>,
    },

    /// A payload or result is not the message the caller's type expects (another type URL, or
    /// bytes that do not decode).
    #[error("could not decode the {what}: {source}")]
    Decode {
        /// What was being decoded, such as "job result".
        what: &'static str,
        /// What prost reported.
        #[source]
        source: prost::DecodeError,
    },

    /// A payload could not be encoded.
    #[error("could not encode the {what}: {source}")]
    Encode {
        /// What was being encoded, such as "job payload".
        what: &'static str,
        /// What prost reported.
        #[source]
        source: prost::EncodeError,
    },

    /// The server's answer lacks something the protocol promises, such as the job of a
    /// `GetJobResponse` or a known job state.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),

    /// A job that was waited on ended FAILED or CANCELLED; see [`JobFailure::state`].
    #[error("{0}")]
    JobFailed(Box<JobFailure>),

    /// The attempt a handler runs no longer holds its lease: the server refused one of its
    /// reports as stale (ABORTED), said the lease moved on, or the attempt already reported its
    /// result. Nothing the handler sends for it will be applied any more; it should return.
    #[error("the lease of job {job_id} attempt {attempt} is no longer held")]
    LeaseLost {
        /// The job.
        job_id: JobId,
        /// The attempt that lost its lease.
        attempt: u32,
    },

    /// The worker's stream to the server broke (or the worker stopped) before the server
    /// acknowledged a report, so whether it was applied is unknown. It is not sent again by
    /// itself; calling again once the worker has reconnected may succeed.
    #[error("the stream to the server ended before the {what} was acknowledged")]
    Disconnected {
        /// What was not acknowledged, such as "checkpoint".
        what: &'static str,
    },

    /// A setting given to a builder is invalid; the message says which.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A worker's graceful drain did not finish in time: handlers were told to stop, and what
    /// was left was abandoned. Their leases lapse and the server retries those jobs.
    #[error(
        "drain did not finish within {timeout:?}: {running} handler(s) still running, \
         {unacknowledged} result(s) not acknowledged by the server"
    )]
    DrainTimeout {
        /// The configured drain timeout.
        timeout: Duration,
        /// Handlers that had not returned.
        running: usize,
        /// Results the server had not acknowledged.
        unacknowledged: usize,
    },
}

impl Error {
    /// The gRPC status code when the server answered with one, so callers can tell
    /// `NotFound` from `FailedPrecondition` without matching on the variant.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { code, .. } | Self::BadRequest { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The fields the server named as the reason it refused the request, each with its path
    /// in the request (such as `job.priority`) and what is wrong with it; empty when the error
    /// names none (it is not [`Error::BadRequest`]).
    ///
    /// ```no_run
    /// # async fn demo(client: jobwire::Client, payload: impl jobwire::JobType) {
    /// if let Err(error) = client.enqueue(payload).priority(500).await {
    ///     for violation in error.field_violations() {
    ///         eprintln!("{}: {}", violation.field(), violation.description());
    ///     }
    /// }
    /// # }
    /// ```
    pub fn field_violations(&self) -> &[FieldViolation] {
        match self {
            Self::BadRequest {
                field_violations, ..
            } => field_violations,
            _ => &[],
        }
    }

    /// How the job ended, when this error is [`Error::JobFailed`].
    pub fn job_failure(&self) -> Option<&JobFailure> {
        match self {
            Self::JobFailed(failure) => Some(failure),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let code = status.code();
        let message = status.message().to_owned();
        // Details that do not decode are ignored: the code and message still say what happened.
        let field_violations: Vec<FieldViolation> = status
            .get_error_details()
            .bad_request()
            .map(|bad_request| {
                bad_request
                    .field_violations
                    .iter()
                    .map(FieldViolation::from_proto)
                    .collect()
            })
            .unwrap_or_default();
        if field_violations.is_empty() {
            Self::Rpc { code, message }
        } else {
            Self::BadRequest {
                code,
                message,
                field_violations,
            }
        }
    }
}

/// A field the server named as the reason it refused a request: one entry of the
/// `google.rpc.BadRequest` detail of its status. See [`Error::field_violations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    field: String,
    description: String,
}

impl FieldViolation {
    fn from_proto(violation: &tonic_types::FieldViolation) -> Self {
        Self {
            field: violation.field.clone(),
            description: violation.description.clone(),
        }
    }

    /// The path of the field in the request, dot-separated from the request's top level, such
    /// as `job.priority` or `jobs[3].payload_json.sourceUrl`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with the field, such as `must be between 0 and 100, got 500`.
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// How a job ended without a result: FAILED (attempts exhausted, or a non-retryable failure) or
/// CANCELLED.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFailure {
    job_id: JobId,
    state: JobState,
    attempt: u32,
    last_error: Option<JobError>,
    cancel_reason: Option<String>,
}

impl JobFailure {
    pub(crate) fn new(
        job_id: JobId,
        state: JobState,
        attempt: u32,
        last_error: Option<JobError>,
        cancel_reason: Option<String>,
    ) -> Self {
        Self {
            job_id,
            state,
            attempt,
            last_error,
            cancel_reason,
        }
    }

    /// The failure a finished job describes, or `None` when it did not fail.
    pub(crate) fn from_info(job: &JobInfo) -> Option<Self> {
        matches!(job.state(), JobState::Failed | JobState::Cancelled).then(|| {
            Self::new(
                job.id().clone(),
                job.state(),
                job.attempt(),
                job.last_error().cloned(),
                job.cancel_reason().map(str::to_owned),
            )
        })
    }

    /// The job that failed.
    pub fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// [`JobState::Failed`] or [`JobState::Cancelled`].
    pub fn state(&self) -> JobState {
        self.state
    }

    /// Attempts started before the job ended (0 when it was cancelled before running).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The most recent failure a worker reported, if any; a cancelled job may have none.
    pub fn last_error(&self) -> Option<&JobError> {
        self.last_error.as_ref()
    }

    /// Why the job was cancelled, when it was and a reason was given.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.cancel_reason.as_deref()
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            JobState::Cancelled => {
                write!(f, "job {} was cancelled", self.job_id)?;
                if let Some(reason) = &self.cancel_reason {
                    write!(f, ": {reason}")?;
                }
            }
            _ => {
                write!(
                    f,
                    "job {} failed after {} attempt(s)",
                    self.job_id, self.attempt
                )?;
                if let Some(error) = &self.last_error {
                    write!(f, ": {error}")?;
                }
            }
        }
        Ok(())
    }
}

/// How a handler's attempt failed.
///
/// A handler error is retryable unless made with [`HandlerError::fatal`]: the server then runs
/// the job again after its retry policy's backoff (or after
/// [`with_retry_after`](Self::with_retry_after)), until its attempts are used up.
///
/// Any [`std::error::Error`] converts into a retryable `HandlerError` whose message is the
/// error and its chain of sources, so `?` works in handlers; the error itself is kept
/// ([`downcast_ref`](Self::downcast_ref)), so a worker's
/// [`RetryPredicate`](crate::retry::RetryPredicate) can decide from it whether the failure is
/// worth retrying. For that blanket conversion to be possible, `HandlerError` itself does not
/// implement `std::error::Error` (the same trade-off as `anyhow::Error`); it is a report to the
/// server, not something to propagate further.
#[derive(Debug, Clone)]
pub struct HandlerError {
    message: String,
    kind: Option<String>,
    retryable: bool,
    retry_after: Option<Duration>,
    /// The error the handler failed with, when it converted one: what retry predicates look
    /// at. Shared, so the report stays cheap to clone.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    /// Not a failure: the handler returned to wait
    /// ([`JobContext::wait_for_children`](crate::JobContext::wait_for_children),
    /// [`JobContext::wait_signal`](crate::JobContext::wait_signal)). Boxed: failures, the
    /// common case, stay small.
    wait: Option<Box<Wait>>,
}

/// What a handler that returned without a result waits for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Wait {
    Children,
    /// The `count`-th signal named `name`, for at most `timeout`.
    Signal {
        name: String,
        count: i32,
        timeout: Option<Duration>,
    },
}

impl HandlerError {
    /// A failure that another attempt may overcome, such as a timeout or an unavailable
    /// dependency.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: None,
            retryable: true,
            retry_after: None,
            source: None,
            wait: None,
        }
    }

    /// The handler's wait for its children, returned as an error so that `?` and early
    /// returns carry it out of the handler.
    pub(crate) fn waiting(wait: Wait) -> Self {
        let message = match &wait {
            Wait::Children => "waiting for its children".to_owned(),
            Wait::Signal { name, .. } => format!("waiting for signal {name}"),
        };
        Self {
            wait: Some(Box::new(wait)),
            ..Self::retryable(message)
        }
    }

    /// Whether this is not a failure but the handler's wait, for its children or a signal.
    pub fn is_wait(&self) -> bool {
        self.wait.is_some()
    }

    /// What the handler waits for, when this is a wait.
    pub(crate) fn wait(&self) -> Option<&Wait> {
        self.wait.as_deref()
    }

    /// A failure that no retry can fix, such as an invalid payload: the job fails at once,
    /// whatever attempts remain.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            ..Self::retryable(message)
        }
    }

    /// A retryable failure from `error`: its message is the error and its chain of sources,
    /// and the error is kept for [`downcast_ref`](Self::downcast_ref) (what `?` does).
    pub fn from_error<E>(error: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self {
            source: Some(Arc::new(error)),
            ..Self::retryable(message)
        }
    }

    /// Names the class of failure (such as `timeout`), for dashboards and filtering.
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Asks for the next attempt after `delay` instead of the retry policy's backoff, for
    /// instance when a rate-limited API said when to come back.
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The class of failure, if one was named.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// Whether the server may run the job again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The requested delay before the next attempt, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The error the handler failed with, when the failure was converted from one (by `?` or
    /// [`from_error`](Self::from_error)).
    pub fn source_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The first error of type `E` in the chain of the error the handler failed with: the
    /// error itself, or one of its sources.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|error| error as &(dyn std::error::Error + 'static));
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<E>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }

    /// This failure as a retry predicate decided it: its retryability, and its kind and delay
    /// where the decision names them.
    pub(crate) fn decided(mut self, decision: crate::retry::RetryDecision) -> Self {
        let (retryable, kind, retry_after) = decision.into_parts();
        self.retryable = retryable;
        if kind.is_some() {
            self.kind = kind;
        }
        if retry_after.is_some() {
            self.retry_after = retry_after;
        }
        self
    }

    /// The same failure, its message prefixed with `context` (such as the item that failed).
    pub(crate) fn in_context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// Two failures are equal when they report the same thing to the server; the source errors,
/// which need not be comparable, are left out.
impl PartialEq for HandlerError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
            && self.kind == other.kind
            && self.retryable == other.retryable
            && self.retry_after == other.retry_after
            && self.wait == other.wait
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(kind) = &self.kind {
            write!(f, "{kind}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self::from_error(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn std_errors_become_retryable_with_their_chain() {
        let error = HandlerError::from(Outer(Inner));
        assert_eq!(error.message(), "outer: inner");
        assert!(error.is_retryable());
        assert!(error.downcast_ref::<Outer>().is_some());
        assert!(
            error.downcast_ref::<Inner>().is_some(),
            "sources are searched too"
        );
        assert!(error.downcast_ref::<std::io::Error>().is_none());
        assert!(
            HandlerError::retryable("x")
                .downcast_ref::<Inner>()
                .is_none()
        );
    }

    #[test]
    fn fatal_is_not_retryable_and_keeps_its_details() {
        let error = HandlerError::fatal("bad payload")
            .with_kind("validation")
            .with_retry_after(Duration::from_secs(3));
        assert!(!error.is_retryable());
        assert_eq!(error.kind(), Some("validation"));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(error.to_string(), "validation: bad payload");
    }

    #[test]
    fn status_keeps_code_and_message() {
        let error = Error::from(tonic::Status::not_found("job 42 not found"));
        assert_eq!(error.code(), Some(tonic::Code::NotFound));
        assert!(error.to_string().contains("job 42 not found"));
    }

    #[test]
    fn field_violations_are_read_from_the_status_details() {
        let status = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "job.priority: must be between 0 and 100, got 500",
            tonic_types::ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new(
                    "job.priority",
                    "must be between 0 and 100, got 500",
                ),
                tonic_types::FieldViolation::new("job.queue", "must not be empty"),
            ]),
        );
        let error = Error::from(status);
        assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
        assert!(matches!(error, Error::BadRequest { .. }));
        let fields: Vec<(&str, &str)> = error
            .field_violations()
            .iter()
            .map(|v| (v.field(), v.description()))
            .collect();
        assert_eq!(
            fields,
            [
                ("job.priority", "must be between 0 and 100, got 500"),
                ("job.queue", "must not be empty"),
            ]
        );
        assert_eq!(
            error.to_string(),
            "server returned InvalidArgument: job.priority: must be between 0 and 100, got 500"
        );
        assert_eq!(
            error.field_violations()[1].to_string(),
            "job.queue: must not be empty"
        );
    }

    #[test]
    fn a_status_without_violations_has_none() {
        let plain = Error::from(tonic::Status::invalid_argument("bad"));
        assert!(matches!(plain, Error::Rpc { .. }));
        assert!(plain.field_violations().is_empty());

        // A BadRequest detail that lists no field is no reason to change the variant.
        let empty = Error::from(tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "bad",
            tonic_types::ErrorDetails::with_bad_request(Vec::new()),
        ));
        assert!(matches!(empty, Error::Rpc { .. }));
        assert!(empty.field_violations().is_empty());

        let other = Error::Config("no url".into());
        assert!(other.field_violations().is_empty());
    }

    #[test]
    fn undecodable_details_are_ignored() {
        let status =
            tonic::Status::with_details(tonic::Code::InvalidArgument, "bad", bytes_of_garbage());
        let error = Error::from(status);
        assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
        assert!(error.field_violations().is_empty());
    }

    fn bytes_of_garbage() -> tonic::codegen::Bytes {
        tonic::codegen::Bytes::from_static(&[0xff, 0xff, 0xff])
    }

    #[test]
    fn error_is_send_sync_and_static() {
        fn assert_traits<T: std::error::Error + Send + Sync + 'static>() {}
        assert_traits::<Error>();
    }
}
