//! The worker stream's messages, validated into the engine's terms: every field is checked
//! here, once, against the limits documented in `worker.proto`, and a bad one is named in the
//! ack of its own message.

use jobwire_proto::{limits::MAX_LOG_BATCH_BYTES, v1 as pb};

use super::{ApiError, convert, job_type_service, validate};
use crate::{
    domain::{LeaseRef, QueueName, TenantId},
    engine::{
        ending::{Completion, Failure, Wait},
        session::SessionSpec,
    },
    store::{Checkpoint, LogBatch, MAX_SIGNALS_PER_JOB, NewJobType, ProgressUpdate, SignalWait},
};

const MAX_SLOTS: i32 = 10_000;
pub const MAX_WORKER_ID: usize = 128;
/// `Hello.version`: an SDK's name and version.
const MAX_VERSION: usize = 128;
/// `Hello.host`: a host name (DNS allows 253 bytes).
const MAX_HOST: usize = 255;
const MAX_FAILURE_KIND: usize = 128;
const MAX_FAILURE_MESSAGE: usize = 8192;
const MAX_LOG_LINES: usize = 1000;
const MAX_LOG_LINE: usize = 8192;
const MAX_PROGRESS_TEXT: usize = 1024;
const MAX_PROGRESS_DATA: usize = 64 * 1024;

/// Cuts a string to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// A validated hello: the session's spec, and the schemas of the types it serves.
pub struct Hello {
    pub spec: SessionSpec,
    /// Schemas of served types, to register when they changed.
    pub schemas: Vec<NewJobType>,
}

pub fn hello(tenant: &TenantId, hello: pb::Hello) -> Result<Hello, ApiError> {
    if hello.worker_id.is_empty() {
        return Err(ApiError::invalid("hello.worker_id", "must not be empty"));
    }
    validate::text("hello.worker_id", &hello.worker_id, MAX_WORKER_ID)?;
    validate::text("hello.version", &hello.version, MAX_VERSION)?;
    validate::text("hello.host", &hello.host, MAX_HOST)?;
    if hello.job_types.is_empty() {
        return Err(ApiError::invalid(
            "hello.job_types",
            "must name at least one job type",
        ));
    }
    let job_types = hello
        .job_types
        .iter()
        .enumerate()
        .map(|(i, t)| validate::job_type(&format!("hello.job_types[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut queues = hello
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| validate::queue(&format!("hello.queues[{i}]"), q))
        .collect::<Result<Vec<_>, _>>()?;
    if queues.is_empty() {
        queues.push(QueueName::new_unchecked(validate::DEFAULT_QUEUE));
    }
    if !(1..=MAX_SLOTS).contains(&hello.slots) {
        return Err(ApiError::invalid(
            "hello.slots",
            format!("must be between 1 and {MAX_SLOTS}, got {}", hello.slots),
        ));
    }
    if !(0..=MAX_SLOTS).contains(&hello.prefetch) {
        return Err(ApiError::invalid(
            "hello.prefetch",
            format!("must be between 0 and {MAX_SLOTS}, got {}", hello.prefetch),
        ));
    }
    let running = hello
        .running
        .iter()
        .enumerate()
        .map(|(i, l)| validate::lease_ref(&format!("hello.running[{i}]"), Some(l)))
        .collect::<Result<Vec<_>, _>>()?;
    let schemas = hello
        .schemas
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("hello.schemas[{i}]");
            if !job_types.contains(&t.name) {
                return Err(ApiError::invalid(
                    format!("{at}.name"),
                    format!("{:?} is not among hello.job_types", t.name),
                ));
            }
            job_type_service::new_job_type(t, &at)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Hello {
        spec: SessionSpec {
            tenant: tenant.clone(),
            worker_id: hello.worker_id,
            job_types,
            queues,
            slots: hello.slots.unsigned_abs(),
            prefetch: hello.prefetch.unsigned_abs(),
            running,
            reports_started: hello.reports_started,
            version: hello.version,
            host: hello.host,
        },
        schemas,
    })
}

pub fn release(release: &pb::ReleaseLeases) -> Result<Vec<LeaseRef>, ApiError> {
    let most = 2 * usize::try_from(MAX_SLOTS).unwrap_or(usize::MAX);
    if release.leases.is_empty() || release.leases.len() > most {
        return Err(ApiError::invalid(
            "release.leases",
            format!("must name 1 to {most} leases, got {}", release.leases.len()),
        ));
    }
    release
        .leases
        .iter()
        .enumerate()
        .map(|(i, l)| validate::lease_ref(&format!("release.leases[{i}]"), Some(l)))
        .collect()
}

pub fn progress(tenant: &TenantId, report: pb::ReportProgress) -> Result<ProgressUpdate, ApiError> {
    let lease = validate::lease_ref("progress.lease", report.lease.as_ref())?;
    let progress = report
        .progress
        .ok_or_else(|| ApiError::invalid("progress.progress", "is required"))?;
    if let Some(f) = progress.fraction
        && !(0.0..=1.0).contains(&f)
    {
        return Err(ApiError::invalid(
            "progress.progress.fraction",
            format!("must be between 0.0 and 1.0, got {f}"),
        ));
    }
    if progress.items_done < 0 || progress.items_total < 0 {
        return Err(ApiError::invalid(
            "progress.progress.items_done",
            "item counts must not be negative",
        ));
    }
    if let Some(data) = &progress.data {
        if prost::Message::encoded_len(data) > MAX_PROGRESS_DATA {
            return Err(ApiError::invalid(
                "progress.progress.data",
                format!("must encode to at most {MAX_PROGRESS_DATA} bytes"),
            ));
        }
        validate::structure("progress.progress.data", data)?;
    }
    let progress = pb::Progress {
        message: truncate(progress.message, MAX_PROGRESS_TEXT),
        stage: truncate(progress.stage, MAX_PROGRESS_TEXT),
        ..progress
    };
    validate::text(
        "progress.progress.message",
        &progress.message,
        MAX_PROGRESS_TEXT,
    )?;
    validate::text(
        "progress.progress.stage",
        &progress.stage,
        MAX_PROGRESS_TEXT,
    )?;
    Ok(ProgressUpdate {
        tenant: tenant.clone(),
        lease,
        fraction: convert::progress_fraction(&progress),
        progress: convert::progress_to_json(&progress, chrono::Utc::now()),
    })
}

pub fn logs(tenant: &TenantId, report: pb::ReportLogs) -> Result<LogBatch, ApiError> {
    let lease = validate::lease_ref("logs.lease", report.lease.as_ref())?;
    if report.lines.len() > MAX_LOG_LINES {
        return Err(ApiError::invalid(
            "logs.lines",
            format!("at most {MAX_LOG_LINES} lines per message"),
        ));
    }
    let text: usize = report.lines.iter().map(|l| l.message.len()).sum();
    if text > MAX_LOG_BATCH_BYTES {
        return Err(ApiError::invalid(
            "logs.lines",
            format!("at most {MAX_LOG_BATCH_BYTES} bytes of text per message, got {text}"),
        ));
    }
    let now = chrono::Utc::now();
    let lines = report
        .lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let level = pb::LogLevel::try_from(line.level)
                .unwrap_or(pb::LogLevel::Info)
                .as_str_name();
            let time = line
                .time
                .map(|t| validate::timestamp(&format!("logs.lines[{i}].time"), &t))
                .transpose()?
                .unwrap_or(now);
            let message = truncate(line.message, MAX_LOG_LINE);
            validate::text(&format!("logs.lines[{i}].message"), &message, MAX_LOG_LINE)?;
            Ok(serde_json::json!({
                "level": level,
                "message": message,
                "time": time.to_rfc3339(),
            }))
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(LogBatch {
        tenant: tenant.clone(),
        lease,
        lines,
    })
}

pub fn checkpoint(
    tenant: &TenantId,
    max_payload: usize,
    save: pb::SaveCheckpoint,
) -> Result<Checkpoint, ApiError> {
    let lease = validate::lease_ref("checkpoint.lease", save.lease.as_ref())?;
    if save.data.len() > max_payload {
        return Err(ApiError::invalid(
            "checkpoint.data",
            format!(
                "is {} bytes, over the limit of {} bytes",
                save.data.len(),
                max_payload
            ),
        ));
    }
    Ok(Checkpoint {
        tenant: tenant.clone(),
        lease,
        data: save.data,
    })
}

pub fn completion(
    tenant: &TenantId,
    max_payload: usize,
    complete: pb::CompleteJob,
) -> Result<Completion, ApiError> {
    let lease = validate::lease_ref("complete.lease", complete.lease.as_ref())?;
    let wait = match (complete.wait_for_children, &complete.wait_signal) {
        (false, None) => None,
        (true, None) => Some(Wait::Children),
        (false, Some(signal)) => Some(signal_wait(signal)?),
        (true, Some(_)) => {
            return Err(ApiError::invalid(
                "complete.wait_signal",
                "must be unset with wait_for_children: an attempt waits for one thing",
            ));
        }
    };
    if let Some(result) = &complete.result {
        if wait.is_some() {
            return Err(ApiError::invalid(
                "complete.result",
                "must be unset when the attempt waits (wait_for_children, wait_signal): the \
                 job's result comes from the attempt that runs once the wait is over",
            ));
        }
        validate::any_size("complete.result", result, max_payload)?;
    }
    let (result_type, result) = match complete.result {
        Some(any) => (Some(any.type_url), Some(any.value)),
        None => (None, None),
    };
    Ok(Completion {
        tenant: tenant.clone(),
        lease,
        result_type,
        result,
        wait,
    })
}

fn signal_wait(signal: &pb::WaitSignal) -> Result<Wait, ApiError> {
    let name = validate::signal_name("complete.wait_signal.name", &signal.name)?;
    // A wait may ask for no more signals of one name than a job holds in all.
    if !(1..=MAX_SIGNALS_PER_JOB).contains(&i64::from(signal.count)) {
        return Err(ApiError::invalid(
            "complete.wait_signal.count",
            format!("must be 1 to {MAX_SIGNALS_PER_JOB}"),
        ));
    }
    let timeout = signal
        .timeout
        .as_ref()
        .map(|d| validate::duration("complete.wait_signal.timeout", d))
        .transpose()?;
    if timeout.is_some_and(|t| t.is_zero()) {
        return Err(ApiError::invalid(
            "complete.wait_signal.timeout",
            "must be at least 1 ms (unset: no limit)",
        ));
    }
    Ok(Wait::Signal {
        wait: SignalWait {
            name,
            count: signal.count,
        },
        timeout,
    })
}

pub fn failure(tenant: &TenantId, fail: pb::FailJob) -> Result<Failure, ApiError> {
    let lease = validate::lease_ref("fail.lease", fail.lease.as_ref())?;
    let retry_after = fail
        .retry_after
        .as_ref()
        .map(|d| validate::duration("fail.retry_after", d))
        .transpose()?;
    let mut message = truncate(fail.message, MAX_FAILURE_MESSAGE);
    if message.is_empty() {
        message = "the handler failed without a message".to_owned();
    }
    validate::text("fail.message", &message, MAX_FAILURE_MESSAGE)?;
    let kind = truncate(fail.kind, MAX_FAILURE_KIND);
    validate::text("fail.kind", &kind, MAX_FAILURE_KIND)?;
    Ok(Failure {
        tenant: tenant.clone(),
        lease,
        message,
        kind,
        non_retryable: fail.non_retryable,
        retry_after,
        timed_out: fail.timed_out,
    })
}
