//! What a running job says about itself: how far it has come ([`Progress`], as a handler
//! reports it, and [`ProgressInfo`], as the server stored it) and the severity of the lines it
//! logs ([`LogLevel`]).
//!
//! A handler's progress is built here and turned into the protocol's `Progress` in one place,
//! so that its ranges are fitted before they travel (a fraction outside 0.0 to 1.0 would be
//! refused by the server, and that refusal would be lost in the background); the reading side
//! maps the protocol's empty strings and zeros to `None` like the rest of the typed API.

use std::fmt;
use std::time::SystemTime;

use prost_types::Struct;

use crate::job;
use crate::proto::v1 as pb;
use crate::worker::reports::for_the_wire;

/// The longest progress message or stage the server keeps, in bytes.
const MAX_TEXT_BYTES: usize = 1024;

/// How far a running job has come, as its handler reports it with
/// [`JobContext::progress`](crate::JobContext::progress).
///
/// Start from [`fraction`](Self::fraction), [`items`](Self::items) or
/// [`indeterminate`](Self::indeterminate), then add what else is known:
///
/// ```
/// use jobwire::Progress;
/// let progress = Progress::items(30, 120).stage("resize").message("page 30 of 120");
/// assert_eq!(progress.to_fraction(), Some(0.25));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use]
pub struct Progress {
    fraction: Option<f64>,
    message: String,
    stage: String,
    items_done: u64,
    items_total: u64,
    data: Option<Struct>,
}

impl Progress {
    /// Progress whose amount is unknown (an indeterminate progress bar); add a message or a
    /// stage to say what is happening.
    pub fn indeterminate() -> Self {
        Self::default()
    }

    /// `fraction` of the work done, 0.0 to 1.0; a value outside that range is clamped to it,
    /// and NaN counts as unknown.
    pub fn fraction(fraction: f64) -> Self {
        Self::indeterminate().with_fraction(fraction)
    }

    /// `done` items of `total`; the fraction is derived from them when `total` is not 0 (0
    /// means the total is unknown).
    pub fn items(done: u64, total: u64) -> Self {
        let progress = Self {
            items_done: done,
            items_total: total,
            ..Self::default()
        };
        if total == 0 {
            progress
        } else {
            // Counts beyond 2^53 lose precision here, which a progress bar cannot show anyway.
            progress.with_fraction(done as f64 / total as f64)
        }
    }

    /// Sets the fraction done, as [`fraction`](Self::fraction) does, keeping the rest.
    pub fn with_fraction(mut self, fraction: f64) -> Self {
        self.fraction = (!fraction.is_nan()).then(|| fraction.clamp(0.0, 1.0));
        self
    }

    /// A human-readable line, such as "resizing page 3".
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// The current stage of a multi-stage job, such as "download".
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = stage.into();
        self
    }

    /// Free structured data for dashboards.
    pub fn data(mut self, data: Struct) -> Self {
        self.data = Some(data);
        self
    }

    /// The fraction done, when known.
    pub fn to_fraction(&self) -> Option<f64> {
        self.fraction
    }

    /// The protocol's form, stamped with the time the handler reported it.
    pub(crate) fn into_proto(self, reported_at: SystemTime) -> pb::Progress {
        pb::Progress {
            fraction: self.fraction,
            message: for_the_wire(self.message, MAX_TEXT_BYTES),
            stage: for_the_wire(self.stage, MAX_TEXT_BYTES),
            items_done: saturating_i64(self.items_done),
            items_total: saturating_i64(self.items_total),
            data: self.data,
            updated_at: Some(reported_at.into()),
            eta: None,
        }
    }
}

/// The progress of a job as the server stored it: what the handler last reported, when, and
/// when the server expects the job to finish.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressInfo {
    progress: pb::Progress,
}

impl ProgressInfo {
    pub(crate) fn from_proto(progress: pb::Progress) -> Self {
        Self { progress }
    }

    /// The fraction done, 0.0 to 1.0; `None` while the amount of work is unknown.
    pub fn fraction(&self) -> Option<f64> {
        self.progress.fraction
    }

    /// The handler's human-readable line, if any.
    pub fn message(&self) -> Option<&str> {
        job::non_empty(&self.progress.message)
    }

    /// The current stage, if the handler named one.
    pub fn stage(&self) -> Option<&str> {
        job::non_empty(&self.progress.stage)
    }

    /// Items done so far (0 when the job does not count items).
    pub fn items_done(&self) -> u64 {
        u64::try_from(self.progress.items_done).unwrap_or(0)
    }

    /// Items in all; `None` when unknown.
    pub fn items_total(&self) -> Option<u64> {
        u64::try_from(self.progress.items_total)
            .ok()
            .filter(|&total| total > 0)
    }

    /// The handler's structured data, if any.
    pub fn data(&self) -> Option<&Struct> {
        self.progress.data.as_ref()
    }

    /// When the handler reported it.
    pub fn updated_at(&self) -> Option<SystemTime> {
        job::system_time(self.progress.updated_at.as_ref())
    }

    /// When the job should finish at the rate of progress so far, as the server estimates it;
    /// `None` while the rate is unknown.
    pub fn eta(&self) -> Option<SystemTime> {
        job::system_time(self.progress.eta.as_ref())
    }

    /// The whole message as the server sent it.
    pub fn as_proto(&self) -> &pb::Progress {
        &self.progress
    }
}

/// The severity of a line a handler logs with [`JobContext::log`](crate::JobContext::log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LogLevel {
    /// Detail for whoever debugs the job.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the job coped with.
    Warn,
    /// Something that went wrong.
    Error,
}

impl LogLevel {
    /// The level as the protocol numbers it.
    pub fn to_proto(self) -> pb::LogLevel {
        match self {
            Self::Debug => pb::LogLevel::Debug,
            Self::Info => pb::LogLevel::Info,
            Self::Warn => pb::LogLevel::Warn,
            Self::Error => pb::LogLevel::Error,
        }
    }

    /// The level for a protocol number. Unspecified or unknown numbers (from a newer server)
    /// read as `Info`, so that a line is never lost over its severity.
    pub(crate) fn from_proto(value: i32) -> Self {
        match pb::LogLevel::try_from(value) {
            Ok(pb::LogLevel::Debug) => Self::Debug,
            Ok(pb::LogLevel::Warn) => Self::Warn,
            Ok(pb::LogLevel::Error) => Self::Error,
            Ok(pb::LogLevel::Info | pb::LogLevel::Unspecified) | Err(_) => Self::Info,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.to_proto().as_str_name();
        f.write_str(name.strip_prefix("LOG_LEVEL_").unwrap_or(name))
    }
}

/// A count the protocol carries as `int64`; one beyond it (never reached) saturates.
fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fractions_are_fitted_to_the_protocol_range() {
        assert_eq!(Progress::fraction(0.4).to_fraction(), Some(0.4));
        assert_eq!(Progress::fraction(1.5).to_fraction(), Some(1.0));
        assert_eq!(Progress::fraction(-0.1).to_fraction(), Some(0.0));
        assert_eq!(Progress::fraction(f64::NAN).to_fraction(), None);
        assert_eq!(Progress::indeterminate().to_fraction(), None);
    }

    #[test]
    fn items_derive_the_fraction_when_the_total_is_known() {
        assert_eq!(Progress::items(1, 4).to_fraction(), Some(0.25));
        assert_eq!(Progress::items(7, 0).to_fraction(), None);
        assert_eq!(Progress::items(9, 4).to_fraction(), Some(1.0));
    }

    #[test]
    fn the_proto_carries_every_field_and_the_report_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let progress = Progress::items(3, 12)
            .message("page 3")
            .stage("render")
            .data(Struct::default())
            .into_proto(at);
        assert_eq!(progress.fraction, Some(0.25));
        assert_eq!(progress.message, "page 3");
        assert_eq!(progress.stage, "render");
        assert_eq!((progress.items_done, progress.items_total), (3, 12));
        assert_eq!(progress.data, Some(Struct::default()));
        assert_eq!(progress.updated_at, Some(at.into()));
        assert_eq!(progress.eta, None);
        assert_eq!(
            Progress::items(u64::MAX, 1).into_proto(at).items_done,
            i64::MAX
        );
    }

    #[test]
    fn stored_progress_maps_empty_fields_to_none() {
        let info = ProgressInfo::from_proto(pb::Progress {
            items_done: 5,
            eta: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert_eq!(info.fraction(), None);
        assert_eq!(info.message(), None);
        assert_eq!(info.stage(), None);
        assert_eq!(info.items_done(), 5);
        assert_eq!(info.items_total(), None);
        assert_eq!(
            info.eta(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(info.updated_at(), None);
    }

    #[test]
    fn log_levels_round_trip_and_unknown_ones_read_as_info() {
        for level in [
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
        ] {
            assert_eq!(LogLevel::from_proto(level.to_proto() as i32), level);
        }
        assert_eq!(LogLevel::from_proto(0), LogLevel::Info);
        assert_eq!(LogLevel::from_proto(99), LogLevel::Info);
        assert_eq!(LogLevel::Warn.to_string(), "WARN");
    }
}
