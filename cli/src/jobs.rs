//! `jobwire jobs`: list, get, enqueue and control jobs through `JobService` (`jobs watch`, a
//! command of its own size, is [`crate::watch`]).
//!
//! Reads and the state changes go through the SDK's [`Client`]; the listing and the enqueue
//! call the generated client on the SDK's channel, because the listing prints the page as the
//! server sent it (with its token) and the enqueue sends a JSON payload or an example slug,
//! which the SDK's typed `enqueue` does not take.

use jobwire::Client;
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::job_service_client::JobServiceClient;

use crate::args::{EnqueueArgs, JobsCommand, ListJobsArgs};
use crate::error::Failure;
use crate::render::{self, Pool, line};

/// Runs one `jobs` subcommand.
pub async fn run(client: &Client, json: bool, command: JobsCommand) -> Result<(), Failure> {
    let pool = Pool::new()?;
    match command {
        JobsCommand::List(args) => list(client, &pool, json, args).await,
        JobsCommand::Get { id } => {
            let job = client.get_job(&id).await?.into_proto();
            let pool = with_types(pool, client, [&job]).await;
            if json {
                return pool.print(&pb::GetJobResponse { job: Some(job) });
            }
            line(&describe(&pool, &job))
        }
        JobsCommand::Watch { id } => crate::watch::run(client, pool, json, &id).await,
        JobsCommand::Enqueue(args) => enqueue(client, &pool, json, args).await,
        JobsCommand::Cancel { id, reason } => {
            let job = client.cancel_job(&id, reason).await?.into_proto();
            changed(
                &pool,
                json,
                &pb::CancelJobResponse { job: Some(job) },
                |r| r.job.as_ref(),
            )
        }
        JobsCommand::Retry { id } => {
            let job = client.retry_job(&id).await?.into_proto();
            changed(&pool, json, &pb::RetryJobResponse { job: Some(job) }, |r| {
                r.job.as_ref()
            })
        }
        JobsCommand::Pause { id, reason } => {
            let job = client.pause_job(&id, reason).await?.into_proto();
            changed(&pool, json, &pb::PauseJobResponse { job: Some(job) }, |r| {
                r.job.as_ref()
            })
        }
        JobsCommand::Resume { id } => {
            let job = client.resume_job(&id).await?.into_proto();
            changed(
                &pool,
                json,
                &pb::ResumeJobResponse { job: Some(job) },
                |r| r.job.as_ref(),
            )
        }
        JobsCommand::Approve { id, comment } => {
            let job = client.approve_job(&id, comment).await?.into_proto();
            changed(
                &pool,
                json,
                &pb::ApproveJobResponse { job: Some(job) },
                |r| r.job.as_ref(),
            )
        }
        JobsCommand::Reject { id, reason } => {
            let job = client.reject_job(&id, reason).await?.into_proto();
            changed(
                &pool,
                json,
                &pb::RejectJobResponse { job: Some(job) },
                |r| r.job.as_ref(),
            )
        }
    }
}

/// The pool plus the schemas of these jobs' types, for their payloads and results.
pub async fn with_types<'a>(
    pool: Pool,
    client: &Client,
    jobs: impl IntoIterator<Item = &'a pb::Job>,
) -> Pool {
    let types: Vec<_> = jobs
        .into_iter()
        .filter(|job| job.job_type_version > 0)
        .map(|job| (job.job_type.clone(), job.job_type_version))
        .collect();
    if types.is_empty() {
        return pool;
    }
    pool.with_job_types(client, types).await
}

/// `jobs list`: one page, filtered.
async fn list(client: &Client, pool: &Pool, json: bool, args: ListJobsArgs) -> Result<(), Failure> {
    let request = pb::ListJobsRequest {
        parent_id: Default::default(),
        page_size: args
            .page_size
            .map_or(0, |size| i32::try_from(size).unwrap_or(i32::MAX)),
        page_token: args.page_token.unwrap_or_default(),
        states: args.states.iter().map(|s| s.to_proto() as i32).collect(),
        queue: args.queue.unwrap_or_default(),
        job_type: args.job_type.unwrap_or_default(),
        view: pb::JobView::Basic as i32,
        error_kind: args.error_kind.unwrap_or_default(),
        error_text: args.error_text.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
    };
    let page = JobServiceClient::new(client.channel())
        .list_jobs(client.request(request))
        .await?
        .into_inner();
    if json {
        let pool = with_types(pool.clone(), client, &page.jobs).await;
        return pool.print(&page);
    }
    let rows = page
        .jobs
        .iter()
        .map(|job| {
            [
                job.id.clone(),
                job.job_type.clone(),
                job.queue.clone(),
                render::state(job.state),
                attempts(job),
                job.progress
                    .as_ref()
                    .map(render::progress)
                    .unwrap_or_default(),
                render::time(job.created_at.as_ref()),
            ]
        })
        .collect();
    line(&render::table(
        [
            "ID", "TYPE", "QUEUE", "STATE", "ATTEMPTS", "PROGRESS", "CREATED",
        ],
        rows,
    ))?;
    if !page.next_page_token.is_empty() {
        line(&format!(
            "\nnext page: --page-token {}",
            page.next_page_token
        ))?;
    }
    Ok(())
}

/// `jobs enqueue`: a registered type's job from JSON or an example.
async fn enqueue(
    client: &Client,
    pool: &Pool,
    json: bool,
    args: EnqueueArgs,
) -> Result<(), Failure> {
    let payload_json = args
        .payload
        .json_payload
        .as_deref()
        .map(|text| pool.parse_struct(text, "--json-payload"))
        .transpose()?;
    let spec = pb::JobSpec {
        job_type: args.job_type,
        payload_json,
        example: args.payload.example.unwrap_or_default(),
        queue: args.queue.unwrap_or_default(),
        priority: args.priority,
        schedule: args
            .delay
            .map(|delay| pb::job_spec::Schedule::Delay(proto_duration(delay))),
        retry_policy: args.max_attempts.map(|attempts| pb::RetryPolicy {
            max_attempts: Some(attempts),
            ..Default::default()
        }),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
        timeout: args.timeout.map(proto_duration),
        job_type_version: args.type_version.unwrap_or(0),
        needs_approval: args.needs_approval,
        ..Default::default()
    };
    let response = JobServiceClient::new(client.channel())
        .enqueue_job(client.request(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(spec),
        }))
        .await?
        .into_inner();
    if json {
        let pool = with_types(pool.clone(), client, response.job.as_ref()).await;
        return pool.print(&response);
    }
    let job = response.job.unwrap_or_default();
    let verb = if response.created {
        "enqueued"
    } else {
        "already enqueued (same idempotency key)"
    };
    line(&format!(
        "{verb}: job {} ({}, queue {})\nwatch it with: jobwire jobs watch {}",
        job.id,
        render::state(job.state),
        job.queue,
        job.id
    ))
}

/// A `std::time::Duration` as protobuf's.
pub fn proto_duration(duration: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// Prints the outcome of a state change: the response as JSON, or the job's new state.
fn changed<R: prost::Message + prost::Name>(
    pool: &Pool,
    json: bool,
    response: &R,
    job: impl Fn(&R) -> Option<&pb::Job>,
) -> Result<(), Failure> {
    if json {
        return pool.print(response);
    }
    let Some(job) = job(response) else {
        return Err(Failure::Internal("the response has no job".into()));
    };
    let mut text = format!("job {}: {}", job.id, render::state(job.state));
    if job.cancel_requested_at.is_some() {
        text.push_str(" (cancel requested; its worker is stopping it)");
    } else if job.pause_requested_at.is_some() {
        text.push_str(" (pause requested; its worker is checkpointing and stopping)");
    }
    line(&text)
}

/// Attempts counted against the limit, as `counted/max`.
fn attempts(job: &pb::Job) -> String {
    let max = job
        .retry_policy
        .as_ref()
        .and_then(|policy| policy.max_attempts)
        .map(|max| max.to_string())
        .unwrap_or_else(|| "?".into());
    format!("{}/{max}", job.attempts_counted)
}

/// `jobs get` for people: the job's fields, progress, payload and result, then its attempts.
fn describe(pool: &Pool, job: &pb::Job) -> String {
    let version = if job.job_type_version > 0 {
        format!(" (version {})", job.job_type_version)
    } else {
        String::new()
    };
    let last_error = job.last_error.as_ref().map(error_text).unwrap_or_default();
    let payload = match (&job.payload_json, &job.payload) {
        (Some(json), _) => pool.struct_text(json),
        (None, Some(any)) => pool.any_text(any),
        (None, None) => String::new(),
    };
    let result = match (&job.result_json, &job.result) {
        (Some(json), _) => pool.struct_text(json),
        (None, Some(any)) => pool.any_text(any),
        (None, None) => String::new(),
    };
    let mut text = render::fields(&[
        ("id", job.id.clone()),
        ("type", format!("{}{version}", job.job_type)),
        ("queue", job.queue.clone()),
        ("state", render::state(job.state)),
        ("priority", job.priority.to_string()),
        (
            "attempts",
            format!("{} counted (latest: {})", attempts(job), job.attempt),
        ),
        ("labels", render::labels(&job.labels)),
        ("idempotency key", job.idempotency_key.clone()),
        ("schedule", job.schedule_id.clone()),
        ("created", render::time(job.created_at.as_ref())),
        ("run at", render::time(job.run_at.as_ref())),
        ("started", render::time(job.started_at.as_ref())),
        ("finished", render::time(job.finished_at.as_ref())),
        ("timeout", render::proto_duration(job.timeout.as_ref())),
        ("worker", job.lease_owner.clone()),
        (
            "progress",
            job.progress
                .as_ref()
                .map(render::progress)
                .unwrap_or_default(),
        ),
        ("cancel reason", job.cancel_reason.clone()),
        ("last error", last_error),
        ("payload", payload),
        ("result", result),
    ]);
    if !job.attempts.is_empty() {
        let rows = job
            .attempts
            .iter()
            .map(|attempt| {
                [
                    attempt.attempt.to_string(),
                    attempt.worker_id.clone(),
                    render::time(attempt.started_at.as_ref()),
                    render::time(attempt.finished_at.as_ref()),
                    pb::AttemptOutcome::try_from(attempt.outcome)
                        .map(|o| render::enum_name(o.as_str_name(), "ATTEMPT_OUTCOME_"))
                        .unwrap_or_default(),
                    attempt.error.as_ref().map(error_text).unwrap_or_default(),
                ]
            })
            .collect();
        text.push_str("\n\nattempts");
        if job.attempts_omitted > 0 {
            text.push_str(&format!(" ({} older ones left out)", job.attempts_omitted));
        }
        text.push_str(":\n");
        text.push_str(&render::table(
            ["#", "WORKER", "STARTED", "FINISHED", "OUTCOME", "ERROR"],
            rows,
        ));
    }
    text
}

/// A failure in one line: message, kind, and whether it may be retried.
pub fn error_text(error: &pb::JobError) -> String {
    let mut text = error.message.clone();
    if !error.kind.is_empty() {
        text.push_str(&format!(" [{}]", error.kind));
    }
    if !error.retryable {
        text.push_str(" (not retryable)");
    }
    text
}
