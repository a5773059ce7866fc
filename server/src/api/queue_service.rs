//! `jobwire.v1.QueueService`: inspect queues, pause them, limit them.

use jobwire_proto::v1::{self as pb, queue_service_server::QueueService};
use tonic::{Request, Response, Status};

use super::{ApiError, convert, paging::PageRequest, tenant_of, validate};
use crate::{
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

/// The limits an UpdateQueue request sets, for the paths its mask names.
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
            &["concurrency_limit", "rate_limit"],
        )?;
        let update = queue_update(queue, &paths)?;
        self.store
            .update_queue(&tenant, &name, &update, req.allow_missing)
            .await
            .map_err(|e| not_found(e, &name))?;
        tracing::info!(%tenant, queue = %name, ?update, "queue limits changed");
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
