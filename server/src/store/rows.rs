//! Rows as they come out of PostgreSQL, before the API layer turns them into protobuf.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{AttemptOutcome, EventKind, JobState, trace::TraceContext};

/// The columns of `jobs`, in the order [`JobRow`] reads them; every statement returning jobs
/// selects exactly these.
pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, queue, job_type, payload_type, payload, \
    priority, state, attempt, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, \
    retry_jitter, run_at, lease_owner, lease_expires_at, result_type, result, last_error, \
    idempotency_key, labels, cancel_reason, created_at, updated_at, started_at, finished_at, \
    attempt_base, progress, progress_origin, checkpoint IS NOT NULL AS has_checkpoint, \
    timeout_ms, attempt_started_at, cancel_requested_at, pause_requested_at, pause_reason, \
    schedule_id, schedule_tick, job_type_version, depends_on, run_regardless, approval_deadline, \
    approval_timeout_fails, retry_rules, traceparent, tracestate, parent_id, awaiting_children, \
    children_ended, has_signals, awaiting_signal, signal_deadline, signal_timed_out";

/// One row of `jobs`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant_id: String,
    pub queue: String,
    pub job_type: String,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub priority: i16,
    pub state: JobState,
    pub attempt: i32,
    pub max_attempts: i32,
    pub retry_initial_ms: i64,
    pub retry_max_ms: i64,
    pub retry_multiplier: f64,
    pub retry_jitter: f64,
    pub run_at: DateTime<Utc>,
    /// The worker of the latest attempt, kept after it ends so that the attempt's row, written
    /// then, can name it; the API shows it only while the job is RUNNING.
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub result_type: Option<String>,
    pub result: Option<Vec<u8>>,
    pub last_error: Option<Json<ErrorRecord>>,
    pub idempotency_key: Option<String>,
    pub labels: Json<HashMap<String, String>>,
    pub cancel_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempt_base: i32,
    pub progress: Option<Json<serde_json::Value>>,
    pub progress_origin: Option<Json<ProgressOrigin>>,
    pub has_checkpoint: bool,
    pub timeout_ms: Option<i64>,
    pub attempt_started_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub pause_requested_at: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    pub schedule_id: Option<Uuid>,
    pub schedule_tick: Option<DateTime<Utc>>,
    pub job_type_version: Option<i32>,
    /// The jobs this one waits for (None: it depends on none).
    pub depends_on: Option<Vec<Uuid>>,
    /// Runs once its dependencies have ended even when one failed.
    pub run_regardless: bool,
    /// While AWAITING_APPROVAL: when the approval timeout ends the wait.
    pub approval_deadline: Option<DateTime<Utc>>,
    /// The approval timeout fails the job rather than reject it.
    pub approval_timeout_fails: bool,
    /// Retry rules by failure kind.
    pub retry_rules: Option<Json<Vec<crate::domain::ending::KindRule>>>,
    /// The W3C trace context the job was enqueued with (`domain::trace`), if any.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The job whose running attempt enqueued this one.
    pub parent_id: Option<Uuid>,
    /// PENDING until every child has ended.
    pub awaiting_children: bool,
    /// The next attempt resumes the job after its children ended.
    pub children_ended: bool,
    /// The job holds signals (SignalJob).
    pub has_signals: bool,
    /// While PENDING for a signal: its name, and when the wait times out.
    pub awaiting_signal: Option<String>,
    pub signal_deadline: Option<DateTime<Utc>>,
    /// The wait the next attempt resumes from timed out.
    pub signal_timed_out: Option<Json<SignalWait>>,
}

/// A wait for a job's signal: its name and how many of that name it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalWait {
    pub name: String,
    pub count: i32,
}

/// The signals of a leased job, oldest first, column by column (all `None` when it holds
/// none).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct LeaseSignals {
    pub signal_names: Option<Vec<String>>,
    pub signal_types: Option<Vec<String>>,
    pub signal_payloads: Option<Vec<Vec<u8>>>,
    pub signal_times: Option<Vec<DateTime<Utc>>>,
}

impl JobRow {
    /// The trace context the job was enqueued with, checked then.
    pub fn trace(&self) -> Option<TraceContext> {
        self.traceparent.clone().map(|traceparent| TraceContext {
            traceparent,
            tracestate: self.tracestate.clone(),
        })
    }
}

/// A job freshly leased: the row plus what only its worker needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeasedRow {
    #[sqlx(flatten)]
    pub job: JobRow,
    /// The last checkpoint, for the attempt to resume from.
    pub checkpoint: Option<Vec<u8>>,
    #[sqlx(flatten)]
    pub signals: LeaseSignals,
}

/// Where the current attempt's progress started, for the ETA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressOrigin {
    pub fraction: f64,
    pub at: DateTime<Utc>,
    pub attempt: i32,
}

/// One row of `job_events`, with what filters need to know of its job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub seq: i64,
    pub tenant_id: String,
    pub job_id: Uuid,
    pub kind: EventKind,
    pub state: Option<JobState>,
    pub attempt: i32,
    pub data: Json<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    /// The job's queue, type and labels, read only where a WatchJobs filter may need them:
    /// reading them costs a lookup of the job per event, which was most of the fanout's read.
    pub queue: Option<String>,
    pub job_type: Option<String>,
    pub labels: Option<Json<HashMap<String, String>>>,
    /// The job's parent, read with the columns above (for WatchJob's `include_children`).
    pub parent_id: Option<Uuid>,
}

/// One row of `job_attempts`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: AttemptOutcome,
    pub error: Option<Json<ErrorRecord>>,
}

pub use crate::domain::ending::ErrorRecord;
