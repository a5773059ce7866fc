//! Request validation: protobuf in, domain types out, or an error naming the field.
//!
//! Invariant 7: bad input never reaches the store. Field paths are relative to the message being
//! checked; callers prefix them ([`ApiError::within`]) for nested and repeated messages.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use jobwire_proto::v1 as pb;
use uuid::Uuid;

use super::ApiError;
use crate::{
    domain::{JobId, JobState, LeaseRef, QueueName, RetryPolicy, TenantId, ending::KindRule},
    store::NewJob,
};

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_PRIORITY: i32 = 50;
const MAX_NAME_LEN: usize = 128;
const MAX_TENANT_LEN: usize = 63;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY_LEN: usize = 63;
const MAX_LABEL_VALUE_LEN: usize = 256;
const MAX_REASON_LEN: usize = 1024;
/// Rules of a retry policy by failure kind.
const MAX_RETRY_RULES: usize = 32;
/// The shortest approval timeout.
const MIN_APPROVAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Dependencies of one job, by id and by batch index together.
pub const MAX_DEPENDENCIES: usize = 100;
/// ListJobs' error filters.
pub const MAX_ERROR_KIND_LEN: usize = 128;
pub const MAX_ERROR_TEXT_LEN: usize = 256;
const MAX_DELAY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const MAX_BATCH: usize = 5000;
/// The longest type URL of a payload or a result.
pub const MAX_TYPE_URL_LEN: usize = 1024;
/// How deep a `google.protobuf.Struct` may nest (a Struct in a Struct is one level deeper).
pub const MAX_STRUCT_DEPTH: usize = 32;
/// The earliest and latest time a Timestamp may name: protobuf's own range, 0001-01-01T00:00:00Z
/// to 9999-12-31T23:59:59.999999999Z, inside PostgreSQL's.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A string stored or searched in PostgreSQL: at most `max` bytes, and free of U+0000, which is
/// valid UTF-8 and valid protobuf but which neither `text` nor `jsonb` can hold.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid(
            field,
            "must not contain the NUL character (U+0000)",
        ));
    }
    Ok(())
}

/// The type URL of an `Any` payload or result: present, at most [`MAX_TYPE_URL_LEN`] bytes.
pub fn type_url(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    text(field, value, MAX_TYPE_URL_LEN)
}

/// A `google.protobuf.Struct` stored as `jsonb`: its keys and strings are [`text`] (of any
/// length; the message's size bounds them) and it nests at most [`MAX_STRUCT_DEPTH`] levels.
pub fn structure(field: &str, value: &prost_types::Struct) -> Result<(), ApiError> {
    fn check_struct(at: &str, s: &prost_types::Struct, depth: usize) -> Result<(), ApiError> {
        if depth > MAX_STRUCT_DEPTH {
            return Err(ApiError::invalid(
                at,
                format!("nests deeper than {MAX_STRUCT_DEPTH} levels"),
            ));
        }
        for (key, value) in &s.fields {
            let at = format!("{at}.{key}");
            text(&at, key, usize::MAX)?;
            check_value(&at, value, depth)?;
        }
        Ok(())
    }
    fn check_value(at: &str, v: &prost_types::Value, depth: usize) -> Result<(), ApiError> {
        use prost_types::value::Kind;
        match &v.kind {
            Some(Kind::StringValue(s)) => text(at, s, usize::MAX),
            Some(Kind::StructValue(s)) => check_struct(at, s, depth + 1),
            Some(Kind::ListValue(list)) => list
                .values
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| check_value(&format!("{at}[{i}]"), v, depth + 1)),
            _ => Ok(()),
        }
    }
    check_struct(field, value, 1)
}

/// Names of job types and queues: readable in logs and URLs, free of the separators used in
/// notification payloads.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(ApiError::invalid(
            field,
            "may contain only letters, digits, '.', '_', '-' and ':'",
        ));
    }
    Ok(())
}

pub fn tenant(value: &str) -> Result<TenantId, ApiError> {
    check_name(super::TENANT_HEADER, value, MAX_TENANT_LEN)?;
    Ok(TenantId::new_unchecked(value))
}

pub fn job_type(field: &str, value: &str) -> Result<String, ApiError> {
    check_name(field, value, MAX_NAME_LEN)?;
    Ok(value.to_owned())
}

/// A signal's name: the characters and length of a job type's.
pub fn signal_name(field: &str, value: &str) -> Result<String, ApiError> {
    job_type(field, value)
}

/// An empty queue name means the default queue.
pub fn queue(field: &str, value: &str) -> Result<QueueName, ApiError> {
    if value.is_empty() {
        return Ok(QueueName::new_unchecked(DEFAULT_QUEUE));
    }
    check_name(field, value, MAX_NAME_LEN)?;
    Ok(QueueName::new_unchecked(value))
}

pub fn job_id(field: &str, value: &str) -> Result<JobId, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    Uuid::parse_str(value)
        .map(JobId)
        .map_err(|_| ApiError::invalid(field, format!("{value:?} is not a UUID")))
}

pub fn lease_ref(field: &str, lease: Option<&pb::LeaseRef>) -> Result<LeaseRef, ApiError> {
    let lease = lease.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    let job_id = job_id(&format!("{field}.job_id"), &lease.job_id)?;
    if lease.attempt < 1 {
        return Err(ApiError::invalid(
            format!("{field}.attempt"),
            "must be at least 1",
        ));
    }
    Ok(LeaseRef {
        job_id,
        attempt: lease.attempt,
    })
}

pub fn duration(field: &str, value: &prost_types::Duration) -> Result<Duration, ApiError> {
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(ApiError::invalid(
            field,
            "must be a non-negative, normalized duration",
        ));
    }
    let d = Duration::new(value.seconds.unsigned_abs(), value.nanos.unsigned_abs());
    if d > MAX_DELAY {
        return Err(ApiError::invalid(field, "must be at most 10 years"));
    }
    Ok(d)
}

/// A point in time within protobuf's own range (years 1 to 9999), normalized.
pub fn timestamp(field: &str, value: &prost_types::Timestamp) -> Result<DateTime<Utc>, ApiError> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&value.seconds) {
        return Err(ApiError::invalid(
            field,
            "must lie between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ));
    }
    u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(value.seconds, nanos))
        .ok_or_else(|| ApiError::invalid(field, "nanos must be between 0 and 999,999,999"))
}

pub fn priority(value: Option<i32>) -> Result<i16, ApiError> {
    let p = value.unwrap_or(DEFAULT_PRIORITY);
    if !(0..=100).contains(&p) {
        return Err(ApiError::invalid(
            "priority",
            format!("must be between 0 and 100, got {p}"),
        ));
    }
    i16::try_from(p).map_err(|_| ApiError::invalid("priority", "out of range"))
}

/// An `Any`: its type URL, and its bytes bounded by the configured limit.
pub fn any_size(field: &str, any: &prost_types::Any, max: usize) -> Result<(), ApiError> {
    type_url(&format!("{field}.type_url"), &any.type_url)?;
    if any.value.len() > max {
        return Err(ApiError::invalid(
            field,
            format!(
                "is {} bytes, over the limit of {max} bytes",
                any.value.len()
            ),
        ));
    }
    Ok(())
}

pub fn retry_policy(policy: Option<&pb::RetryPolicy>) -> Result<RetryPolicy, ApiError> {
    let mut out = RetryPolicy::default();
    let Some(p) = policy else { return Ok(out) };
    if let Some(n) = p.max_attempts {
        if !(1..=1000).contains(&n) {
            return Err(ApiError::invalid(
                "retry_policy.max_attempts",
                format!("must be between 1 and 1000, got {n}"),
            ));
        }
        out.max_attempts = n;
    }
    if let Some(d) = &p.initial_backoff {
        out.initial_backoff = duration("retry_policy.initial_backoff", d)?;
    }
    if let Some(d) = &p.max_backoff {
        out.max_backoff = duration("retry_policy.max_backoff", d)?;
    }
    if out.max_backoff < out.initial_backoff {
        return Err(ApiError::invalid(
            "retry_policy.max_backoff",
            "must not be shorter than initial_backoff",
        ));
    }
    if let Some(m) = p.backoff_multiplier {
        if !(1.0..=10.0).contains(&m) {
            return Err(ApiError::invalid(
                "retry_policy.backoff_multiplier",
                format!("must be between 1.0 and 10.0, got {m}"),
            ));
        }
        out.multiplier = m;
    }
    if p.by_kind.len() > MAX_RETRY_RULES {
        return Err(ApiError::invalid(
            "retry_policy.by_kind",
            format!("at most {MAX_RETRY_RULES} rules"),
        ));
    }
    for (i, rule) in p.by_kind.iter().enumerate() {
        let field = format!("retry_policy.by_kind[{i}]");
        if rule.kind.is_empty() {
            return Err(ApiError::invalid(format!("{field}.kind"), "is required"));
        }
        text(&format!("{field}.kind"), &rule.kind, MAX_ERROR_KIND_LEN)?;
        if out.rules.iter().any(|r| r.kind == rule.kind) {
            return Err(ApiError::invalid(
                format!("{field}.kind"),
                format!("repeats the kind {:?}", rule.kind),
            ));
        }
        let backoff_ms = rule
            .backoff
            .as_ref()
            .map(|d| duration(&format!("{field}.backoff"), d).map(millis))
            .transpose()?;
        out.rules.push(KindRule {
            kind: rule.kind.clone(),
            never: rule.never,
            backoff_ms,
        });
    }
    if let Some(j) = p.jitter {
        if !(0.0..=1.0).contains(&j) {
            return Err(ApiError::invalid(
                "retry_policy.jitter",
                format!("must be between 0.0 and 1.0, got {j}"),
            ));
        }
        out.jitter = j;
    }
    Ok(out)
}

/// Labels of a job, or a filter on them.
pub fn labels(labels: &HashMap<String, String>) -> Result<HashMap<String, String>, ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in labels {
        let field = format!("labels[{k:?}]");
        if k.is_empty() {
            return Err(ApiError::invalid(field, "keys must not be empty"));
        }
        text(&field, k, MAX_LABEL_KEY_LEN)?;
        text(&field, v, MAX_LABEL_VALUE_LEN)?;
    }
    Ok(labels.clone())
}

/// A job to enqueue, with every default applied.
pub fn job_spec(spec: &pb::JobSpec, max_payload: usize) -> Result<NewJob, ApiError> {
    let job_type = job_type("job_type", &spec.job_type)?;
    let payload = spec
        .payload
        .as_ref()
        .ok_or_else(|| ApiError::invalid("payload", "is required"))?;
    any_size("payload", payload, max_payload)?;
    let queue = queue("queue", &spec.queue)?;
    let priority = priority(spec.priority)?;
    let run_at = match &spec.schedule {
        None => None,
        Some(pb::job_spec::Schedule::RunAt(ts)) => Some(timestamp("run_at", ts)?),
        Some(pb::job_spec::Schedule::Delay(d)) => {
            let d = duration("delay", d)?;
            let delta =
                TimeDelta::from_std(d).map_err(|_| ApiError::invalid("delay", "is too long"))?;
            Some(Utc::now() + delta)
        }
    };
    let policy = retry_policy(spec.retry_policy.as_ref())?;
    let idempotency_key = match spec.idempotency_key.as_str() {
        "" => None,
        key => {
            text("idempotency_key", key, MAX_IDEMPOTENCY_KEY_LEN)?;
            Some(key.to_owned())
        }
    };
    let timeout_ms = match &spec.timeout {
        None => None,
        Some(d) => {
            let d = duration("timeout", d)?;
            if d < Duration::from_millis(1) {
                return Err(ApiError::invalid("timeout", "must be at least 1ms"));
            }
            Some(millis(d))
        }
    };
    if spec.depends_on.len() + spec.depends_on_index.len() > MAX_DEPENDENCIES {
        return Err(ApiError::invalid(
            "depends_on",
            format!("at most {MAX_DEPENDENCIES} dependencies (with depends_on_index)"),
        ));
    }
    let mut depends_on = Vec::with_capacity(spec.depends_on.len());
    for (i, id) in spec.depends_on.iter().enumerate() {
        let field = format!("depends_on[{i}]");
        let id = job_id(&field, id)?;
        if depends_on.contains(&id) {
            return Err(ApiError::invalid(field, format!("repeats {id}")));
        }
        depends_on.push(id);
    }
    let run_regardless = match pb::DependencyFailure::try_from(spec.on_dependency_failure) {
        Ok(pb::DependencyFailure::Unspecified | pb::DependencyFailure::Cancel) => false,
        Ok(pb::DependencyFailure::Run) => true,
        Err(_) => {
            return Err(ApiError::invalid(
                "on_dependency_failure",
                format!("{} is not a DependencyFailure", spec.on_dependency_failure),
            ));
        }
    };
    let approval_timeout_ms = approval_timeout(spec.approval_timeout.as_ref())?;
    let approval_timeout_fails = approval_timeout_fails(spec.on_approval_timeout)?;
    Ok(NewJob {
        id: JobId::new(),
        approval_timeout_ms,
        approval_timeout_fails,
        retry_rules: policy.rules.clone(),
        depends_on,
        run_regardless,
        timeout_ms,
        queue,
        job_type,
        payload_type: payload.type_url.clone(),
        payload: payload.value.clone(),
        priority,
        max_attempts: policy.max_attempts,
        retry_initial_ms: millis(policy.initial_backoff),
        retry_max_ms: millis(policy.max_backoff),
        retry_multiplier: policy.multiplier,
        retry_jitter: policy.jitter,
        run_at,
        idempotency_key,
        labels: labels(&spec.labels)?,
        schedule: None,
        job_type_version: None,
        needs_approval: spec.needs_approval,
        accept_existing: spec.accept_existing,
        handoff: None,
        trace: None,
    })
}

/// The size of an EnqueueJobs batch.
pub fn batch_len(len: usize) -> Result<(), ApiError> {
    if len == 0 || len > MAX_BATCH {
        return Err(ApiError::invalid(
            "jobs",
            format!("must hold 1 to {MAX_BATCH} jobs, got {len}"),
        ));
    }
    Ok(())
}

/// An approval timeout, in milliseconds (1 s to 10 years), for a job or a job type.
pub fn approval_timeout(value: Option<&prost_types::Duration>) -> Result<Option<i64>, ApiError> {
    let Some(d) = value else { return Ok(None) };
    let d = duration("approval_timeout", d)?;
    if d < MIN_APPROVAL_TIMEOUT {
        return Err(ApiError::invalid("approval_timeout", "must be at least 1s"));
    }
    Ok(Some(millis(d)))
}

/// Whether an approval timeout fails the job (FAIL) rather than reject it (REJECT, the
/// default).
pub fn approval_timeout_fails(value: i32) -> Result<bool, ApiError> {
    match pb::ApprovalTimeoutAction::try_from(value) {
        Ok(pb::ApprovalTimeoutAction::Unspecified | pb::ApprovalTimeoutAction::Reject) => Ok(false),
        Ok(pb::ApprovalTimeoutAction::Fail) => Ok(true),
        Err(_) => Err(ApiError::invalid(
            "on_approval_timeout",
            format!("{value} is not an ApprovalTimeoutAction"),
        )),
    }
}

/// A single job: [`job_spec`], refusing what only a batch can hold.
pub fn single_job_spec(spec: &pb::JobSpec, max_payload: usize) -> Result<NewJob, ApiError> {
    if !spec.depends_on_index.is_empty() {
        return Err(ApiError::invalid(
            "depends_on_index",
            "names jobs of the same EnqueueJobs request; use depends_on with job ids here",
        ));
    }
    job_spec(spec, max_payload)
}

/// A batch: each job valid, no idempotency key used twice, not too many, and its dependencies
/// on jobs of the batch resolved to their ids, without a cycle.
pub fn job_specs<S: std::borrow::Borrow<pb::JobSpec>>(
    specs: &[S],
    max_payload: usize,
) -> Result<Vec<NewJob>, ApiError> {
    batch_len(specs.len())?;
    let mut seen = HashMap::new();
    let mut jobs = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let job = job_spec(spec.borrow(), max_payload)
                .map_err(|e| e.within(&format!("jobs[{i}]")))?;
            if let Some(first) = job
                .idempotency_key
                .as_ref()
                .and_then(|key| seen.insert(key.clone(), i))
            {
                return Err(ApiError::invalid(
                    format!("jobs[{i}].idempotency_key"),
                    format!("repeats the key of jobs[{first}]"),
                ));
            }
            Ok(job)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut edges = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let mut to = Vec::new();
        for (k, &index) in spec.borrow().depends_on_index.iter().enumerate() {
            let field = format!("jobs[{i}].depends_on_index[{k}]");
            let target = usize::try_from(index)
                .ok()
                .filter(|&t| t < specs.len())
                .ok_or_else(|| {
                    ApiError::invalid(
                        &field,
                        format!(
                            "{index} is not an index of this request's {} jobs",
                            specs.len()
                        ),
                    )
                })?;
            if target == i {
                return Err(ApiError::invalid(field, "a job cannot depend on itself"));
            }
            if to.contains(&target) {
                return Err(ApiError::invalid(field, format!("repeats {target}")));
            }
            to.push(target);
        }
        edges.push(to);
    }
    if let Some(i) = crate::domain::waits::cycle(&edges) {
        return Err(ApiError::invalid(
            format!("jobs[{i}].depends_on_index"),
            "forms a cycle: the jobs would wait for each other forever",
        ));
    }
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    for (job, to) in jobs.iter_mut().zip(edges) {
        job.depends_on.extend(to.into_iter().map(|t| ids[t]));
    }
    Ok(jobs)
}

pub fn states(values: &[i32]) -> Result<Vec<JobState>, ApiError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            pb::JobState::try_from(*v)
                .ok()
                .and_then(JobState::from_proto)
                .ok_or_else(|| {
                    ApiError::invalid(format!("states[{i}]"), format!("{v} is not a job state"))
                })
        })
        .collect()
}

pub fn sequence(field: &str, value: i64) -> Result<i64, ApiError> {
    if value < 0 {
        return Err(ApiError::invalid(field, "must not be negative"));
    }
    Ok(value)
}

pub fn reason(value: &str) -> Result<String, ApiError> {
    text("reason", value, MAX_REASON_LEN)?;
    Ok(value.to_owned())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A read's view; UNSPECIFIED means `default`.
pub fn view(value: i32, default: pb::JobView) -> Result<pb::JobView, ApiError> {
    match pb::JobView::try_from(value) {
        Ok(pb::JobView::Unspecified) => Ok(default),
        Ok(view) => Ok(view),
        Err(_) => Err(ApiError::invalid(
            "view",
            format!("{value} is not a view; JOB_VIEW_BASIC (1) or JOB_VIEW_FULL (2)"),
        )),
    }
}

/// A GetJobType view: unspecified means BASIC.
pub fn job_type_view(value: i32) -> Result<pb::JobTypeView, ApiError> {
    match pb::JobTypeView::try_from(value) {
        Ok(pb::JobTypeView::Unspecified) => Ok(pb::JobTypeView::Basic),
        Ok(view) => Ok(view),
        Err(_) => Err(ApiError::invalid(
            "view",
            format!("{value} is not a view; JOB_TYPE_VIEW_BASIC (1) or JOB_TYPE_VIEW_FULL (2)"),
        )),
    }
}

/// A name such as a schedule's: the characters of queue and job type names.
pub fn name(field: &str, value: &str) -> Result<String, ApiError> {
    check_name(field, value, MAX_NAME_LEN)?;
    Ok(value.to_owned())
}

/// The paths of an AIP-134 update mask, each one of `allowed`; `*` stands for all of them.
pub fn update_mask<'a>(
    mask: Option<&prost_types::FieldMask>,
    allowed: &[&'a str],
) -> Result<Vec<&'a str>, ApiError> {
    let mask = mask.ok_or_else(|| ApiError::invalid("update_mask", "is required"))?;
    if mask.paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            "must name at least one field",
        ));
    }
    let mut out = Vec::new();
    for (i, path) in mask.paths.iter().enumerate() {
        if path == "*" {
            return Ok(allowed.to_vec());
        }
        let known = allowed.iter().find(|a| **a == path).ok_or_else(|| {
            ApiError::invalid(
                format!("update_mask.paths[{i}]"),
                format!("{path:?} cannot be updated; one of {}", allowed.join(", ")),
            )
        })?;
        out.push(*known);
    }
    Ok(out)
}
