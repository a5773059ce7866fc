//! The job type registry as the API uses it: registered versions with their descriptors decoded,
//! cached, and the JSON form of payloads and results checked and converted against them.
//!
//! Versions never change once stored, so a decoded version is cached for good. Which version is
//! the latest can change on any replica, so that answer is cached briefly ([`LATEST_TTL`]); a
//! replica that registered a version forgets its own answer at once. Every enqueue consults the
//! registry for its type's defaults, so the hot path costs a map lookup, not a query.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind,
    MessageDescriptor,
};
use serde_json::Value;

use crate::{
    domain::TenantId,
    store::{self, Example, JobTypeRow, Store, TypeDefaults},
};

/// How long a replica trusts its answer to "which version is the latest".
const LATEST_TTL: Duration = Duration::from_secs(1);

/// A field of a payload at fault, by its path from the payload's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub why: String,
}

impl FieldError {
    fn new(path: &str, why: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            why: why.into(),
        }
    }
}

/// Why a registration's descriptors are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("is not a valid FileDescriptorSet: {0}")]
    Descriptors(String),
    #[error("names {0:?}, which the descriptor set does not define")]
    MissingMessage(String),
}

/// One registered version, decoded.
#[derive(Debug)]
pub struct Schema {
    pub name: String,
    pub version: i32,
    pub defaults: TypeDefaults,
    pub examples: Vec<Example>,
    pub payload: MessageDescriptor,
    pub output: MessageDescriptor,
}

impl Schema {
    /// Decodes a descriptor set and finds the payload and output messages in it.
    pub fn decode(
        payload_type: &str,
        output_type: &str,
        descriptor_set: &[u8],
    ) -> Result<(MessageDescriptor, MessageDescriptor), SchemaError> {
        let pool = DescriptorPool::decode(descriptor_set)
            .map_err(|e| SchemaError::Descriptors(e.to_string()))?;
        let find = |full: &str| {
            pool.get_message_by_name(full)
                .or_else(|| {
                    // The output may be a well-known type the set does not carry.
                    DescriptorPool::global().get_message_by_name(full)
                })
                .ok_or_else(|| SchemaError::MissingMessage(full.to_owned()))
        };
        Ok((find(payload_type)?, find(output_type)?))
    }

    fn from_row(row: &JobTypeRow) -> Result<Self, SchemaError> {
        let (payload, output) =
            Self::decode(&row.payload_type, &row.output_type, &row.descriptor_set)?;
        Ok(Self {
            name: row.name.clone(),
            version: row.version,
            defaults: row.defaults.0.clone(),
            examples: row.examples.0.clone(),
            payload,
            output,
        })
    }

    /// The `Any` type URL of the payload message.
    pub fn payload_type_url(&self) -> String {
        format!("type.googleapis.com/{}", self.payload.full_name())
    }

    /// Checks a JSON payload against the payload message and encodes it. Unknown fields and
    /// values of the wrong type are refused with their path.
    pub fn payload_from_json(&self, json: &Value) -> Result<Vec<u8>, FieldError> {
        check_message(&self.payload, json, "")?;
        let message = DynamicMessage::deserialize_with_options(
            self.payload.clone(),
            json.clone(),
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .map_err(|e| FieldError::new("", e.to_string()))?;
        Ok(message.encode_to_vec())
    }

    /// The JSON form of an encoded payload, if it decodes.
    pub fn payload_to_json(&self, bytes: &[u8]) -> Option<Value> {
        to_json(&self.payload, bytes)
    }

    /// The JSON form of an encoded result, if it decodes.
    pub fn output_to_json(&self, bytes: &[u8]) -> Option<Value> {
        to_json(&self.output, bytes)
    }
}

fn to_json(desc: &MessageDescriptor, bytes: &[u8]) -> Option<Value> {
    let message = DynamicMessage::decode(desc.clone(), bytes).ok()?;
    serde_json::to_value(&message).ok()
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Walks a JSON object against a message, so a mistake is reported at its field path (the
/// converter that follows reports only the first problem, without a path).
fn check_message(desc: &MessageDescriptor, json: &Value, path: &str) -> Result<(), FieldError> {
    if desc.full_name().starts_with("google.protobuf.") {
        // Well-known types have JSON forms of their own (strings for Timestamp, anything for
        // Value): the converter judges each on its own, so a mistake is named at its path.
        return DynamicMessage::deserialize(desc.clone(), json.clone())
            .map(|_| ())
            .map_err(|e| FieldError::new(path, e.to_string()));
    }
    let Value::Object(fields) = json else {
        return Err(FieldError::new(
            path,
            format!("must be a JSON object for {}", desc.full_name()),
        ));
    };
    for (key, value) in fields {
        let at = join(path, key);
        let field = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
            .ok_or_else(|| {
                FieldError::new(&at, format!("is not a field of {}", desc.full_name()))
            })?;
        check_field(&field, value, &at)?;
    }
    Ok(())
}

fn check_field(field: &FieldDescriptor, json: &Value, path: &str) -> Result<(), FieldError> {
    if json.is_null() {
        return Ok(());
    }
    if field.is_map() {
        let Value::Object(entries) = json else {
            return Err(FieldError::new(path, "must be a JSON object (a map)"));
        };
        let Kind::Message(entry) = field.kind() else {
            return Ok(());
        };
        let value_field = entry.map_entry_value_field();
        for (key, value) in entries {
            check_kind(&value_field.kind(), value, &format!("{path}[{key:?}]"))?;
        }
        return Ok(());
    }
    if field.is_list() {
        let Value::Array(items) = json else {
            return Err(FieldError::new(path, "must be a JSON array"));
        };
        for (i, item) in items.iter().enumerate() {
            check_kind(&field.kind(), item, &format!("{path}[{i}]"))?;
        }
        return Ok(());
    }
    check_kind(&field.kind(), json, path)
}

fn check_kind(kind: &Kind, json: &Value, path: &str) -> Result<(), FieldError> {
    let wrong = |want: &str| FieldError::new(path, format!("must be {want}, got {}", shape(json)));
    match kind {
        Kind::Message(desc) => check_message(desc, json, path),
        Kind::Enum(desc) => check_enum(desc, json, path),
        Kind::String | Kind::Bytes => json
            .is_string()
            .then_some(())
            .ok_or_else(|| wrong("a string")),
        Kind::Bool => json
            .is_boolean()
            .then_some(())
            .ok_or_else(|| wrong("true or false")),
        Kind::Double | Kind::Float => match json {
            Value::Number(_) => Ok(()),
            Value::String(s) if s.parse::<f64>().is_ok() => Ok(()),
            _ => Err(wrong("a number")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            integer(json, i64::from(i32::MIN), i64::from(i32::MAX))
                .ok_or_else(|| wrong("a 32-bit integer"))
        }
        Kind::Uint32 | Kind::Fixed32 => {
            integer(json, 0, i64::from(u32::MAX)).ok_or_else(|| wrong("an unsigned 32-bit integer"))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            integer(json, i64::MIN, i64::MAX).ok_or_else(|| wrong("a 64-bit integer"))
        }
        Kind::Uint64 | Kind::Fixed64 => match json {
            Value::Number(n) if n.as_u64().is_some() => Ok(()),
            Value::String(s) if s.parse::<u64>().is_ok() => Ok(()),
            _ => Err(wrong("an unsigned 64-bit integer")),
        },
    }
}

/// Some(()) when `json` is an integer in range: a number without a fraction, or a string of
/// one (proto3 JSON accepts both).
fn integer(json: &Value, min: i64, max: i64) -> Option<()> {
    let n = match json {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        })?,
        Value::String(s) => s.parse::<i64>().ok()?,
        _ => return None,
    };
    (min..=max).contains(&n).then_some(())
}

fn check_enum(desc: &EnumDescriptor, json: &Value, path: &str) -> Result<(), FieldError> {
    let known = match json {
        Value::String(name) => desc.get_value_by_name(name).is_some(),
        Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .is_some_and(|n| desc.get_value(n).is_some()),
        _ => false,
    };
    if known {
        return Ok(());
    }
    let values: Vec<String> = desc.values().map(|v| v.name().to_owned()).collect();
    Err(FieldError::new(
        path,
        format!("must be one of {}, got {}", values.join(", "), shape(json)),
    ))
}

/// A short description of a JSON value for messages.
fn shape(json: &Value) -> String {
    match json {
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => format!("{b}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        Value::Null => "null".into(),
    }
}

/// (tenant, job type): a job type of one tenant.
type TypeKey = (String, String);
/// The latest version of a type (`None`: not registered), and when that was read.
type LatestCache = HashMap<TypeKey, (Option<i32>, Instant)>;
/// Decoded versions; immutable once stored, so never evicted.
type VersionCache = HashMap<(TypeKey, i32), Arc<Schema>>;

/// Decoded versions and the latest version of each type, per tenant.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
    versions: Arc<Mutex<VersionCache>>,
    latest: Arc<Mutex<LatestCache>>,
}

impl Registry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            versions: Arc::default(),
            latest: Arc::default(),
        }
    }

    /// A version of a type (`None`: the latest), or `None` when the type (or that version) is
    /// not registered.
    pub async fn schema(
        &self,
        tenant: &TenantId,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<Arc<Schema>>, store::Error> {
        let version = match version {
            Some(v) => v,
            None => match self.latest_version(tenant, name).await? {
                Some(v) => v,
                None => return Ok(None),
            },
        };
        let key = ((tenant.as_str().to_owned(), name.to_owned()), version);
        if let Some(schema) = lock(&self.versions).get(&key) {
            return Ok(Some(Arc::clone(schema)));
        }
        let row = match self.store.get_job_type(tenant, name, Some(version)).await {
            Ok(row) => row,
            Err(store::Error::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let schema =
            Arc::new(Schema::from_row(&row).map_err(|e| store::Error::Corrupt(e.to_string()))?);
        lock(&self.versions).insert(key, Arc::clone(&schema));
        Ok(Some(schema))
    }

    async fn latest_version(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<Option<i32>, store::Error> {
        let key = (tenant.as_str().to_owned(), name.to_owned());
        if let Some((version, at)) = lock(&self.latest).get(&key)
            && at.elapsed() < LATEST_TTL
        {
            return Ok(*version);
        }
        let version = match self.store.get_job_type(tenant, name, None).await {
            Ok(row) => Some(row.version),
            Err(store::Error::NotFound) => None,
            Err(e) => return Err(e),
        };
        lock(&self.latest).insert(key, (version, Instant::now()));
        Ok(version)
    }

    /// Forgets which version of a type is the latest, after registering one here.
    pub fn forget_latest(&self, tenant: &TenantId, name: &str) {
        lock(&self.latest).remove(&(tenant.as_str().to_owned(), name.to_owned()));
    }
}

/// The maps hold plain data, so a panic while one was held leaves it usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
