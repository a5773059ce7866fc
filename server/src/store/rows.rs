//! Rows as they come out of PostgreSQL, before the API layer turns them into protobuf.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{AttemptOutcome, JobState};

/// The columns of `jobs`, in the order [`JobRow`] reads them; every statement returning jobs
/// selects exactly these.
pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, queue, job_type, payload_type, payload, \
    priority, state, attempt, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, \
    retry_jitter, run_at, lease_owner, lease_expires_at, result_type, result, last_error, \
    idempotency_key, labels, cancel_reason, created_at, updated_at, started_at, finished_at";

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

/// A failure as kept in `jobs.last_error` and `job_attempts.error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub message: String,
    #[serde(default)]
    pub kind: String,
    pub retryable: bool,
    pub attempt: i32,
    pub occurred_at: DateTime<Utc>,
}
