//! `jobwire.v1.JobService`: enqueue, inspect and control jobs.

use std::collections::HashMap;

use jobwire_proto::v1::{self as pb, job_service_server::JobService};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use tokio_stream::wrappers::ReceiverStream;

use jobwire_proto::limits::MAX_PAGE_BYTES;

use super::{
    ApiError, actor_of, auth, convert,
    paging::PageRequest,
    payloads, tenant_of, validate,
    watch::{JobSink, JobsSink, Watches},
};
use crate::{
    domain::{Actor, JobId, JobState, LeaseRef, TenantId, trace::TraceContext},
    engine::{enqueuer::EnqueuerHandle, fanout::Target},
    registry::Registry,
    store::{self, EventFilter, ListFilter, ReplayFilter, StopKind, Store},
    telemetry,
};
use tracing::Instrument;

const DEFAULT_PAGE_SIZE: i32 = 50;
const MAX_PAGE_SIZE: i32 = 1000;
const DEFAULT_REPLAY_LIMIT: i32 = 1000;
const MAX_REPLAY_LIMIT: i32 = 10_000;
const MAX_REQUEST_ID_LEN: usize = 128;
const MAX_PATCH_BYTES: usize = 64 * 1024;
/// Every signal of a job travels in each of its leases, beside its payload and checkpoint.
const MAX_SIGNAL_PAYLOAD_BYTES: usize = 16 * 1024;

pub struct JobApi {
    store: Store,
    registry: Registry,
    /// Group-commits single enqueues.
    enqueuer: EnqueuerHandle,
    max_payload_bytes: usize,
    watches: Watches,
}

impl JobApi {
    pub fn new(
        store: Store,
        registry: Registry,
        enqueuer: EnqueuerHandle,
        max_payload_bytes: usize,
        watches: Watches,
    ) -> Self {
        Self {
            store,
            registry,
            enqueuer,
            max_payload_bytes,
            watches,
        }
    }

    /// Asks the worker running `id` to stop it; for a job that is not running, explains why
    /// the request cannot apply.
    async fn stop_running(
        &self,
        tenant: &TenantId,
        id: JobId,
        stop: StopKind,
        reason: &str,
        action: &str,
        actor: &Actor,
    ) -> Result<pb::Job, ApiError> {
        match self
            .store
            .request_stop(tenant, id, stop, reason, Some(actor))
            .await?
        {
            Some(row) => {
                tracing::info!(job_id = %id, %tenant, ?stop, "stop requested of a running job");
                Ok(convert::job(row, &[]))
            }
            None => Err(self.refusal(tenant, id, action).await),
        }
    }

    async fn full_job(
        &self,
        tenant: &TenantId,
        id: JobId,
        view: pb::JobView,
    ) -> Result<pb::Job, ApiError> {
        let row = self
            .store
            .get_job(tenant, id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("job {id} not found")))?;
        let attempts = if view == pb::JobView::Full {
            self.store.list_attempts(tenant, id).await?
        } else {
            Vec::new()
        };
        let mut job = convert::job(row, &attempts);
        payloads::render(&self.registry, tenant, &mut job).await;
        Ok(job)
    }

    /// Explains why a job could not take a transition: missing, or in the wrong state.
    async fn refusal(&self, tenant: &TenantId, id: JobId, action: &str) -> ApiError {
        match self.store.get_job(tenant, id).await {
            Ok(row) => ApiError::FailedPrecondition(format!(
                "job {id} is {}; cannot {action} it",
                state_name(row.state)
            )),
            Err(e) => ApiError::from_store(e, || format!("job {id} not found")),
        }
    }
}

/// The W3C trace context of a call's `traceparent` and `tracestate` metadata; a missing or
/// malformed one is no context, never an error (see `domain::trace`).
fn trace_context(metadata: &tonic::metadata::MetadataMap) -> Option<TraceContext> {
    let header = |name| metadata.get(name).and_then(|v| v.to_str().ok());
    TraceContext::parse(header("traceparent"), header("tracestate"))
}

fn state_name(state: JobState) -> &'static str {
    state.to_proto().as_str_name()
}

/// The filters a ListJobs page token was issued for, as the request gave them (AIP-158: a token
/// must not be reused with other filters).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct JobsFilter {
    states: Vec<i32>,
    queue: String,
    job_type: String,
    #[serde(default)]
    error_kind: String,
    #[serde(default)]
    error_text: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    parent_id: String,
}

/// The running job an enqueue names as the parent of its jobs, checked. A key whose only right
/// to enqueue is the worker's must name one: a worker enqueues the children of the jobs it runs
/// and nothing else.
fn parent_of<T>(
    request: &Request<T>,
    parent: Option<&pb::LeaseRef>,
) -> Result<Option<LeaseRef>, Status> {
    let parent = parent
        .map(|p| validate::lease_ref("parent", Some(p)))
        .transpose()?;
    let identity = request.extensions().get::<auth::Identity>();
    if parent.is_none() && identity.is_some_and(auth::Identity::enqueues_only_children) {
        return Err(Status::permission_denied(
            "a key with the worker role enqueues only children of a job it runs: set `parent` \
             to the running job's lease (a producer or admin key enqueues any job)",
        ));
    }
    Ok(parent)
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn enqueue_job(
        &self,
        request: Request<pb::EnqueueJobRequest>,
    ) -> Result<Response<pb::EnqueueJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let parent = parent_of(&request, request.get_ref().parent.as_ref())?;
        let spec = request
            .get_ref()
            .job
            .as_ref()
            .ok_or_else(|| ApiError::invalid("job", "is required"))?;
        let (spec, version) = payloads::prepare(&self.registry, &tenant, spec)
            .await
            .map_err(|e| e.within("job"))?;
        let mut job = validate::single_job_spec(&spec, self.max_payload_bytes)
            .map_err(|e| e.within("job"))?;
        job.job_type_version = version;
        job.trace = trace_context(request.metadata());
        let span = tracing::info_span!(
            "jobwire.enqueue",
            job_id = %job.id,
            %tenant,
            queue = %job.queue,
            job_type = %job.job_type,
        );
        telemetry::adopt(&span, job.trace.as_ref());
        let queue = job.queue.clone();
        let accept_existing = job.accept_existing;
        let outcome = if job.depends_on.is_empty() && parent.is_none() {
            self.enqueuer
                .enqueue(tenant.clone(), job)
                .instrument(span)
                .await
                .map_err(ApiError::from)?
        } else {
            // Not group-committed: its dependencies and its parent are checked and marked in
            // its own transaction.
            let mut outcomes = self
                .store
                .enqueue_dependent(&tenant, std::slice::from_ref(&job), parent)
                .instrument(span)
                .await
                .map_err(|e| match e {
                    store::Error::UnknownDependency { position, id, .. } => ApiError::invalid(
                        format!("job.depends_on[{position}]"),
                        format!("names {id}, which is no job of this tenant"),
                    ),
                    store::Error::KeyReused { existing, .. } => ApiError::KeyReused {
                        field: "job.idempotency_key".into(),
                        existing: existing.to_string(),
                    },
                    other => ApiError::from(other),
                })?;
            outcomes
                .pop()
                .ok_or_else(|| ApiError::Internal("an enqueue returned no job".into()))?
        };
        if !outcome.same && !accept_existing {
            return Err(ApiError::KeyReused {
                field: "job.idempotency_key".into(),
                existing: outcome.job.id.to_string(),
            }
            .into());
        }
        if outcome.created {
            tracing::debug!(job_id = %outcome.job.id, %tenant, %queue, "job enqueued");
        }
        let mut job = convert::job(outcome.job, &[]);
        payloads::render(&self.registry, &tenant, &mut job).await;
        Ok(Response::new(pb::EnqueueJobResponse {
            created: outcome.created,
            job: Some(job),
        }))
    }

    async fn enqueue_jobs(
        &self,
        request: Request<pb::EnqueueJobsRequest>,
    ) -> Result<Response<pb::EnqueueJobsResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let parent = parent_of(&request, request.get_ref().parent.as_ref())?;
        let requested = &request.get_ref().jobs;
        // Before the registry lookups, so an oversized batch costs none.
        validate::batch_len(requested.len())?;
        let mut specs = Vec::with_capacity(requested.len());
        let mut versions = Vec::with_capacity(requested.len());
        for (i, spec) in requested.iter().enumerate() {
            let (spec, version) = payloads::prepare(&self.registry, &tenant, spec)
                .await
                .map_err(|e| e.within(&format!("jobs[{i}]")))?;
            specs.push(spec);
            versions.push(version);
        }
        let mut jobs = validate::job_specs(&specs, self.max_payload_bytes)?;
        let trace = trace_context(request.metadata());
        for (job, version) in jobs.iter_mut().zip(versions) {
            job.job_type_version = version;
            job.trace.clone_from(&trace);
        }
        let span = tracing::info_span!("jobwire.enqueue", %tenant, jobs = jobs.len());
        telemetry::adopt(&span, trace.as_ref());
        let outcomes = if jobs.iter().all(|j| j.depends_on.is_empty()) && parent.is_none() {
            self.store
                .enqueue_batch(&tenant, &jobs)
                .instrument(span)
                .await
                .map_err(ApiError::from)?
        } else {
            self.store
                .enqueue_dependent(&tenant, &jobs, parent)
                .instrument(span)
                .await
                .map_err(ApiError::from)?
                .into_iter()
                .map(|o| store::Enqueued {
                    id: o.job.id,
                    state: o.job.state,
                    created: o.created,
                    same: o.same,
                })
                .collect()
        };
        Ok(Response::new(pb::EnqueueJobsResponse {
            jobs: outcomes
                .into_iter()
                .map(|o| pb::EnqueuedJob {
                    id: o.id.to_string(),
                    state: o.state.to_proto().into(),
                    created: o.created,
                })
                .collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let view = validate::view(req.view, pb::JobView::Full)?;
        let mut job = self.full_job(&tenant, id, view).await?;
        let counts = self
            .store
            .child_counts(&tenant, id)
            .await
            .map_err(ApiError::from)?;
        job.children = convert::child_counts(&counts);
        Ok(Response::new(pb::GetJobResponse { job: Some(job) }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<uuid::Uuid, _>::parse(
            req.page_size,
            &req.page_token,
            JobsFilter {
                states: req.states.clone(),
                queue: req.queue.clone(),
                job_type: req.job_type.clone(),
                error_kind: req.error_kind.clone(),
                error_text: req.error_text.clone(),
                labels: req.labels.clone().into_iter().collect(),
                parent_id: req.parent_id.clone(),
            },
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        let filter = ListFilter {
            states: validate::states(&req.states)?,
            queue: (!req.queue.is_empty())
                .then(|| validate::queue("queue", &req.queue))
                .transpose()?,
            job_type: (!req.job_type.is_empty())
                .then(|| validate::job_type("job_type", &req.job_type))
                .transpose()?,
            error_kind: (!req.error_kind.is_empty())
                .then(|| {
                    validate::text("error_kind", &req.error_kind, validate::MAX_ERROR_KIND_LEN)
                        .map(|()| req.error_kind.clone())
                })
                .transpose()?,
            error_text: (!req.error_text.is_empty())
                .then(|| {
                    validate::text("error_text", &req.error_text, validate::MAX_ERROR_TEXT_LEN)
                        .map(|()| req.error_text.clone())
                })
                .transpose()?,
            labels: validate::labels(&req.labels)?,
            parent: (!req.parent_id.is_empty())
                .then(|| validate::job_id("parent_id", &req.parent_id))
                .transpose()?,
            before: paging.after.map(JobId),
        };
        let full = validate::view(req.view, pb::JobView::Basic)? == pb::JobView::Full;
        let listed = self
            .store
            .list_jobs(&tenant, &filter, paging.limit(), MAX_PAGE_BYTES)
            .await
            .map_err(ApiError::from)?;
        let truncated = listed.candidates > listed.rows.len();
        let mut attempts = if full {
            let ids: Vec<JobId> = listed.rows.iter().map(|row| JobId(row.id)).collect();
            self.store
                .list_attempts_of(&tenant, &ids)
                .await
                .map_err(ApiError::from)?
        } else {
            HashMap::new()
        };
        let mut candidates = Vec::with_capacity(listed.rows.len());
        for row in listed.rows {
            let attempts = attempts.remove(&JobId(row.id)).unwrap_or_default();
            let mut job = convert::job(row, &attempts);
            payloads::render(&self.registry, &tenant, &mut job).await;
            candidates.push(job);
        }
        let (jobs, next_page_token) = paging.page(candidates, truncated, |job| {
            uuid::Uuid::parse_str(&job.id).map_err(|e| ApiError::Internal(e.to_string()))
        })?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let reason = validate::reason(&req.reason)?;
        let job = match self
            .store
            .cancel_queued(&tenant, id, &reason, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        {
            Some(row) => {
                tracing::info!(job_id = %id, %tenant, "job cancelled");
                convert::job(row, &[])
            }
            None => {
                self.stop_running(
                    &tenant,
                    id,
                    StopKind::Cancel,
                    &reason,
                    "cancel",
                    &actor_of(&request),
                )
                .await?
            }
        };
        Ok(Response::new(pb::CancelJobResponse { job: Some(job) }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let id = validate::job_id("id", &request.get_ref().id)?;
        let Some(row) = self
            .store
            .retry_finished(&tenant, id, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        else {
            return Err(self.refusal(&tenant, id, "retry").await.into());
        };
        tracing::info!(job_id = %id, %tenant, "job retried");
        Ok(Response::new(pb::RetryJobResponse {
            job: Some(convert::job(row, &[])),
        }))
    }

    async fn replay_jobs(
        &self,
        request: Request<pb::ReplayJobsRequest>,
    ) -> Result<Response<pb::ReplayJobsResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let actor = actor_of(&request);
        let req = request.get_ref();
        let states = validate::states(&req.states)?;
        if let Some(i) = states
            .iter()
            .position(|s| !matches!(s, JobState::Failed | JobState::Cancelled))
        {
            return Err(ApiError::invalid(
                format!("states[{i}]"),
                "only FAILED and CANCELLED jobs are replayed",
            )
            .into());
        }
        let text = |field: &str, value: &str, max: usize| {
            (!value.is_empty())
                .then(|| validate::text(field, value, max).map(|()| value.to_owned()))
                .transpose()
        };
        let filter = ReplayFilter {
            states,
            queue: (!req.queue.is_empty())
                .then(|| validate::queue("queue", &req.queue))
                .transpose()?,
            job_type: (!req.job_type.is_empty())
                .then(|| validate::job_type("job_type", &req.job_type))
                .transpose()?,
            finished_after: req
                .finished_after
                .as_ref()
                .map(|t| validate::timestamp("finished_after", t))
                .transpose()?,
            finished_before: req
                .finished_before
                .as_ref()
                .map(|t| validate::timestamp("finished_before", t))
                .transpose()?,
            error_kind: text("error_kind", &req.error_kind, validate::MAX_ERROR_KIND_LEN)?,
            error_text: text("error_text", &req.error_text, validate::MAX_ERROR_TEXT_LEN)?,
            labels: validate::labels(&req.labels)?,
        };
        let limit = match req.limit {
            0 => DEFAULT_REPLAY_LIMIT,
            n if (1..=MAX_REPLAY_LIMIT).contains(&n) => n,
            n => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("must be between 1 and {MAX_REPLAY_LIMIT}, got {n}"),
                )
                .into());
            }
        };
        let request_id = match (req.dry_run, req.request_id.as_str()) {
            (true, _) => None,
            (false, "") => {
                return Err(ApiError::invalid(
                    "request_id",
                    "is required unless dry_run: it makes a repeated replay harmless",
                )
                .into());
            }
            (false, id) => {
                validate::text("request_id", id, MAX_REQUEST_ID_LEN)?;
                Some(id)
            }
        };
        let patch = match &req.payload_patch {
            None => None,
            Some(patch) => {
                if prost::Message::encoded_len(patch) > MAX_PATCH_BYTES {
                    return Err(ApiError::invalid(
                        "payload_patch",
                        format!("must encode to at most {MAX_PATCH_BYTES} bytes"),
                    )
                    .into());
                }
                let Some(job_type) = &filter.job_type else {
                    return Err(ApiError::invalid(
                        "job_type",
                        "is required with payload_patch: a patch fits one job type's payload",
                    )
                    .into());
                };
                Some((job_type.clone(), convert::struct_to_json(patch)))
            }
        };
        let patch = patch.map(std::sync::Arc::new);
        let change = |job: store::Replayable| {
            let (registry, tenant, patch) = (self.registry.clone(), tenant.clone(), patch.clone());
            let patched = async move {
                let Some((job_type, patch)) = patch.as_deref() else {
                    return Ok(None);
                };
                let version = job
                    .job_type_version
                    .ok_or("its job type had no registered schema when it was enqueued")?;
                let schema = registry
                    .schema(&tenant, job_type, Some(version))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("version {version} of its job type is not registered")
                    })?;
                let mut json = schema
                    .payload_to_json(&job.payload)
                    .ok_or("its payload does not decode")?;
                json_patch::merge(&mut json, patch);
                schema
                    .payload_from_json(&json)
                    .map(Some)
                    .map_err(|e| format!("{}: {}", e.path, e.why))
            };
            futures::FutureExt::boxed(patched)
        };
        let replayed = self
            .store
            .replay(
                &tenant,
                store::Replay {
                    filter: &filter,
                    limit: i64::from(limit),
                    request: request_id,
                    actor: Some(&actor),
                },
                change,
            )
            .await
            .map_err(|e| match e {
                store::Error::Refused { id, why } => ApiError::invalid(
                    "payload_patch",
                    format!("does not fit job {id}: {why}; nothing was replayed"),
                ),
                other => ApiError::from(other),
            })?;
        if !req.dry_run && !replayed.repeated {
            tracing::info!(%tenant, jobs = replayed.count, request_id = ?request_id, "jobs replayed");
        }
        Ok(Response::new(pb::ReplayJobsResponse {
            count: replayed.count,
            sample_ids: replayed.sample.iter().map(ToString::to_string).collect(),
            truncated: replayed.truncated,
            repeated: replayed.repeated,
        }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::PauseJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let reason = validate::reason(&req.reason)?;
        let job = match self
            .store
            .pause_queued(&tenant, id, &reason, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        {
            Some(row) => convert::job(row, &[]),
            None => {
                self.stop_running(
                    &tenant,
                    id,
                    StopKind::Pause,
                    &reason,
                    "pause",
                    &actor_of(&request),
                )
                .await?
            }
        };
        Ok(Response::new(pb::PauseJobResponse { job: Some(job) }))
    }

    async fn resume_job(
        &self,
        request: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::ResumeJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let id = validate::job_id("id", &request.get_ref().id)?;
        let Some(row) = self
            .store
            .resume_paused(&tenant, id, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        else {
            return Err(self.refusal(&tenant, id, "resume").await.into());
        };
        Ok(Response::new(pb::ResumeJobResponse {
            job: Some(convert::job(row, &[])),
        }))
    }

    async fn approve_job(
        &self,
        request: Request<pb::ApproveJobRequest>,
    ) -> Result<Response<pb::ApproveJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let reason = validate::reason(&req.reason)?;
        let Some(row) = self
            .store
            .approve(&tenant, id, &reason, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        else {
            return Err(self.refusal(&tenant, id, "approve").await.into());
        };
        tracing::info!(job_id = %id, %tenant, %reason, "job approved");
        Ok(Response::new(pb::ApproveJobResponse {
            job: Some(convert::job(row, &[])),
        }))
    }

    async fn signal_job(
        &self,
        request: Request<pb::SignalJobRequest>,
    ) -> Result<Response<pb::SignalJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let name = validate::signal_name("name", &req.name)?;
        if let Some(payload) = &req.payload {
            validate::any_size("payload", payload, MAX_SIGNAL_PAYLOAD_BYTES)?;
        }
        let request_id = (!req.request_id.is_empty())
            .then(|| {
                validate::text("request_id", &req.request_id, MAX_REQUEST_ID_LEN)
                    .map(|()| req.request_id.clone())
            })
            .transpose()?;
        let signal = store::NewSignal {
            name,
            payload: req
                .payload
                .as_ref()
                .map(|p| (p.type_url.clone(), p.value.clone())),
            request_id,
        };
        let signalled = self
            .store
            .signal_job(&tenant, id, &signal, Some(&actor_of(&request)))
            .await
            .map_err(|e| match e {
                store::Error::Ended(state) => ApiError::FailedPrecondition(format!(
                    "job {id} is {}; a finished job takes no signal",
                    state_name(state)
                )),
                store::Error::TooManySignals(max) => ApiError::ResourceExhausted(format!(
                    "job {id} holds {max} signals, the most a job may"
                )),
                other => ApiError::from_store(other, || format!("job {id} not found")),
            })?;
        tracing::info!(job_id = %id, %tenant, signal = %signal.name, "job signalled");
        Ok(Response::new(pb::SignalJobResponse {
            job: Some(convert::job(signalled.job, &[])),
            number: i32::try_from(signalled.number).unwrap_or(i32::MAX),
            repeated: signalled.repeated,
        }))
    }

    async fn reject_job(
        &self,
        request: Request<pb::RejectJobRequest>,
    ) -> Result<Response<pb::RejectJobResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let reason = validate::reason(&req.reason)?;
        let Some(row) = self
            .store
            .reject(&tenant, id, &reason, Some(&actor_of(&request)))
            .await
            .map_err(ApiError::from)?
        else {
            return Err(self.refusal(&tenant, id, "reject").await.into());
        };
        tracing::info!(job_id = %id, %tenant, %reason, "job rejected");
        Ok(Response::new(pb::RejectJobResponse {
            job: Some(convert::job(row, &[])),
        }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::WatchJobResponse, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let id = validate::job_id("id", &req.id)?;
        let after = validate::sequence("after_sequence", req.after_sequence)?;
        {
            let reads = self.watches.reads();
            let _turn = reads.turn().await;
            reads
                .store
                .get_job(&tenant, id)
                .await
                .map_err(|e| ApiError::from_store(e, || format!("job {id} not found")))?;
        }
        let target = if req.include_children {
            Target::Family(id)
        } else {
            Target::Job(id)
        };
        let rx = self
            .watches
            .start::<JobSink>(request.remote_addr(), tenant, target, after)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchJobsStream = ReceiverStream<Result<pb::WatchJobsResponse, Status>>;

    async fn watch_jobs(
        &self,
        request: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let filter = EventFilter {
            queue: (!req.queue.is_empty())
                .then(|| validate::queue("queue", &req.queue))
                .transpose()?,
            job_type: (!req.job_type.is_empty())
                .then(|| validate::job_type("job_type", &req.job_type))
                .transpose()?,
            states: validate::states(&req.states)?,
            labels: validate::labels(&req.labels)?,
        };
        let after = validate::sequence("after_sequence", req.after_sequence)?;
        let rx = self.watches.start::<JobsSink>(
            request.remote_addr(),
            tenant,
            Target::Filter(filter),
            after,
        )?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
