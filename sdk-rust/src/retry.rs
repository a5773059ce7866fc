//! Retry predicates: a worker's say, from the error a handler failed with, on whether the
//! failure is worth another attempt and what kind of failure it is.
//!
//! A handler that fails with `?` reports a retryable [`HandlerError`] carrying the original
//! error. A predicate, set for the whole worker
//! ([`WorkerBuilder::retry_predicate`](crate::WorkerBuilder::retry_predicate)) or for one job
//! type ([`WorkerBuilder::retry_predicate_for`](crate::WorkerBuilder::retry_predicate_for)),
//! looks at that failure before it is reported and may turn it fatal (the job ends FAILED after
//! this attempt) or retryable, name its kind (recorded as the job's `last_error.kind`, which
//! the server's per-kind rules and the dead-letter filters read) and ask for a delay. So the
//! policy "retry a 5xx, not a 4xx" is written once, next to the worker, not in every handler:
//!
//! ```
//! use jobwire::retry::{self, RetryDecision};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("HTTP {status}")]
//! struct HttpError {
//!     status: u16,
//! }
//!
//! let http = retry::on_error(|error: &HttpError| {
//!     let decision = if error.status >= 500 {
//!         RetryDecision::retryable()
//!     } else {
//!         RetryDecision::fatal()
//!     };
//!     decision.with_kind(format!("http_{}xx", error.status / 100))
//! });
//! # let _ = http;
//! ```
//!
//! The predicate sees only what the handler returned: failures the SDK makes itself (a payload
//! that does not decode, a panic, an attempt stopped by a cancel, pause or timeout) are
//! reported as they are.

use std::sync::Arc;
use std::time::Duration;

use crate::error::HandlerError;

/// What a [`RetryPredicate`] decided about a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct RetryDecision {
    retryable: bool,
    kind: Option<String>,
    retry_after: Option<Duration>,
}

impl RetryDecision {
    /// Another attempt may succeed: the server retries under the job's retry policy.
    pub fn retryable() -> Self {
        Self {
            retryable: true,
            kind: None,
            retry_after: None,
        }
    }

    /// No attempt can succeed: the job fails now, whatever attempts remain.
    pub fn fatal() -> Self {
        Self {
            retryable: false,
            ..Self::retryable()
        }
    }

    /// Names the failure's kind (such as `http_4xx`), replacing the handler's.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Asks for the next attempt after `delay` rather than the policy's backoff.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Whether the failure is to be retried.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The kind named, if any.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    pub(crate) fn into_parts(self) -> (bool, Option<String>, Option<Duration>) {
        (self.retryable, self.kind, self.retry_after)
    }
}

/// Decides, from a handler's failure, whether it is retryable and of what kind; `None` leaves
/// the failure as the handler reported it.
///
/// Any `Fn(&HandlerError) -> Option<RetryDecision>` is one; [`on_error`] makes one from a
/// function of a typed error.
pub trait RetryPredicate: Send + Sync + 'static {
    /// The decision for `error`, or `None` to keep the handler's own.
    fn decide(&self, error: &HandlerError) -> Option<RetryDecision>;
}

impl<F> RetryPredicate for F
where
    F: Fn(&HandlerError) -> Option<RetryDecision> + Send + Sync + 'static,
{
    fn decide(&self, error: &HandlerError) -> Option<RetryDecision> {
        self(error)
    }
}

/// A predicate that decides failures caused by an error of type `E` (the error the handler
/// returned with `?`, or any error in its chain of sources) and leaves every other failure as
/// it is.
pub fn on_error<E, F>(decide: F) -> impl RetryPredicate
where
    E: std::error::Error + 'static,
    F: Fn(&E) -> RetryDecision + Send + Sync + 'static,
{
    move |error: &HandlerError| error.downcast_ref::<E>().map(&decide)
}

/// A predicate shared by the handlers it applies to.
pub(crate) type SharedPredicate = Arc<dyn RetryPredicate>;

/// `error` as `predicate` decides it.
pub(crate) fn apply(predicate: Option<&SharedPredicate>, error: HandlerError) -> HandlerError {
    if error.is_wait() {
        return error;
    }
    match predicate.and_then(|predicate| predicate.decide(&error)) {
        Some(decision) => error.decided(decision),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("HTTP {status}")]
    struct HttpError {
        status: u16,
    }

    fn http() -> SharedPredicate {
        Arc::new(on_error(|error: &HttpError| {
            if error.status >= 500 {
                RetryDecision::retryable().with_kind("http_5xx")
            } else {
                RetryDecision::fatal().with_kind("http_4xx")
            }
        }))
    }

    #[test]
    fn a_typed_predicate_decides_its_errors() {
        let predicate = http();
        let server = apply(
            Some(&predicate),
            HandlerError::from_error(HttpError { status: 503 }),
        );
        assert!(server.is_retryable());
        assert_eq!(server.kind(), Some("http_5xx"));
        assert_eq!(server.message(), "HTTP 503");

        let client = apply(
            Some(&predicate),
            HandlerError::from_error(HttpError { status: 404 }),
        );
        assert!(!client.is_retryable());
        assert_eq!(client.kind(), Some("http_4xx"));
    }

    #[test]
    fn other_failures_are_left_as_reported() {
        let predicate = http();
        let fatal = HandlerError::fatal("bad input").with_kind("validation");
        assert_eq!(apply(Some(&predicate), fatal.clone()), fatal);
        let io = HandlerError::from_error(std::io::Error::other("disk"));
        assert_eq!(apply(Some(&predicate), io.clone()), io);
        assert_eq!(apply(None, fatal.clone()), fatal);
    }

    #[test]
    fn a_decision_keeps_what_it_does_not_name() {
        let error = HandlerError::retryable("slow down")
            .with_kind("rate_limited")
            .with_retry_after(Duration::from_secs(3));
        let closure: SharedPredicate = Arc::new(|_: &HandlerError| Some(RetryDecision::fatal()));
        let decided = apply(Some(&closure), error);
        assert!(!decided.is_retryable());
        assert_eq!(decided.kind(), Some("rate_limited"));
        assert_eq!(decided.retry_after(), Some(Duration::from_secs(3)));
    }
}
