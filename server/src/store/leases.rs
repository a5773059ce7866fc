//! Statements on leased jobs: claim, renew, release, and settle (complete or fail).
//!
//! Every statement after the claim is guarded by `state = 'running' AND attempt = $token`, so a
//! message carrying a stale fencing token matches no row and changes nothing (invariant 2).

use std::time::Duration;

use uuid::Uuid;

use super::{
    Result, Store,
    rows::{JOB_COLUMNS, JobRow},
};
use crate::domain::{AttemptOutcome, JobId, JobState, LeaseRef, QueueName, TenantId};

/// The delay before the next attempt, from the job's own policy: exponential in the attempt
/// number (capped so `power` cannot overflow), bounded by the maximum, with symmetric jitter.
/// Refers to the job as `j`.
pub(super) const BACKOFF_MS: &str = "least(j.retry_max_ms, \
     j.retry_initial_ms * power(j.retry_multiplier, least(j.attempt - j.attempt_base - 1, 60))) \
     * (1 + j.retry_jitter * (2 * random() - 1))";

/// A successful attempt to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub result_type: Option<String>,
    pub result: Option<Vec<u8>>,
}

/// A failed attempt to record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub message: String,
    pub kind: String,
    pub non_retryable: bool,
    /// Overrides the policy's backoff when set.
    pub retry_after: Option<Duration>,
}

/// What became of one completion or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleResult {
    /// Recorded; the job is now in this state.
    Applied(JobState),
    /// The same lease was already settled (a resent message); nothing changed.
    AlreadySettled,
    /// The token is not the job's running attempt, or the job does not exist in the tenant.
    Stale,
}

#[derive(sqlx::FromRow)]
struct SettledRow {
    applied_state: Option<JobState>,
    /// How the attempt had ended before this statement, if it had.
    prior_outcome: Option<AttemptOutcome>,
}

impl SettledRow {
    /// A message for an attempt that already ended the same way is a resend: acknowledge it.
    /// Any other unmatched message carries a stale token.
    fn into_result(self, same: AttemptOutcome) -> SettleResult {
        match (self.applied_state, self.prior_outcome) {
            (Some(state), _) => SettleResult::Applied(state),
            (None, Some(outcome)) if outcome == same => SettleResult::AlreadySettled,
            _ => SettleResult::Stale,
        }
    }
}

impl Store {
    /// Leases up to `limit` available jobs of the tenant's `queues` and `job_types` to `worker`,
    /// highest priority first, oldest first among equals. One statement: pick with
    /// `FOR UPDATE SKIP LOCKED` (replicas never pick the same row), bump the attempt (the new
    /// fencing token), open the attempt row and write the event.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        queues: &[QueueName],
        job_types: &[String],
        limit: i64,
        worker: &str,
        lease: Duration,
    ) -> Result<Vec<JobRow>> {
        let sql = static_sql!(
            "WITH picked AS ( \
                 SELECT id FROM jobs \
                 WHERE tenant_id = $1 AND state = 'available' AND queue = ANY($2) \
                   AND job_type = ANY($3) \
                 ORDER BY priority DESC, run_at, id \
                 LIMIT $4 \
                 FOR UPDATE SKIP LOCKED \
             ), upd AS ( \
                 UPDATE jobs j SET state = 'running', attempt = j.attempt + 1, \
                        lease_owner = $5, lease_expires_at = now() + $6 * interval '1 millisecond', \
                        started_at = coalesce(j.started_at, now()), updated_at = now() \
                 FROM picked WHERE j.id = picked.id \
                 RETURNING j.* \
             ), att AS ( \
                 INSERT INTO job_attempts (job_id, attempt, tenant_id, worker_id) \
                 SELECT id, attempt, tenant_id, $5 FROM upd \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('worker', $5) \
                 FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd ORDER BY priority DESC, run_at, id"
        );
        let queues: Vec<&str> = queues.iter().map(QueueName::as_str).collect();
        Ok(sqlx::query_as::<_, JobRow>(sql)
            .bind(tenant.as_str())
            .bind(&queues)
            .bind(job_types)
            .bind(limit)
            .bind(worker)
            .bind(millis(lease))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Extends the listed leases, and names `worker` their owner (a reconnected worker adopts
    /// its leases again). Returns the leases renewed; the others are no longer the worker's.
    pub async fn renew(
        &self,
        tenant: &TenantId,
        leases: &[LeaseRef],
        worker: &str,
        lease: Duration,
    ) -> Result<Vec<LeaseRef>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(Uuid, i32)> = sqlx::query_as(
            "UPDATE jobs j SET lease_expires_at = now() + $5 * interval '1 millisecond', \
                    lease_owner = $4 \
             FROM UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt) \
             WHERE j.tenant_id = $1 AND j.id = r.id AND j.attempt = r.attempt \
               AND j.state = 'running' \
             RETURNING j.id, j.attempt",
        )
        .bind(tenant.as_str())
        .bind(leases.iter().map(|l| l.job_id.0).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.attempt).collect::<Vec<_>>())
        .bind(worker)
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, attempt)| LeaseRef {
                job_id: JobId(id),
                attempt,
            })
            .collect())
    }

    /// Hands back leases that never reached their worker (its stream closed first): the job is
    /// available again and the attempt is undone, as no handler ever saw that token.
    pub async fn release_undelivered(&self, tenant: &TenantId, leases: &[LeaseRef]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "WITH r AS ( \
                 SELECT * FROM UNNEST($2::uuid[], $3::int4[]) AS r(id, attempt) \
             ), del AS ( \
                 DELETE FROM job_attempts a USING r \
                 WHERE a.job_id = r.id AND a.attempt = r.attempt \
             ), upd AS ( \
                 UPDATE jobs j SET state = 'available', attempt = j.attempt - 1, \
                        lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
                 FROM r WHERE j.tenant_id = $1 AND j.id = r.id AND j.attempt = r.attempt \
                   AND j.state = 'running' \
                 RETURNING j.id, j.tenant_id, j.attempt, j.queue \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', 'available', attempt, \
                        '{\"reason\": \"lease not delivered\"}' \
                 FROM upd \
             ) \
             SELECT pg_notify('jobwire_jobs', tenant_id || '/' || queue) FROM upd",
        )
        .bind(tenant.as_str())
        .bind(leases.iter().map(|l| l.job_id.0).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.attempt).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Records successful attempts in one statement. Results come back in input order.
    pub async fn complete_many(&self, done: &[Completion]) -> Result<Vec<SettleResult>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<SettledRow> = sqlx::query_as(
            "WITH input AS ( \
                 SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::int4[], $4::text[], \
                                      $5::bytea[]) WITH ORDINALITY \
                 AS t(tenant_id, id, attempt, result_type, result, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET state = 'succeeded', result_type = i.result_type, \
                        result = i.result, lease_owner = NULL, lease_expires_at = NULL, \
                        finished_at = now(), updated_at = now() \
                 FROM input i \
                 WHERE j.id = i.id AND j.tenant_id = i.tenant_id AND j.attempt = i.attempt \
                   AND j.state = 'running' \
                 RETURNING j.id, j.tenant_id, j.attempt, j.state \
             ), att AS ( \
                 UPDATE job_attempts a SET finished_at = now(), outcome = 'succeeded' \
                 FROM upd WHERE a.job_id = upd.id AND a.attempt = upd.attempt \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt) \
                 SELECT tenant_id, id, 'state', state, attempt FROM upd \
             ) \
             SELECT upd.state AS applied_state, prior.outcome AS prior_outcome \
             FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt \
             LEFT JOIN job_attempts prior ON prior.job_id = i.id \
                  AND prior.attempt = i.attempt AND prior.tenant_id = i.tenant_id \
             ORDER BY i.ord",
        )
        .bind(
            done.iter()
                .map(|c| c.tenant.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(done.iter().map(|c| c.lease.job_id.0).collect::<Vec<_>>())
        .bind(done.iter().map(|c| c.lease.attempt).collect::<Vec<_>>())
        .bind(
            done.iter()
                .map(|c| c.result_type.clone())
                .collect::<Vec<_>>(),
        )
        .bind(done.iter().map(|c| c.result.clone()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.into_result(AttemptOutcome::Succeeded))
            .collect())
    }

    /// Records failed attempts in one statement: each job goes to RETRYING with its backoff, or
    /// to FAILED when it was non-retryable or had no attempts left. Results in input order.
    pub async fn fail_many(&self, failed: &[Failure]) -> Result<Vec<SettleResult>> {
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS ( \
                 SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::int4[], $4::text[], $5::text[], \
                                      $6::bool[], $7::int8[]) WITH ORDINALITY \
                 AS t(tenant_id, id, attempt, message, kind, non_retryable, retry_after_ms, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = CASE WHEN i.non_retryable OR j.attempt - j.attempt_base >= j.max_attempts \
                                  THEN 'failed'::job_state ELSE 'retrying'::job_state END, \
                     run_at = CASE WHEN i.non_retryable OR j.attempt - j.attempt_base >= j.max_attempts \
                                   THEN j.run_at \
                                   ELSE now() + coalesce(i.retry_after_ms, {BACKOFF_MS}) \
                                                * interval '1 millisecond' END, \
                     last_error = jsonb_build_object('message', i.message, 'kind', i.kind, \
                         'retryable', NOT i.non_retryable, 'attempt', j.attempt, \
                         'occurred_at', now()), \
                     lease_owner = NULL, lease_expires_at = NULL, \
                     finished_at = CASE WHEN i.non_retryable OR j.attempt - j.attempt_base >= j.max_attempts \
                                        THEN now() END, \
                     updated_at = now() \
                 FROM input i \
                 WHERE j.id = i.id AND j.tenant_id = i.tenant_id AND j.attempt = i.attempt \
                   AND j.state = 'running' \
                 RETURNING j.id, j.tenant_id, j.attempt, j.state, j.last_error \
             ), att AS ( \
                 UPDATE job_attempts a SET finished_at = now(), outcome = 'failed', \
                        error = upd.last_error \
                 FROM upd WHERE a.job_id = upd.id AND a.attempt = upd.attempt \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('error', last_error) \
                 FROM upd \
             ) \
             SELECT upd.state AS applied_state, prior.outcome AS prior_outcome \
             FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt \
             LEFT JOIN job_attempts prior ON prior.job_id = i.id \
                  AND prior.attempt = i.attempt AND prior.tenant_id = i.tenant_id \
             ORDER BY i.ord"
        );
        let rows: Vec<SettledRow> = sqlx::query_as(sql)
            .bind(
                failed
                    .iter()
                    .map(|f| f.tenant.as_str().to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(failed.iter().map(|f| f.lease.job_id.0).collect::<Vec<_>>())
            .bind(failed.iter().map(|f| f.lease.attempt).collect::<Vec<_>>())
            .bind(failed.iter().map(|f| f.message.clone()).collect::<Vec<_>>())
            .bind(failed.iter().map(|f| f.kind.clone()).collect::<Vec<_>>())
            .bind(failed.iter().map(|f| f.non_retryable).collect::<Vec<_>>())
            .bind(
                failed
                    .iter()
                    .map(|f| f.retry_after.map(millis))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.into_result(AttemptOutcome::Failed))
            .collect())
    }
}

/// Durations as whole milliseconds for SQL intervals, saturating rather than wrapping.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
