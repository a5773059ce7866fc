//! Statements on whole jobs: enqueue, read, list, cancel and retry.

use std::{collections::HashMap, sync::LazyLock};

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, types::Json};
use uuid::Uuid;

use super::{
    Error, Result, StopKind, Store,
    notify::send,
    query, query_as, query_scalar,
    rows::{AttemptRow, JOB_COLUMNS, JobRow},
};
use crate::{
    domain::{
        Actor, JobId, JobState, LeaseRef, QueueName, TenantId, ending::KindRule,
        trace::TraceContext,
    },
    metrics,
    telemetry::{self, JobStep, Step},
};

/// A validated job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub queue: QueueName,
    pub job_type: String,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub priority: i16,
    pub max_attempts: i32,
    pub retry_initial_ms: i64,
    pub retry_max_ms: i64,
    pub retry_multiplier: f64,
    pub retry_jitter: f64,
    /// `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub labels: HashMap<String, String>,
    pub timeout_ms: Option<i64>,
    /// The schedule and tick that created the job, if one did.
    pub schedule: Option<(Uuid, Option<DateTime<Utc>>)>,
    /// The registered version of the job type the payload was checked against, if any.
    pub job_type_version: Option<i32>,
    /// Held AWAITING_APPROVAL until ApproveJob.
    pub needs_approval: bool,
    /// How long the job may wait AWAITING_APPROVAL, if it needs approval.
    pub approval_timeout_ms: Option<i64>,
    /// The approval timeout fails the job rather than reject it.
    pub approval_timeout_fails: bool,
    /// Retry rules by failure kind.
    pub retry_rules: Vec<KindRule>,
    /// Jobs of the tenant this one waits PENDING for.
    pub depends_on: Vec<JobId>,
    /// Run once the dependencies have ended even when one failed, rather than be cancelled.
    pub run_regardless: bool,
    /// With an idempotency key already used for another job type or payload, take that job
    /// rather than refuse.
    pub accept_existing: bool,
    /// A worker of this replica with a slot set aside for the job: if the job is due and its
    /// queue is neither paused nor limited, it starts RUNNING under a lease to that worker in
    /// the enqueue statement itself, with no claim after it.
    pub handoff: Option<Handoff>,
    /// The W3C trace context of the producer's span, kept with the job for its worker.
    pub trace: Option<TraceContext>,
}

/// Who a job is leased to at its enqueue, and for how long.
#[derive(Debug, Clone)]
pub struct Handoff {
    pub worker: String,
    pub lease: std::time::Duration,
    /// The worker says when its handlers start; otherwise the attempt counts as started now.
    pub reports_started: bool,
}

/// The job an enqueue produced, or the one its idempotency key already named.
#[derive(Debug, Clone)]
pub struct EnqueueOutcome {
    pub job: JobRow,
    pub created: bool,
    /// False when an existing job was returned for an idempotency key it holds with another
    /// job type or payload: the caller refuses it unless the job accepts the existing one.
    pub same: bool,
}

/// What EnqueueJobs answers for each job: a batch caller gets ids and states, so the statement
/// returns only those. Reading back whole rows cost about an eighth of a 1,000-job call, most
/// of it the server decoding 40 columns a row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Enqueued {
    pub id: Uuid,
    pub state: JobState,
    pub created: bool,
    /// As [`EnqueueOutcome::same`].
    pub same: bool,
}

/// Rows of a listing read within a byte budget, and how many matched before the budget.
#[derive(Debug)]
pub struct Listed<T> {
    pub rows: Vec<T>,
    /// How many rows matched (up to the limit asked); more than `rows.len()` when the byte
    /// budget left some out.
    pub candidates: usize,
}

impl NewJob {
    /// Whether `existing`, the job holding this job's idempotency key, is the same request:
    /// the same job type and payload. Options (queue, priority, retries) may differ; a repeat
    /// that changes them gets the first job as it was.
    pub fn repeats(&self, existing: &JobRow) -> bool {
        existing.job_type == self.job_type
            && existing.payload_type == self.payload_type
            && existing.payload == self.payload
    }
}

impl<T> Listed<T> {
    pub(super) fn from_rows(rows: Vec<ListedRow<T>>) -> Self {
        let candidates = rows
            .first()
            .map_or(0, |r| usize::try_from(r.candidates).unwrap_or(usize::MAX));
        Self {
            rows: rows.into_iter().map(|r| r.row).collect(),
            candidates,
        }
    }
}

/// A row of a listing, with the count of candidates every row repeats.
#[derive(sqlx::FromRow)]
pub(super) struct ListedRow<T> {
    #[sqlx(flatten)]
    row: T,
    candidates: i64,
}

/// Filters of ListJobs; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub states: Vec<JobState>,
    pub queue: Option<QueueName>,
    pub job_type: Option<String>,
    /// Only jobs whose last error has this kind.
    pub error_kind: Option<String>,
    /// Only jobs whose last error's message contains this, ignoring case.
    pub error_text: Option<String>,
    /// Only jobs carrying every one of these labels.
    pub labels: HashMap<String, String>,
    /// Only the children of this job.
    pub parent: Option<JobId>,
    /// Only jobs older (smaller id) than this one: the page cursor.
    pub before: Option<JobId>,
}

/// A job's metric series: its tenant, queue and type.
pub(super) fn series(job: &JobRow) -> metrics::Series<'_> {
    (&job.tenant_id, &job.queue, &job.job_type)
}

/// A job's span about the statement that just changed it (see `telemetry`).
pub(super) fn job_step(job: &JobRow) -> JobStep<'_> {
    JobStep {
        trace: job.trace(),
        job_id: job.id.to_string(),
        tenant: &job.tenant_id,
        queue: &job.queue,
        job_type: &job.job_type,
        attempt: job.attempt,
        state: job.state.as_str(),
    }
}

/// How long a job that just started had been due, in seconds: from its run_at (its enqueue,
/// or the time it was scheduled or retried for) to its attempt's start.
pub(super) fn start_delay(job: &JobRow) -> f64 {
    job.attempt_started_at
        .map_or(0.0, |started| (started - job.run_at).as_seconds_f64())
}

impl Store {
    /// Inserts jobs in one statement, with their first event rows and a NOTIFY per queue that
    /// received available work. Jobs whose idempotency key the tenant already used are not
    /// inserted; the existing job is returned instead. Outcomes come back in input order.
    pub async fn enqueue_many(
        &self,
        tenant: &TenantId,
        jobs: &[NewJob],
    ) -> Result<Vec<EnqueueOutcome>> {
        let outcomes = self
            .hot_as_tenant(tenant, async |c| {
                enqueue_statement(c, tenant, jobs, None).await
            })
            .await?;
        metrics::enqueue_batch(jobs.len());
        let created = || outcomes.iter().flatten().filter(|o| o.created);
        metrics::enqueued(created().map(|o| series(&o.job)));
        let leased = || created().filter(|o| o.job.state == JobState::Running);
        metrics::started(leased().map(|o| (series(&o.job), start_delay(&o.job))));
        telemetry::steps(Step::Claim, leased().map(|o| job_step(&o.job)));
        self.settle_conflicts(tenant, jobs, outcomes, |job, row| EnqueueOutcome {
            job: row.clone(),
            created: false,
            same: job.repeats(row),
        })
        .await
    }

    /// [`enqueue_many`](Self::enqueue_many) for callers that need only each job's id and state.
    pub async fn enqueue_batch(&self, tenant: &TenantId, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        let sql = if keyed(jobs) {
            ENQUEUE_KEYED_BRIEF.as_str()
        } else {
            ENQUEUE_UNKEYED_BRIEF.as_str()
        };
        // A key reused for another job type or payload refuses the whole batch: the check runs
        // inside the statement's transaction, which it then leaves uncommitted.
        let rows: Vec<Ordered<Enqueued>> = self
            .hot_as_tenant(tenant, async |c| {
                let rows: Vec<Ordered<Enqueued>> = enqueue_rows(c, sql, tenant, jobs, None).await?;
                match rows.iter().find(|r| {
                    !r.row.same
                        && usize::try_from(r.ord - 1)
                            .ok()
                            .and_then(|i| jobs.get(i))
                            .is_some_and(|j| !j.accept_existing)
                }) {
                    Some(reused) => Err(Error::KeyReused {
                        index: usize::try_from(reused.ord - 1).unwrap_or(0),
                        existing: JobId(reused.row.id),
                    }),
                    None => Ok(rows),
                }
            })
            .await?;
        metrics::enqueue_batch(jobs.len());
        metrics::enqueued(rows.iter().filter(|r| r.row.created).filter_map(|r| {
            let job = jobs.get(usize::try_from(r.ord - 1).ok()?)?;
            Some((tenant.as_str(), job.queue.as_str(), job.job_type.as_str()))
        }));
        self.settle_conflicts(tenant, jobs, in_order(jobs.len(), rows), |job, row| {
            Enqueued {
                id: row.id,
                state: row.state,
                created: false,
                same: job.repeats(row),
            }
        })
        .await
    }

    /// Enqueues jobs of which some depend on others, or children of a running job, in one
    /// transaction: the dependencies outside the batch must be jobs of the tenant (each is
    /// marked waited on, so that its ending wakes the scheduler), and the dependent jobs start
    /// PENDING. A `parent` must be running the attempt named: its row is locked until the
    /// commit, so a parent's wait for its children, which ends that attempt, sees every child
    /// enqueued before it and none after. Outside the group commit, so that one caller's
    /// unknown dependency or stale parent fails no one else.
    pub async fn enqueue_dependent(
        &self,
        tenant: &TenantId,
        jobs: &[NewJob],
        parent: Option<LeaseRef>,
    ) -> Result<Vec<EnqueueOutcome>> {
        let batch: Vec<Uuid> = jobs.iter().map(|j| j.id.0).collect();
        let mut targets: Vec<Uuid> = jobs
            .iter()
            .flat_map(|j| j.depends_on.iter().map(|d| d.0))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let (inside, outside): (Vec<Uuid>, Vec<Uuid>) =
            targets.into_iter().partition(|t| batch.contains(t));
        let mut tx = self.tenant_transaction(tenant).await?;
        if let Some(parent) = parent {
            // Marked waited on: its ending (CANCELLED, FAILED) wakes the scheduler, which
            // cancels the children it left unfinished.
            let running: Option<Uuid> = query_scalar(
                "UPDATE jobs SET waited_on = true \
                 WHERE tenant_id = $1 AND id = $2 AND state = 'running' AND attempt = $3 \
                 RETURNING id",
            )
            .bind(tenant.as_str())
            .bind(parent.job_id.0)
            .bind(parent.attempt)
            .fetch_optional(&mut *tx)
            .await?;
            if running.is_none() {
                let exists: Option<Uuid> =
                    query_scalar("SELECT id FROM jobs WHERE tenant_id = $1 AND id = $2")
                        .bind(tenant.as_str())
                        .bind(parent.job_id.0)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match exists {
                    Some(_) => Error::StaleParent(parent),
                    None => Error::UnknownParent(parent.job_id),
                });
            }
        }
        let found: Vec<Uuid> = query_scalar(
            "UPDATE jobs SET waited_on = true WHERE tenant_id = $1 AND id = ANY($2) RETURNING id",
        )
        .bind(tenant.as_str())
        .bind(&outside)
        .fetch_all(&mut *tx)
        .await?;
        if let Some(missing) = outside.iter().find(|id| !found.contains(id)) {
            let (index, position) = jobs
                .iter()
                .enumerate()
                .find_map(|(i, j)| {
                    j.depends_on
                        .iter()
                        .position(|d| d.0 == *missing)
                        .map(|p| (i, p))
                })
                .unwrap_or_default();
            return Err(Error::UnknownDependency {
                index,
                position,
                id: JobId(*missing),
            });
        }
        let outcomes =
            enqueue_statement(&mut *tx, tenant, jobs, parent.map(|p| p.job_id.0)).await?;
        // As in enqueue_batch: a key reused for another job type or payload refuses the whole
        // batch, left uncommitted.
        if let Some((index, reused)) = outcomes.iter().enumerate().find_map(|(i, o)| {
            o.as_ref()
                .filter(|o| !o.same && !jobs.get(i).is_some_and(|j| j.accept_existing))
                .map(|o| (i, o))
        }) {
            return Err(Error::KeyReused {
                index,
                existing: JobId(reused.job.id),
            });
        }
        if !inside.is_empty() {
            query("UPDATE jobs SET waited_on = true WHERE tenant_id = $1 AND id = ANY($2)")
                .bind(tenant.as_str())
                .bind(&inside)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.settle_conflicts(tenant, jobs, outcomes, |job, row| EnqueueOutcome {
            job: row.clone(),
            created: false,
            same: job.repeats(row),
        })
        .await
    }

    /// Fills in the jobs an idempotency key conflict skipped. A key used by a concurrent, not yet
    /// committed enqueue is skipped by ON CONFLICT but is invisible to the statement's snapshot;
    /// read it again now that it has committed.
    async fn settle_conflicts<T>(
        &self,
        tenant: &TenantId,
        jobs: &[NewJob],
        mut outcomes: Vec<Option<T>>,
        existing: impl Fn(&NewJob, &JobRow) -> T,
    ) -> Result<Vec<T>> {
        let missing: Vec<String> = jobs
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.is_none())
            .filter_map(|(j, _)| j.idempotency_key.clone())
            .collect();
        if !missing.is_empty() {
            let mut tx = self.tenant_transaction(tenant).await?;
            let found = jobs_by_keys(&mut *tx, tenant, &missing).await?;
            tx.commit().await?;
            for (job, outcome) in jobs.iter().zip(outcomes.iter_mut()) {
                if outcome.is_none() {
                    *outcome = job
                        .idempotency_key
                        .as_ref()
                        .and_then(|k| found.iter().find(|r| r.idempotency_key.as_ref() == Some(k)))
                        .map(|row| existing(job, row));
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| {
                    Error::Corrupt("an idempotency key conflict named no visible job".into())
                })
            })
            .collect()
    }

    pub async fn get_job(&self, tenant: &TenantId, id: JobId) -> Result<JobRow> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let job = get_job(&mut *tx, tenant, id).await?;
        tx.commit().await?;
        Ok(job)
    }

    /// The attempts of a job, oldest first. The running attempt and the one that succeeded have
    /// no row of their own (see [`ATTEMPT_UPSERT`](super::leases::ATTEMPT_UPSERT)): the
    /// `job_attempt_history` view reads them from the job.
    pub async fn list_attempts(&self, tenant: &TenantId, id: JobId) -> Result<Vec<AttemptRow>> {
        let mut attempts = self.list_attempts_of(tenant, &[id]).await?;
        Ok(attempts.remove(&id).unwrap_or_default())
    }

    /// The attempts of each of `ids`, oldest first, in one statement: a page of jobs in the
    /// full view costs one read of their attempts, not one per job.
    pub async fn list_attempts_of(
        &self,
        tenant: &TenantId,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, Vec<AttemptRow>>> {
        #[derive(sqlx::FromRow)]
        struct JobAttempt {
            job_id: Uuid,
            #[sqlx(flatten)]
            attempt: AttemptRow,
        }
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let mut tx = self.tenant_transaction(tenant).await?;
        let rows: Vec<JobAttempt> = query_as(
            "SELECT job_id, attempt, worker_id, started_at, finished_at, outcome, error \
             FROM job_attempt_history WHERE tenant_id = $1 AND job_id = ANY($2) \
             ORDER BY job_id, attempt",
        )
        .bind(tenant.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut attempts: HashMap<JobId, Vec<AttemptRow>> = HashMap::new();
        for row in rows {
            attempts
                .entry(JobId(row.job_id))
                .or_default()
                .push(row.attempt);
        }
        Ok(attempts)
    }

    /// Jobs newest first, at most `limit`.
    pub async fn list_jobs(
        &self,
        tenant: &TenantId,
        filter: &ListFilter,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Listed<JobRow>> {
        // The newest `limit` matching jobs are the candidates; of them, those whose payloads and
        // results fit `max_bytes` (the first always) are read whole. `octet_length` of a stored
        // value reads its size from its header, without fetching it.
        let sql = static_sql!(
            "WITH candidate AS ( \
                 SELECT id, row_number() OVER (ORDER BY id DESC) AS n, \
                        sum(octet_length(payload) + coalesce(octet_length(result), 0)) \
                            OVER (ORDER BY id DESC) AS bytes \
                 FROM jobs \
                 WHERE tenant_id = $1 \
                   AND (cardinality($2::job_state[]) = 0 OR state = ANY($2)) \
                   AND ($3::text IS NULL OR queue = $3) \
                   AND ($4::text IS NULL OR job_type = $4) \
                   AND ($5::uuid IS NULL OR id < $5) \
                   AND ($8::text IS NULL OR last_error->>'kind' = $8) \
                   AND ($9::text IS NULL \
                        OR strpos(lower(last_error->>'message'), lower($9)) > 0) \
                   AND labels @> $10 \
                   AND ($11::uuid IS NULL OR parent_id = $11) \
                 ORDER BY id DESC LIMIT $6 \
             ) \
             SELECT {JOB_COLUMNS}, (SELECT count(*) FROM candidate) AS candidates FROM jobs \
             WHERE tenant_id = $1 \
               AND id = ANY(ARRAY(SELECT id FROM candidate WHERE n = 1 OR bytes <= $7)) \
             ORDER BY id DESC"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let rows: Vec<ListedRow<JobRow>> = query_as(sql)
            .bind(tenant.as_str())
            .bind(&filter.states)
            .bind(filter.queue.as_ref().map(QueueName::as_str))
            .bind(filter.job_type.as_deref())
            .bind(filter.before.map(|id| id.0))
            .bind(limit)
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .bind(filter.error_kind.as_deref())
            .bind(filter.error_text.as_deref())
            .bind(Json(&filter.labels))
            .bind(filter.parent.map(|id| id.0))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Listed::from_rows(rows))
    }

    /// How many children `id` has in each state (none when it has no children).
    pub async fn child_counts(&self, tenant: &TenantId, id: JobId) -> Result<Vec<(JobState, i64)>> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let counts = query_as(
            "SELECT state, count(*) FROM jobs WHERE tenant_id = $1 AND parent_id = $2 \
             GROUP BY state",
        )
        .bind(tenant.as_str())
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(counts)
    }

    /// Cancels a job that no worker runs yet. Returns `None` when the job exists but is not in
    /// a cancellable queued state; the caller reads it to say why.
    pub async fn cancel_queued(
        &self,
        tenant: &TenantId,
        id: JobId,
        reason: &str,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET state = 'cancelled', cancel_reason = $3, \
                        finished_at = now(), updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 \
                   AND state IN ('awaiting_approval', 'pending', 'scheduled', 'available', \
                                 'retrying', 'paused') \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('reason', $3, 'actor', $4::jsonb) \
                 FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(reason)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        if let Some(job) = &out {
            metrics::cancelled(series(job));
        }
        Ok(out)
    }

    /// Asks the worker running a job to stop it, for good (`Cancel`) or to resume later
    /// (`Pause`): the request is recorded durably (so a worker that reconnects, or a replica
    /// that missed the notification, still honours it), an event is written and every replica
    /// is notified. Returns `None` when the job exists but is not running.
    pub async fn request_stop(
        &self,
        tenant: &TenantId,
        id: JobId,
        stop: StopKind,
        reason: &str,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET \
                     cancel_requested_at = CASE WHEN $3 = 'cancel' \
                         THEN coalesce(cancel_requested_at, now()) ELSE cancel_requested_at END, \
                     cancel_reason = CASE WHEN $3 = 'cancel' THEN $4 ELSE cancel_reason END, \
                     pause_requested_at = CASE WHEN $3 = 'pause' \
                         THEN coalesce(pause_requested_at, now()) ELSE pause_requested_at END, \
                     pause_reason = CASE WHEN $3 = 'pause' THEN $4 ELSE pause_reason END, \
                     updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND state = 'running' \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, attempt, data) \
                 SELECT tenant_id, id, 'stop_requested', attempt, \
                        jsonb_build_object('target', CASE WHEN $3 = 'cancel' THEN 'cancelled' \
                                                          ELSE 'paused' END, 'reason', $4, \
                                   'actor', $5::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {stop} \
                 FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd, (SELECT count(*) FROM wake) w",
            stop = send::stop("tenant_id", "id", "attempt", "$3"),
        );
        let kind = match stop {
            StopKind::Cancel => "cancel",
            StopKind::Pause => "pause",
        };
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(kind)
            .bind(reason)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Holds a job that no worker runs: it stays PAUSED until resumed. Returns `None` when the
    /// job exists but is not queued.
    pub async fn pause_queued(
        &self,
        tenant: &TenantId,
        id: JobId,
        reason: &str,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET state = 'paused', pause_reason = $3, updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 \
                   AND state IN ('scheduled', 'available', 'retrying') \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('reason', $3, 'actor', $4::jsonb) \
                 FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(reason)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Makes a PAUSED job available again. Returns `None` when the job exists but is not
    /// paused.
    pub async fn resume_paused(
        &self,
        tenant: &TenantId,
        id: JobId,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET state = 'available', run_at = now(), pause_reason = NULL, \
                        updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND state = 'paused' \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('reason', 'resumed', 'actor', $3::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd, (SELECT count(*) FROM wake) w",
            work = send::work("tenant_id", "queue"),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Lets a job AWAITING_APPROVAL run: AVAILABLE, or SCHEDULED while its run_at is ahead.
    /// Returns `None` when the job exists but does not await approval.
    pub async fn approve(
        &self,
        tenant: &TenantId,
        id: JobId,
        reason: &str,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET state = CASE \
                            WHEN depends_on IS NOT NULL THEN 'pending'::job_state \
                            WHEN run_at <= now() THEN 'available'::job_state \
                            ELSE 'scheduled'::job_state END, \
                        updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND state = 'awaiting_approval' \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', 'approved: ' || $3, 'actor', $4::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM upd \
                 WHERE state = 'available' \
                 UNION ALL \
                 SELECT {due} FROM upd WHERE state IN ('scheduled', 'pending') \
             ) \
             SELECT {JOB_COLUMNS} FROM upd, (SELECT count(*) FROM wake) w",
            work = send::work("tenant_id", "queue"),
            due = send::due(),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(reason)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Refuses a job AWAITING_APPROVAL: CANCELLED for good. Returns `None` when the job exists
    /// but does not await approval.
    pub async fn reject(
        &self,
        tenant: &TenantId,
        id: JobId,
        reason: &str,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET state = 'cancelled', cancel_reason = 'rejected: ' || $3, \
                        finished_at = now(), updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND state = 'awaiting_approval' \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', cancel_reason, 'actor', $4::jsonb) \
                 FROM upd \
             ) \
             SELECT {JOB_COLUMNS} FROM upd"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(reason)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        if let Some(job) = &out {
            metrics::cancelled(series(job));
        }
        Ok(out)
    }

    /// Makes a FAILED or CANCELLED job available again with a fresh set of attempts. The attempt
    /// counter keeps counting, so fencing tokens never repeat; `attempt_base` moves instead.
    /// Returns `None` when the job exists but is in another state.
    pub async fn retry_finished(
        &self,
        tenant: &TenantId,
        id: JobId,
        actor: Option<&Actor>,
    ) -> Result<Option<JobRow>> {
        let sql = static_sql!(
            "WITH upd AS ( \
                 UPDATE jobs SET attempt_base = attempt, {CLEAR_WAITS}, \
                        state = CASE WHEN depends_on IS NULL THEN 'available'::job_state \
                                     ELSE 'pending'::job_state END, \
                        run_at = now(), finished_at = NULL, cancel_reason = NULL, \
                        cancel_requested_at = NULL, pause_requested_at = NULL, \
                        result = NULL, result_type = NULL, updated_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND state IN ('failed', 'cancelled') \
                 RETURNING * \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, jsonb_build_object('reason', 'retried', 'actor', $3::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM upd WHERE state = 'available' \
                 UNION ALL \
                 SELECT {due} FROM upd WHERE state = 'pending' \
             ) \
             SELECT {JOB_COLUMNS} FROM upd, (SELECT count(*) FROM wake) w",
            work = send::work("tenant_id", "queue"),
            due = send::due(),
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<JobRow>(sql)
            .bind(tenant.as_str())
            .bind(id.0)
            .bind(actor.map(Json))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }
}

pub(super) async fn get_job(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: JobId,
) -> Result<JobRow> {
    let sql = static_sql!("SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND id = $2");
    query_as::<JobRow>(sql)
        .bind(tenant.as_str())
        .bind(id.0)
        .fetch_optional(db)
        .await?
        .ok_or(Error::NotFound)
}

async fn jobs_by_keys(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    keys: &[String],
) -> Result<Vec<JobRow>> {
    let sql = static_sql!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND idempotency_key = ANY($2)"
    );
    Ok(query_as::<JobRow>(sql)
        .bind(tenant.as_str())
        .bind(keys)
        .fetch_all(db)
        .await?)
}

/// A returned row and where its job stood in the input (1-based).
#[derive(sqlx::FromRow)]
struct Ordered<T> {
    ord: i64,
    #[sqlx(flatten)]
    row: T,
}

/// A whole job as an enqueue returns it.
#[derive(sqlx::FromRow)]
struct EnqueuedJob {
    created: bool,
    same: bool,
    #[sqlx(flatten)]
    job: JobRow,
}

/// The enqueue statement: `keyed` for batches that may collide on a unique index, `returning`
/// the columns it returns of each job, and `inserted` what the insert returns for the rest of
/// the statement to read (it must include what `returning` names).
///
/// Most of a small batch's cost is the plan's setup, not its rows (`pgbench`, one job and its
/// commit: 0.84 ms), so the statement leaves out what a batch cannot need: an unkeyed batch has
/// neither a conflict clause nor the read of the jobs a conflict skipped, and `planned` is
/// materialized so that its queue lookup is one subplan, not one per use of `state` in the insert
/// (0.74 ms together).
fn enqueue_sql(keyed: bool, returning: &[&str], inserted: &str) -> String {
    let (conflict, skipped) = if keyed {
        (
            "ON CONFLICT DO NOTHING",
            format!(
                "UNION ALL \
                 SELECT i.ord, false AS created, \
                     (j.job_type = i.job_type AND j.payload_type = i.payload_type \
                      AND j.payload = i.payload) AS same, {old_cols} \
                 FROM input i \
                 JOIN jobs j ON j.tenant_id = $1 AND j.idempotency_key = i.idempotency_key \
                 WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = i.id)",
                old_cols = prefixed("j", returning),
            ),
        )
    } else {
        ("", String::new())
    };
    format!(
        "WITH input AS ( \
            SELECT * FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::bytea[], \
                $7::int2[], $8::int4[], $9::int8[], $10::int8[], $11::float8[], $12::float8[], \
                $13::timestamptz[], $14::text[], $15::jsonb[], $16::int8[], $17::uuid[], \
                $18::timestamptz[], $19::int4[], $20::bool[], $21::text[], $22::int8[], \
                $23::bool[], $24::text[], $25::bool[], $26::int8[], $27::bool[], \
                $28::jsonb[], $29::text[], $30::text[]) WITH ORDINALITY \
            AS t(id, queue, job_type, payload_type, payload, priority, max_attempts, \
                 retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, run_at, \
                 idempotency_key, labels, timeout_ms, schedule_id, schedule_tick, \
                 job_type_version, needs_approval, lease_owner, lease_ms, reports_started, \
                 depends_on, run_regardless, approval_timeout_ms, approval_timeout_fails, \
                 retry_rules, traceparent, tracestate, ord) \
        ), planned AS MATERIALIZED ( \
            SELECT input.*, \
                CASE WHEN needs_approval THEN 'awaiting_approval'::job_state \
                     WHEN depends_on IS NOT NULL THEN 'pending'::job_state \
                     WHEN coalesce(run_at, now()) > now() THEN 'scheduled'::job_state \
                     WHEN lease_owner IS NOT NULL AND NOT EXISTS ( \
                         SELECT 1 FROM queues s WHERE s.tenant_id = $1 AND s.name = input.queue \
                           AND (s.paused_at IS NOT NULL OR s.concurrency_limit IS NOT NULL \
                                OR s.rate_per_second IS NOT NULL)) \
                         THEN 'running'::job_state \
                     ELSE 'available'::job_state END AS state \
            FROM input \
        ), ins AS ( \
            INSERT INTO jobs (id, tenant_id, queue, job_type, payload_type, payload, priority, \
                state, max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, \
                retry_jitter, run_at, idempotency_key, labels, timeout_ms, schedule_id, \
                schedule_tick, job_type_version, attempt, lease_owner, lease_expires_at, \
                started_at, attempt_started_at, handler_started_at, depends_on, \
                run_regardless, approval_deadline, approval_timeout_fails, retry_rules, \
                traceparent, tracestate, parent_id, waited_on) \
            SELECT id, $1, queue, job_type, payload_type, payload, priority, state, \
                max_attempts, retry_initial_ms, retry_max_ms, retry_multiplier, retry_jitter, \
                coalesce(run_at, now()), idempotency_key, coalesce(labels, '{{}}'), timeout_ms, \
                schedule_id, schedule_tick, job_type_version, \
                CASE WHEN state = 'running' THEN 1 ELSE 0 END, \
                CASE WHEN state = 'running' THEN lease_owner END, \
                CASE WHEN state = 'running' \
                     THEN now() + lease_ms * interval '1 millisecond' END, \
                CASE WHEN state = 'running' THEN now() END, \
                CASE WHEN state = 'running' THEN now() END, \
                CASE WHEN state = 'running' AND NOT reports_started THEN now() END, \
                depends_on::uuid[], coalesce(run_regardless, false), \
                CASE WHEN state = 'awaiting_approval' \
                     THEN now() + approval_timeout_ms * interval '1 millisecond' END, \
                coalesce(approval_timeout_fails, false), retry_rules, traceparent, tracestate, \
                $31::uuid, $31::uuid IS NOT NULL \
            FROM planned ORDER BY ord \
            {conflict} \
            RETURNING {inserted} \
        ), queues AS ( \
            INSERT INTO queues (tenant_id, name) \
            SELECT DISTINCT $1, queue FROM input ORDER BY 2 \
            ON CONFLICT DO NOTHING \
        ), ev AS ( \
            INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
            SELECT tenant_id, id, 'state', state, attempt, data FROM ( \
                SELECT tenant_id, id, 1 AS n, \
                    CASE WHEN state = 'running' THEN 'available'::job_state ELSE state END \
                        AS state, \
                    0 AS attempt, '{{}}'::jsonb AS data \
                FROM ins \
                UNION ALL \
                SELECT tenant_id, id, 2, state, attempt, \
                    jsonb_build_object('worker', lease_owner) \
                FROM ins WHERE state = 'running' \
            ) e ORDER BY id, n \
        ), wake AS ( \
            SELECT {work} \
            FROM (SELECT DISTINCT tenant_id, queue FROM ins WHERE state = 'available') q \
            UNION ALL \
            SELECT {due} \
            FROM (SELECT 1 FROM ins WHERE state IN ('scheduled', 'pending') LIMIT 1) d \
        ) \
        SELECT u.* FROM ( \
            SELECT i.ord, true AS created, true AS same, {ins_cols} \
            FROM ins JOIN input i ON i.id = ins.id \
            {skipped} \
        ) u CROSS JOIN (SELECT count(*) AS woken FROM wake) w",
        work = send::work("tenant_id", "queue"),
        due = send::due(),
        ins_cols = prefixed("ins", returning),
    )
}

/// Forgets what a finished job waited for when it ended (a cancel leaves them as they were), so
/// that a retried or replayed job waits only for its dependencies again.
pub(super) const CLEAR_WAITS: &str = "awaiting_children = false, awaiting_signal = NULL, \
     awaiting_signal_count = NULL, signal_deadline = NULL";

/// Every column of a job, for callers that answer with the whole job.
static WHOLE: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| JOB_COLUMNS.split(", ").map(str::trim).collect());

/// For batches where a job carries an idempotency key or a schedule tick: the only columns with
/// a unique index a new job can collide on (ids are fresh v7 UUIDs).
static ENQUEUE_KEYED: LazyLock<String> = LazyLock::new(|| enqueue_sql(true, &WHOLE, "*"));
/// For batches without: a plain insert, as ON CONFLICT's speculative insertion costs a quarter
/// more (1,000 rows into `jobs`: 26 ms against 20.6, medians of ten).
static ENQUEUE_UNKEYED: LazyLock<String> = LazyLock::new(|| enqueue_sql(false, &WHOLE, "*"));
/// The same two, returning what [`Enqueued`] holds. Their insert returns only the columns the
/// event rows and wake-ups read, so the new rows' payloads are not copied along the statement.
static ENQUEUE_KEYED_BRIEF: LazyLock<String> =
    LazyLock::new(|| enqueue_sql(true, &["id", "state"], BRIEF_INSERTED));
static ENQUEUE_UNKEYED_BRIEF: LazyLock<String> =
    LazyLock::new(|| enqueue_sql(false, &["id", "state"], BRIEF_INSERTED));
const BRIEF_INSERTED: &str = "id, tenant_id, queue, state, attempt, lease_owner";

/// Whether any job of the batch can collide on a unique index.
fn keyed(jobs: &[NewJob]) -> bool {
    jobs.iter()
        .any(|j| j.idempotency_key.is_some() || j.schedule.is_some_and(|(_, tick)| tick.is_some()))
}

/// The single enqueue statement, returning whole jobs; `parent` is the job enqueuing them as
/// its children, if one is (each child's ending then wakes the scheduler, for the parent's
/// wait). Rows skipped by an idempotency conflict whose winner is not visible yet come back as
/// `None`.
pub(super) async fn enqueue_statement(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    jobs: &[NewJob],
    parent: Option<Uuid>,
) -> Result<Vec<Option<EnqueueOutcome>>> {
    let sql = if keyed(jobs) {
        ENQUEUE_KEYED.as_str()
    } else {
        ENQUEUE_UNKEYED.as_str()
    };
    let rows: Vec<Ordered<EnqueuedJob>> = enqueue_rows(db, sql, tenant, jobs, parent).await?;
    Ok(in_order(jobs.len(), rows)
        .into_iter()
        .map(|row| {
            row.map(|r| EnqueueOutcome {
                job: r.job,
                created: r.created,
                same: r.same,
            })
        })
        .collect())
}

/// Runs one of the enqueue statements over `jobs`.
async fn enqueue_rows<T>(
    db: impl PgExecutor<'_>,
    sql: &'static str,
    tenant: &TenantId,
    jobs: &[NewJob],
    parent: Option<Uuid>,
) -> Result<Vec<Ordered<T>>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut q = query_as::<Ordered<T>>(sql).bind(tenant.as_str());
    q = q
        .bind(jobs.iter().map(|j| j.id.0).collect::<Vec<Uuid>>())
        .bind(
            jobs.iter()
                .map(|j| j.queue.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.job_type.clone()).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.payload_type.clone())
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.payload.clone()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.priority).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.retry_initial_ms).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.retry_max_ms).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.retry_multiplier).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.retry_jitter).collect::<Vec<_>>())
        .bind(nullable(jobs.iter().map(|j| j.run_at)))
        .bind(nullable(jobs.iter().map(|j| j.idempotency_key.clone())))
        .bind(nullable(jobs.iter().map(|j| {
            (!j.labels.is_empty()).then(|| Json(j.labels.clone()))
        })))
        .bind(nullable(jobs.iter().map(|j| j.timeout_ms)))
        .bind(nullable(jobs.iter().map(|j| j.schedule.map(|(id, _)| id))))
        .bind(nullable(
            jobs.iter().map(|j| j.schedule.and_then(|(_, tick)| tick)),
        ))
        .bind(nullable(jobs.iter().map(|j| j.job_type_version)))
        .bind(jobs.iter().map(|j| j.needs_approval).collect::<Vec<_>>())
        .bind(nullable(
            jobs.iter()
                .map(|j| j.handoff.as_ref().map(|h| h.worker.clone())),
        ))
        .bind(nullable(jobs.iter().map(|j| {
            j.handoff.as_ref().map(|h| super::leases::millis(h.lease))
        })))
        .bind(nullable(
            jobs.iter()
                .map(|j| j.handoff.as_ref().map(|h| h.reports_started)),
        ))
        .bind(nullable(jobs.iter().map(|j| {
            (!j.depends_on.is_empty()).then(|| uuid_array_literal(&j.depends_on))
        })))
        .bind(nullable(
            jobs.iter().map(|j| j.run_regardless.then_some(true)),
        ))
        .bind(nullable(jobs.iter().map(|j| j.approval_timeout_ms)))
        .bind(nullable(
            jobs.iter()
                .map(|j| j.approval_timeout_fails.then_some(true)),
        ))
        .bind(nullable(jobs.iter().map(|j| {
            (!j.retry_rules.is_empty()).then(|| Json(j.retry_rules.clone()))
        })))
        .bind(nullable(
            jobs.iter()
                .map(|j| j.trace.as_ref().map(|t| t.traceparent.clone())),
        ))
        .bind(nullable(
            jobs.iter()
                .map(|j| j.trace.as_ref().and_then(|t| t.tracestate.clone())),
        ))
        .bind(parent);
    Ok(q.fetch_all(db).await?)
}

/// A column of optional values as an array parameter, or NULL when every value is NULL (or,
/// for labels, empty). The statement's multi-argument UNNEST pads a NULL array with NULLs, so
/// PostgreSQL neither receives nor unnests a thousand NULLs for the options a batch leaves
/// unset, which most batches do.
pub(super) fn nullable<T>(values: impl Iterator<Item = Option<T>>) -> Option<Vec<Option<T>>> {
    let values: Vec<Option<T>> = values.collect();
    values.iter().any(Option::is_some).then_some(values)
}

/// Ids as a PostgreSQL array literal: a column of `uuid[]` values travels as `text[]`, since
/// UNNEST cannot unnest an array of arrays of different lengths.
fn uuid_array_literal(ids: &[JobId]) -> String {
    let inner: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!("{{{}}}", inner.join(","))
}

/// Returned rows placed at their jobs' positions; a job the statement returned nothing for (an
/// idempotency conflict whose winner it could not see) is `None`.
fn in_order<T>(len: usize, rows: Vec<Ordered<T>>) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(len).collect();
    for Ordered { ord, row } in rows {
        if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some(row);
        }
    }
    out
}

/// Columns qualified by a table alias, for statements that join.
fn prefixed(alias: &str, columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}
