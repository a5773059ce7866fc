//! The bench's job types, shared by the producers (this process) and the worker subprocess: a
//! payload is how a producer tells the handler what to do and what to measure.

use jobwire::JobType;

/// Protobuf package of every bench payload.
const PACKAGE: &str = "jobwire.bench";

/// W1, W3: a job that does nothing, so the figures are the queue's own.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Noop {}

impl prost::Name for Noop {
    const NAME: &'static str = "Noop";
    const PACKAGE: &'static str = PACKAGE;
}

impl JobType for Noop {
    const JOB_TYPE: &'static str = "bench.noop";
    type Output = ();
}

/// W2: a job carrying the time its `EnqueueJob` call was issued; the handler prints it with the
/// time it started, and the difference is the pick-up latency.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stamp {
    /// The job's number in the run; 0 is the warm-up job, which is not measured.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// [`unix_nanos`](crate::clock::unix_nanos) when the producer issued the enqueue.
    #[prost(int64, tag = "2")]
    pub enqueued_unix_nanos: i64,
}

impl prost::Name for Stamp {
    const NAME: &'static str = "Stamp";
    const PACKAGE: &'static str = PACKAGE;
}

impl JobType for Stamp {
    const JOB_TYPE: &'static str = "bench.stamp";
    type Output = ();
}

/// W4: a job that reports progress `reports` times, `spacing_ms` apart, each report carrying
/// the time it was made under [`SENT_KEY`] in its data, and then succeeds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Beat {
    #[prost(uint32, tag = "1")]
    pub reports: u32,
    #[prost(uint32, tag = "2")]
    pub spacing_ms: u32,
}

impl prost::Name for Beat {
    const NAME: &'static str = "Beat";
    const PACKAGE: &'static str = PACKAGE;
}

impl JobType for Beat {
    const JOB_TYPE: &'static str = "bench.beat";
    type Output = ();
}

/// The key of a [`Beat`] report's data holding its `unix_nanos` send time (a JSON number, so
/// exact to about 0.3 µs).
pub const SENT_KEY: &str = "sent_unix_nanos";
