//! Domain types shared by the API, the engine and the store.
//!
//! Names travel as newtypes so that a queue can never be passed where a tenant is expected, and
//! a job's state is one enum mapped to its PostgreSQL type and to its protobuf value in exactly
//! one place each.

pub mod approval;
pub mod ending;
pub mod health;
pub mod trace;
pub mod waits;

use std::{fmt, time::Duration};

use chrono::{DateTime, Utc};

use jobwire_proto::v1 as pb;
use uuid::Uuid;

/// The lifecycle state of a job; the column type `job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(type_name = "job_state", rename_all = "snake_case")]
pub enum JobState {
    AwaitingApproval,
    Pending,
    Scheduled,
    Available,
    Running,
    Retrying,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Terminal states never change again except through RetryJob.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The state as its column spells it: the `state` label of the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingApproval => "awaiting_approval",
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// `None` for `JOB_STATE_UNSPECIFIED`, which names no state.
    pub fn from_proto(state: pb::JobState) -> Option<Self> {
        Some(match state {
            pb::JobState::Unspecified => return None,
            pb::JobState::AwaitingApproval => Self::AwaitingApproval,
            pb::JobState::Pending => Self::Pending,
            pb::JobState::Scheduled => Self::Scheduled,
            pb::JobState::Available => Self::Available,
            pb::JobState::Running => Self::Running,
            pb::JobState::Retrying => Self::Retrying,
            pb::JobState::Paused => Self::Paused,
            pb::JobState::Succeeded => Self::Succeeded,
            pb::JobState::Failed => Self::Failed,
            pb::JobState::Cancelled => Self::Cancelled,
        })
    }

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
}

/// What an event of a job's log records; the `kind` column of `job_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum EventKind {
    /// The job changed state (`state` says into which).
    State,
    /// Its handler reported progress.
    Progress,
    /// Its handler logged a line.
    Log,
    /// A cancel or a pause of its running attempt was asked.
    StopRequested,
    /// SignalJob delivered a signal.
    Signal,
}

/// How an attempt ended; the column type `attempt_outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "attempt_outcome", rename_all = "snake_case")]
pub enum AttemptOutcome {
    Running,
    Succeeded,
    Failed,
    LeaseExpired,
    Cancelled,
    Paused,
    TimedOut,
    /// The handler returned to wait for its children; the job runs again once they end.
    Suspended,
}

impl AttemptOutcome {
    pub fn to_proto(self) -> pb::AttemptOutcome {
        match self {
            Self::Running => pb::AttemptOutcome::Running,
            Self::Succeeded => pb::AttemptOutcome::Succeeded,
            Self::Failed => pb::AttemptOutcome::Failed,
            Self::LeaseExpired => pb::AttemptOutcome::LeaseExpired,
            Self::Cancelled => pb::AttemptOutcome::Cancelled,
            Self::Paused => pb::AttemptOutcome::Paused,
            Self::TimedOut => pb::AttemptOutcome::TimedOut,
            Self::Suspended => pb::AttemptOutcome::Suspended,
        }
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Wraps a name the API layer has already validated.
            pub fn new_unchecked(name: impl Into<String>) -> Self {
                Self(name.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The owner of jobs; every query is scoped to one.
    TenantId
);
name_type!(
    /// A queue: the unit workers subscribe to and (later) limits apply to.
    QueueName
);

/// Who made a change through the API: the acting key, written into the job's events beside the
/// change so a job's history names who approved, rejected, cancelled or retried it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Actor {
    /// `None` on a server running without keys.
    pub key_id: Option<Uuid>,
    pub key_name: String,
}

impl Actor {
    /// The caller on a server running without keys.
    pub fn open() -> Self {
        Self {
            key_id: None,
            key_name: "(no key: server open)".to_owned(),
        }
    }
}

impl TenantId {
    /// The tenant of requests that name none, until authentication assigns tenants.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

/// A job's id: a UUID v7, so ids sort by creation time and index locality is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Names one lease: a job and the attempt holding it. The attempt is the fencing token that
/// makes a late message from a lost worker harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub attempt: i32,
}

/// A retry policy with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    /// Rules by failure kind, overriding the above for failures of that kind.
    pub rules: Vec<ending::KindRule>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            multiplier: 2.0,
            jitter: 0.1,
            rules: Vec::new(),
        }
    }
}

/// A cron expression read in a time zone: when a schedule ticks.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

/// Why a cron expression or time zone was refused, and which of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CronError {
    Expression(String),
    TimeZone(String),
}

impl CronSchedule {
    /// Accepts 5 fields (minute first) or 6 (seconds first); a seventh (year) is refused to
    /// keep expressions portable between cron dialects.
    pub fn parse(expression: &str, zone: &str) -> Result<Self, CronError> {
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(CronError::Expression(format!(
                "must have 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds \
                 first), found {fields}"
            )));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| CronError::Expression(e.to_string()))?;
        let zone = zone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| CronError::TimeZone(format!("{zone:?} is not an IANA time zone name")))?;
        Ok(Self { cron, zone })
    }

    /// The first tick strictly after `after`; `None` when the expression never matches again.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last tick before `at`, or at `at` itself when `inclusive`.
    pub fn previous(&self, at: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&at.with_timezone(&self.zone), inclusive)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}
