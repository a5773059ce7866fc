//! Rust SDK for jobwire, a durable job queue served over gRPC.
//!
//! A job type is a protobuf message (its payload) tied by the [`JobType`] trait to a name and an
//! output message. Producers enqueue payloads through a [`Client`] and get a typed
//! [`JobHandle`] back, which can wait for the typed result or stream the job's events (state
//! changes, progress, log lines) as they happen; workers register typed handlers on a
//! [`Worker`], which leases jobs from the server, runs them with bounded concurrency, carries
//! their progress, logs and checkpoints to the server, and reports their results.
//!
//! # Example
//!
//! ```no_run
//! use jobwire::{Client, HandlerError, JobContext, JobType, Worker};
//!
//! #[derive(Clone, PartialEq, prost::Message)]
//! struct Resize {
//!     #[prost(string, tag = "1")]
//!     url: String,
//!     #[prost(uint32, tag = "2")]
//!     width: u32,
//! }
//!
//! impl prost::Name for Resize {
//!     const NAME: &'static str = "Resize";
//!     const PACKAGE: &'static str = "example.v1";
//! }
//!
//! impl JobType for Resize {
//!     const JOB_TYPE: &'static str = "image.resize";
//!     // `()` is `google.protobuf.Empty`: for jobs whose only result is that they finished.
//!     type Output = ();
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // The producer side.
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let handle = client
//!     .enqueue(Resize { url: "https://example.com/a.png".into(), width: 64 })
//!     .queue("images")
//!     .await?;
//! handle.wait().await?;
//!
//! // The worker side, usually another process.
//! let worker = Worker::builder("http://127.0.0.1:50051")
//!     .queues(["images"])
//!     .concurrency(8)
//!     .register::<Resize, _, _>(|ctx: JobContext, job: Resize| async move {
//!         if job.width == 0 {
//!             return Err(HandlerError::fatal("width must be positive"));
//!         }
//!         ctx.progress(jobwire::Progress::fraction(1.0).message("resized"));
//!         Ok(())
//!     })
//!     .build()?;
//! worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Composition
//!
//! Three features compose jobs from what the server already offers, on the SDK's side alone:
//!
//! - **Item-based jobs** ([`items`]): a payload declares its items ([`ItemJob`]), a per-item
//!   handler is registered with [`WorkerBuilder::register_items`]; items run in order from the
//!   first unfinished one (the checkpoint holds the outcomes so far), progress is counted in
//!   items, and the result is every item's outcome ([`ItemResults`]).
//! - **Retry predicates** ([`retry`]): [`WorkerBuilder::retry_predicate`] (every job type) or
//!   [`WorkerBuilder::retry_predicate_for`] (one) decides from the error a handler returned
//!   whether the failure is retryable and its kind, such as retrying a 5xx and not a 4xx.
//! - **Recipes** ([`Recipe`]): a reusable enqueue profile applied with
//!   [`Client::enqueue_with`] or [`Enqueue::recipe`]; the call's own settings win.
//!
//! # Layout
//!
//! - [`client`]: the producer's side: enqueue, inspect, watch, wait for, pause, resume, cancel
//!   and retry jobs; administer queues ([`QueueRef`]) and cron schedules of typed jobs
//!   ([`ScheduleRef`]).
//! - [`worker`]: the worker runtime: one stream to the server, leases, heartbeats, reports,
//!   results, reconnects and graceful drain.
//! - [`context`]: what a handler learns about the attempt it runs, how it reports progress,
//!   logs and checkpoints, and how it is told to stop.
//! - [`job`]: the typed vocabulary both sides share: [`JobType`], [`JobId`], [`JobState`],
//!   [`RetryPolicy`], [`JobInfo`].
//! - [`report`]: what a running job says about itself: [`Progress`], [`ProgressInfo`],
//!   [`LogLevel`].
//! - [`event`]: typed job events, [`JobEvent`] and [`JobEventKind`].
//! - [`items`]: item-based jobs ([`ItemJob`], [`ItemOptions`]): items run in order, each done
//!   or failed, resumed from the first unfinished one, their outcomes the job's
//!   [`ItemResults`].
//! - [`retry`]: retry predicates, which decide from a handler's error whether its failure is
//!   retryable and its kind ("retry a 5xx, not a 4xx"), per worker or per job type.
//! - [`Recipe`]: a reusable enqueue profile (queue, priority, retry policy, labels, timeout,
//!   approval) shared by many job types.
//! - [`Tls`] and the `api_key` settings of [`ClientBuilder`] and [`WorkerBuilder`]: how both
//!   reach a server that serves TLS (an `https://` address) or asks for an API key.
//! - [`error`]: [`Error`] for calls that fail (and jobs that end badly), with the fields the
//!   server named at fault ([`Error::field_violations`]); [`HandlerError`] for handlers that fail.
//! - Tracing: with the `opentelemetry` feature, enqueues carry the caller's current span as W3C
//!   `traceparent` metadata, and each handler's `job` span is a child of the context its job was
//!   enqueued with, for the application's own OpenTelemetry pipeline to export.
//!
//! The client and the worker share nothing but the job vocabulary and the connection settings,
//! so a producer never pulls in the worker's machinery and the other way round.

mod backoff;
pub mod client;
pub mod context;
pub mod error;
pub mod event;
pub mod items;
pub mod job;
pub mod report;
pub mod retry;
mod trace;
mod transport;
pub mod worker;

pub use client::{
    CatchUpPolicy, Client, ClientBuilder, CreateSchedule, Enqueue, Enqueued, JobEvents, JobHandle,
    JobPage, ListJobs, NewJob, OverlapPolicy, QueueHealth, QueueInfo, QueueRef, RateLimit, Recipe,
    ScheduleInfo, ScheduleRef, UpdateQueue, UpdateSchedule, WatchJobs,
};
pub use context::{JobContext, Signal, StopReason};
pub use error::{Error, HandlerError, JobFailure};
pub use event::{Actor, JobEvent, JobEventKind};
pub use items::{ItemJob, ItemOptions, ItemResults, OnItemFailure};
pub use job::{JobError, JobId, JobInfo, JobSchema, JobState, JobType, RetryPolicy};
pub use report::{LogLevel, Progress, ProgressInfo};
pub use retry::{RetryDecision, RetryPredicate};
pub use transport::Tls;
pub use worker::{Worker, WorkerBuilder};

/// The generated protocol types, for what the typed API does not cover (such as
/// [`JobInfo::as_proto`]).
pub use jobwire_proto as proto;
/// Re-exported so that job types, generated by `jobwire-build` (whose code names
/// `::jobwire::prost`) or written by hand, use the SDK's version of prost without depending on
/// it themselves.
pub use prost;
/// Re-exported with [`prost`], for messages that use well-known types such as
/// `google.protobuf.Duration`.
pub use prost_types;
/// Re-exported so callers can name [`tonic::Code`] (see [`Error::code`]) and build their own
/// [`tonic::transport::Channel`] for [`Client::from_channel`] without a version mismatch.
pub use tonic;
