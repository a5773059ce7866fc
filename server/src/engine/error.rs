//! The engine's one error: what can go wrong when it enqueues, ends an attempt, or records a
//! worker's report. The API maps it to a status code once (`api::error`), for calls and for the
//! acks of a worker's stream alike.

use crate::{domain::LeaseRef, store};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The database cannot be reached right now; the same call may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The report names a lease that is no longer the job's running attempt.
    #[error(
        "lease {job}/{attempt} is no longer held: the job has moved on; nothing changed",
        job = .0.job_id,
        attempt = .0.attempt
    )]
    Stale(LeaseRef),
    /// A result after the attempt's deadline: the attempt timed out.
    #[error(
        "lease {job}/{attempt} ran past its timeout: its result is refused, and the attempt \
         ends timed out",
        job = .0.job_id,
        attempt = .0.attempt
    )]
    Late(LeaseRef),
    /// A bug, or a row the database refused: logged in full, reported vaguely.
    #[error("database error: {0}")]
    Internal(String),
}

impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        if error.is_transient() {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(error.to_string())
        }
    }
}
