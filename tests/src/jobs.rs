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

impl Sleep {
    /// A job that sleeps `millis` and succeeds, told apart by `seq`.
    pub fn succeeding(millis: u64, seq: u64) -> Self {
        Self {
            millis,
            seq,
            ..Default::default()
        }
    }
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

/// Counts `steps` steps of `step_millis` each, reporting progress and saving the step reached
/// as a checkpoint after each; resumes from the last checkpoint; stops when told to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Steps {
    #[prost(uint32, tag = "1")]
    pub steps: u32,
    #[prost(uint32, tag = "2")]
    pub step_millis: u32,
}

impl prost::Name for Steps {
    const NAME: &'static str = "Steps";
    const PACKAGE: &'static str = "jobwire.tests";
}

/// Where the attempt that finished started from, and where it ended.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StepsOutput {
    #[prost(uint32, tag = "1")]
    pub started_from: u32,
    #[prost(uint32, tag = "2")]
    pub reached: u32,
}

impl prost::Name for StepsOutput {
    const NAME: &'static str = "StepsOutput";
    const PACKAGE: &'static str = "jobwire.tests";
}

impl JobType for Steps {
    const JOB_TYPE: &'static str = "test.steps";
    type Output = StepsOutput;
}

/// The handler of [`Steps`].
pub async fn run_steps(ctx: JobContext, job: Steps) -> Result<StepsOutput, HandlerError> {
    let started_from = ctx
        .last_checkpoint()
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0);
    for step in started_from..job.steps {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(u64::from(job.step_millis))) => {}
            _ = ctx.cancelled() => return Err(HandlerError::retryable(format!("stopped at step {step}"))),
        }
        ctx.progress(
            jobwire::Progress::items(u64::from(step + 1), u64::from(job.steps))
                .message(format!("step {}", step + 1)),
        );
        ctx.checkpoint((step + 1).to_le_bytes().to_vec())
            .await
            .map_err(|e| HandlerError::retryable(e.to_string()))?;
    }
    Ok(StepsOutput {
        started_from,
        reached: job.steps,
    })
}

/// Reports progress `calls` times in a tight loop, then finishes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Spin {
    #[prost(uint32, tag = "1")]
    pub calls: u32,
}

impl prost::Name for Spin {
    const NAME: &'static str = "Spin";
    const PACKAGE: &'static str = "jobwire.tests";
}

impl JobType for Spin {
    const JOB_TYPE: &'static str = "test.spin";
    type Output = ();
}

/// The handler of [`Spin`].
pub async fn run_spin(ctx: JobContext, job: Spin) -> Result<(), HandlerError> {
    for done in 1..=job.calls {
        ctx.progress(jobwire::Progress::items(
            u64::from(done),
            u64::from(job.calls),
        ));
    }
    ctx.log(
        jobwire::LogLevel::Info,
        format!("reported {} times", job.calls),
    );
    Ok(())
}
