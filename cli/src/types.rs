//! `jobwire types`: the registered job types, through `JobTypeService` (the SDK has no client
//! for it: workers register their types as they connect), on the SDK's channel.
//!
//! `types get` shows what an operator needs to enqueue a job by hand: the payload's fields as
//! a schema (name, type, description), the defaults a job takes, and the examples to run by
//! slug. `types list` reads every page.

use jobwire::Client;
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::job_type_service_client::JobTypeServiceClient;

use crate::args::TypesCommand;
use crate::error::Failure;
use crate::render::{self, Pool, line};

/// The largest page ListJobTypes allows: the fewest round trips for a whole listing.
const PAGE_SIZE: i32 = 1000;

/// Runs one `types` subcommand.
pub async fn run(client: &Client, json: bool, command: TypesCommand) -> Result<(), Failure> {
    let pool = Pool::new()?;
    let mut service = JobTypeServiceClient::new(client.channel());
    match command {
        TypesCommand::List => {
            let mut job_types = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = pb::ListJobTypesRequest {
                    page_size: PAGE_SIZE,
                    page_token,
                };
                let page = service
                    .list_job_types(client.request(request))
                    .await?
                    .into_inner();
                job_types.extend(page.job_types);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json {
                return pool.print(&pb::ListJobTypesResponse {
                    job_types,
                    next_page_token: String::new(),
                });
            }
            line(&list(&job_types))
        }
        TypesCommand::Get { name, version } => {
            let request = pb::GetJobTypeRequest {
                name,
                version: version.map(|v| v.to_string()).unwrap_or_default(),
                view: pb::JobTypeView::Basic as i32,
            };
            let response = service
                .get_job_type(client.request(request))
                .await?
                .into_inner();
            if json {
                return pool.print(&response);
            }
            let job_type = response
                .job_type
                .ok_or_else(|| Failure::Internal("the response has no job type".into()))?;
            line(&describe(&pool, &job_type))
        }
    }
}

fn list(job_types: &[pb::JobType]) -> String {
    let rows = job_types
        .iter()
        .map(|job_type| {
            let defaults = job_type.defaults.clone().unwrap_or_default();
            [
                job_type.name.clone(),
                job_type.version.to_string(),
                job_type.payload_type.clone(),
                job_type.output_type.clone(),
                defaults.queue,
                job_type.examples.len().to_string(),
            ]
        })
        .collect();
    render::table(
        ["NAME", "VERSION", "PAYLOAD", "OUTPUT", "QUEUE", "EXAMPLES"],
        rows,
    )
}

/// A job type for people: defaults, payload and output schemas, examples.
fn describe(pool: &Pool, job_type: &pb::JobType) -> String {
    let defaults = job_type.defaults.clone().unwrap_or_default();
    let yes_no = |flag: bool| if flag { "yes" } else { "no" }.to_owned();
    let mut text = render::fields(&[
        ("name", job_type.name.clone()),
        (
            "version",
            format!(
                "{}{}",
                job_type.version,
                if job_type.latest { " (latest)" } else { "" }
            ),
        ),
        ("payload", job_type.payload_type.clone()),
        ("output", job_type.output_type.clone()),
        ("queue", defaults.queue.clone()),
        (
            "priority",
            defaults.priority.map(|p| p.to_string()).unwrap_or_default(),
        ),
        (
            "max attempts",
            defaults
                .retry_policy
                .as_ref()
                .and_then(|policy| policy.max_attempts)
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        ("timeout", render::proto_duration(defaults.timeout.as_ref())),
        ("needs approval", yes_no(defaults.needs_approval)),
        ("idempotent", yes_no(defaults.idempotent_by_payload)),
        ("registered", render::time(job_type.created_at.as_ref())),
    ]);
    for (title, schema) in [
        ("payload fields", &job_type.payload_schema),
        ("output fields", &job_type.output_schema),
    ] {
        let Some(schema) = schema else { continue };
        text.push_str(&format!("\n\n{title} ({}):\n", schema.full_name));
        if schema.fields.is_empty() {
            text.push_str("(none)");
            continue;
        }
        // Descriptors registered without their source's comments describe no field: the
        // column is left out rather than shown empty.
        if schema
            .fields
            .iter()
            .all(|field| field.description.is_empty())
        {
            let rows = schema
                .fields
                .iter()
                .map(|field| [field.name.clone(), field_type(field)])
                .collect();
            text.push_str(&render::table(["FIELD", "TYPE"], rows));
            continue;
        }
        let rows = schema
            .fields
            .iter()
            .map(|field| {
                [
                    field.name.clone(),
                    field_type(field),
                    first_line(&field.description),
                ]
            })
            .collect();
        text.push_str(&render::table(["FIELD", "TYPE", "DESCRIPTION"], rows));
    }
    if !job_type.examples.is_empty() {
        let rows = job_type
            .examples
            .iter()
            .map(|example| {
                [
                    example.slug.clone(),
                    example.name.clone(),
                    example
                        .payload
                        .as_ref()
                        .map(|payload| pool.struct_text(payload))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        text.push_str("\n\nexamples (jobwire jobs enqueue TYPE --example SLUG):\n");
        text.push_str(&render::table(["SLUG", "NAME", "PAYLOAD"], rows));
    }
    text
}

/// A field's type as a person reads it: `repeated string`, `enum demo.v1.Mode (A|B)`, ...
fn field_type(field: &pb::FieldSchema) -> String {
    let mut text = if field.type_name.is_empty() {
        field.r#type.clone()
    } else if field.map {
        format!("map {}", field.type_name)
    } else {
        format!("{} {}", field.r#type, field.type_name)
    };
    if field.repeated && !field.map {
        text = format!("repeated {text}");
    }
    if !field.enum_values.is_empty() {
        text.push_str(&format!(" ({})", field.enum_values.join("|")));
    }
    text
}

/// The first line of a comment, which says what the field is.
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_owned()
}
