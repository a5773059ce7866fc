//! Output, for scripts and for people.
//!
//! For scripts (`--json`), every response is printed in the canonical proto3 JSON mapping
//! (camelCase names, 64-bit integers as strings, enums by name, default values left out), as
//! grpcurl and the other SDKs print it. prost-reflect does the mapping from the protocol's own
//! descriptors ([`jobwire_proto::FILE_DESCRIPTOR_SET`]), so the JSON follows the `.proto` files
//! without a hand-written serializer to drift from them.
//!
//! Payloads and results are `google.protobuf.Any`, whose JSON needs the schema of the message
//! inside. [`Pool::with_job_types`] adds the schemas of the job types involved, as the server's
//! registry holds them (`GetJobType`, FULL view); an `Any` whose type is still unknown (a type
//! registered with no schema, or one the key may not read) is left out rather than failing the
//! command: for a registered type the job's `payloadJson` and `resultJson` carry it anyway.
//!
//! For people: aligned tables without borders ([`table`]), `name: value` blocks ([`fields`]),
//! times in UTC (RFC 3339), durations in short units.

use std::collections::HashSet;
use std::io::Write as _;
use std::time::Duration;

use comfy_table::{Table, presets};
use jobwire::Client;
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::job_type_service_client::JobTypeServiceClient;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage as _, Value};
use serde_json::Value as Json;

use crate::error::Failure;

/// The descriptors the JSON mapping reads: the protocol's, and those of the job types whose
/// payloads a response carries.
#[derive(Debug, Clone)]
pub struct Pool {
    pool: DescriptorPool,
}

impl Pool {
    /// The protocol's descriptors alone.
    pub fn new() -> Result<Self, Failure> {
        let pool = DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET).map_err(|err| {
            Failure::Internal(format!("the protocol's descriptors do not decode: {err}"))
        })?;
        Ok(Self { pool })
    }

    /// These descriptors plus the registered schema of each `(job type, version)` (version 0:
    /// the latest). A type the server has no schema for, or will not show, adds nothing.
    pub async fn with_job_types(
        mut self,
        client: &Client,
        types: impl IntoIterator<Item = (String, i32)>,
    ) -> Self {
        let mut service = JobTypeServiceClient::new(client.channel());
        let wanted: HashSet<(String, i32)> = types
            .into_iter()
            .filter(|(name, _)| !name.is_empty())
            .collect();
        for (name, version) in wanted {
            let request = pb::GetJobTypeRequest {
                name,
                version: if version > 0 {
                    version.to_string()
                } else {
                    String::new()
                },
                view: pb::JobTypeView::Full as i32,
            };
            let Ok(response) = service.get_job_type(client.request(request)).await else {
                continue;
            };
            let Some(job_type) = response.into_inner().job_type else {
                continue;
            };
            if let Ok(set) =
                prost_types::FileDescriptorSet::decode(job_type.descriptor_set.as_ref())
            {
                // Files the pool already holds (the well-known types, jobwire's options) are
                // skipped; a set that does not fit leaves its payloads out of the JSON.
                let _ = self.pool.add_file_descriptor_set(set);
            }
        }
        self
    }

    /// `message` in the proto3 JSON mapping.
    pub fn to_json<M: prost::Message + prost::Name>(&self, message: &M) -> Result<Json, Failure> {
        self.named_to_json(&M::full_name(), message)
    }

    /// `message`, whose full protobuf name is `name`, in the proto3 JSON mapping (for the
    /// well-known types, which do not implement `prost::Name`).
    fn named_to_json(&self, name: &str, message: &impl prost::Message) -> Result<Json, Failure> {
        let descriptor = self
            .pool
            .get_message_by_name(name)
            .ok_or_else(|| Failure::Internal(format!("no descriptor for {name}")))?;
        let mut dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .map_err(|err| Failure::Internal(format!("re-reading a {name}: {err}")))?;
        drop_unknown_any(&mut dynamic, &self.pool);
        serde_json::to_value(&dynamic)
            .map_err(|err| Failure::Internal(format!("a {name} as JSON: {err}")))
    }

    /// Prints `message` as one line of JSON.
    pub fn print<M: prost::Message + prost::Name>(&self, message: &M) -> Result<(), Failure> {
        line(&self.to_json(message)?.to_string())
    }

    /// A `google.protobuf.Struct` (a JSON payload or result) as compact JSON text.
    pub fn struct_text(&self, value: &prost_types::Struct) -> String {
        self.named_to_json("google.protobuf.Struct", value)
            .map(|json| whole_numbers(json).to_string())
            .unwrap_or_else(|err| format!("<{err}>"))
    }

    /// An `Any` (a payload or a result) as JSON text when its schema is known, otherwise its
    /// type and size.
    pub fn any_text(&self, value: &prost_types::Any) -> String {
        self.named_to_json("google.protobuf.Any", value)
            .ok()
            .filter(|json| !json.is_null())
            .map(|json| whole_numbers(json).to_string())
            .unwrap_or_else(|| {
                format!(
                    "{} ({} bytes; no registered schema)",
                    value.type_url,
                    value.value.len()
                )
            })
    }

    /// `text` (a JSON object; `@FILE` reads a file, `-` standard input) as the
    /// `google.protobuf.Struct` a payload travels in. `what` names the option for errors.
    pub fn parse_struct(&self, text: &str, what: &str) -> Result<prost_types::Struct, Failure> {
        let text = match text {
            "-" => std::io::read_to_string(std::io::stdin())
                .map_err(|err| Failure::Input(format!("{what}: reading standard input: {err}")))?,
            _ => match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|err| Failure::Input(format!("{what}: reading {path}: {err}")))?,
                None => text.to_owned(),
            },
        };
        let json: Json = serde_json::from_str(&text)
            .map_err(|err| Failure::Input(format!("{what} is not valid JSON: {err}")))?;
        if !json.is_object() {
            return Err(Failure::Input(format!(
                "{what} must be a JSON object, such as {{\"url\": \"...\"}}"
            )));
        }
        let descriptor = self
            .pool
            .get_message_by_name("google.protobuf.Struct")
            .ok_or_else(|| Failure::Internal("no descriptor for google.protobuf.Struct".into()))?;
        let dynamic = DynamicMessage::deserialize(descriptor, json)
            .map_err(|err| Failure::Input(format!("{what}: {err}")))?;
        dynamic
            .transcode_to()
            .map_err(|err| Failure::Internal(format!("{what}: {err}")))
    }
}

/// Clears every `Any` inside `message` whose type the pool does not hold, so the rest still
/// maps to JSON (the mapping of an `Any` needs its type's schema).
fn drop_unknown_any(message: &mut DynamicMessage, pool: &DescriptorPool) {
    let fields: Vec<_> = message.descriptor().fields().collect();
    for field in fields {
        if !message.has_field(&field) {
            continue;
        }
        let is_any = field
            .kind()
            .as_message()
            .is_some_and(|kind| kind.full_name() == "google.protobuf.Any");
        let mut clear = false;
        match message.get_field_mut(&field) {
            Value::Message(inner) if is_any => clear = !any_is_known(inner, pool),
            Value::Message(inner) => drop_unknown_any(inner, pool),
            Value::List(items) => {
                if is_any {
                    items.retain(|item| match item {
                        Value::Message(inner) => any_is_known(inner, pool),
                        _ => true,
                    });
                } else {
                    for item in items.iter_mut() {
                        if let Value::Message(inner) = item {
                            drop_unknown_any(inner, pool);
                        }
                    }
                }
            }
            Value::Map(entries) => {
                for value in entries.values_mut() {
                    if let Value::Message(inner) = value {
                        drop_unknown_any(inner, pool);
                    }
                }
            }
            _ => {}
        }
        if clear {
            message.clear_field(&field);
        }
    }
}

/// Whether the pool holds the type an `Any` names.
fn any_is_known(any: &DynamicMessage, pool: &DescriptorPool) -> bool {
    let Ok(any) = any.transcode_to::<prost_types::Any>() else {
        return false;
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    pool.get_message_by_name(name).is_some()
}

/// `json` with whole numbers written without a fraction: a `Struct` holds every number as a
/// double, which would show a width of 3 as `3.0` to people.
fn whole_numbers(json: Json) -> Json {
    /// Beyond 2^53 a double no longer holds every whole number.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match json {
        Json::Number(number) => match number.as_f64() {
            Some(value) if value.fract() == 0.0 && value.abs() <= EXACT => Json::from(value as i64),
            _ => Json::Number(number),
        },
        Json::Array(items) => Json::Array(items.into_iter().map(whole_numbers).collect()),
        Json::Object(fields) => Json::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key, whole_numbers(value)))
                .collect(),
        ),
        other => other,
    }
}

/// Writes one line to stdout.
pub fn line(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

/// A table for people: a header and aligned columns, no borders.
pub fn table<const N: usize>(header: [&str; N], rows: Vec<[String; N]>) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row.to_vec());
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt()
}

/// `name: value` lines with the values aligned; empty values are left out.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{:<width$}  {value}", format!("{name}:"), width = width + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A timestamp in UTC, to the second (empty when unset).
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|ts| chrono::DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32))
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A protobuf duration in short units (empty when unset).
pub fn proto_duration(duration: Option<&prost_types::Duration>) -> String {
    duration
        .and_then(|d| Duration::try_from(*d).ok())
        .map(short_duration)
        .unwrap_or_default()
}

/// A duration in short units: `350ms`, `12s`, `4m05s`, `2h10m`, `3d4h`.
pub fn short_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// A job state's name without its prefix, such as `RUNNING`.
pub fn state(value: i32) -> String {
    pb::JobState::try_from(value)
        .map(|state| {
            let name = state.as_str_name();
            name.strip_prefix("JOB_STATE_").unwrap_or(name).to_owned()
        })
        .unwrap_or_else(|_| format!("state {value}"))
}

/// An enum value's name without the prefix all its values share.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// A job's progress in one line: stage, items or percent, message, ETA.
pub fn progress(progress: &pb::Progress) -> String {
    let mut parts = Vec::new();
    if !progress.stage.is_empty() {
        parts.push(format!("[{}]", progress.stage));
    }
    if progress.items_total > 0 {
        parts.push(format!("{}/{}", progress.items_done, progress.items_total));
    }
    if let Some(fraction) = progress.fraction {
        parts.push(format!("{:.0}%", fraction * 100.0));
    }
    if !progress.message.is_empty() {
        parts.push(progress.message.clone());
    }
    if let Some(eta) = eta(progress) {
        parts.push(format!("(eta {eta})"));
    }
    parts.join(" ")
}

/// How long until the server's estimate of the end, from now, in whole seconds rounded up
/// (`None` without an estimate, or once it has passed).
pub fn eta(progress: &pb::Progress) -> Option<String> {
    let eta = progress.eta.as_ref()?;
    let eta = chrono::DateTime::from_timestamp(eta.seconds, eta.nanos.max(0) as u32)?;
    let left = (eta - chrono::Utc::now()).to_std().ok()?;
    let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    (seconds > 0).then(|| short_duration(Duration::from_secs(seconds)))
}

/// Labels as `k=v, k=v`, sorted.
pub fn labels(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_map_to_proto_json() {
        let pool = Pool::new().expect("descriptors");
        let job = pb::Job {
            id: "j1".into(),
            state: pb::JobState::Running as i32,
            attempt: 2,
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/nowhere.Unknown".into(),
                value: vec![1, 2, 3],
            }),
            ..Default::default()
        };
        let json = pool.to_json(&job).expect("JSON");
        assert_eq!(json["id"], "j1");
        assert_eq!(json["state"], "JOB_STATE_RUNNING");
        assert_eq!(json["attempt"], 2);
        assert!(json.get("payload").is_none(), "{json}");
    }

    #[test]
    fn payloads_parse_into_structs() {
        let pool = Pool::new().expect("descriptors");
        let payload = pool
            .parse_struct(r#"{"url": "u", "width": 3}"#, "--json-payload")
            .expect("a struct");
        assert_eq!(pool.struct_text(&payload), r#"{"url":"u","width":3}"#);
        assert!(matches!(
            pool.parse_struct("[1]", "--json-payload"),
            Err(Failure::Input(_))
        ));
        assert!(matches!(
            pool.parse_struct("{", "--json-payload"),
            Err(Failure::Input(_))
        ));
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(Duration::from_millis(350)), "350ms");
        assert_eq!(short_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(short_duration(Duration::from_secs(7800)), "2h10m");
    }
}
