//! Typed handles to enqueued jobs: watching them, waiting for their outcome, and controlling
//! them.
//!
//! A handle is only a job id plus the job type it was enqueued as, so it is cheap to clone,
//! store and rebuild from an id ([`Client::job`]). Waiting follows the job's `WatchJob` event
//! stream until its terminal state change, so a waiter learns the outcome as soon as the server
//! records it; against a server that does not offer `WatchJob` yet (`Unimplemented`) it polls
//! `GetJob` with a backoff instead.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use futures::StreamExt;

use crate::Error;
use crate::backoff::Backoff;
use crate::client::Client;
use crate::client::watch::{self, JobEvents};
use crate::error::JobFailure;
use crate::event::{JobEvent, JobEventKind};
use crate::job::{self, JobId, JobInfo, JobState, JobType};
use crate::proto::v1 as pb;

/// The first delay between two polls of a waited-on job: short, because most jobs that are
/// waited on are quick.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// The longest delay between two polls, which bounds how late a poll notices the outcome.
const MAX_POLL: Duration = Duration::from_millis(500);

/// A job of type `J` on the server.
pub struct JobHandle<J: JobType> {
    client: Client,
    id: JobId,
    /// `fn() -> J` keeps the handle `Send + Sync` and free of `J`'s drop check: it holds no `J`.
    job_type: PhantomData<fn() -> J>,
}

impl<J: JobType> JobHandle<J> {
    pub(super) fn new(client: Client, id: JobId) -> Self {
        Self {
            client,
            id,
            job_type: PhantomData,
        }
    }

    /// The job's id.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// A snapshot of the job, with its attempt history.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the job does not exist in the client's tenant.
    pub async fn get(&self) -> Result<JobInfo, Error> {
        self.client.get_job(&self.id).await
    }

    /// The job's events from its beginning: state changes, progress, log lines and stop
    /// requests, each exactly once and in order, across reconnects. The stream ends after the
    /// job's terminal state change (SUCCEEDED, FAILED or CANCELLED); see [`JobEvents`] for when
    /// it gives up instead.
    pub fn watch(&self) -> JobEvents {
        self.watch_from(0)
    }

    /// The job's events after `after_sequence` (such as the [`JobEvent::sequence`] of the last
    /// one seen), as for [`watch`](Self::watch).
    pub fn watch_from(&self, after_sequence: i64) -> JobEvents {
        watch::job_events(self.client.clone(), self.id.clone(), after_sequence)
    }

    /// Waits until the job finishes and returns its typed output.
    ///
    /// Follows the job's events ([`watch`](Self::watch)) until its terminal state change. A
    /// server that is unreachable or restarting does not end the wait, however long it lasts
    /// (the stream resumes where it left off); an error status the server sends about the job
    /// does. Wrap the call in [`tokio::time::timeout`] to bound it.
    ///
    /// # Errors
    ///
    /// [`Error::JobFailed`] when the job ends FAILED or CANCELLED, [`Error::Decode`] when its
    /// result is not a `J::Output`, [`Error::Rpc`] when the server refuses the watch (such as
    /// `NotFound`).
    pub async fn wait(&self) -> Result<J::Output, Error> {
        let mut events = self.watch().give_up_after(Duration::MAX);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) if event.is_terminal() => return self.settle(&event).await,
                Ok(_) => {}
                Err(error) if error.code() == Some(tonic::Code::Unimplemented) => {
                    tracing::debug!(job_id = %self.id, "WatchJob is not offered; polling");
                    return self.poll().await;
                }
                Err(error) => return Err(error),
            }
        }
        // The stream ended without the terminal change: the job finished beyond its reach.
        self.poll().await
    }

    /// Cancels the job if it has not finished; returns it after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job already finished.
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<JobInfo, Error> {
        self.client.cancel_job(&self.id, reason).await
    }

    /// Holds the job: a queued one is PAUSED at once; a running one is asked to checkpoint and
    /// stop, and becomes PAUSED when it has. A pause uses none of the job's attempts. Returns
    /// the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job cannot be paused (say, it already
    /// finished).
    pub async fn pause(&self, reason: impl Into<String>) -> Result<JobInfo, Error> {
        self.client.pause_job(&self.id, reason).await
    }

    /// Makes a PAUSED job available again; its next attempt starts from its last checkpoint.
    /// Returns the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job is not PAUSED.
    pub async fn resume(&self) -> Result<JobInfo, Error> {
        self.client.resume_job(&self.id).await
    }

    /// Makes a FAILED or CANCELLED job available again with a fresh set of attempts; returns it
    /// after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job is not FAILED or CANCELLED.
    pub async fn retry(&self) -> Result<JobInfo, Error> {
        self.client.retry_job(&self.id).await
    }

    /// The outcome a terminal event announces: a failure from the event itself, a result from
    /// the event's snapshot of the job, or from reading the job when the snapshot lacks it.
    async fn settle(&self, event: &JobEvent) -> Result<J::Output, Error> {
        if let Some(failure) = event.failure() {
            return Err(Error::JobFailed(Box::new(failure)));
        }
        if let JobEventKind::StateChanged { job: Some(job), .. } = event.kind()
            && job.as_proto().result.is_some()
        {
            return job::decode(job.as_proto().result.as_ref(), "job result");
        }
        self.poll().await
    }

    /// Polls `GetJob` every 10 ms at first, backing off to every 500 ms, until the job has
    /// finished. Failures of the transport do not end it; a status the server sends does.
    async fn poll(&self) -> Result<J::Output, Error> {
        let mut backoff = Backoff::new(FIRST_POLL, MAX_POLL);
        loop {
            match self
                .client
                .fetch_raw(self.id.as_str(), pb::JobView::Basic)
                .await
            {
                Ok(response) => {
                    if let Some(outcome) = outcome::<J>(&super::job_info(response.job)?) {
                        return outcome;
                    }
                }
                Err(status) if is_transient(&status) => {
                    tracing::debug!(job_id = %self.id, %status, "server unreachable while waiting");
                }
                Err(status) => return Err(status.into()),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

impl<J: JobType> Clone for JobHandle<J> {
    fn clone(&self) -> Self {
        Self::new(self.client.clone(), self.id.clone())
    }
}

impl<J: JobType> fmt::Debug for JobHandle<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle")
            .field("id", &self.id)
            .field("job_type", &J::JOB_TYPE)
            .finish()
    }
}

/// Whether a failed call says nothing about the job: the server was unavailable, or the
/// connection broke under the call (tonic reports that as `Unknown` with the transport error as
/// its source, whereas a status the server sent has no source).
fn is_transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Cancelled => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// What a snapshot says about the end of the job: `None` while it may still run.
fn outcome<J: JobType>(job: &JobInfo) -> Option<Result<J::Output, Error>> {
    match job.state() {
        JobState::Succeeded => Some(job::decode(job.as_proto().result.as_ref(), "job result")),
        _ => JobFailure::from_info(job).map(|failure| Err(Error::JobFailed(Box::new(failure)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Sum {
        #[prost(int64, repeated, tag = "1")]
        terms: Vec<i64>,
    }

    impl prost::Name for Sum {
        const NAME: &'static str = "Sum";
        const PACKAGE: &'static str = "jobwire.test";
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Total {
        #[prost(int64, tag = "1")]
        value: i64,
    }

    impl prost::Name for Total {
        const NAME: &'static str = "Total";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Sum {
        const JOB_TYPE: &'static str = "test.sum";
        type Output = Total;
    }

    fn job(state: pb::JobState) -> pb::Job {
        pb::Job {
            id: "j1".into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn info(job: pb::Job) -> JobInfo {
        JobInfo::from_proto(job).expect("valid job")
    }

    #[test]
    fn only_transport_failures_are_transient() {
        assert!(is_transient(&tonic::Status::unavailable(
            "connection refused"
        )));
        let broken = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        assert_eq!(broken.code(), tonic::Code::Unknown);
        assert!(is_transient(&broken));
        assert!(!is_transient(&tonic::Status::unknown("the server failed")));
        assert!(!is_transient(&tonic::Status::not_found("no such job")));
    }

    #[test]
    fn unfinished_jobs_have_no_outcome() {
        for state in [
            pb::JobState::Available,
            pb::JobState::Running,
            pb::JobState::Retrying,
            pb::JobState::Scheduled,
        ] {
            assert!(outcome::<Sum>(&info(job(state))).is_none());
        }
    }

    #[test]
    fn success_decodes_the_typed_result() {
        let mut succeeded = job(pb::JobState::Succeeded);
        succeeded.result = Some(prost_types::Any::from_msg(&Total { value: 7 }).expect("encode"));
        let output = outcome::<Sum>(&info(succeeded)).and_then(Result::ok);
        assert_eq!(output, Some(Total { value: 7 }));
    }

    #[test]
    fn a_result_of_another_type_is_a_decode_error() {
        let mut succeeded = job(pb::JobState::Succeeded);
        succeeded.result =
            Some(prost_types::Any::from_msg(&Sum { terms: vec![1] }).expect("encode"));
        assert!(matches!(
            outcome::<Sum>(&info(succeeded)),
            Some(Err(Error::Decode { .. }))
        ));
    }

    #[test]
    fn failure_and_cancellation_are_typed_errors() {
        let mut failed = job(pb::JobState::Failed);
        failed.attempt = 3;
        failed.last_error = Some(pb::JobError {
            message: "disk full".into(),
            kind: "io".into(),
            retryable: true,
            attempt: 3,
            occurred_at: None,
        });
        let Some(Err(error)) = outcome::<Sum>(&info(failed)) else {
            panic!("expected an error");
        };
        let failure = error.job_failure().expect("job failure");
        assert_eq!(failure.state(), JobState::Failed);
        assert_eq!(failure.attempt(), 3);
        assert_eq!(failure.last_error().map(|e| e.message()), Some("disk full"));
        assert_eq!(
            error.to_string(),
            "job j1 failed after 3 attempt(s): io: disk full"
        );

        let mut cancelled = job(pb::JobState::Cancelled);
        cancelled.cancel_reason = "no longer needed".into();
        let Some(Err(error)) = outcome::<Sum>(&info(cancelled)) else {
            panic!("expected an error");
        };
        let failure = error.job_failure().expect("job failure");
        assert_eq!(failure.state(), JobState::Cancelled);
        assert_eq!(failure.cancel_reason(), Some("no longer needed"));
        assert_eq!(error.to_string(), "job j1 was cancelled: no longer needed");
    }
}
