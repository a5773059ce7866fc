//! What a registered job type changes about a job: the payload may come as JSON or as an
//! example's slug, an `Any` payload is checked against the schema, unset fields take the type's
//! defaults, and reads show the payload and result as JSON.

use std::borrow::Cow;

use jobwire_proto::{limits::MAX_RENDERED_JSON_BYTES, v1 as pb};
use prost_reflect::DynamicMessage;

use super::{ApiError, convert, validate};
use crate::{
    domain::TenantId,
    registry::{Registry, Schema},
};

/// The spec with its payload resolved and the type's defaults applied, and the registered
/// version it was checked against (`None` when the type has no registered schema).
pub async fn prepare<'a>(
    registry: &Registry,
    tenant: &TenantId,
    spec: &'a pb::JobSpec,
) -> Result<(Cow<'a, pb::JobSpec>, Option<i32>), ApiError> {
    // Checked before the registry is asked about it.
    validate::job_type("job_type", &spec.job_type)?;
    let sources = usize::from(spec.payload.is_some())
        + usize::from(spec.payload_json.is_some())
        + usize::from(!spec.example.is_empty());
    if sources > 1 {
        return Err(ApiError::invalid(
            "payload",
            "give only one of payload, payload_json and example",
        ));
    }
    let version = match spec.job_type_version {
        0 => None,
        v if v > 0 => Some(v),
        v => {
            return Err(ApiError::invalid(
                "job_type_version",
                format!("must be positive, got {v}"),
            ));
        }
    };
    let schema = registry
        .schema(tenant, &spec.job_type, version)
        .await
        .map_err(ApiError::from)?;
    let Some(schema) = schema else {
        if let Some(v) = version {
            return Err(ApiError::invalid(
                "job_type_version",
                format!("version {v} of {:?} is not registered", spec.job_type),
            ));
        }
        if spec.payload_json.is_some() || !spec.example.is_empty() {
            let field = if spec.example.is_empty() {
                "payload_json"
            } else {
                "example"
            };
            return Err(ApiError::invalid(
                field,
                format!(
                    "job type {:?} has no registered schema; register it with JobTypeService \
                     or send the payload as Any",
                    spec.job_type
                ),
            ));
        }
        return Ok((Cow::Borrowed(spec), None));
    };

    let mut out = spec.clone();
    if let Some(json) = &spec.payload_json {
        let value = schema
            .payload_from_json(&convert::struct_to_json(json))
            .map_err(|e| field_error("payload_json", e))?;
        out.payload = Some(any(&schema, value));
        out.payload_json = None;
    } else if !spec.example.is_empty() {
        let example = schema
            .examples
            .iter()
            .find(|e| e.slug == spec.example)
            .ok_or_else(|| {
                let known: Vec<&str> = schema.examples.iter().map(|e| e.slug.as_str()).collect();
                ApiError::invalid(
                    "example",
                    format!(
                        "version {} of {:?} has no example {:?} (it has: {})",
                        schema.version,
                        schema.name,
                        spec.example,
                        known.join(", ")
                    ),
                )
            })?;
        let value = schema
            .payload_from_json(&example.payload)
            .map_err(|e| field_error("example", e))?;
        out.payload = Some(any(&schema, value));
        out.example.clear();
    } else if let Some(payload) = &spec.payload {
        check_any(&schema, payload)?;
    }
    apply_defaults(&schema, &mut out);
    if schema.defaults.idempotent_by_payload && out.idempotency_key.is_empty() {
        out.idempotency_key = payload_key(&out);
    }
    Ok((Cow::Owned(out), Some(schema.version)))
}

/// Checks a stored payload (a schedule's template) against its job type's latest registered
/// schema, when the type has one.
pub async fn check_registered(
    registry: &Registry,
    tenant: &TenantId,
    job_type: &str,
    payload: &prost_types::Any,
) -> Result<(), ApiError> {
    match registry
        .schema(tenant, job_type, None)
        .await
        .map_err(ApiError::from)?
    {
        Some(schema) => check_any(&schema, payload),
        None => Ok(()),
    }
}

fn field_error(root: &str, e: crate::registry::FieldError) -> ApiError {
    let field = if e.path.is_empty() {
        root.to_owned()
    } else {
        format!("{root}.{}", e.path)
    };
    ApiError::invalid(field, e.why)
}

fn any(schema: &Schema, value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: schema.payload_type_url(),
        value,
    }
}

/// An `Any` payload of a registered type must be that type's payload message, and decode.
fn check_any(schema: &Schema, payload: &prost_types::Any) -> Result<(), ApiError> {
    let named = payload.type_url.rsplit('/').next().unwrap_or_default();
    if named != schema.payload.full_name() {
        return Err(ApiError::invalid(
            "payload.type_url",
            format!(
                "version {} of {:?} takes {}, not {named}",
                schema.version,
                schema.name,
                schema.payload.full_name()
            ),
        ));
    }
    DynamicMessage::decode(schema.payload.clone(), payload.value.as_slice())
        .map(|_| ())
        .map_err(|e| ApiError::invalid("payload.value", format!("does not decode: {e}")))
}

/// The idempotency key of a payload: its type and a digest of its bytes, so the same payload
/// enqueued again names the same job.
fn payload_key(spec: &pb::JobSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(spec.job_type.as_bytes());
    digest.update([0]);
    if let Some(payload) = &spec.payload {
        digest.update(&payload.value);
    }
    format!("payload:{}", hex::encode(digest.finalize()))
}

/// Fills what the spec leaves unset from the type's defaults.
fn apply_defaults(schema: &Schema, spec: &mut pb::JobSpec) {
    let d = &schema.defaults;
    if spec.queue.is_empty()
        && let Some(queue) = &d.queue
    {
        spec.queue.clone_from(queue);
    }
    if spec.priority.is_none() {
        spec.priority = d.priority;
    }
    let policy = spec.retry_policy.get_or_insert_with(Default::default);
    if policy.max_attempts.is_none() {
        policy.max_attempts = d.max_attempts;
    }
    if policy.initial_backoff.is_none() {
        policy.initial_backoff = d.initial_backoff_ms.map(millis);
    }
    if policy.max_backoff.is_none() {
        policy.max_backoff = d.max_backoff_ms.map(millis);
    }
    if policy.backoff_multiplier.is_none() {
        policy.backoff_multiplier = d.backoff_multiplier;
    }
    if policy.jitter.is_none() {
        policy.jitter = d.jitter;
    }
    if spec.timeout.is_none() {
        spec.timeout = d.timeout_ms.map(millis);
    }
    if policy.by_kind.is_empty() {
        policy.by_kind = d.retry_rules.iter().map(convert::retry_rule).collect();
    }
    if spec.approval_timeout.is_none() {
        spec.approval_timeout = d.approval_timeout_ms.map(millis);
    }
    if spec.on_approval_timeout == pb::ApprovalTimeoutAction::Unspecified as i32
        && d.approval_timeout_fails
    {
        spec.on_approval_timeout = pb::ApprovalTimeoutAction::Fail.into();
    }
    spec.needs_approval |= d.needs_approval;
    if !spec.needs_approval && !d.approval_when.is_empty() {
        let payload = spec
            .payload
            .as_ref()
            .and_then(|p| schema.payload_to_json(&p.value));
        spec.needs_approval = payload.is_some_and(|p| d.approval_when.iter().any(|c| c.holds(&p)));
    }
}

fn millis(ms: i64) -> prost_types::Duration {
    convert::duration(std::time::Duration::from_millis(
        u64::try_from(ms).unwrap_or(0),
    ))
}

/// Adds the JSON form of the payload and result to a job whose type version is registered.
pub async fn render(registry: &Registry, tenant: &TenantId, job: &mut pb::Job) {
    if job.job_type_version == 0 {
        return;
    }
    let schema = match registry
        .schema(tenant, &job.job_type, Some(job.job_type_version))
        .await
    {
        Ok(Some(schema)) => schema,
        // The binary form is there either way; JSON is a courtesy.
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "could not read a job type's schema");
            return;
        }
    };
    job.payload_json = job
        .payload
        .as_ref()
        .and_then(|p| schema.payload_to_json(&p.value))
        .and_then(|v| within_budget(convert::json_to_struct(&v)));
    job.result_json = job
        .result
        .as_ref()
        .and_then(|r| schema.output_to_json(&r.value))
        .and_then(|v| within_budget(convert::json_to_struct(&v)));
}

/// A rendering is left out when it would take the job past its size budget: JSON can be many
/// times the size of the binary form it renders (a packed array of small numbers, for one).
fn within_budget(rendered: Option<prost_types::Struct>) -> Option<prost_types::Struct> {
    rendered.filter(|s| prost::Message::encoded_len(s) <= MAX_RENDERED_JSON_BYTES)
}
