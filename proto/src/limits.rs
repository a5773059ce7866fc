//! The size budget of the protocol, shared by the server and the SDK.
//!
//! Every message either side sends fits [`MAX_MESSAGE_BYTES`], the receive limit most gRPC
//! implementations apply by default (grpc-go, grpc-java, Python's grpcio, grpcurl), so any
//! client can read anything jobwire sends without raising it. The per-field limits below are
//! chosen so that the largest message the protocol can produce stays within it; the proto
//! comments give the same numbers:
//! - a job read back whole (GetJob, a WatchJob state change) carries at most its payload and
//!   its result ([`MAX_PAYLOAD_BYTES`] each), their JSON renderings (each left out beyond
//!   [`MAX_RENDERED_JSON_BYTES`]), its attempt history (the newest attempts up to
//!   [`MAX_ATTEMPTS_BYTES`]) and small fields: under 3.5 MiB;
//! - a lease carries a payload and a checkpoint ([`MAX_PAYLOAD_BYTES`] each): under 2.1 MiB;
//! - list pages stop early at [`MAX_PAGE_BYTES`] and say where to go on.

/// The most any one message holds, in either direction: 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest payload, result or checkpoint: 1 MiB. A server may be set to accept less.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// A payload's or a result's rendering as JSON (`payload_json`, `result_json`) is left out of
/// a job when it would encode to more than this: the binary form is always there.
pub const MAX_RENDERED_JSON_BYTES: usize = 512 * 1024;

/// The attempt history a job's FULL view carries at most, newest attempts first to go in.
pub const MAX_ATTEMPTS_BYTES: usize = 256 * 1024;

/// A list page stops before the job, schedule or job type that would take it past this.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The most log text one ReportLogs message carries.
pub const MAX_LOG_BATCH_BYTES: usize = 1024 * 1024;

/// How deep messages may nest inside one another (prost's decoding limit).
pub const MAX_MESSAGE_NESTING: usize = 100;
