//! The job type the end-to-end tests run, shared by the test binaries and the test worker.

use std::time::Duration;

use jobwire::{HandlerError, JobContext, JobType};

/// Sleeps, and fails its first `fail_times` attempts (fatally when `fatal`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sleep {
    #[prost(uint64, tag = "1")]
    pub millis: u64,
    #[prost(uint32, tag = "2")]
    pub fail_times: u32,
    #[prost(bool, tag = "3")]
    pub fatal: bool,
    /// Echoed in the output, so a test can tell jobs apart.
    #[prost(uint64, tag = "4")]
    pub seq: u64,
}

impl prost::Name for Sleep {
    const NAME: &'static str = "Sleep";
    const PACKAGE: &'static str = "jobwire.tests";
}

/// Who ran the attempt that succeeded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SleepOutput {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
    #[prost(string, tag = "3")]
    pub worker: String,
}

impl prost::Name for SleepOutput {
    const NAME: &'static str = "SleepOutput";
    const PACKAGE: &'static str = "jobwire.tests";
}

impl JobType for Sleep {
    const JOB_TYPE: &'static str = "test.sleep";
    type Output = SleepOutput;
}

/// The handler of [`Sleep`]: sleeps (stopping early when told to), fails as asked, and says
/// which worker and attempt succeeded.
pub async fn run_sleep(
    ctx: JobContext,
    job: Sleep,
    worker: String,
) -> Result<SleepOutput, HandlerError> {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(job.millis)) => {}
        _ = ctx.cancelled() => return Err(HandlerError::retryable("stopped")),
    }
    if ctx.attempt() <= job.fail_times {
        let message = format!("attempt {} failed", ctx.attempt());
        return Err(if job.fatal {
            HandlerError::fatal(message)
        } else {
            HandlerError::retryable(message)
        });
    }
    Ok(SleepOutput {
        seq: job.seq,
        attempt: ctx.attempt(),
        worker,
    })
}
