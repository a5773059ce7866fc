//! Statements on cron schedules: their definitions, and the firing of due ticks.
//!
//! A firing is one transaction: the due schedules are locked (`FOR UPDATE SKIP LOCKED`), each
//! tick's job is inserted and the schedule advanced, and both commit together. A job records its
//! schedule and tick under a unique index, so even two replicas that both believed they led
//! could not create one tick's job twice.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction, postgres::PgArguments, query::QueryAs, types::Json};
use uuid::Uuid;

use super::{
    Error, Listed, Result, Store, Term,
    jobs::{self, NewJob, enqueue_statement},
    notify::send,
    query, query_as,
    rows::JobRow,
};
use crate::{
    domain::{JobId, QueueName, TenantId},
    metrics,
};

/// What a tick does while the previous tick's job has not finished; the column type
/// `overlap_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "overlap_policy", rename_all = "snake_case")]
pub enum OverlapPolicy {
    Allow,
    Skip,
    CancelPrevious,
}

/// What becomes of ticks missed while no replica ran the schedules; the column type
/// `catch_up_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "catch_up_policy", rename_all = "snake_case")]
pub enum CatchUpPolicy {
    Once,
    Skip,
    All,
}

/// The job a schedule creates at each tick, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobTemplate {
    pub job_type: String,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub queue: String,
    pub priority: i16,
    pub max_attempts: i32,
    pub retry_initial_ms: i64,
    pub retry_max_ms: i64,
    pub retry_multiplier: f64,
    pub retry_jitter: f64,
    pub labels: Json<HashMap<String, String>>,
    pub timeout_ms: Option<i64>,
}

impl JobTemplate {
    /// The job for one tick (`None`: a manual trigger) of schedule `schedule`.
    fn to_job(&self, schedule: Uuid, tick: Option<DateTime<Utc>>) -> NewJob {
        NewJob {
            id: JobId::new(),
            queue: QueueName::new_unchecked(&self.queue),
            job_type: self.job_type.clone(),
            payload_type: self.payload_type.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            retry_initial_ms: self.retry_initial_ms,
            retry_max_ms: self.retry_max_ms,
            retry_multiplier: self.retry_multiplier,
            retry_jitter: self.retry_jitter,
            run_at: None,
            idempotency_key: None,
            labels: self.labels.0.clone(),
            timeout_ms: self.timeout_ms,
            schedule: Some((schedule, tick)),
            job_type_version: None,
            needs_approval: false,
            depends_on: Vec::new(),
            run_regardless: false,
            approval_timeout_ms: None,
            approval_timeout_fails: false,
            retry_rules: Vec::new(),
            accept_existing: false,
            handoff: None,
            trace: None,
        }
    }
}

/// The settable part of a schedule, validated.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub description: String,
    pub cron: String,
    pub time_zone: String,
    pub job: JobTemplate,
    pub overlap_policy: OverlapPolicy,
    pub catch_up_policy: CatchUpPolicy,
    pub max_catch_up: i32,
    pub misfire_grace_ms: i64,
}

/// A schedule to create.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub id: Uuid,
    pub name: String,
    pub spec: ScheduleSpec,
    /// The first tick; `None` creates the schedule paused.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// A change to a schedule, decided from its current row under lock.
#[derive(Debug, Clone)]
pub struct ScheduleUpdate {
    pub spec: ScheduleSpec,
    /// `None` pauses the schedule.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// One row of `schedules`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub cron: String,
    pub time_zone: String,
    #[sqlx(flatten)]
    pub job: JobTemplate,
    pub overlap_policy: OverlapPolicy,
    pub catch_up_policy: CatchUpPolicy,
    pub max_catch_up: i32,
    pub misfire_grace_ms: i64,
    pub paused: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleRow {
    pub fn spec(&self) -> ScheduleSpec {
        ScheduleSpec {
            description: self.description.clone(),
            cron: self.cron.clone(),
            time_zone: self.time_zone.clone(),
            job: self.job.clone(),
            overlap_policy: self.overlap_policy,
            catch_up_policy: self.catch_up_policy,
            max_catch_up: self.max_catch_up,
            misfire_grace_ms: self.misfire_grace_ms,
        }
    }
}

/// A due schedule, locked for firing, with the state of the job its last tick created.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueSchedule {
    #[sqlx(flatten)]
    pub schedule: ScheduleRow,
    /// `None` when there is no last job (or it was deleted).
    pub last_job_state: Option<crate::domain::JobState>,
    /// The database's clock, which decides what is due.
    pub db_now: DateTime<Utc>,
}

const SCHEDULE_COLUMNS: &str = "s.id, s.tenant_id, s.name, s.description, s.cron, s.time_zone, \
    s.job_type, s.payload_type, s.payload, s.queue, s.priority, s.max_attempts, \
    s.retry_initial_ms, s.retry_max_ms, s.retry_multiplier, s.retry_jitter, s.labels, \
    s.timeout_ms, s.overlap_policy, s.catch_up_policy, s.max_catch_up, s.misfire_grace_ms, \
    s.paused, s.next_run_at, s.last_run_at, s.last_job_id, s.created_at, s.updated_at";

/// An open firing: due schedules locked until [`commit`](Self::commit).
pub struct Firing {
    tx: Transaction<'static, Postgres>,
    /// The series (tenant, queue, job type) of the jobs created, counted once committed.
    created: Vec<(String, String, String)>,
}

impl Store {
    pub async fn create_schedule(
        &self,
        tenant: &TenantId,
        new: &NewSchedule,
    ) -> Result<ScheduleRow> {
        let sql = static_sql!(
            "WITH s AS ( \
                 INSERT INTO schedules (id, tenant_id, name, description, cron, time_zone, \
                     job_type, payload_type, payload, queue, priority, max_attempts, \
                     retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, labels, \
                     timeout_ms, overlap_policy, catch_up_policy, max_catch_up, misfire_grace_ms, \
                     paused, next_run_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                     $17, $18, $19, $20, $21, $22, $23 IS NULL, $23) \
                 ON CONFLICT (tenant_id, name) DO NOTHING \
                 RETURNING * \
             ), wake AS ( \
                 SELECT {due} FROM s \
             ) \
             SELECT {SCHEDULE_COLUMNS} FROM s, (SELECT count(*) FROM wake) w",
            due = send::due(),
        );
        let query = query_as::<ScheduleRow>(sql)
            .bind(new.id)
            .bind(tenant.as_str())
            .bind(&new.name);
        let mut tx = self.tenant_transaction(tenant).await?;
        let row = bind_spec(query, &new.spec)
            .bind(new.next_run_at)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::AlreadyExists)?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn get_schedule(&self, tenant: &TenantId, name: &str) -> Result<ScheduleRow> {
        let sql = static_sql!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules s WHERE s.tenant_id = $1 AND s.name = $2"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let row = query_as::<ScheduleRow>(sql)
            .bind(tenant.as_str())
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound)?;
        tx.commit().await?;
        Ok(row)
    }

    /// Schedules by name after `after`, at most `limit`.
    pub async fn list_schedules(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Listed<ScheduleRow>> {
        // As `list_jobs`: the candidates, of which those whose templates fit `max_bytes`.
        let sql = static_sql!(
            "WITH candidate AS ( \
                 SELECT id, row_number() OVER (ORDER BY name) AS n, \
                        sum(octet_length(payload)) OVER (ORDER BY name) AS bytes \
                 FROM schedules \
                 WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2) \
                 ORDER BY name LIMIT $3 \
             ) \
             SELECT {SCHEDULE_COLUMNS}, (SELECT count(*) FROM candidate) AS candidates \
             FROM schedules s \
             WHERE s.id = ANY(ARRAY(SELECT id FROM candidate WHERE n = 1 OR bytes <= $4)) \
             ORDER BY s.name"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let rows = query_as(sql)
            .bind(tenant.as_str())
            .bind(after)
            .bind(limit)
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Listed::from_rows(rows))
    }

    /// Changes a schedule under lock: `change` sees the current row and decides the new one,
    /// so a concurrent firing (which advances `next_run_at`) is never overwritten with a stale
    /// view. `change`'s own errors pass through.
    pub async fn modify_schedule<E: From<Error>>(
        &self,
        tenant: &TenantId,
        name: &str,
        change: impl FnOnce(&ScheduleRow) -> Result<ScheduleUpdate, E>,
    ) -> Result<ScheduleRow, E> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let current = lock_schedule(&mut tx, tenant, name).await?;
        let update = change(&current)?;
        let sql = static_sql!(
            "WITH s AS ( \
                 UPDATE schedules SET description = $2, cron = $3, time_zone = $4, \
                     job_type = $5, payload_type = $6, payload = $7, queue = $8, priority = $9, \
                     max_attempts = $10, retry_initial_ms = $11, retry_max_ms = $12, \
                     retry_multiplier = $13, retry_jitter = $14, labels = $15, timeout_ms = $16, \
                     overlap_policy = $17, catch_up_policy = $18, max_catch_up = $19, \
                     misfire_grace_ms = $20, paused = $21 IS NULL, next_run_at = $21, \
                     updated_at = now() \
                 WHERE id = $1 \
                 RETURNING * \
             ), wake AS ( \
                 SELECT {due} FROM s \
             ) \
             SELECT {SCHEDULE_COLUMNS} FROM s, (SELECT count(*) FROM wake) w",
            due = send::due(),
        );
        let query = query_as::<ScheduleRow>(sql).bind(current.id);
        let row = bind_spec(query, &update.spec)
            .bind(update.next_run_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(Error::from)?;
        tx.commit().await.map_err(Error::from)?;
        Ok(row)
    }

    pub async fn delete_schedule(&self, tenant: &TenantId, name: &str) -> Result<()> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let done = query("DELETE FROM schedules WHERE tenant_id = $1 AND name = $2")
            .bind(tenant.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound);
        }
        Ok(())
    }

    /// Creates a job from a schedule's template now, outside its ticks, and records it as the
    /// schedule's last job.
    pub async fn trigger_schedule(&self, tenant: &TenantId, name: &str) -> Result<JobRow> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let schedule = lock_schedule(&mut tx, tenant, name).await?;
        let job = schedule.job.to_job(schedule.id, None);
        let created = enqueue_statement(&mut *tx, tenant, std::slice::from_ref(&job), None)
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| Error::Corrupt("a triggered job was not inserted".into()))?;
        query(
            "UPDATE schedules SET last_run_at = now(), last_job_id = $2, updated_at = now() \
             WHERE id = $1",
        )
        .bind(schedule.id)
        .bind(created.job.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::enqueued([jobs::series(&created.job)]);
        Ok(created.job)
    }

    /// Opens a firing: locks up to `limit` due, unpaused schedules (of every tenant) that no
    /// other firing holds; none unless `term` is the leader's.
    pub async fn begin_firing(&self, term: Term, limit: i64) -> Result<(Firing, Vec<DueSchedule>)> {
        let mut tx = self.begin().await?;
        let sql = static_sql!(
            "SELECT {SCHEDULE_COLUMNS}, j.state AS last_job_state, now() AS db_now \
             FROM schedules s LEFT JOIN jobs j ON j.tenant_id = s.tenant_id AND j.id = s.last_job_id \
             WHERE s.next_run_at <= now() AND {fence} \
             ORDER BY s.next_run_at LIMIT $1 \
             FOR UPDATE OF s SKIP LOCKED",
            fence = leader_fence!("$2"),
        );
        let due = query_as::<DueSchedule>(sql)
            .bind(limit)
            .bind(term.0)
            .fetch_all(&mut *tx)
            .await?;
        Ok((
            Firing {
                tx,
                created: Vec::new(),
            },
            due,
        ))
    }

    /// The earliest next tick of any unpaused schedule.
    pub async fn next_schedule_tick(&self) -> Result<Option<DateTime<Utc>>> {
        let (at,): (Option<DateTime<Utc>>,) = self
            .pooled(async |c| {
                Ok(query_as("SELECT min(next_run_at) FROM schedules")
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        Ok(at)
    }
}

/// Binds the settable fields of a schedule, in the column order both the insert and the update
/// list them.
fn bind_spec<'q>(
    query: QueryAs<'q, Postgres, ScheduleRow, PgArguments>,
    spec: &'q ScheduleSpec,
) -> QueryAs<'q, Postgres, ScheduleRow, PgArguments> {
    let job = &spec.job;
    query
        .bind(&spec.description)
        .bind(&spec.cron)
        .bind(&spec.time_zone)
        .bind(&job.job_type)
        .bind(&job.payload_type)
        .bind(&job.payload)
        .bind(&job.queue)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.retry_initial_ms)
        .bind(job.retry_max_ms)
        .bind(job.retry_multiplier)
        .bind(job.retry_jitter)
        .bind(&job.labels)
        .bind(job.timeout_ms)
        .bind(spec.overlap_policy)
        .bind(spec.catch_up_policy)
        .bind(spec.max_catch_up)
        .bind(spec.misfire_grace_ms)
}

/// A schedule of the tenant, locked until the transaction ends.
async fn lock_schedule(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    name: &str,
) -> Result<ScheduleRow> {
    let sql = static_sql!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules s \
         WHERE s.tenant_id = $1 AND s.name = $2 FOR UPDATE"
    );
    query_as::<ScheduleRow>(sql)
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(Error::NotFound)
}

impl Firing {
    /// Creates the jobs of `ticks` (oldest first) for a locked schedule and advances it to
    /// `next_run_at` (`None`, for a schedule that can never tick again, pauses it). A tick whose
    /// job exists already creates nothing. Returns the jobs created.
    pub async fn fire(
        &mut self,
        schedule: &ScheduleRow,
        ticks: &[DateTime<Utc>],
        next_run_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<JobRow>> {
        let tenant = TenantId::new_unchecked(&schedule.tenant_id);
        let jobs: Vec<NewJob> = ticks
            .iter()
            .map(|tick| schedule.job.to_job(schedule.id, Some(*tick)))
            .collect();
        let created: Vec<JobRow> = if jobs.is_empty() {
            Vec::new()
        } else {
            enqueue_statement(&mut *self.tx, &tenant, &jobs, None)
                .await?
                .into_iter()
                .flatten()
                .map(|outcome| outcome.job)
                .collect()
        };
        self.created.extend(created.iter().map(|job| {
            (
                job.tenant_id.clone(),
                job.queue.clone(),
                job.job_type.clone(),
            )
        }));
        let last = created.last();
        query(
            "UPDATE schedules SET next_run_at = $2, paused = $2 IS NULL, \
                 last_run_at = coalesce($3, last_run_at), \
                 last_job_id = coalesce($4, last_job_id), updated_at = now() \
             WHERE id = $1",
        )
        .bind(schedule.id)
        .bind(next_run_at)
        .bind(last.and_then(|job| job.schedule_tick))
        .bind(last.map(|job| job.id))
        .execute(&mut *self.tx)
        .await?;
        Ok(created)
    }

    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        metrics::enqueued(
            self.created.iter().map(|(tenant, queue, job_type)| {
                (tenant.as_str(), queue.as_str(), job_type.as_str())
            }),
        );
        Ok(())
    }
}
