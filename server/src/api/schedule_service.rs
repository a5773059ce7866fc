//! `jobwire.v1.ScheduleService`: cron schedules and their job templates.

use std::time::Duration;

use chrono::Utc;
use jobwire_proto::v1::{self as pb, schedule_service_server::ScheduleService};
use sqlx::types::Json;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use jobwire_proto::limits::MAX_PAGE_BYTES;

use super::{ApiError, convert, paging::PageRequest, payloads, tenant_of, validate};
use crate::{
    domain::{CronError, CronSchedule, TenantId},
    registry::Registry,
    store::{
        CatchUpPolicy, JobTemplate, NewSchedule, OverlapPolicy, ScheduleRow, ScheduleSpec,
        ScheduleUpdate, Store,
    },
};

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;
const DEFAULT_MAX_CATCH_UP: i32 = 100;
const MAX_CATCH_UP: i32 = 1000;
const DEFAULT_MISFIRE_GRACE: Duration = Duration::from_secs(60);
const MAX_MISFIRE_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_DESCRIPTION_LEN: usize = 1024;
const MAX_CRON_LEN: usize = 256;
const MAX_TIME_ZONE_LEN: usize = 64;
const DEFAULT_TIME_ZONE: &str = "UTC";

/// Every field UpdateSchedule can change.
const UPDATABLE: &[&str] = &[
    "description",
    "cron",
    "time_zone",
    "job",
    "overlap_policy",
    "catch_up_policy",
    "max_catch_up",
    "misfire_grace",
];

pub struct ScheduleApi {
    store: Store,
    /// Registered job types, which templates are checked against like enqueues.
    registry: Registry,
    max_payload_bytes: usize,
}

impl ScheduleApi {
    pub fn new(store: Store, registry: Registry, max_payload_bytes: usize) -> Self {
        Self {
            store,
            registry,
            max_payload_bytes,
        }
    }

    /// A template, checked as an enqueue of it would be: against the job type's registered
    /// schema when it has one (with its defaults applied), so that no tick makes a job that
    /// its worker cannot decode.
    async fn template(
        &self,
        tenant: &TenantId,
        job: Option<&pb::JobTemplate>,
    ) -> Result<JobTemplate, ApiError> {
        let job = job.ok_or_else(|| ApiError::invalid("schedule.job", "is required"))?;
        if job
            .retry_policy
            .as_ref()
            .is_some_and(|p| !p.by_kind.is_empty())
        {
            return Err(ApiError::invalid(
                "schedule.job.retry_policy.by_kind",
                "is not kept by schedules; enqueue the job with its rules instead",
            ));
        }
        // A template is a job spec without a time or a key: the same rules and defaults apply.
        let spec = pb::JobSpec {
            job_type: job.job_type.clone(),
            payload: job.payload.clone(),
            payload_json: job.payload_json.clone(),
            queue: job.queue.clone(),
            priority: job.priority,
            schedule: None,
            retry_policy: job.retry_policy.clone(),
            idempotency_key: String::new(),
            labels: job.labels.clone(),
            timeout: job.timeout,
            ..Default::default()
        };
        let (spec, _) = payloads::prepare(&self.registry, tenant, &spec)
            .await
            .map_err(|e| e.within("schedule.job"))?;
        let new = validate::job_spec(&spec, self.max_payload_bytes)
            .map_err(|e| e.within("schedule.job"))?;
        Ok(JobTemplate {
            job_type: new.job_type,
            payload_type: new.payload_type,
            payload: new.payload,
            queue: new.queue.as_str().to_owned(),
            priority: new.priority,
            max_attempts: new.max_attempts,
            retry_initial_ms: new.retry_initial_ms,
            retry_max_ms: new.retry_max_ms,
            retry_multiplier: new.retry_multiplier,
            retry_jitter: new.retry_jitter,
            labels: Json(new.labels),
            timeout_ms: new.timeout_ms,
        })
    }

    /// Every field of a new schedule, validated, with defaults.
    async fn spec(
        &self,
        tenant: &TenantId,
        s: &pb::Schedule,
    ) -> Result<(ScheduleSpec, CronSchedule), ApiError> {
        let time_zone = time_zone(&s.time_zone);
        let cron = cron(&s.cron, &time_zone)?;
        let spec = ScheduleSpec {
            description: description(&s.description)?,
            cron: s.cron.trim().to_owned(),
            time_zone,
            job: self.template(tenant, s.job.as_ref()).await?,
            overlap_policy: overlap(s.overlap_policy)?,
            catch_up_policy: catch_up(s.catch_up_policy)?,
            max_catch_up: max_catch_up(s.max_catch_up)?,
            misfire_grace_ms: misfire_grace(s.misfire_grace.as_ref())?,
        };
        Ok((spec, cron))
    }

    /// The current schedule with the masked fields of `s` applied (`template`, checked before,
    /// for the `job` path), and when it ticks next.
    fn updated(
        current: &ScheduleRow,
        s: &pb::Schedule,
        paths: &[&str],
        template: Option<&JobTemplate>,
    ) -> Result<ScheduleUpdate, ApiError> {
        let mut spec = current.spec();
        let mut retimed = false;
        for path in paths {
            match *path {
                "description" => spec.description = description(&s.description)?,
                "cron" => {
                    spec.cron = s.cron.trim().to_owned();
                    retimed = true;
                }
                "time_zone" => {
                    spec.time_zone = time_zone(&s.time_zone);
                    retimed = true;
                }
                "job" => {
                    if let Some(template) = template {
                        spec.job = template.clone();
                    }
                }
                "overlap_policy" => spec.overlap_policy = overlap(s.overlap_policy)?,
                "catch_up_policy" => spec.catch_up_policy = catch_up(s.catch_up_policy)?,
                "max_catch_up" => spec.max_catch_up = max_catch_up(s.max_catch_up)?,
                "misfire_grace" => {
                    spec.misfire_grace_ms = misfire_grace(s.misfire_grace.as_ref())?;
                }
                other => {
                    return Err(ApiError::Internal(format!(
                        "update_mask admitted {other:?}, which UpdateSchedule does not handle"
                    )));
                }
            }
        }
        let cron = cron(&spec.cron, &spec.time_zone)?;
        let next = next_tick(&cron)?;
        let next_run_at = match current.next_run_at {
            Some(_) if retimed => Some(next),
            keep => keep,
        };
        Ok(ScheduleUpdate { spec, next_run_at })
    }
}

fn time_zone(value: &str) -> String {
    match value.trim() {
        "" => DEFAULT_TIME_ZONE.to_owned(),
        zone => zone.to_owned(),
    }
}

fn cron(expression: &str, zone: &str) -> Result<CronSchedule, ApiError> {
    if expression.trim().is_empty() {
        return Err(ApiError::invalid("schedule.cron", "is required"));
    }
    validate::text("schedule.cron", expression, MAX_CRON_LEN)?;
    validate::text("schedule.time_zone", zone, MAX_TIME_ZONE_LEN)?;
    CronSchedule::parse(expression, zone).map_err(|e| match e {
        CronError::Expression(why) => ApiError::invalid(
            "schedule.cron",
            format!("{expression:?} is not a valid cron expression: {why}"),
        ),
        CronError::TimeZone(why) => ApiError::invalid("schedule.time_zone", why),
    })
}

/// The next tick after now; an expression that never matches again (the 31st of February) is
/// refused as a create is, rather than leaving a schedule that silently never runs.
fn next_tick(cron: &CronSchedule) -> Result<chrono::DateTime<Utc>, ApiError> {
    cron.next_after(Utc::now())
        .ok_or_else(|| ApiError::invalid("schedule.cron", "never matches a future time"))
}

fn description(value: &str) -> Result<String, ApiError> {
    validate::text("schedule.description", value, MAX_DESCRIPTION_LEN)?;
    Ok(value.to_owned())
}

fn overlap(value: i32) -> Result<OverlapPolicy, ApiError> {
    match pb::OverlapPolicy::try_from(value) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Allow) => Ok(OverlapPolicy::Allow),
        Ok(pb::OverlapPolicy::Skip) => Ok(OverlapPolicy::Skip),
        Ok(pb::OverlapPolicy::CancelPrevious) => Ok(OverlapPolicy::CancelPrevious),
        Err(_) => Err(ApiError::invalid(
            "schedule.overlap_policy",
            format!("{value} is not an overlap policy"),
        )),
    }
}

fn catch_up(value: i32) -> Result<CatchUpPolicy, ApiError> {
    match pb::CatchUpPolicy::try_from(value) {
        Ok(pb::CatchUpPolicy::Unspecified | pb::CatchUpPolicy::Once) => Ok(CatchUpPolicy::Once),
        Ok(pb::CatchUpPolicy::Skip) => Ok(CatchUpPolicy::Skip),
        Ok(pb::CatchUpPolicy::All) => Ok(CatchUpPolicy::All),
        Err(_) => Err(ApiError::invalid(
            "schedule.catch_up_policy",
            format!("{value} is not a catch-up policy"),
        )),
    }
}

fn max_catch_up(value: i32) -> Result<i32, ApiError> {
    match value {
        0 => Ok(DEFAULT_MAX_CATCH_UP),
        n if (1..=MAX_CATCH_UP).contains(&n) => Ok(n),
        n => Err(ApiError::invalid(
            "schedule.max_catch_up",
            format!("must be between 1 and {MAX_CATCH_UP}, got {n}"),
        )),
    }
}

fn misfire_grace(value: Option<&prost_types::Duration>) -> Result<i64, ApiError> {
    let grace = match value {
        None => DEFAULT_MISFIRE_GRACE,
        Some(d) => validate::duration("schedule.misfire_grace", d)?,
    };
    if grace > MAX_MISFIRE_GRACE {
        return Err(ApiError::invalid(
            "schedule.misfire_grace",
            "must be at most 24h",
        ));
    }
    Ok(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX))
}

fn schedule_name(value: &str) -> Result<String, ApiError> {
    validate::name("name", value)
}

fn not_found(tenant: &TenantId, name: &str) -> impl FnOnce() -> String {
    let message = format!("schedule {name:?} not found in tenant {tenant}");
    move || message
}

/// Names the schedule in a NOT_FOUND that the store reported without a name.
fn name_missing(tenant: &TenantId, name: &str) -> impl FnOnce(ApiError) -> ApiError {
    let message = not_found(tenant, name)();
    move |e| match e {
        ApiError::NotFound(_) => ApiError::NotFound(message),
        other => other,
    }
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::CreateScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let s = req
            .schedule
            .as_ref()
            .ok_or_else(|| ApiError::invalid("schedule", "is required"))?;
        let name = validate::name("schedule.name", &s.name)?;
        let (spec, cron) = self.spec(&tenant, s).await?;
        let next = next_tick(&cron)?;
        let next_run_at = (!req.paused).then_some(next);
        let new = NewSchedule {
            id: Uuid::now_v7(),
            name,
            spec,
            next_run_at,
        };
        let row = self
            .store
            .create_schedule(&tenant, &new)
            .await
            .map_err(|e| match e {
                crate::store::Error::AlreadyExists => ApiError::AlreadyExists(format!(
                    "schedule {:?} already exists in tenant {tenant}",
                    new.name
                )),
                other => other.into(),
            })?;
        tracing::info!(%tenant, schedule = %row.name, cron = %row.cron, "schedule created");
        Ok(Response::new(pb::CreateScheduleResponse {
            schedule: Some(convert::schedule(row)),
        }))
    }

    async fn get_schedule(
        &self,
        request: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::GetScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = schedule_name(&request.get_ref().name)?;
        let row = self
            .store
            .get_schedule(&tenant, &name)
            .await
            .map_err(|e| ApiError::from_store(e, not_found(&tenant, &name)))?;
        Ok(Response::new(pb::GetScheduleResponse {
            schedule: Some(convert::schedule(row)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<String, ()>::parse(
            req.page_size,
            &req.page_token,
            (),
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        let listed = self
            .store
            .list_schedules(
                &tenant,
                paging.after.as_deref(),
                paging.limit(),
                MAX_PAGE_BYTES,
            )
            .await
            .map_err(ApiError::from)?;
        let truncated = listed.candidates > listed.rows.len();
        let candidates = listed.rows.into_iter().map(convert::schedule).collect();
        let (schedules, next_page_token) =
            paging.page(candidates, truncated, |item| Ok(item.name.clone()))?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules,
            next_page_token,
        }))
    }

    async fn update_schedule(
        &self,
        request: Request<pb::UpdateScheduleRequest>,
    ) -> Result<Response<pb::UpdateScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let s = req
            .schedule
            .as_ref()
            .ok_or_else(|| ApiError::invalid("schedule", "is required"))?;
        let name = validate::name("schedule.name", &s.name)?;
        let paths = validate::update_mask(req.update_mask.as_ref(), UPDATABLE)?;
        let template = if paths.contains(&"job") {
            Some(self.template(&tenant, s.job.as_ref()).await?)
        } else {
            None
        };
        let row = self
            .store
            .modify_schedule(&tenant, &name, |current| {
                Self::updated(current, s, &paths, template.as_ref())
            })
            .await
            .map_err(name_missing(&tenant, &name))?;
        tracing::info!(%tenant, schedule = %row.name, ?paths, "schedule updated");
        Ok(Response::new(pb::UpdateScheduleResponse {
            schedule: Some(convert::schedule(row)),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = schedule_name(&request.get_ref().name)?;
        self.store
            .delete_schedule(&tenant, &name)
            .await
            .map_err(|e| ApiError::from_store(e, not_found(&tenant, &name)))?;
        tracing::info!(%tenant, schedule = %name, "schedule deleted");
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::PauseScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = schedule_name(&request.get_ref().name)?;
        let row = self
            .store
            .modify_schedule(&tenant, &name, |current| {
                Ok::<_, ApiError>(ScheduleUpdate {
                    spec: current.spec(),
                    next_run_at: None,
                })
            })
            .await
            .map_err(name_missing(&tenant, &name))?;
        tracing::info!(%tenant, schedule = %name, "schedule paused");
        Ok(Response::new(pb::PauseScheduleResponse {
            schedule: Some(convert::schedule(row)),
        }))
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::ResumeScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = schedule_name(&request.get_ref().name)?;
        let row = self
            .store
            .modify_schedule(&tenant, &name, |current| {
                let next_run_at = match current.next_run_at {
                    Some(next) => next,
                    None => {
                        let cron = cron(&current.cron, &current.time_zone)?;
                        cron.next_after(Utc::now()).ok_or_else(|| {
                            ApiError::FailedPrecondition(format!(
                                "schedule {name:?} cannot resume: its cron expression never \
                                 matches a future time; update it first"
                            ))
                        })?
                    }
                };
                let next_run_at = Some(next_run_at);
                Ok::<_, ApiError>(ScheduleUpdate {
                    spec: current.spec(),
                    next_run_at,
                })
            })
            .await
            .map_err(name_missing(&tenant, &name))?;
        tracing::info!(%tenant, schedule = %name, "schedule resumed");
        Ok(Response::new(pb::ResumeScheduleResponse {
            schedule: Some(convert::schedule(row)),
        }))
    }

    async fn trigger_schedule(
        &self,
        request: Request<pb::TriggerScheduleRequest>,
    ) -> Result<Response<pb::TriggerScheduleResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = schedule_name(&request.get_ref().name)?;
        // The template is checked against the job type as registered now: it may have changed
        // since the schedule was made.
        let current = self
            .store
            .get_schedule(&tenant, &name)
            .await
            .map_err(|e| ApiError::from_store(e, not_found(&tenant, &name)))?;
        let payload = prost_types::Any {
            type_url: current.job.payload_type.clone(),
            value: current.job.payload.clone(),
        };
        payloads::check_registered(&self.registry, &tenant, &current.job.job_type, &payload)
            .await
            .map_err(|e| e.within("schedule.job"))?;
        let job = self
            .store
            .trigger_schedule(&tenant, &name)
            .await
            .map_err(|e| ApiError::from_store(e, not_found(&tenant, &name)))?;
        tracing::info!(%tenant, schedule = %name, job_id = %job.id, "schedule triggered");
        Ok(Response::new(pb::TriggerScheduleResponse {
            job: Some(convert::job(job, &[])),
        }))
    }
}
