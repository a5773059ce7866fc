//! The API's error type and its one mapping to gRPC status codes.
//!
//! Field errors carry a `google.rpc.BadRequest` detail naming the field path, so clients can
//! point at the culprit; database errors never reach the wire as SQL text.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{engine, store};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` is the path of the offending field.
    #[error("{field}: {description}")]
    InvalidArgument { field: String, description: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// An idempotency key the tenant holds for a job of another job type or payload; `field`
    /// is the key's path in the request.
    #[error("{field}: already names job {existing}, of another job type or payload")]
    KeyReused { field: String, existing: String },
    /// The request is well-formed but the target's state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A stale fencing token or a lost race; retrying with fresh state may succeed.
    #[error("{0}")]
    Aborted(String),
    /// A limit of the server or of this client is reached; retrying later may succeed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The database cannot be reached right now; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A watch resumes after a sequence whose successors, up to `through`, were pruned with
    /// their partition of the event log; `field` names the request's sequence.
    #[error("{field}: events up to sequence {through} were pruned")]
    EventsPruned { field: String, through: i64 },
    /// A bug or a corrupt row: logged in full, reported vaguely.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }

    /// Maps a store error, naming what was looked for when it was not found.
    pub fn from_store(error: store::Error, what: impl FnOnce() -> String) -> Self {
        match error {
            store::Error::NotFound => Self::NotFound(what()),
            other => other.into(),
        }
    }

    /// Prefixes the field path, for errors inside repeated or nested messages.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, description } => Self::InvalidArgument {
                field: format!("{prefix}.{field}"),
                description,
            },
            other => other,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) | Self::KeyReused { .. } => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::EventsPruned { .. } => Code::OutOfRange,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(error: store::Error) -> Self {
        if error.is_pool_exhausted() {
            tracing::warn!(%error, "no database connection came free in time");
            return Self::Unavailable(
                "server busy: every database connection of this server stayed in use for the \
                 pool's timeout; retry later"
                    .into(),
            );
        }
        if error.is_transient() {
            tracing::warn!(%error, "database unavailable");
            return Self::Unavailable("database unavailable; retry later".into());
        }
        match error {
            store::Error::NotFound => Self::NotFound("not found".into()),
            store::Error::KeyReused { index, existing } => Self::KeyReused {
                field: format!("jobs[{index}].idempotency_key"),
                existing: existing.to_string(),
            },
            store::Error::UnknownDependency {
                index,
                position,
                id,
            } => Self::invalid(
                format!("jobs[{index}].depends_on[{position}]"),
                format!("names {id}, which is no job of this tenant"),
            ),
            store::Error::UnknownParent(id) => Self::invalid(
                "parent.job_id",
                format!("names {id}, which is no job of this tenant"),
            ),
            store::Error::StaleParent(lease) => Self::Aborted(format!(
                "parent: job {} is not running attempt {} (the lease is stale); no child was \
                 enqueued",
                lease.job_id, lease.attempt
            )),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<engine::Error> for ApiError {
    fn from(error: engine::Error) -> Self {
        match error {
            engine::Error::ShuttingDown | engine::Error::Unavailable(_) => {
                Self::Unavailable(error.to_string())
            }
            engine::Error::Stale(_) | engine::Error::Late(_) => Self::Aborted(error.to_string()),
            engine::Error::Internal(message) => Self::Internal(message),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                format!("{field}: {description}"),
                ErrorDetails::with_bad_request_violation(field, description),
            ),
            ApiError::KeyReused { field, existing } => {
                let message = format!(
                    "{field}: already names job {existing}, of another job type or payload; \
                     use another key, or set accept_existing to receive that job"
                );
                let mut details = ErrorDetails::new();
                details
                    .set_error_info(
                        "IDEMPOTENCY_KEY_REUSED",
                        "jobwire.v1",
                        [("existing_job_id".to_owned(), existing.clone())],
                    )
                    .set_resource_info("jobwire.v1.Job", existing, "", "")
                    .add_bad_request_violation(field, "reuses the key of another job");
                Status::with_error_details(Code::AlreadyExists, message, details)
            }
            ApiError::EventsPruned { field, through } => {
                let oldest = through.saturating_add(1);
                let message = format!(
                    "{field}: events up to sequence {through} were pruned (retention); the oldest \
                     retained sequence is {oldest}: resume after {through} or later, or from 0 \
                     for the whole retained history"
                );
                let mut details = ErrorDetails::new();
                details
                    .set_error_info(
                        "EVENTS_PRUNED",
                        "jobwire.v1",
                        [("oldest_retained_sequence".to_owned(), oldest.to_string())],
                    )
                    .add_bad_request_violation(
                        field,
                        format!("the oldest retained sequence is {oldest}"),
                    );
                Status::with_error_details(Code::OutOfRange, message, details)
            }
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}
