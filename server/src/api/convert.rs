//! Conversions from stored rows to protobuf messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jobwire_proto::v1 as pb;

use crate::store::{AttemptRow, ErrorRecord, JobRow};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn millis(ms: i64) -> prost_types::Duration {
    duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

pub fn error(e: &ErrorRecord) -> pb::JobError {
    pb::JobError {
        message: e.message.clone(),
        kind: e.kind.clone(),
        retryable: e.retryable,
        attempt: e.attempt,
        occurred_at: Some(timestamp(e.occurred_at)),
    }
}

pub fn attempt(a: &AttemptRow) -> pb::JobAttempt {
    pb::JobAttempt {
        attempt: a.attempt,
        worker_id: a.worker_id.clone(),
        started_at: Some(timestamp(a.started_at)),
        finished_at: a.finished_at.map(timestamp),
        outcome: a.outcome.to_proto().into(),
        error: a.error.as_ref().map(|e| error(&e.0)),
    }
}

/// A job as the API shows it; `attempts` is filled only for the FULL view.
pub fn job(row: JobRow, attempts: &[AttemptRow]) -> pb::Job {
    pb::Job {
        id: row.id.to_string(),
        tenant: row.tenant_id,
        queue: row.queue,
        job_type: row.job_type,
        payload: Some(prost_types::Any {
            type_url: row.payload_type,
            value: row.payload,
        }),
        priority: i32::from(row.priority),
        state: row.state.to_proto().into(),
        attempt: row.attempt,
        retry_policy: Some(pb::RetryPolicy {
            max_attempts: Some(row.max_attempts),
            initial_backoff: Some(millis(row.retry_initial_ms)),
            max_backoff: Some(millis(row.retry_max_ms)),
            backoff_multiplier: Some(row.retry_multiplier),
            jitter: Some(row.retry_jitter),
        }),
        run_at: Some(timestamp(row.run_at)),
        result: row.result.map(|value| prost_types::Any {
            type_url: row.result_type.unwrap_or_default(),
            value,
        }),
        last_error: row.last_error.as_ref().map(|e| error(&e.0)),
        idempotency_key: row.idempotency_key.unwrap_or_default(),
        labels: row.labels.0,
        lease_owner: row.lease_owner.unwrap_or_default(),
        lease_expires_at: row.lease_expires_at.map(timestamp),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        started_at: row.started_at.map(timestamp),
        finished_at: row.finished_at.map(timestamp),
        attempts: attempts.iter().map(attempt).collect(),
        cancel_reason: row.cancel_reason.unwrap_or_default(),
    }
}

/// The lease message pushed to a worker for a freshly claimed job.
pub fn lease(row: JobRow) -> pb::Lease {
    pb::Lease {
        job_id: row.id.to_string(),
        attempt: row.attempt,
        job_type: row.job_type,
        queue: row.queue,
        payload: Some(prost_types::Any {
            type_url: row.payload_type,
            value: row.payload,
        }),
        priority: i32::from(row.priority),
        max_attempts: row.max_attempts,
        expires_at: row.lease_expires_at.map(timestamp),
        labels: row.labels.0,
        created_at: Some(timestamp(row.created_at)),
    }
}
