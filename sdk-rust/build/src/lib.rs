//! Build-time code generation for jobwire job types.
//!
//! A job type is declared once, in its .proto file, by the `(jobwire.v1.job)` option on its
//! payload message:
//!
//! ```proto
//! import "jobwire/v1/options.proto";
//!
//! message DownloadFetch {
//!   option (jobwire.v1.job) = {name: "download.fetch", output: "DownloadFetchResult",
//!                              default_queue: "downloads", priority: 70};
//!   string url = 1;
//! }
//! message DownloadFetchResult { string path = 1; }
//! ```
//!
//! [`compile`] (called from `build.rs`) compiles the files with protox (pure Rust: no system
//! `protoc`), generates the messages with prost, and for every message carrying the option adds
//! the `jobwire::JobType` impl: its name, its output type, and its schema and defaults
//! (`JobType::SCHEMA`), which a worker registers with the server when it connects. So a
//! producer gets a typed `client.enqueue(DownloadFetch { .. })` and a worker a typed handler,
//! and nobody writes an impl by hand.
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     jobwire_build::compile(&["proto/shop/v1/jobs.proto"], &["proto"])?;
//!     Ok(())
//! }
//! ```
//!
//! and in the crate: `pub mod jobs { include!(concat!(env!("OUT_DIR"), "/shop.v1.rs")); }`
//! (one file per protobuf package, named after it). The crate needs only `jobwire` as a
//! dependency: the generated code uses the prost it re-exports. An output message must be in the payload's package, or
//! `google.protobuf.Empty` (the unit type `()`), the default.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use heck::ToUpperCamelCase;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};

/// The option's own definition, and what it imports, shipped with this crate so a producer's
/// build needs nothing but its own .proto files.
const OPTIONS_PROTO: &str = include_str!("../../../proto/jobwire/v1/options.proto");
const JOB_PROTO: &str = include_str!("../../../proto/jobwire/v1/job.proto");

/// The file, next to the generated code, holding the encoded descriptor set of every file
/// compiled and its imports: the schema a worker registers.
const DESCRIPTOR_FILE: &str = "jobwire_job_types.bin";
const EMPTY: &str = "google.protobuf.Empty";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OUT_DIR is not set: call jobwire_build::compile from a build script")]
    NoOutDir,
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protox(#[from] protox::Error),
    #[error("code generation failed: {0}")]
    Prost(std::io::Error),
    #[error("{message}: {why}")]
    Option { message: String, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Compiles `protos` (found under `includes`), generates their messages into `OUT_DIR`, and
/// adds a `jobwire::JobType` impl for each message with the `(jobwire.v1.job)` option.
pub fn compile(protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> Result<(), Error> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or(Error::NoOutDir)?);
    let shipped = out.join("jobwire-include");
    let v1 = shipped.join("jobwire/v1");
    fs::create_dir_all(&v1).map_err(io(&v1))?;
    for (name, text) in [("options.proto", OPTIONS_PROTO), ("job.proto", JOB_PROTO)] {
        let path = v1.join(name);
        fs::write(&path, text).map_err(io(&path))?;
    }

    let mut roots: Vec<PathBuf> = includes.iter().map(|i| i.as_ref().to_owned()).collect();
    roots.push(shipped);
    let mut compiler = protox::Compiler::new(&roots)?;
    compiler.include_imports(true).include_source_info(true);
    let relative: Vec<PathBuf> = protos
        .iter()
        .map(|p| {
            let p = p.as_ref();
            println!("cargo:rerun-if-changed={}", p.display());
            includes
                .iter()
                .find_map(|i| p.strip_prefix(i.as_ref()).ok())
                .unwrap_or(p)
                .to_owned()
        })
        .collect();
    compiler.open_files(&relative)?;

    let descriptors = out.join(DESCRIPTOR_FILE);
    fs::write(&descriptors, compiler.encode_file_descriptor_set()).map_err(io(&descriptors))?;

    let mut config = prost_build::Config::new();
    config.enable_type_names();
    // The SDK's prost, so the crate needs no prost of its own, nor one of the same version.
    config.prost_path("::jobwire::prost");
    config.prost_types_path("::jobwire::prost_types");
    config.extern_path(".jobwire.v1", "::jobwire::proto::v1");
    config
        .compile_fds(compiler.file_descriptor_set())
        .map_err(Error::Prost)?;

    let pool = compiler.descriptor_pool();
    let requested: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    let mut impls: BTreeMap<String, String> = BTreeMap::new();
    for file in pool
        .files()
        .filter(|f| requested.iter().any(|r| r == f.name()))
    {
        for message in file.messages() {
            if let Some(code) = job_type_impl(&message)? {
                impls
                    .entry(file.package_name().to_owned())
                    .or_default()
                    .push_str(&code);
            }
        }
    }
    for (package, code) in impls {
        let name = if package.is_empty() {
            "_".to_owned()
        } else {
            package.clone()
        };
        let path = out.join(format!("{name}.rs"));
        let mut generated = fs::read_to_string(&path).map_err(io(&path))?;
        let _ = write!(
            generated,
            "\n/// The encoded descriptors of this package's job types and their imports: the \
             schema their workers register.\npub const JOBWIRE_DESCRIPTOR_SET: &[u8] = \
             include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{DESCRIPTOR_FILE}\"));\n{code}"
        );
        fs::write(&path, generated).map_err(io(&path))?;
    }
    Ok(())
}

/// The `JobType` impl of a message with the option, or `None` without it.
fn job_type_impl(message: &MessageDescriptor) -> Result<Option<String>, Error> {
    let options = message.options();
    let Some(extension) = options
        .extensions()
        .find(|(ext, _)| ext.full_name() == "jobwire.v1.job")
        .map(|(_, value)| value.clone())
    else {
        return Ok(None);
    };
    let Value::Message(job) = extension else {
        return Ok(None);
    };
    let fail = |why: String| Error::Option {
        message: message.full_name().to_owned(),
        why,
    };
    let name = text(&job, "name");
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(fail(format!(
            "(jobwire.v1.job).name {name:?} must have 1 to 128 letters, digits, '.', '_', '-' \
             or ':'"
        )));
    }
    let package = message.package_name();
    let output = match text(&job, "output") {
        o if o.is_empty() => EMPTY.to_owned(),
        o if o.contains('.') => o,
        o if package.is_empty() => o,
        o => format!("{package}.{o}"),
    };
    let output_rust = if output == EMPTY {
        "()".to_owned()
    } else {
        let found = message
            .parent_pool()
            .get_message_by_name(&output)
            .ok_or_else(|| fail(format!("(jobwire.v1.job).output {output:?} is not defined")))?;
        if found.package_name() != package || found.parent_message().is_some() {
            return Err(fail(format!(
                "(jobwire.v1.job).output {output:?} must be a top-level message of package \
                 {package:?}, or google.protobuf.Empty"
            )));
        }
        found.name().to_upper_camel_case()
    };
    if message.parent_message().is_some() {
        return Err(fail(
            "(jobwire.v1.job) is allowed on top-level messages only".into(),
        ));
    }

    let mut schema = format!(
        "::jobwire::JobSchema::new({:?}, {output:?}, JOBWIRE_DESCRIPTOR_SET)",
        message.full_name()
    );
    let queue = text(&job, "default_queue");
    if !queue.is_empty() {
        let _ = write!(schema, ".queue({queue:?})");
    }
    if job.has_field_by_name("priority") {
        let priority = job
            .get_field_by_name("priority")
            .and_then(|v| v.as_i32())
            .unwrap_or_default();
        if !(0..=100).contains(&priority) {
            return Err(fail(format!(
                "(jobwire.v1.job).priority must be 0 to 100, got {priority}"
            )));
        }
        let _ = write!(schema, ".priority({priority})");
    }
    if let Some(attempts) = nested(&job, "retry_policy")
        .filter(|p| p.has_field_by_name("max_attempts"))
        .and_then(|p| p.get_field_by_name("max_attempts")?.as_i32())
    {
        let attempts = u32::try_from(attempts).map_err(|_| {
            fail("(jobwire.v1.job).retry_policy.max_attempts must be positive".into())
        })?;
        let _ = write!(schema, ".max_attempts({attempts})");
    }
    if let Some(timeout) = nested(&job, "timeout") {
        let seconds = timeout
            .get_field_by_name("seconds")
            .and_then(|v| v.as_i64())
            .unwrap_or_default();
        let nanos = timeout
            .get_field_by_name("nanos")
            .and_then(|v| v.as_i32())
            .unwrap_or_default();
        let millis = seconds.saturating_mul(1000) + i64::from(nanos / 1_000_000);
        if millis <= 0 {
            return Err(fail("(jobwire.v1.job).timeout must be positive".into()));
        }
        let _ = write!(schema, ".timeout_ms({millis})");
    }
    for (flag, method) in [
        ("idempotent_by_payload", ".idempotent_by_payload()"),
        ("needs_approval", ".needs_approval()"),
    ] {
        if job
            .get_field_by_name(flag)
            .and_then(|v| v.as_bool())
            .unwrap_or_default()
        {
            schema.push_str(method);
        }
    }
    if let Some(policy) = nested(&job, "retry_policy") {
        let rules: Vec<String> = list(&policy, "by_kind")
            .iter()
            .map(|rule| {
                let backoff = nested(rule, "backoff")
                    .map(|d| format!("::core::option::Option::Some({})", duration_ms(&d)))
                    .unwrap_or_else(|| "::core::option::Option::None".into());
                let never = rule
                    .get_field_by_name("never")
                    .and_then(|v| v.as_bool())
                    .unwrap_or_default();
                format!("({:?}, {never}, {backoff})", text(rule, "kind"))
            })
            .collect();
        if !rules.is_empty() {
            let _ = write!(schema, ".retry_rules(&[{}])", rules.join(", "));
        }
    }
    let conditions: Vec<String> = list(&job, "approval_when")
        .iter()
        .map(|c| {
            let equals: Vec<String> = c
                .get_field_by_name("equals")
                .and_then(|v| {
                    v.as_list().map(|l| {
                        l.iter()
                            .filter_map(|x| x.as_str())
                            .map(|x| format!("{x:?}"))
                            .collect()
                    })
                })
                .unwrap_or_default();
            format!("({:?}, &[{}])", text(c, "field"), equals.join(", "))
        })
        .collect();
    if !conditions.is_empty() {
        let _ = write!(schema, ".approval_when(&[{}])", conditions.join(", "));
    }
    if let Some(timeout) = nested(&job, "approval_timeout") {
        let _ = write!(schema, ".approval_timeout_ms({})", duration_ms(&timeout));
    }
    // APPROVAL_TIMEOUT_ACTION_FAIL.
    if job
        .get_field_by_name("on_approval_timeout")
        .and_then(|v| v.as_enum_number())
        == Some(2)
    {
        schema.push_str(".approval_timeout_fails()");
    }
    let rust_name = message.name().to_upper_camel_case();
    Ok(Some(format!(
        "\nimpl ::jobwire::JobType for {rust_name} {{\n    \
         const JOB_TYPE: &'static str = {name:?};\n    \
         type Output = {output_rust};\n    \
         const SCHEMA: ::core::option::Option<::jobwire::JobSchema> =\n        \
         ::core::option::Option::Some({schema});\n}}\n"
    )))
}

fn text(message: &DynamicMessage, field: &str) -> String {
    message
        .get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The messages of a repeated message field (empty when unset).
fn list(message: &DynamicMessage, field: &str) -> Vec<DynamicMessage> {
    message
        .get_field_by_name(field)
        .and_then(|v| {
            v.as_list()
                .map(|l| l.iter().filter_map(|x| x.as_message().cloned()).collect())
        })
        .unwrap_or_default()
}

/// A google.protobuf.Duration option in whole milliseconds (negative values as 0).
fn duration_ms(d: &DynamicMessage) -> u64 {
    let seconds = d
        .get_field_by_name("seconds")
        .and_then(|v| v.as_i64())
        .unwrap_or_default();
    let nanos = d
        .get_field_by_name("nanos")
        .and_then(|v| v.as_i32())
        .unwrap_or_default();
    u64::try_from(seconds.saturating_mul(1000) + i64::from(nanos / 1_000_000)).unwrap_or(0)
}

fn nested(message: &DynamicMessage, field: &str) -> Option<DynamicMessage> {
    if !message.has_field_by_name(field) {
        return None;
    }
    message
        .get_field_by_name(field)
        .and_then(|v| v.as_message().cloned())
}
