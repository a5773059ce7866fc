//! Conversions from stored rows to protobuf messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jobwire_proto::v1 as pb;

use crate::{
    domain::{Actor, EventKind, JobState, health::QueueHealth},
    engine::fanout::FanoutEvent,
    store::{
        AttemptRow, CatchUpPolicy, ErrorRecord, EventRow, JobRow, LeasedRow, OverlapPolicy,
        QueueView, ScheduleRow, WorkerView,
    },
};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn millis(ms: i64) -> prost_types::Duration {
    duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

pub fn error(e: &ErrorRecord) -> pb::JobError {
    pb::JobError {
        message: e.message.clone(),
        kind: e.kind.clone(),
        retryable: e.retryable,
        attempt: e.attempt,
        occurred_at: Some(timestamp(e.occurred_at)),
    }
}

pub fn attempt(a: &AttemptRow) -> pb::JobAttempt {
    pb::JobAttempt {
        attempt: a.attempt,
        worker_id: a.worker_id.clone(),
        started_at: Some(timestamp(a.started_at)),
        finished_at: a.finished_at.map(timestamp),
        outcome: a.outcome.to_proto().into(),
        error: a.error.as_ref().map(|e| error(&e.0)),
    }
}

/// A job as the API shows it; `attempts` is filled only for the FULL view.
pub fn job(row: JobRow, attempts: &[AttemptRow]) -> pb::Job {
    let mut job = pb::Job {
        id: row.id.to_string(),
        tenant: row.tenant_id,
        queue: row.queue,
        job_type: row.job_type,
        payload: Some(prost_types::Any {
            type_url: row.payload_type,
            value: row.payload,
        }),
        priority: i32::from(row.priority),
        state: row.state.to_proto().into(),
        attempt: row.attempt,
        retry_policy: Some(pb::RetryPolicy {
            max_attempts: Some(row.max_attempts),
            initial_backoff: Some(millis(row.retry_initial_ms)),
            max_backoff: Some(millis(row.retry_max_ms)),
            backoff_multiplier: Some(row.retry_multiplier),
            jitter: Some(row.retry_jitter),
            by_kind: row
                .retry_rules
                .as_ref()
                .map(|r| r.0.iter().map(retry_rule).collect())
                .unwrap_or_default(),
        }),
        run_at: Some(timestamp(row.run_at)),
        result: row.result.map(|value| prost_types::Any {
            type_url: row.result_type.unwrap_or_default(),
            value,
        }),
        last_error: row.last_error.as_ref().map(|e| error(&e.0)),
        idempotency_key: row.idempotency_key.unwrap_or_default(),
        labels: row.labels.0,
        lease_owner: row
            .lease_owner
            .filter(|_| row.state == crate::domain::JobState::Running)
            .unwrap_or_default(),
        lease_expires_at: row.lease_expires_at.map(timestamp),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        started_at: row.started_at.map(timestamp),
        finished_at: row.finished_at.map(timestamp),
        attempts: attempts.iter().map(attempt).collect(),
        cancel_reason: row.cancel_reason.unwrap_or_default(),
        progress: row.progress.as_ref().map(|p| progress_from_json(&p.0)),
        timeout: row
            .timeout_ms
            .map(|ms| duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))),
        cancel_requested_at: row
            .cancel_requested_at
            .filter(|_| row.state == crate::domain::JobState::Running)
            .map(timestamp),
        pause_requested_at: row.pause_requested_at.map(timestamp),
        attempts_counted: row.attempt - row.attempt_base,
        has_checkpoint: row.has_checkpoint,
        schedule_id: row.schedule_id.map(|id| id.to_string()).unwrap_or_default(),
        schedule_tick: row.schedule_tick.map(timestamp),
        job_type_version: row.job_type_version.unwrap_or(0),
        // Filled in by the caller when the job type's schema is registered.
        payload_json: None,
        result_json: None,
        attempts_omitted: 0,
        depends_on: ids(row.depends_on.as_deref()),
        on_dependency_failure: if row.run_regardless {
            pb::DependencyFailure::Run
        } else {
            pb::DependencyFailure::Cancel
        }
        .into(),
        approval_deadline: row
            .approval_deadline
            .filter(|_| row.state == crate::domain::JobState::AwaitingApproval)
            .map(timestamp),
        on_approval_timeout: match (row.approval_deadline, row.approval_timeout_fails) {
            (None, _) => pb::ApprovalTimeoutAction::Unspecified,
            (Some(_), false) => pb::ApprovalTimeoutAction::Reject,
            (Some(_), true) => pb::ApprovalTimeoutAction::Fail,
        }
        .into(),
        parent_id: row.parent_id.map(|id| id.to_string()).unwrap_or_default(),
        // Filled in by GetJob.
        children: None,
        awaiting_children: row.awaiting_children && row.state == crate::domain::JobState::Pending,
        awaiting_signal: row
            .awaiting_signal
            .clone()
            .filter(|_| row.state == crate::domain::JobState::Pending)
            .unwrap_or_default(),
        signal_deadline: row
            .signal_deadline
            .filter(|_| row.state == crate::domain::JobState::Pending)
            .map(timestamp),
    };
    super::budget::trim_attempts(&mut job);
    job
}

/// A job's children by state, as GetJob shows them (`None` for a job without children).
pub fn child_counts(counts: &[(crate::domain::JobState, i64)]) -> Option<pb::ChildCounts> {
    use crate::domain::JobState;
    let count = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
    let mut children = pb::ChildCounts::default();
    for &(state, n) in counts {
        let n = count(n);
        children.total = children.total.saturating_add(n);
        match state {
            JobState::Succeeded => children.succeeded = n,
            JobState::Failed => children.failed = n,
            JobState::Cancelled => children.cancelled = n,
            _ => children.unfinished = children.unfinished.saturating_add(n),
        }
    }
    (children.total > 0).then_some(children)
}

/// A retry rule by failure kind as the API shows it.
pub fn retry_rule(rule: &crate::domain::ending::KindRule) -> pb::RetryRule {
    pb::RetryRule {
        kind: rule.kind.clone(),
        never: rule.never,
        backoff: rule
            .backoff_ms
            .map(|ms| duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))),
    }
}

/// Job ids as the API spells them.
fn ids(ids: Option<&[uuid::Uuid]>) -> Vec<String> {
    ids.unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The lease message pushed to a worker for a freshly claimed job, `held` after its claim.
pub fn lease(leased: LeasedRow, held: std::time::Duration) -> pb::Lease {
    let row = leased.job;
    let (traceparent, tracestate) = (
        row.traceparent.clone().unwrap_or_default(),
        row.tracestate.clone().unwrap_or_default(),
    );
    let deadline = row
        .timeout_ms
        .zip(row.attempt_started_at)
        .map(|(ms, at)| timestamp(at + chrono::TimeDelta::milliseconds(ms)));
    pb::Lease {
        checkpoint: leased.checkpoint.unwrap_or_default(),
        deadline,
        job_id: row.id.to_string(),
        attempt: row.attempt,
        job_type: row.job_type,
        queue: row.queue,
        payload: Some(prost_types::Any {
            type_url: row.payload_type,
            value: row.payload,
        }),
        priority: i32::from(row.priority),
        max_attempts: row.max_attempts,
        expires_at: row.lease_expires_at.map(timestamp),
        labels: row.labels.0,
        created_at: Some(timestamp(row.created_at)),
        held: prost_types::Duration::try_from(held).ok(),
        depends_on: ids(row.depends_on.as_deref()),
        traceparent,
        tracestate,
        children_ended: row.children_ended,
        signals: lease_signals(leased.signals),
        signal_timed_out: row.signal_timed_out.map(|t| pb::WaitSignal {
            name: t.0.name,
            count: t.0.count,
            timeout: None,
        }),
    }
}

/// A job's signals as a lease carries them.
fn lease_signals(signals: crate::store::LeaseSignals) -> Vec<pb::JobSignal> {
    let names = signals.signal_names.unwrap_or_default();
    let types = signals.signal_types.unwrap_or_default();
    let payloads = signals.signal_payloads.unwrap_or_default();
    let times = signals.signal_times.unwrap_or_default();
    names
        .into_iter()
        .zip(types)
        .zip(payloads)
        .zip(times)
        .map(|(((name, type_url), value), at)| pb::JobSignal {
            name,
            payload: (!type_url.is_empty()).then_some(prost_types::Any { type_url, value }),
            received_at: Some(timestamp(at)),
        })
        .collect()
}

/// The completed fraction a progress report implies: its fraction, or items done of total.
pub fn progress_fraction(p: &pb::Progress) -> Option<f64> {
    p.fraction
        .or_else(|| (p.items_total > 0).then(|| p.items_done as f64 / p.items_total as f64))
}

/// Progress as stored: the API message in JSON (the server adds `eta` when it knows one).
pub fn progress_to_json(p: &pb::Progress, at: DateTime<Utc>) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    if let Some(fraction) = p.fraction {
        object.insert("fraction".into(), fraction.into());
    }
    object.insert("message".into(), p.message.clone().into());
    object.insert("stage".into(), p.stage.clone().into());
    object.insert("items_done".into(), p.items_done.into());
    object.insert("items_total".into(), p.items_total.into());
    if let Some(data) = &p.data {
        object.insert("data".into(), struct_to_json(data));
    }
    object.insert("updated_at".into(), at.to_rfc3339().into());
    serde_json::Value::Object(object)
}

fn parse_time(value: &serde_json::Value) -> Option<prost_types::Timestamp> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| timestamp(t.with_timezone(&Utc)))
}

pub fn progress_from_json(value: &serde_json::Value) -> pb::Progress {
    let text = |key: &str| {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let int = |key: &str| value.get(key).and_then(|v| v.as_i64()).unwrap_or_default();
    pb::Progress {
        fraction: value.get("fraction").and_then(|v| v.as_f64()),
        message: text("message"),
        stage: text("stage"),
        items_done: int("items_done"),
        items_total: int("items_total"),
        data: value.get("data").and_then(json_to_struct),
        updated_at: value.get("updated_at").and_then(parse_time),
        eta: value.get("eta").and_then(parse_time),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_to_json).collect(),
    }
}

pub fn json_to_struct(v: &serde_json::Value) -> Option<prost_types::Struct> {
    match v {
        serde_json::Value::Object(map) => Some(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
        _ => None,
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => match json_to_struct(v) {
            Some(s) => Kind::StructValue(s),
            None => Kind::NullValue(0),
        },
    };
    prost_types::Value { kind: Some(kind) }
}

fn log_level(name: &str) -> pb::LogLevel {
    pb::LogLevel::from_str_name(name).unwrap_or(pb::LogLevel::Unspecified)
}

/// The caller an event's data names, for changes made through the API.
fn actor(data: &serde_json::Value) -> Option<pb::Actor> {
    let actor: Actor = serde_json::from_value(data.get("actor")?.clone()).ok()?;
    Some(pb::Actor {
        key_id: actor.key_id.map(|id| id.to_string()).unwrap_or_default(),
        key_name: actor.key_name,
    })
}

/// An event as watchers see it. State changes carry `job`, the job as it is now.
pub fn event(row: &EventRow, job: Option<&JobRow>) -> pb::JobEvent {
    use pb::job_event::Event;
    let data = &row.data.0;
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let event = match row.kind {
        EventKind::Progress => Some(Event::Progress(progress_from_json(data))),
        EventKind::Log => Some(Event::Log(pb::LogLine {
            level: log_level(&text("level")).into(),
            message: text("message"),
            time: data.get("time").and_then(parse_time),
        })),
        EventKind::Signal => Some(Event::SignalReceived(pb::SignalReceived {
            name: text("name"),
            actor: actor(data),
        })),
        EventKind::StopRequested => Some(Event::StopRequested(pb::StopRequested {
            target_state: match text("target").as_str() {
                "paused" => pb::JobState::Paused,
                _ => pb::JobState::Cancelled,
            }
            .into(),
            reason: text("reason"),
            actor: actor(data),
        })),
        EventKind::State => Some(Event::StateChanged(pb::StateChanged {
            state: row
                .state
                .map(|s| s.to_proto())
                .unwrap_or(pb::JobState::Unspecified)
                .into(),
            reason: text("reason"),
            worker_id: text("worker"),
            error: data
                .get("error")
                .and_then(|e| serde_json::from_value::<ErrorRecord>(e.clone()).ok())
                .map(|e| error(&e)),
            job: job.map(|j| self::job(j.clone(), &[])),
            actor: actor(data),
        })),
    };
    pb::JobEvent {
        sequence: row.seq,
        job_id: row.job_id.to_string(),
        time: Some(timestamp(row.created_at)),
        attempt: row.attempt,
        event,
    }
}

pub fn fanout_event(e: &FanoutEvent) -> pb::JobEvent {
    event(&e.row, e.job.as_ref())
}

/// A queue with its figures.
pub fn queue(view: QueueView) -> pb::Queue {
    let q = view.queue;
    let thresholds = q.thresholds();
    let states = view.states.unwrap_or_default();
    let backlog = states
        .iter()
        .zip(view.counts.iter().flatten())
        .find(|(state, _)| **state == JobState::Available)
        .map_or(0, |(_, count)| *count);
    let counts = states
        .into_iter()
        .zip(view.counts.unwrap_or_default())
        .map(|(state, count)| pb::StateCount {
            state: state.to_proto().into(),
            count,
        })
        .collect();
    let oldest_available_age = view
        .oldest_available
        .map(|at| (view.read_at - at).to_std().unwrap_or_default());
    pb::Queue {
        name: q.name,
        paused: q.paused_at.is_some(),
        paused_at: q.paused_at.map(timestamp),
        pause_reason: q.pause_reason.unwrap_or_default(),
        concurrency_limit: q.concurrency_limit,
        rate_limit: q
            .rate_per_second
            .zip(q.rate_burst)
            .map(|(per_second, burst)| pb::RateLimit { per_second, burst }),
        created_at: Some(timestamp(q.created_at)),
        updated_at: Some(timestamp(q.updated_at)),
        stats: Some(pb::QueueStats {
            counts,
            oldest_available_age: oldest_available_age.map(duration),
            finished_last_minute: view.finished_last_minute,
            throughput_per_second: view.finished_last_minute as f64 / 60.0,
            backlog,
            health: queue_health(thresholds.judge(oldest_available_age)).into(),
        }),
        warn_after: thresholds.warn_after.map(duration),
        critical_after: thresholds.critical_after.map(duration),
        retention: q.retention_ms.map(millis),
    }
}

/// A worker's stream as ListWorkers shows it.
pub fn worker(view: WorkerView) -> pb::Worker {
    let slots = view.slots;
    let held = i32::try_from(view.leases_held).unwrap_or(i32::MAX);
    pb::Worker {
        stream_id: view.id.to_string(),
        worker_id: view.worker_id,
        version: view.version,
        host: view.host,
        queues: view.queues,
        job_types: view.job_types,
        slots,
        prefetch: view.prefetch,
        free_slots: slots.saturating_sub(held).max(0),
        leases_held: held,
        connected_at: Some(timestamp(view.connected_at)),
        last_heartbeat_at: Some(timestamp(view.heartbeat_at)),
        replica: view.replica,
        draining: view.draining,
    }
}

/// A queue's health as the API names it.
pub fn queue_health(health: QueueHealth) -> pb::QueueHealth {
    match health {
        QueueHealth::Ok => pb::QueueHealth::Ok,
        QueueHealth::Warning => pb::QueueHealth::Warning,
        QueueHealth::Critical => pb::QueueHealth::Critical,
    }
}

/// A schedule as the API shows it.
pub fn schedule(row: ScheduleRow) -> pb::Schedule {
    let job = row.job;
    pb::Schedule {
        id: row.id.to_string(),
        name: row.name,
        description: row.description,
        cron: row.cron,
        time_zone: row.time_zone,
        job: Some(pb::JobTemplate {
            job_type: job.job_type,
            payload: Some(prost_types::Any {
                type_url: job.payload_type,
                value: job.payload,
            }),
            queue: job.queue,
            priority: Some(i32::from(job.priority)),
            retry_policy: Some(pb::RetryPolicy {
                max_attempts: Some(job.max_attempts),
                initial_backoff: Some(millis(job.retry_initial_ms)),
                max_backoff: Some(millis(job.retry_max_ms)),
                backoff_multiplier: Some(job.retry_multiplier),
                jitter: Some(job.retry_jitter),
                by_kind: Vec::new(),
            }),
            labels: job.labels.0,
            timeout: job.timeout_ms.map(millis),
            payload_json: None,
        }),
        overlap_policy: match row.overlap_policy {
            OverlapPolicy::Allow => pb::OverlapPolicy::Allow,
            OverlapPolicy::Skip => pb::OverlapPolicy::Skip,
            OverlapPolicy::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
        }
        .into(),
        catch_up_policy: match row.catch_up_policy {
            CatchUpPolicy::Once => pb::CatchUpPolicy::Once,
            CatchUpPolicy::Skip => pb::CatchUpPolicy::Skip,
            CatchUpPolicy::All => pb::CatchUpPolicy::All,
        }
        .into(),
        max_catch_up: row.max_catch_up,
        misfire_grace: Some(millis(row.misfire_grace_ms)),
        paused: row.paused,
        next_run_at: row.next_run_at.map(timestamp),
        last_run_at: row.last_run_at.map(timestamp),
        last_job_id: row.last_job_id.map(|id| id.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}
