//! What can go wrong in a command, and the exit code that says so.
//!
//! Scripts branch on the exit code, so each code names one kind of outcome, decided in one
//! place ([`Failure::exit_code`]) from the gRPC status the server answered with:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | anything else: the server's INTERNAL or UNKNOWN, an answer the tool cannot read, a failed write |
//! | 2 | invalid input: a usage error (clap's own code), a malformed value or file, or the server's INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE or ALREADY_EXISTS |
//! | 3 | not found: NOT_FOUND |
//! | 4 | unavailable, try again: the server cannot be reached, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED |
//! | 5 | refused: UNAUTHENTICATED or PERMISSION_DENIED |
//! | 6 | `jobs watch`: the job ended FAILED |
//! | 7 | `jobs watch`: the job ended CANCELLED |
//!
//! The same table is in `jobwire --help` ([`EXIT_CODES_HELP`]); a unit test keeps the two
//! in step.

use std::fmt;
use std::process::ExitCode;

use jobwire::tonic::Code;

/// The exit codes as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  anything else (the server's INTERNAL, an unreadable answer, a failed write)
  2  invalid input: a usage error, or INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE,
     ALREADY_EXISTS
  3  not found
  4  unavailable, try again: unreachable, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
     ABORTED
  5  refused: UNAUTHENTICATED or PERMISSION_DENIED
  6  jobs watch: the job ended FAILED
  7  jobs watch: the job ended CANCELLED";

/// The kinds of outcome an exit code tells apart; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Other = 1,
    InvalidInput = 2,
    NotFound = 3,
    Unavailable = 4,
    Refused = 5,
    JobFailed = 6,
    JobCancelled = 7,
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        ExitCode::from(outcome as u8)
    }
}

/// Why a command did not finish with 0.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A call failed: the server's status, or no connection.
    #[error("{}", describe_sdk(.0))]
    Sdk(#[from] jobwire::Error),

    /// Input the tool itself refused before calling (a malformed JSON payload, an unreadable
    /// file).
    #[error("{0}")]
    Input(String),

    /// A watched job ended FAILED or CANCELLED; the outcome is already printed.
    #[error("job {id} ended {state}")]
    JobEnded {
        id: String,
        state: jobwire::JobState,
    },

    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),

    /// Something the tool should not meet: a response it cannot render.
    #[error("{0}")]
    Internal(String),
}

impl From<jobwire::tonic::Status> for Failure {
    /// Through the SDK's error, so the fields a `google.rpc.BadRequest` names come along.
    fn from(status: jobwire::tonic::Status) -> Self {
        Self::Sdk(jobwire::Error::from(status))
    }
}

impl Failure {
    /// The exit code for this failure.
    pub fn exit_code(&self) -> Outcome {
        match self {
            Self::Sdk(error) => match error {
                jobwire::Error::Transport(_) => Outcome::Unavailable,
                jobwire::Error::Config(_) => Outcome::InvalidInput,
                error => error.code().map_or(Outcome::Other, outcome_of),
            },
            Self::Input(_) => Outcome::InvalidInput,
            Self::JobEnded { state, .. } => match state {
                jobwire::JobState::Cancelled => Outcome::JobCancelled,
                _ => Outcome::JobFailed,
            },
            Self::Output(_) | Self::Internal(_) => Outcome::Other,
        }
    }

    /// Whether this is a closed pipe (`jobwire jobs list | head`): the reader wanted no more,
    /// so there is nothing to report.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output(err) if err.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The lines to print on stderr after `error: `: the message, then each field the server
    /// named at fault.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        if let Self::Sdk(error) = self {
            for violation in error.field_violations() {
                text.push_str(&format!("\n  {violation}"));
            }
        }
        text
    }
}

/// The exit code for a status code.
fn outcome_of(code: Code) -> Outcome {
    match code {
        Code::Ok => Outcome::Other,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => Outcome::InvalidInput,
        Code::NotFound => Outcome::NotFound,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            Outcome::Unavailable
        }
        Code::Unauthenticated | Code::PermissionDenied => Outcome::Refused,
        Code::Cancelled | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => {
            Outcome::Other
        }
    }
}

/// The SDK's error in an operator's words: the status code's name and the server's message.
fn describe_sdk(error: &jobwire::Error) -> String {
    match error {
        jobwire::Error::Rpc { code, message }
        | jobwire::Error::BadRequest { code, message, .. } => {
            format!("{}: {message}", CodeName(*code))
        }
        jobwire::Error::Transport(err) => {
            // tonic's transport error says little by itself; its sources say what failed.
            let mut text = format!("cannot reach the server: {err}");
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
        other => other.to_string(),
    }
}

/// A status code as the gRPC specification spells it, such as `NOT_FOUND`.
struct CodeName(Code);

impl fmt::Display for CodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_lists_every_exit_code() {
        for outcome in [
            Outcome::Other,
            Outcome::InvalidInput,
            Outcome::NotFound,
            Outcome::Unavailable,
            Outcome::Refused,
            Outcome::JobFailed,
            Outcome::JobCancelled,
        ] {
            let line = format!("\n  {}  ", outcome as u8);
            assert!(
                EXIT_CODES_HELP.contains(&line),
                "{outcome:?} is not in --help"
            );
        }
    }

    #[test]
    fn statuses_map_to_their_codes() {
        let status = |code| Failure::from(jobwire::tonic::Status::new(code, "x")).exit_code();
        assert_eq!(status(Code::NotFound), Outcome::NotFound);
        assert_eq!(status(Code::FailedPrecondition), Outcome::InvalidInput);
        assert_eq!(status(Code::PermissionDenied), Outcome::Refused);
        assert_eq!(status(Code::Unavailable), Outcome::Unavailable);
        assert_eq!(status(Code::Internal), Outcome::Other);
    }
}
