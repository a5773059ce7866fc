//! `jobwire.v1.QueueService`: inspect queues (with their health against the thresholds set on
//! them), pause them, limit them, set how long their finished jobs are kept.

use std::time::Duration;

use jobwire_proto::v1::{self as pb, queue_service_server::QueueService};
use tonic::{Request, Response, Status};

use super::{ApiError, convert, paging::PageRequest, tenant_of, validate};
use crate::{
    config::{MAX_RETENTION, MIN_RETENTION},
    domain::{QueueName, TenantId},
    store::{QueueUpdate, QueueView, Store},
};

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;
const MAX_CONCURRENCY_LIMIT: i32 = 1_000_000;
/// The slowest rate: one start in about eleven and a half days.
const MIN_RATE: f64 = 0.000_001;
const MAX_RATE: f64 = 100_000.0;
const MAX_BURST: i32 = 100_000;
/// The shortest and longest health threshold: a wait shorter than a second is noise, and one
/// beyond a year means the queue is not watched.
const MIN_THRESHOLD: Duration = Duration::from_secs(1);
const MAX_THRESHOLD: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct QueueApi {
    store: Store,
}

impl QueueApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    async fn view(&self, tenant: &TenantId, name: &QueueName) -> Result<pb::Queue, ApiError> {
        let view = self
            .store
            .get_queue(tenant, name)
            .await
            .map_err(|e| not_found(e, name))?;
        Ok(convert::queue(view))
    }
}

fn not_found(error: crate::store::Error, name: &QueueName) -> ApiError {
    ApiError::from_store(error, || format!("queue {:?} not found", name.as_str()))
}

fn queue_name(value: &str) -> Result<QueueName, ApiError> {
    validate::name("name", value).map(QueueName::new_unchecked)
}

/// A health threshold of an UpdateQueue request, in milliseconds: [`MIN_THRESHOLD`] to
/// [`MAX_THRESHOLD`], or `None` to remove it.
fn threshold(field: &str, value: Option<&prost_types::Duration>) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let wait = validate::duration(field, value)?;
    if !(MIN_THRESHOLD..=MAX_THRESHOLD).contains(&wait) {
        return Err(ApiError::invalid(
            field,
            format!(
                "must be between {}s and {}s, got {:?}",
                MIN_THRESHOLD.as_secs(),
                MAX_THRESHOLD.as_secs(),
                wait
            ),
        ));
    }
    Ok(Some(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)))
}

/// A queue's retention of finished jobs, in milliseconds: [`MIN_RETENTION`] to
/// [`MAX_RETENTION`], or `None` for the server's default.
fn retention(value: Option<&prost_types::Duration>) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let kept = validate::duration("queue.retention", value)?;
    if !(MIN_RETENTION..=MAX_RETENTION).contains(&kept) {
        return Err(ApiError::invalid(
            "queue.retention",
            format!(
                "must be between {}s and {} days, got {:?}",
                MIN_RETENTION.as_secs(),
                MAX_RETENTION.as_secs() / (24 * 3600),
                kept
            ),
        ));
    }
    Ok(Some(i64::try_from(kept.as_millis()).unwrap_or(i64::MAX)))
}

/// The settings an UpdateQueue request changes, for the paths its mask names.
fn queue_update(queue: &pb::Queue, paths: &[&str]) -> Result<QueueUpdate, ApiError> {
    let mut update = QueueUpdate::default();
    for path in paths {
        match *path {
            "concurrency_limit" => {
                let limit = match queue.concurrency_limit {
                    None => None,
                    Some(n) if (1..=MAX_CONCURRENCY_LIMIT).contains(&n) => Some(n),
                    Some(n) => {
                        return Err(ApiError::invalid(
                            "queue.concurrency_limit",
                            format!("must be between 1 and {MAX_CONCURRENCY_LIMIT}, got {n}"),
                        ));
                    }
                };
                update.concurrency_limit = Some(limit);
            }
            "rate_limit" => {
                let rate = match &queue.rate_limit {
                    None => None,
                    Some(r) => {
                        if !(MIN_RATE..=MAX_RATE).contains(&r.per_second) {
                            return Err(ApiError::invalid(
                                "queue.rate_limit.per_second",
                                format!(
                                    "must be between {MIN_RATE} and {MAX_RATE}, got {}",
                                    r.per_second
                                ),
                            ));
                        }
                        let burst = match r.burst {
                            // One second's worth: a late claim is made up, not lost.
                            0 => (r.per_second.ceil() as i32).clamp(1, MAX_BURST),
                            b if (1..=MAX_BURST).contains(&b) => b,
                            b => {
                                return Err(ApiError::invalid(
                                    "queue.rate_limit.burst",
                                    format!("must be between 1 and {MAX_BURST}, got {b}"),
                                ));
                            }
                        };
                        Some((r.per_second, burst))
                    }
                };
                update.rate_limit = Some(rate);
            }
            "warn_after" => {
                update.warn_after_ms =
                    Some(threshold("queue.warn_after", queue.warn_after.as_ref())?);
            }
            "retention" => {
                update.retention_ms = Some(retention(queue.retention.as_ref())?);
            }
            "critical_after" => {
                update.critical_after_ms = Some(threshold(
                    "queue.critical_after",
                    queue.critical_after.as_ref(),
                )?);
            }
            other => {
                return Err(ApiError::Internal(format!(
                    "update_mask admitted {other:?}, which UpdateQueue does not handle"
                )));
            }
        }
    }
    Ok(update)
}

#[tonic::async_trait]
impl QueueService for QueueApi {
    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<String, ()>::parse(
            req.page_size,
            &req.page_token,
            (),
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        let views: Vec<QueueView> = self
            .store
            .list_queues(&tenant, paging.after.as_deref(), paging.limit())
            .await
            .map_err(ApiError::from)?;
        let candidates = views.into_iter().map(convert::queue).collect();
        let (queues, next_page_token) = paging.page(candidates, false, |queue: &pb::Queue| {
            Ok(queue.name.clone())
        })?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues,
            next_page_token,
        }))
    }

    async fn get_queue(
        &self,
        request: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::GetQueueResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = queue_name(&request.get_ref().name)?;
        let queue = self.view(&tenant, &name).await?;
        Ok(Response::new(pb::GetQueueResponse { queue: Some(queue) }))
    }

    async fn update_queue(
        &self,
        request: Request<pb::UpdateQueueRequest>,
    ) -> Result<Response<pb::UpdateQueueResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let queue = req
            .queue
            .as_ref()
            .ok_or_else(|| ApiError::invalid("queue", "is required"))?;
        let name = validate::name("queue.name", &queue.name).map(QueueName::new_unchecked)?;
        let paths = validate::update_mask(
            req.update_mask.as_ref(),
            &[
                "concurrency_limit",
                "rate_limit",
                "warn_after",
                "critical_after",
                "retention",
            ],
        )?;
        let update = queue_update(queue, &paths)?;
        self.store
            .update_queue(&tenant, &name, &update, req.allow_missing)
            .await
            .map_err(|e| not_found(e, &name))?;
        tracing::info!(%tenant, queue = %name, ?update, "queue settings changed");
        let queue = self.view(&tenant, &name).await?;
        Ok(Response::new(pb::UpdateQueueResponse {
            queue: Some(queue),
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let name = queue_name(&req.name)?;
        let reason = validate::reason(&req.reason)?;
        self.store
            .pause_queue(&tenant, &name, &reason)
            .await
            .map_err(|e| not_found(e, &name))?;
        tracing::info!(%tenant, queue = %name, %reason, "queue paused");
        let queue = self.view(&tenant, &name).await?;
        Ok(Response::new(pb::PauseQueueResponse { queue: Some(queue) }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let name = queue_name(&request.get_ref().name)?;
        self.store
            .resume_queue(&tenant, &name)
            .await
            .map_err(|e| not_found(e, &name))?;
        tracing::info!(%tenant, queue = %name, "queue resumed");
        let queue = self.view(&tenant, &name).await?;
        Ok(Response::new(pb::ResumeQueueResponse {
            queue: Some(queue),
        }))
    }
}
