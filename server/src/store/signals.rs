//! Signals of jobs: SignalJob's statement, which stores one with its job, and the scheduler's
//! pass over jobs waiting PENDING for one: reading those whose signal arrived or whose wait
//! timed out, and applying what `domain::waits::signal_wait` decided.

use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Error, Result, Store, Term,
    notify::send,
    query_as, query_scalar,
    rows::{JOB_COLUMNS, JobRow},
};
use crate::domain::{Actor, JobId, JobState, TenantId, waits::SignalWaitEnd};

/// The most signals a job holds: each of them travels in every lease of the job.
pub const MAX_SIGNALS_PER_JOB: i64 = 100;

/// A signal to store.
#[derive(Debug, Clone)]
pub struct NewSignal {
    pub name: String,
    /// The payload's type URL and bytes, when it has one.
    pub payload: Option<(String, Vec<u8>)>,
    pub request_id: Option<String>,
}

/// What SignalJob did.
#[derive(Debug, Clone)]
pub struct Signalled {
    pub job: JobRow,
    /// The signal's place among the job's signals of its name, from 1.
    pub number: i64,
    /// An earlier call with the same request id stored it.
    pub repeated: bool,
}

/// A job waiting for a signal, as the scheduler reads it.
#[derive(Debug, Clone)]
pub struct SignalWaiting {
    pub tenant: String,
    pub id: Uuid,
    pub received: bool,
    pub past_deadline: bool,
}

#[derive(sqlx::FromRow)]
struct WaitingRow {
    tenant_id: String,
    id: Uuid,
    received: bool,
    past_deadline: bool,
}

impl Store {
    /// Stores a signal for a job that has not ended, with its event, and wakes the scheduler
    /// when the job waits for a signal of that name. Under the job's row lock, so that the
    /// count of its signals and the check of its state hold until the commit.
    pub async fn signal_job(
        &self,
        tenant: &TenantId,
        id: JobId,
        signal: &NewSignal,
        actor: Option<&Actor>,
    ) -> Result<Signalled> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let state: Option<JobState> =
            query_scalar("SELECT state FROM jobs WHERE tenant_id = $1 AND id = $2 FOR UPDATE")
                .bind(tenant.as_str())
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let state = state.ok_or(Error::NotFound)?;
        let number_of = "SELECT count(*) FROM job_signals \
                         WHERE tenant_id = $1 AND job_id = $2 AND name = $3 AND seq <= $4";
        if let Some(request_id) = &signal.request_id {
            let earlier: Option<(i64, String)> = query_as(
                "SELECT seq, name FROM job_signals \
                 WHERE tenant_id = $1 AND job_id = $2 AND request_id = $3",
            )
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((seq, name)) = earlier {
                let number: i64 = query_scalar(number_of)
                    .bind(tenant.as_str())
                    .bind(id.0)
                    .bind(&name)
                    .bind(seq)
                    .fetch_one(&mut *tx)
                    .await?;
                let job = super::jobs::get_job(&mut *tx, tenant, id).await?;
                tx.commit().await?;
                return Ok(Signalled {
                    job,
                    number,
                    repeated: true,
                });
            }
        }
        if state.is_terminal() {
            return Err(Error::Ended(state));
        }
        let held: i64 =
            query_scalar("SELECT count(*) FROM job_signals WHERE tenant_id = $1 AND job_id = $2")
                .bind(tenant.as_str())
                .bind(id.0)
                .fetch_one(&mut *tx)
                .await?;
        if held >= MAX_SIGNALS_PER_JOB {
            return Err(Error::TooManySignals(MAX_SIGNALS_PER_JOB));
        }
        let (payload_type, payload) = signal.payload.clone().unwrap_or_default();
        let seq: i64 = query_scalar(
            "INSERT INTO job_signals (tenant_id, job_id, name, payload_type, payload, request_id, \
                                      actor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
        )
        .bind(tenant.as_str())
        .bind(id.0)
        .bind(&signal.name)
        .bind(payload_type)
        .bind(payload)
        .bind(signal.request_id.as_deref())
        .bind(actor.map(Json))
        .fetch_one(&mut *tx)
        .await?;
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET has_signals = true, updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
                 SELECT tenant_id, id, 'signal', attempt, \
                        jsonb_build_object('name', $3::text, 'actor', $4::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {due} FROM upd WHERE state = 'pending' AND awaiting_signal = $3 \
             ) \
             SELECT {JOB_COLUMNS} FROM upd, (SELECT count(*) FROM wake) w",
            due = send::due(),
        );
        let job: JobRow = query_as(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(&signal.name)
            .bind(actor.map(Json))
            .fetch_one(&mut *tx)
            .await?;
        let number: i64 = query_scalar(number_of)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(&signal.name)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Signalled {
            job,
            number,
            repeated: false,
        })
    }

    /// Up to `limit` PENDING jobs waiting for a signal whose signal has arrived or whose wait's
    /// timeout has passed.
    pub async fn decidable_signal_waits(
        &self,
        term: Term,
        limit: i64,
    ) -> Result<Vec<SignalWaiting>> {
        let sql = static_sql!(
            "SELECT j.tenant_id, j.id, \
                    (SELECT count(*) FROM job_signals s \
                     WHERE s.tenant_id = j.tenant_id AND s.job_id = j.id \
                       AND s.name = j.awaiting_signal) >= j.awaiting_signal_count AS received, \
                    coalesce(j.signal_deadline <= now(), false) AS past_deadline \
             FROM jobs j \
             WHERE j.state = 'pending' AND j.awaiting_signal IS NOT NULL AND {fence} \
               AND (j.signal_deadline <= now() OR (SELECT count(*) FROM job_signals s \
                     WHERE s.tenant_id = j.tenant_id AND s.job_id = j.id \
                       AND s.name = j.awaiting_signal) >= j.awaiting_signal_count) \
             LIMIT $2",
            fence = leader_fence!("$1"),
        );
        let rows: Vec<WaitingRow> = self
            .pooled(async |c| Ok(query_as(sql).bind(term.0).bind(limit).fetch_all(c).await?))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| SignalWaiting {
                tenant: r.tenant_id,
                id: r.id,
                received: r.received,
                past_deadline: r.past_deadline,
            })
            .collect())
    }

    /// Applies decisions on jobs waiting for a signal: each becomes AVAILABLE with its event,
    /// one whose wait timed out marked so for its next lease. Jobs no longer waiting are left
    /// alone. Returns how many changed.
    pub async fn end_signal_waits(
        &self,
        term: Term,
        ends: &[(String, Uuid, SignalWaitEnd)],
    ) -> Result<u64> {
        let mut tenants = Vec::with_capacity(ends.len());
        let mut ids = Vec::with_capacity(ends.len());
        let mut timed_out = Vec::with_capacity(ends.len());
        for (tenant, id, end) in ends {
            let late = match end {
                SignalWaitEnd::Wait => continue,
                SignalWaitEnd::Received => false,
                SignalWaitEnd::TimedOut => true,
            };
            tenants.push(tenant.clone());
            ids.push(*id);
            timed_out.push(late);
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = static_sql!(
            "WITH d AS ( \
                 SELECT d.tenant_id, d.id, d.timed_out, j.awaiting_signal AS name \
                 FROM unnest($2::text[], $3::uuid[], $4::bool[]) AS d(tenant_id, id, timed_out) \
                 JOIN jobs j ON j.tenant_id = d.tenant_id AND j.id = d.id \
             ), upd AS ( \
                 UPDATE jobs j SET state = 'available', run_at = now(), \
                     signal_timed_out = CASE WHEN d.timed_out THEN jsonb_build_object( \
                         'name', j.awaiting_signal, 'count', j.awaiting_signal_count) END, \
                     awaiting_signal = NULL, awaiting_signal_count = NULL, \
                     signal_deadline = NULL, updated_at = now() \
                 FROM d WHERE j.tenant_id = d.tenant_id AND j.id = d.id AND j.state = 'pending' \
                   AND j.awaiting_signal IS NOT NULL AND {fence} \
                 RETURNING j.id, j.tenant_id, j.queue, j.state, j.attempt, d.timed_out, d.name \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('reason', \
                     CASE WHEN timed_out THEN 'waiting for signal ' || name || ' timed out' \
                          ELSE 'signal ' || name || ' received' END) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM (SELECT DISTINCT tenant_id, queue FROM upd) q \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)",
            fence = leader_fence!("$1"),
            work = send::work("tenant_id", "queue"),
        );
        let (changed, _woken): (i64, i64) = self
            .pooled(async |c| {
                Ok(query_as(sql)
                    .bind(term.0)
                    .bind(&tenants)
                    .bind(&ids)
                    .bind(&timed_out)
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        Ok(u64::try_from(changed).unwrap_or(0))
    }
}
