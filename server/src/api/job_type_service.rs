//! `jobwire.v1.JobTypeService`: the registry of job types, their schemas, defaults and examples.

use jobwire_proto::v1::{self as pb, job_type_service_server::JobTypeService};
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use tonic::{Request, Response, Status};

use jobwire_proto::limits::MAX_PAGE_BYTES;

use super::{ApiError, convert, paging::PageRequest, tenant_of, validate};
use crate::{
    domain::{TenantId, approval::Condition},
    registry::{Registry, Schema, SchemaError},
    store::{Example, JobTypeRow, NewJobType, Store, TypeDefaults},
};

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;
const MAX_EXAMPLES: usize = 100;
const MAX_EXAMPLE_NAME: usize = 256;
/// A job type read back carries its descriptor set, the schema rendered from it and its
/// examples: with these two limits it fits a message (`jobwire_proto::limits`).
const MAX_DESCRIPTOR_BYTES: usize = 1024 * 1024;
const MAX_EXAMPLES_BYTES: usize = 512 * 1024;
const EMPTY: &str = "google.protobuf.Empty";
const MAX_CONDITIONS: usize = 16;
const MAX_CONDITION_VALUES: usize = 64;
const MAX_CONDITION_TEXT: usize = 256;

pub struct JobTypeApi {
    store: Store,
    registry: Registry,
}

impl JobTypeApi {
    pub fn new(store: Store, registry: Registry) -> Self {
        Self { store, registry }
    }
}

/// The explicit defaults of a registration, validated; unset fields stay unset.
fn defaults(
    d: Option<&pb::JobTypeDefaults>,
    at: &str,
    payload: &MessageDescriptor,
) -> Result<TypeDefaults, ApiError> {
    let Some(d) = d else {
        return Ok(TypeDefaults::default());
    };
    let at = format!("{at}.defaults");
    let within = |e: ApiError| e.within(&at);
    let queue = (!d.queue.is_empty())
        .then(|| validate::queue("queue", &d.queue))
        .transpose()
        .map_err(within)?;
    if d.priority.is_some() {
        validate::priority(d.priority).map_err(within)?;
    }
    // Checked whole (so a bad multiplier is refused now), kept field by field.
    let rules = validate::retry_policy(d.retry_policy.as_ref())
        .map_err(within)?
        .rules;
    let policy = d.retry_policy.clone().unwrap_or_default();
    let ms = |field: &str, v: Option<&prost_types::Duration>| -> Result<Option<i64>, ApiError> {
        v.map(|d| {
            validate::duration(field, d).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
        .transpose()
        .map_err(within)
    };
    Ok(TypeDefaults {
        queue: queue.map(|q| q.as_str().to_owned()),
        priority: d.priority,
        max_attempts: policy.max_attempts,
        initial_backoff_ms: ms(
            "retry_policy.initial_backoff",
            policy.initial_backoff.as_ref(),
        )?,
        max_backoff_ms: ms("retry_policy.max_backoff", policy.max_backoff.as_ref())?,
        backoff_multiplier: policy.backoff_multiplier,
        jitter: policy.jitter,
        timeout_ms: ms("timeout", d.timeout.as_ref())?,
        idempotent_by_payload: d.idempotent_by_payload,
        needs_approval: d.needs_approval,
        retry_rules: rules,
        approval_when: conditions(&d.approval_when, payload).map_err(within)?,
        approval_timeout_ms: validate::approval_timeout(d.approval_timeout.as_ref())
            .map_err(within)?,
        approval_timeout_fails: validate::approval_timeout_fails(d.on_approval_timeout)
            .map_err(within)?,
    })
}

/// Approval conditions, each naming a singular scalar field of the payload (through nested
/// messages), with the text its default value compares as.
fn conditions(
    given: &[pb::PayloadCondition],
    payload: &MessageDescriptor,
) -> Result<Vec<Condition>, ApiError> {
    if given.len() > MAX_CONDITIONS {
        return Err(ApiError::invalid(
            "approval_when",
            format!("at most {MAX_CONDITIONS} conditions"),
        ));
    }
    given
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("approval_when[{i}]");
            validate::text(&format!("{at}.field"), &c.field, MAX_CONDITION_TEXT)?;
            if c.equals.is_empty() || c.equals.len() > MAX_CONDITION_VALUES {
                return Err(ApiError::invalid(
                    format!("{at}.equals"),
                    format!("must hold 1 to {MAX_CONDITION_VALUES} values"),
                ));
            }
            for (k, v) in c.equals.iter().enumerate() {
                validate::text(&format!("{at}.equals[{k}]"), v, MAX_CONDITION_TEXT)?;
            }
            let (json_field, absent) = field_default(payload, &c.field)
                .map_err(|why| ApiError::invalid(format!("{at}.field"), why))?;
            Ok(Condition {
                field: c.field.clone(),
                json_field,
                equals: c.equals.clone(),
                absent,
            })
        })
        .collect()
}

/// For a path of field names ending at a singular scalar or enum field: the path in the names
/// of the proto3 JSON form, and the text of the field's default value there.
fn field_default(message: &MessageDescriptor, path: &str) -> Result<(String, String), String> {
    let mut at = message.clone();
    let mut json = Vec::new();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = at
            .get_field_by_name(part)
            .ok_or_else(|| format!("{} has no field {part:?}", at.full_name()))?;
        json.push(field.json_name().to_owned());
        if field.is_list() || field.is_map() {
            return Err(format!(
                "{part:?} is repeated; a condition needs a single value"
            ));
        }
        match field.kind() {
            Kind::Message(inner) if parts.peek().is_some() => at = inner,
            Kind::Message(_) => {
                return Err(format!("{part:?} is a message; name a field within it"));
            }
            _ if parts.peek().is_some() => {
                return Err(format!("{part:?} is not a message"));
            }
            kind => {
                let absent = match kind {
                    Kind::Enum(e) => e.default_value().name().to_owned(),
                    Kind::Bool => "false".into(),
                    Kind::String | Kind::Bytes => String::new(),
                    _ => "0".into(),
                };
                return Ok((json.join("."), absent));
            }
        }
    }
    Err("is empty".into())
}

fn examples(
    schema: &Schema,
    given: &[pb::ExamplePayload],
    at: &str,
) -> Result<Vec<Example>, ApiError> {
    if given.len() > MAX_EXAMPLES {
        return Err(ApiError::invalid(
            format!("{at}.examples"),
            format!("at most {MAX_EXAMPLES}"),
        ));
    }
    let bytes: usize = given.iter().map(prost::Message::encoded_len).sum();
    if bytes > MAX_EXAMPLES_BYTES {
        return Err(ApiError::invalid(
            format!("{at}.examples"),
            format!("at most {MAX_EXAMPLES_BYTES} bytes in all, got {bytes}"),
        ));
    }
    let mut out: Vec<Example> = Vec::with_capacity(given.len());
    for (i, e) in given.iter().enumerate() {
        let at = format!("{at}.examples[{i}]");
        validate::name(&format!("{at}.slug"), &e.slug)?;
        validate::text(&format!("{at}.name"), &e.name, MAX_EXAMPLE_NAME)?;
        if let Some(payload) = &e.payload {
            validate::structure(&format!("{at}.payload"), payload)?;
        }
        if out.iter().any(|o| o.slug == e.slug) {
            return Err(ApiError::invalid(
                format!("{at}.slug"),
                format!("repeats {:?}", e.slug),
            ));
        }
        let payload = e
            .payload
            .as_ref()
            .map(convert::struct_to_json)
            .ok_or_else(|| ApiError::invalid(format!("{at}.payload"), "is required"))?;
        schema.payload_from_json(&payload).map_err(|fe| {
            let field = if fe.path.is_empty() {
                format!("{at}.payload")
            } else {
                format!("{at}.payload.{}", fe.path)
            };
            ApiError::invalid(field, fe.why)
        })?;
        out.push(Example {
            slug: e.slug.clone(),
            name: e.name.clone(),
            payload,
        });
    }
    Ok(out)
}

/// Validates a registration (from RegisterJobType, or a worker's hello) into a version to store.
/// `at` is the field path of the JobType message, for error messages.
pub fn new_job_type(t: &pb::JobType, at: &str) -> Result<NewJobType, ApiError> {
    let name = validate::job_type(&format!("{at}.name"), &t.name)?;
    if t.payload_type.is_empty() {
        return Err(ApiError::invalid(
            format!("{at}.payload_type"),
            "is required",
        ));
    }
    if t.descriptor_set.is_empty() {
        return Err(ApiError::invalid(
            format!("{at}.descriptor_set"),
            "is required",
        ));
    }
    if t.descriptor_set.len() > MAX_DESCRIPTOR_BYTES {
        return Err(ApiError::invalid(
            format!("{at}.descriptor_set"),
            format!("must be at most {MAX_DESCRIPTOR_BYTES} bytes"),
        ));
    }
    let output_type = if t.output_type.is_empty() {
        EMPTY.to_owned()
    } else {
        t.output_type.clone()
    };
    let (payload, output) = Schema::decode(&t.payload_type, &output_type, &t.descriptor_set)
        .map_err(|e| {
            let field = match &e {
                SchemaError::Descriptors(_) => "descriptor_set",
                SchemaError::MissingMessage(m) if *m == output_type => "output_type",
                SchemaError::MissingMessage(_) => "payload_type",
            };
            ApiError::invalid(format!("{at}.{field}"), e.to_string())
        })?;
    let schema = Schema {
        name: name.clone(),
        version: 0,
        defaults: defaults(t.defaults.as_ref(), at, &payload)?,
        examples: Vec::new(),
        payload,
        output,
    };
    let examples = examples(&schema, &t.examples, at)?;
    Ok(NewJobType {
        name,
        payload_type: t.payload_type.clone(),
        output_type,
        descriptor_set: t.descriptor_set.clone(),
        defaults: schema.defaults,
        examples,
    })
}

fn field_type(kind: &Kind) -> (&'static str, String) {
    match kind {
        Kind::Double => ("double", String::new()),
        Kind::Float => ("float", String::new()),
        Kind::Int32 => ("int32", String::new()),
        Kind::Int64 => ("int64", String::new()),
        Kind::Uint32 => ("uint32", String::new()),
        Kind::Uint64 => ("uint64", String::new()),
        Kind::Sint32 => ("sint32", String::new()),
        Kind::Sint64 => ("sint64", String::new()),
        Kind::Fixed32 => ("fixed32", String::new()),
        Kind::Fixed64 => ("fixed64", String::new()),
        Kind::Sfixed32 => ("sfixed32", String::new()),
        Kind::Sfixed64 => ("sfixed64", String::new()),
        Kind::Bool => ("bool", String::new()),
        Kind::String => ("string", String::new()),
        Kind::Bytes => ("bytes", String::new()),
        Kind::Message(m) => ("message", m.full_name().to_owned()),
        Kind::Enum(e) => ("enum", e.full_name().to_owned()),
    }
}

fn field_schema(field: &FieldDescriptor) -> pb::FieldSchema {
    let kind = if field.is_map() {
        match field.kind() {
            Kind::Message(entry) => entry.map_entry_value_field().kind(),
            other => other,
        }
    } else {
        field.kind()
    };
    let (type_name, full) = field_type(&kind);
    pb::FieldSchema {
        name: field.name().to_owned(),
        number: i32::try_from(field.number()).unwrap_or(i32::MAX),
        r#type: type_name.to_owned(),
        type_name: full,
        repeated: field.is_list(),
        map: field.is_map(),
        description: String::new(),
        enum_values: match &kind {
            Kind::Enum(e) => e.values().map(|v| v.name().to_owned()).collect(),
            _ => Vec::new(),
        },
    }
}

fn message_schema(desc: &MessageDescriptor) -> pb::MessageSchema {
    pb::MessageSchema {
        full_name: desc.full_name().to_owned(),
        fields: desc.fields().map(|f| field_schema(&f)).collect(),
        description: String::new(),
    }
}

fn millis(ms: i64) -> prost_types::Duration {
    convert::duration(std::time::Duration::from_millis(
        u64::try_from(ms).unwrap_or(0),
    ))
}

/// A stored version as the API shows it; `with_descriptors` false leaves the (large) set out.
fn job_type(row: JobTypeRow, with_descriptors: bool) -> pb::JobType {
    let schemas = Schema::decode(&row.payload_type, &row.output_type, &row.descriptor_set).ok();
    let d = row.defaults.0;
    let retry = pb::RetryPolicy {
        max_attempts: d.max_attempts,
        initial_backoff: d.initial_backoff_ms.map(millis),
        max_backoff: d.max_backoff_ms.map(millis),
        backoff_multiplier: d.backoff_multiplier,
        jitter: d.jitter,
        by_kind: d.retry_rules.iter().map(convert::retry_rule).collect(),
    };
    pb::JobType {
        name: row.name,
        version: row.version,
        latest: row.latest,
        payload_type: row.payload_type,
        output_type: row.output_type,
        descriptor_set: if with_descriptors {
            row.descriptor_set
        } else {
            Vec::new()
        },
        defaults: Some(pb::JobTypeDefaults {
            queue: d.queue.unwrap_or_default(),
            priority: d.priority,
            retry_policy: (retry != pb::RetryPolicy::default()).then_some(retry),
            timeout: d.timeout_ms.map(millis),
            idempotent_by_payload: d.idempotent_by_payload,
            needs_approval: d.needs_approval,
            approval_when: d
                .approval_when
                .iter()
                .map(|c| pb::PayloadCondition {
                    field: c.field.clone(),
                    equals: c.equals.clone(),
                })
                .collect(),
            approval_timeout: d.approval_timeout_ms.map(millis),
            on_approval_timeout: match (d.approval_timeout_ms, d.approval_timeout_fails) {
                (None, _) => pb::ApprovalTimeoutAction::Unspecified,
                (Some(_), false) => pb::ApprovalTimeoutAction::Reject,
                (Some(_), true) => pb::ApprovalTimeoutAction::Fail,
            }
            .into(),
        }),
        examples: row
            .examples
            .0
            .into_iter()
            .map(|e| pb::ExamplePayload {
                slug: e.slug,
                name: e.name,
                payload: convert::json_to_struct(&e.payload),
            })
            .collect(),
        payload_schema: schemas.as_ref().map(|(p, _)| message_schema(p)),
        output_schema: schemas.as_ref().map(|(_, o)| message_schema(o)),
        created_at: Some(convert::timestamp(row.created_at)),
    }
}

fn not_found(tenant: &TenantId, name: &str, version: Option<i32>) -> impl FnOnce() -> String {
    let message = match version {
        Some(v) => format!("version {v} of job type {name:?} not found in tenant {tenant}"),
        None => format!("job type {name:?} not found in tenant {tenant}"),
    };
    move || message
}

#[tonic::async_trait]
impl JobTypeService for JobTypeApi {
    async fn register_job_type(
        &self,
        request: Request<pb::RegisterJobTypeRequest>,
    ) -> Result<Response<pb::RegisterJobTypeResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let t = request
            .get_ref()
            .job_type
            .as_ref()
            .ok_or_else(|| ApiError::invalid("job_type", "is required"))?;
        let new = new_job_type(t, "job_type")?;
        let name = new.name.clone();
        let row = self
            .store
            .register_job_type(&tenant, &new)
            .await
            .map_err(ApiError::from)?;
        self.registry.forget_latest(&tenant, &name);
        tracing::info!(%tenant, job_type = %name, version = row.version, "job type registered");
        Ok(Response::new(pb::RegisterJobTypeResponse {
            job_type: Some(job_type(row, true)),
        }))
    }

    async fn get_job_type(
        &self,
        request: Request<pb::GetJobTypeRequest>,
    ) -> Result<Response<pb::GetJobTypeResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let name = validate::job_type("name", &req.name)?;
        let full = validate::job_type_view(req.view)? == pb::JobTypeView::Full;
        let version = match req.version.as_str() {
            "" | "latest" => None,
            v => Some(v.parse::<i32>().ok().filter(|v| *v > 0).ok_or_else(|| {
                ApiError::invalid(
                    "version",
                    format!("must be a version number or \"latest\", got {v:?}"),
                )
            })?),
        };
        let row = self
            .store
            .get_job_type(&tenant, &name, version)
            .await
            .map_err(|e| ApiError::from_store(e, not_found(&tenant, &name, version)))?;
        Ok(Response::new(pb::GetJobTypeResponse {
            job_type: Some(job_type(row, full)),
        }))
    }

    async fn list_job_types(
        &self,
        request: Request<pb::ListJobTypesRequest>,
    ) -> Result<Response<pb::ListJobTypesResponse>, Status> {
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
            .list_job_types(
                &tenant,
                paging.after.as_deref(),
                paging.limit(),
                MAX_PAGE_BYTES,
            )
            .await
            .map_err(ApiError::from)?;
        let truncated = listed.candidates > listed.rows.len();
        let candidates = listed
            .rows
            .into_iter()
            .map(|row| job_type(row, false))
            .collect();
        let (job_types, next_page_token) =
            paging.page(candidates, truncated, |item| Ok(item.name.clone()))?;
        Ok(Response::new(pb::ListJobTypesResponse {
            job_types,
            next_page_token,
        }))
    }
}
