//! The seeds' job-type catalog (JOB_TYPES_DRAFT v0.1) as jobwire job types, with a reference
//! worker that serves all eleven of them.
//!
//! The contract lives in `proto/jobwire/catalog/v1/catalog.proto`: one payload message per job
//! type (the seed's `payload_json`, field for field) and one output message. Each payload
//! declares its job type there with the `(jobwire.v1.job)` option (name, output, default queue
//! and default priority), and `build.rs` compiles the file with `jobwire-build`, which generates
//! the `jobwire::JobType` impls: no job type is declared in Rust. This crate lists the types
//! ([`CATALOG`]), names the seed's two cron templates ([`schedules`]), and registers a handler
//! for every type on a [`jobwire::WorkerBuilder`] ([`register_all`]), whose worker registers the
//! types' schemas and defaults with the server when it connects.
//!
//! Only the three download jobs do real work: `download.fetch` streams an HTTP body into the
//! cache directory, `download.verify` checks a SHA-256, `download.cleanup` removes stale files.
//! A verify enqueued with `depends_on` its fetch (and naming the fetch's `target_filename`)
//! runs once the file is there, and whatever depends on the verify (an `update.apply.package`)
//! is cancelled, naming the verify, when the digest is wrong.
//! An `update.check.batch` of several ids fans out into one child batch per id, waits for them
//! without holding a worker slot, and gathers what they checked.
//! The other eight are plan-only stand-ins: they read their payload, run the seed's gates, log
//! what they would do and change nothing, and say so in their output (`plan_only = true`). A
//! real deployment replaces them one by one; the payloads and outputs stay.
//!
//! ```no_run
//! use jobwire_catalog::{idempotency_key, pb};
//!
//! # async fn demo(client: jobwire::Client) -> Result<(), jobwire::Error> {
//! let fetch = pb::DownloadFetch {
//!     source_url: "http://mirror.example/git.exe".into(),
//!     target_filename: "git.exe".into(),
//!     allow_untrusted_source: true,
//!     ..Default::default()
//! };
//! // Queue `downloads` and priority 70 are the type's registered defaults.
//! let handle = client
//!     .enqueue(fetch.clone())
//!     .idempotency_key(idempotency_key(&fetch))
//!     .await?;
//! let artifact = handle.wait().await?;
//! println!("{} bytes, sha256 {}", artifact.size_bytes, artifact.sha256);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`pb`]: the generated messages of `jobwire.catalog.v1` and their `JobType` impls.
//! - [`catalog`]: [`CATALOG`], every type with its generated schema and defaults; the seed's
//!   [`PriorityBand`]s; [`idempotency_key`], the seed's `job_type + payload_fingerprint`.
//! - [`schedules`]: the `daily_update_check` and `daily_registry_scan` cron templates.
//! - [`download`]: the fetch, verify and cleanup handlers, which own the cache directory.
//! - [`plan`]: the eight plan-only stand-ins.
//! - `src/bin/catalog-worker.rs`: a worker process serving the whole catalog.

pub mod catalog;
pub mod download;
pub mod plan;
pub mod schedules;

use std::path::PathBuf;
use std::sync::Arc;

pub use catalog::{CATALOG, CatalogEntry, PriorityBand, QUEUES, idempotency_key};
pub use download::Downloads;

/// The generated messages of `jobwire.catalog.v1`, with the `jobwire::JobType` impls that
/// `jobwire-build` generates from their `(jobwire.v1.job)` options.
#[allow(missing_docs, clippy::doc_markdown, clippy::doc_lazy_continuation)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/jobwire.catalog.v1.rs"));
}

/// Registers a handler for each of the catalog's eleven job types on `builder`, and makes it
/// take jobs from the queues they default to, [`QUEUES`] (replacing any set before; call
/// [`queues`](jobwire::WorkerBuilder::queues) afterwards to serve others).
///
/// The download handlers keep their files in `cache_dir`, which is created on first use. They
/// share one HTTP client (and so its connection pool); every handler runs on its own task, as
/// the worker runtime calls it.
pub fn register_all(builder: jobwire::WorkerBuilder, cache_dir: PathBuf) -> jobwire::WorkerBuilder {
    let downloads = Arc::new(Downloads::new(cache_dir));
    let fetch = Arc::clone(&downloads);
    let verify = Arc::clone(&downloads);
    let cleanup = downloads;
    builder
        .queues(QUEUES)
        .register::<pb::DownloadFetch, _, _>(move |ctx, job| {
            download::fetch::run(ctx, job, Arc::clone(&fetch))
        })
        .register::<pb::DownloadVerify, _, _>(move |ctx, job| {
            download::verify::run(ctx, job, Arc::clone(&verify))
        })
        .register::<pb::DownloadCleanup, _, _>(move |ctx, job| {
            download::cleanup::run(ctx, job, Arc::clone(&cleanup))
        })
        .register::<pb::DiscoveryScanRegistry, _, _>(plan::discovery_scan_registry)
        .register::<pb::SourceSuggestEnrich, _, _>(plan::source_suggest_enrich)
        .register::<pb::UpdateCheckBatch, _, _>(plan::update_check_batch)
        .register::<pb::UpdateApplyPackage, _, _>(plan::update_apply_package)
        .register::<pb::CleanupQuarantine, _, _>(plan::cleanup_quarantine)
        .register::<pb::AiAnalyze, _, _>(plan::ai_analyze)
        .register::<pb::AiRecommend, _, _>(plan::ai_recommend)
        .register::<pb::AiRepairPlan, _, _>(plan::ai_repair_plan)
}

/// A payload no attempt can succeed with: fatal, of kind `invalid_payload`.
pub(crate) fn invalid_payload(message: impl Into<String>) -> jobwire::HandlerError {
    jobwire::HandlerError::fatal(message).with_kind("invalid_payload")
}

/// The failure of a handler that was told to stop: retryable, since the job decides what
/// follows (a paused or timed-out job runs again, a cancelled one does not).
pub(crate) fn stopped(ctx: &jobwire::JobContext) -> jobwire::HandlerError {
    let reason = ctx
        .stop_reason()
        .map_or_else(|| "stopped".to_owned(), |reason| reason.to_string());
    jobwire::HandlerError::retryable(format!("stopped: {reason}"))
}
