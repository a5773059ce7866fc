//! jobwire-server: a durable job queue served over gRPC, backed by PostgreSQL.
//!
//! # Layout
//!
//! - [`config`]: flags and environment, validated at start-up.
//! - [`domain`]: the names and states every layer shares.
//! - [`api`]: one file per gRPC service; validates, calls the store or the engine, maps errors
//!   to status codes once. Handlers hold no SQL and no timing.
//! - [`engine`]: the loops that own timing and batching (dispatcher, completer, notifier,
//!   leader election, reaper, scheduler, cron).
//! - [`registry`]: registered job types with their descriptors decoded and cached; JSON
//!   payloads checked and converted against them.
//! - [`store`]: every SQL statement.
//! - [`metrics`]: Prometheus metrics: names, labels, the records the code makes, `/metrics`.
//! - [`telemetry`]: OpenTelemetry: the OTLP export and the spans a job's trace context parents.
//! - [`memory`]: gives memory freed by ended streams back to the system.
//! - [`embedded_pg`]: the private PostgreSQL cluster used when no `DATABASE_URL` is given.
//! - [`tls`]: the listener's TLS settings, read and checked from their PEM files at start-up.
//! - [`server`]: wires the pieces together and runs them until shutdown.
//!
//! PostgreSQL holds all state, so any number of replicas can serve side by side.

pub mod api;
pub mod config;
pub mod domain;
pub mod embedded_pg;
pub mod engine;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
