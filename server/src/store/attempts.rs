//! Ending attempts: the one statement that applies how an attempt ends, whatever ended it (a
//! completion, a failure, a lapsed lease, a hand-back), and the reads its decisions need.
//!
//! The decision is made in code (`domain::ending`); this statement only picks, under the job's
//! row lock, the branch for the stop request the row holds (a cancel, a pause, or neither), and
//! writes what it says: the state, whether the attempt counts, the attempt's row and the event,
//! all in one statement. Every change is fenced by the attempt (invariant 2).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Result, Store, Term,
    jobs::nullable,
    leases::{ATTEMPT_UPSERT, LEASE_MATCH, PRIOR_OUTCOME, RUNNING, SettleResult},
    notify::send,
    query_as, query_scalar,
    rows::SignalWait,
};
use crate::domain::{
    AttemptOutcome, JobId, JobState, LeaseRef, TenantId,
    ending::{Attempt, Backoff, Decision, End, KindRule},
};
use crate::{
    domain::trace::TraceContext,
    metrics::{self, Ended},
    telemetry::{self, JobStep, Step},
};

/// What a statement ending an attempt must see of its job beyond its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Nothing more.
    None,
    /// The attempt is within its timeout: a result after its deadline is refused.
    InTime,
    /// Its lease has lapsed: a renewal since wins over the reaper.
    Lapsed,
    /// No handler has started it: a worker cannot hand back, uncounted, an attempt it ran.
    Unstarted,
}

impl Guard {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::InTime => "in_time",
            Self::Lapsed => "lapsed",
            Self::Unstarted => "unstarted",
        }
    }
}

/// What a resend of the same report would find in the attempt's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// A resent completion: the attempt succeeded (or waits for its children).
    Completion,
    /// A resent failure: the attempt failed, timed out, or was cancelled or paused.
    Failure,
    /// Nothing is resent (hand-backs and lapses are not acknowledged by outcome).
    Never,
}

impl Resend {
    fn settled_by(self, outcome: AttemptOutcome) -> bool {
        match self {
            Self::Completion => matches!(
                outcome,
                AttemptOutcome::Succeeded | AttemptOutcome::Suspended
            ),
            Self::Failure => matches!(
                outcome,
                AttemptOutcome::Failed
                    | AttemptOutcome::TimedOut
                    | AttemptOutcome::Cancelled
                    | AttemptOutcome::Paused
            ),
            Self::Never => false,
        }
    }
}

/// One attempt to end, as decided.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub decision: Decision,
    /// The result's type URL and bytes, for a completion.
    pub result: Option<(String, Vec<u8>)>,
    pub guard: Guard,
    pub resend: Resend,
    /// For an attempt whose handler waits for a signal: the wait, and its timeout.
    pub signal_wait: Option<(SignalWait, Option<std::time::Duration>)>,
}

/// A running attempt's facts, read for the decision of how it ends.
#[derive(Debug, Clone)]
pub struct RunningAttempt {
    pub attempt: Attempt,
    /// Whether its deadline had passed when it was read.
    pub past_deadline: bool,
    pub now: DateTime<Utc>,
}

/// A running attempt whose lease lapsed, with what its decision needs.
#[derive(Debug, Clone)]
pub struct LapsedAttempt {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub attempt: Attempt,
    pub started: bool,
    pub timed_out: bool,
    pub worker: String,
    pub timeout_ms: Option<i64>,
    pub now: DateTime<Utc>,
}

/// The branch of [`Decision`] the row's stop request selects, for column `x` of each branch's
/// input. The decision never makes the no-stop branch CANCELLED or PAUSED, so the state a row
/// ends in also tells which branch it took ([`TAKEN`]).
macro_rules! branch {
    ($x:literal) => {
        concat!(
            "(CASE WHEN j.cancel_requested_at IS NOT NULL THEN i.cancel_",
            $x,
            " WHEN j.pause_requested_at IS NOT NULL THEN i.pause_",
            $x,
            " ELSE i.end_",
            $x,
            " END)"
        )
    };
}

/// The outcome of the branch a row took, read from the state it ended in (see [`branch!`]).
const TAKEN_OUTCOME: &str = "CASE j.state WHEN 'cancelled' THEN i.cancel_outcome \
     WHEN 'paused' THEN i.pause_outcome ELSE i.end_outcome END";

#[derive(sqlx::FromRow)]
struct EndedRow {
    applied_state: Option<JobState>,
    /// The job's queue and type, when the end applied: the labels of its metrics.
    queue: Option<String>,
    job_type: Option<String>,
    /// How long the attempt ran, when the end applied and counted it as run.
    ran_s: Option<f64>,
    /// The job's trace context, when the end applied (see `telemetry`).
    traceparent: Option<String>,
    tracestate: Option<String>,
    prior_outcome: Option<AttemptOutcome>,
    late: Option<bool>,
}

impl Store {
    /// Ends attempts as decided, in one statement; results in input order. An input whose lease
    /// no longer matches (or whose guard fails) changes nothing: it was already ended the same
    /// way (a resend), or its token is stale, or its result came after its deadline.
    pub async fn end_attempts(&self, ends: &[AttemptEnd]) -> Result<Vec<SettleResult>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[], \
                     $4::job_state[], $5::bool[], $6::attempt_outcome[], \
                     $7::job_state[], $8::bool[], $9::attempt_outcome[], \
                     $10::job_state[], $11::bool[], $12::attempt_outcome[], \
                     $13::int8[], $14::jsonb[], $15::text[], $16::bytea[], $17::text[], \
                     $18::text[], $19::text[], $20::int4[], $21::int8[]) WITH ORDINALITY \
                 AS t(tenant_id, id, attempt, end_state, end_counts, end_outcome, \
                      cancel_state, cancel_counts, cancel_outcome, \
                      pause_state, pause_counts, pause_outcome, \
                      retry_in_us, error, result_type, result, reason, guard, \
                      signal_name, signal_count, signal_timeout_ms, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET \
                     state = {state}, \
                     attempt_base = j.attempt_base + CASE WHEN {counts} THEN 0 ELSE 1 END, \
                     run_at = CASE WHEN {state} = 'retrying' \
                                   THEN now() + i.retry_in_us * interval '1 microsecond' \
                                   ELSE j.run_at END, \
                     last_error = CASE WHEN {state} IN ('failed', 'retrying') THEN i.error \
                                       ELSE j.last_error END, \
                     result_type = CASE WHEN {state} = 'succeeded' THEN i.result_type \
                                        ELSE j.result_type END, \
                     result = CASE WHEN {state} = 'succeeded' THEN i.result ELSE j.result END, \
                     lease_owner = CASE WHEN {outcome} IS NULL THEN NULL ELSE j.lease_owner END, \
                     finished_at = CASE WHEN {state} IN ('succeeded', 'failed', 'cancelled') \
                                        THEN now() END, \
                     awaiting_children = {state} = 'pending' AND i.signal_name IS NULL, \
                     children_ended = j.children_ended AND {outcome} IS NULL, \
                     awaiting_signal = CASE WHEN {state} = 'pending' THEN i.signal_name END, \
                     awaiting_signal_count = CASE WHEN {state} = 'pending' \
                                                  THEN i.signal_count END, \
                     signal_deadline = CASE WHEN {state} = 'pending' THEN now() \
                         + i.signal_timeout_ms * interval '1 millisecond' END, \
                     signal_timed_out = CASE WHEN {outcome} IS NULL \
                                             THEN j.signal_timed_out END, \
                     lease_expires_at = NULL, pause_requested_at = NULL, updated_at = now() \
                 FROM input i \
                 WHERE {LEASE_MATCH} \
                   AND CASE i.guard \
                       WHEN 'lapsed' THEN j.lease_expires_at < now() \
                       WHEN 'unstarted' THEN j.handler_started_at IS NULL \
                       WHEN 'in_time' THEN j.timeout_ms IS NULL \
                            OR j.attempt_started_at + j.timeout_ms * interval '1 millisecond' \
                               > now() \
                       ELSE true END \
                 RETURNING j.id, j.tenant_id, j.attempt, j.state, j.queue, j.job_type, \
                           j.last_error, j.traceparent, j.tracestate, \
                           j.cancel_reason, j.pause_reason, j.lease_owner, \
                           j.attempt_started_at, {TAKEN_OUTCOME} AS outcome, \
                           i.error AS attempt_error, i.reason \
             ), att AS ( \
                 INSERT INTO job_attempts AS a (job_id, attempt, tenant_id, worker_id, \
                                                started_at, finished_at, outcome, error) \
                 SELECT id, attempt, tenant_id, coalesce(lease_owner, ''), \
                        coalesce(attempt_started_at, now()), now(), outcome, \
                        CASE WHEN outcome IN ('failed', 'timed_out', 'lease_expired') \
                             THEN attempt_error END \
                 FROM upd WHERE outcome IS NOT NULL AND outcome <> 'succeeded' \
                 {ATTEMPT_UPSERT} \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        CASE state \
                            WHEN 'succeeded' THEN '{{}}'::jsonb \
                            WHEN 'cancelled' THEN jsonb_build_object('reason', cancel_reason) \
                            WHEN 'paused' THEN jsonb_build_object('reason', pause_reason) \
                            WHEN 'available' THEN jsonb_build_object('reason', reason) \
                            WHEN 'pending' THEN jsonb_build_object('reason', reason) \
                            ELSE jsonb_build_object('error', last_error) END \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} \
                 FROM (SELECT DISTINCT tenant_id, queue FROM upd WHERE state = 'available') q \
                 UNION ALL \
                 SELECT {due} \
                 FROM (SELECT 1 FROM upd WHERE state IN ('retrying', 'pending') LIMIT 1) d \
             ) \
             SELECT upd.state AS applied_state, {PRIOR_OUTCOME} AS prior_outcome, \
                    upd.queue, upd.job_type, upd.traceparent, upd.tracestate, \
                    CASE WHEN upd.outcome IS NOT NULL THEN extract(epoch FROM \
                        now() - upd.attempt_started_at)::float8 END AS ran_s, \
                    CASE WHEN upd.id IS NULL AND i.guard = 'in_time' THEN EXISTS ( \
                        SELECT 1 FROM jobs k WHERE k.tenant_id = i.tenant_id AND k.id = i.id \
                          AND k.attempt = i.attempt AND k.state = 'running') END AS late \
             FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt \
             CROSS JOIN (SELECT count(*) FROM wake) w \
             ORDER BY i.ord",
            work = send::work("tenant_id", "queue"),
            due = send::due(),
            state = branch!("state"),
            counts = branch!("counts"),
            outcome = branch!("outcome"),
        );
        let column = |pick: fn(&Decision) -> End| -> (Vec<JobState>, Vec<bool>, Vec<Option<AttemptOutcome>>) {
            let ends = ends.iter().map(|e| pick(&e.decision));
            let (mut states, mut counts, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
            for end in ends {
                states.push(end.state);
                counts.push(end.counts);
                outcomes.push(end.outcome);
            }
            (states, counts, outcomes)
        };
        let otherwise = column(|d| d.otherwise);
        let on_cancel = column(|d| d.on_cancel);
        let on_pause = column(|d| d.on_pause);
        let query = query_as::<EndedRow>(sql)
            .bind(
                ends.iter()
                    .map(|e| e.tenant.as_str().to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(ends.iter().map(|e| e.lease.job_id.0).collect::<Vec<Uuid>>())
            .bind(ends.iter().map(|e| e.lease.attempt).collect::<Vec<_>>())
            .bind(otherwise.0)
            .bind(otherwise.1)
            .bind(otherwise.2)
            .bind(on_cancel.0)
            .bind(on_cancel.1)
            .bind(on_cancel.2)
            .bind(on_pause.0)
            .bind(on_pause.1)
            .bind(on_pause.2)
            .bind(
                ends.iter()
                    .map(|e| {
                        e.decision
                            .retry_in
                            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
                    })
                    .collect::<Vec<_>>(),
            )
            .bind(
                ends.iter()
                    .map(|e| e.decision.error.clone().map(Json))
                    .collect::<Vec<_>>(),
            )
            .bind(
                ends.iter()
                    .map(|e| e.result.as_ref().map(|(t, _)| t.clone()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                ends.iter()
                    .map(|e| e.result.as_ref().map(|(_, r)| r.clone()))
                    .collect::<Vec<_>>(),
            )
            .bind(ends.iter().map(|e| e.decision.reason).collect::<Vec<_>>())
            .bind(ends.iter().map(|e| e.guard.as_str()).collect::<Vec<_>>())
            .bind(nullable(ends.iter().map(|e| {
                e.signal_wait.as_ref().map(|(wait, _)| wait.name.clone())
            })))
            .bind(nullable(
                ends.iter()
                    .map(|e| e.signal_wait.as_ref().map(|(wait, _)| wait.count)),
            ))
            .bind(nullable(ends.iter().map(|e| {
                e.signal_wait
                    .as_ref()
                    .and_then(|(_, timeout)| timeout.map(super::leases::millis))
            })));
        let rows: Vec<EndedRow> = self.hot(async |c| Ok(query.fetch_all(c).await?)).await?;
        metrics::ended(rows.iter().zip(ends).filter_map(|(row, end)| {
            let state = row.applied_state?;
            let how = match state {
                JobState::Succeeded => Ended::Succeeded,
                JobState::Failed => Ended::Failed,
                JobState::Retrying => Ended::Retried,
                JobState::Cancelled => Ended::Cancelled,
                _ => Ended::Other,
            };
            let series = (
                end.tenant.as_str(),
                row.queue.as_deref()?,
                row.job_type.as_deref()?,
            );
            Some((series, how, row.ran_s))
        }));
        telemetry::steps(
            Step::Settle,
            rows.iter().zip(ends).filter_map(|(row, end)| {
                Some(JobStep {
                    trace: row.traceparent.clone().map(|traceparent| TraceContext {
                        traceparent,
                        tracestate: row.tracestate.clone(),
                    }),
                    job_id: end.lease.job_id.to_string(),
                    tenant: end.tenant.as_str(),
                    queue: row.queue.as_deref()?,
                    job_type: row.job_type.as_deref()?,
                    attempt: end.lease.attempt,
                    state: row.applied_state?.as_str(),
                })
            }),
        );
        Ok(rows
            .into_iter()
            .zip(ends)
            .map(|(row, end)| match (row.applied_state, row.prior_outcome) {
                (Some(state), _) => SettleResult::Applied(state),
                (None, Some(outcome)) if end.resend.settled_by(outcome) => {
                    SettleResult::AlreadySettled
                }
                _ if row.late == Some(true) => SettleResult::Late,
                _ => SettleResult::Stale,
            })
            .collect())
    }

    /// The facts of running attempts, for deciding how the reported ones end; `None` for a
    /// lease that is no longer running.
    pub async fn running_attempts(
        &self,
        leases: &[(TenantId, LeaseRef)],
    ) -> Result<Vec<Option<RunningAttempt>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[]) \
                 WITH ORDINALITY AS t(tenant_id, id, attempt, ord) \
             ) \
             SELECT i.ord, {FACT_COLUMNS}, \
                    j.timeout_ms IS NOT NULL AND j.attempt_started_at \
                        + j.timeout_ms * interval '1 millisecond' <= now() AS past_deadline \
             FROM input i JOIN jobs j ON {LEASE_MATCH}"
        );
        let rows: Vec<RunningRow> = self
            .pooled(async |c| {
                Ok(query_as(sql)
                    .bind(
                        leases
                            .iter()
                            .map(|(t, _)| t.as_str().to_owned())
                            .collect::<Vec<_>>(),
                    )
                    .bind(leases.iter().map(|(_, l)| l.job_id.0).collect::<Vec<_>>())
                    .bind(leases.iter().map(|(_, l)| l.attempt).collect::<Vec<_>>())
                    .fetch_all(c)
                    .await?)
            })
            .await?;
        let mut out = vec![None; leases.len()];
        for row in rows {
            if let Some(slot) = usize::try_from(row.ord - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
            {
                *slot = Some(RunningAttempt {
                    attempt: row.facts.attempt(),
                    past_deadline: row.past_deadline,
                    now: row.facts.now,
                });
            }
        }
        Ok(out)
    }

    /// Up to `limit` running attempts whose lease has lapsed, oldest lapse first; none unless
    /// `term` is the leader's.
    pub async fn lapsed_attempts(&self, term: Term, limit: i64) -> Result<Vec<LapsedAttempt>> {
        let sql = static_sql!(
            "SELECT j.tenant_id, j.id, {FACT_COLUMNS}, j.handler_started_at IS NOT NULL AS started, \
                    j.timeout_ms, coalesce(j.lease_owner, '?') AS worker, \
                    j.timeout_ms IS NOT NULL AND j.attempt_started_at \
                        + j.timeout_ms * interval '1 millisecond' < now() AS timed_out \
             FROM jobs j WHERE j.state = 'running' AND j.lease_expires_at < now() AND {fence} \
             ORDER BY j.lease_expires_at LIMIT $1",
            fence = leader_fence!("$2"),
        );
        let rows: Vec<LapsedRow> = self
            .pooled(async |c| Ok(query_as(sql).bind(limit).bind(term.0).fetch_all(c).await?))
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| LapsedAttempt {
                tenant: TenantId::new_unchecked(row.tenant_id),
                lease: LeaseRef {
                    job_id: JobId(row.id),
                    attempt: row.facts.attempt,
                },
                attempt: row.facts.attempt(),
                started: row.started,
                timed_out: row.timed_out,
                worker: row.worker,
                timeout_ms: row.timeout_ms,
                now: row.facts.now,
            })
            .collect())
    }

    /// Notes that the handlers of running attempts have started, so that a lapse of their
    /// leases counts (see `domain::ending`).
    pub async fn mark_started(&self, leases: &[(TenantId, LeaseRef)]) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let sql = static_sql!(
            "WITH input AS MATERIALIZED ( \
                 SELECT *, {RUNNING} FROM UNNEST($1::text[], $2::uuid[], $3::int4[]) \
                 WITH ORDINALITY AS t(tenant_id, id, attempt, ord) \
             ), upd AS ( \
                 UPDATE jobs j SET handler_started_at = coalesce(j.handler_started_at, now()) \
                 FROM input i WHERE {LEASE_MATCH} \
                 RETURNING j.id, j.attempt \
             ) \
             SELECT upd.id IS NOT NULL AS matched FROM input i \
             LEFT JOIN upd ON upd.id = i.id AND upd.attempt = i.attempt ORDER BY i.ord"
        );
        let query = query_scalar(sql)
            .bind(
                leases
                    .iter()
                    .map(|(t, _)| t.as_str().to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(leases.iter().map(|(_, l)| l.job_id.0).collect::<Vec<_>>())
            .bind(leases.iter().map(|(_, l)| l.attempt).collect::<Vec<_>>());
        self.hot(async |c| Ok(query.fetch_all(c).await?)).await
    }
}

/// The columns [`AttemptFacts`] reads, from `jobs j`.
const FACT_COLUMNS: &str = "j.attempt, j.attempt_base, j.max_attempts, j.retry_initial_ms, \
     j.retry_max_ms, j.retry_multiplier, j.retry_jitter, j.retry_rules, now() AS now";

#[derive(sqlx::FromRow)]
struct AttemptFacts {
    attempt: i32,
    attempt_base: i32,
    max_attempts: i32,
    retry_initial_ms: i64,
    retry_max_ms: i64,
    retry_multiplier: f64,
    retry_jitter: f64,
    retry_rules: Option<sqlx::types::Json<Vec<KindRule>>>,
    now: DateTime<Utc>,
}

impl AttemptFacts {
    fn attempt(&self) -> Attempt {
        Attempt {
            number: self.attempt,
            uncounted: self.attempt_base,
            max_attempts: self.max_attempts,
            backoff: Backoff {
                initial_ms: self.retry_initial_ms,
                max_ms: self.retry_max_ms,
                multiplier: self.retry_multiplier,
                jitter: self.retry_jitter,
            },
            rules: self
                .retry_rules
                .as_ref()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct RunningRow {
    ord: i64,
    #[sqlx(flatten)]
    facts: AttemptFacts,
    past_deadline: bool,
}

#[derive(sqlx::FromRow)]
struct LapsedRow {
    tenant_id: String,
    id: Uuid,
    #[sqlx(flatten)]
    facts: AttemptFacts,
    started: bool,
    timeout_ms: Option<i64>,
    worker: String,
    timed_out: bool,
}
