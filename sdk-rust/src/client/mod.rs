//! The producer's side of jobwire: enqueue typed jobs, then inspect, watch, wait for, pause,
//! resume, cancel and retry them through `JobService`; administer queues through
//! `QueueService` and recurring jobs through `ScheduleService`.
//!
//! A [`Client`] is a cheap, cloneable handle around one multiplexed HTTP/2 channel; clone it
//! into every task that needs it instead of connecting again. It never runs jobs: that is the
//! [`worker`](crate::worker)'s job, and the two share no state.
//!
//! - [`enqueue`](Client::enqueue) returns an [`Enqueue`] builder (queue, priority, schedule,
//!   retries, idempotency key, labels) that is sent by awaiting it.
//! - [`JobHandle`] is a job id that remembers its job type, so [`JobHandle::wait`] returns the
//!   typed output; [`JobHandle::watch`] streams its events.
//! - [`Recipe`] is a reusable enqueue profile (queue, priority, retry policy, labels, timeout,
//!   approval) for many job types: [`enqueue_with`](Client::enqueue_with) or
//!   [`Enqueue::recipe`].
//! - [`list_jobs`](Client::list_jobs) returns a [`ListJobs`] builder for filtered, paged reads.
//! - [`watch_jobs`](Client::watch_jobs) returns a [`WatchJobs`] builder for a filtered stream of
//!   every matching job's events.
//! - [`queue`](Client::queue) returns a [`QueueRef`] to read a queue's figures, pause it, or
//!   set its concurrency and rate limits ([`UpdateQueue`]).
//! - [`create_schedule`](Client::create_schedule) returns a [`CreateSchedule`] builder for a
//!   cron schedule of typed jobs; [`schedule`](Client::schedule) returns a [`ScheduleRef`] to
//!   change, pause, trigger or delete one.
//!
//! Event streams ([`JobEvents`]) reconnect and resume by themselves, so a consumer sees every
//! event once, in order, across server restarts.

mod builder;
mod enqueue;
mod handle;
mod list;
mod queues;
mod recipe;
mod schedules;
mod watch;

pub use builder::ClientBuilder;
pub use enqueue::{Enqueue, Enqueued, NewJob};

use enqueue::sealed::Sealed as _;
pub use handle::JobHandle;
pub use list::{JobPage, ListJobs};
pub use queues::{QueueHealth, QueueInfo, QueueRef, RateLimit, UpdateQueue};
pub use recipe::Recipe;
pub use schedules::{
    CatchUpPolicy, CreateSchedule, OverlapPolicy, ScheduleInfo, ScheduleRef, UpdateSchedule,
};
pub use watch::{JobEvents, WatchJobs};

use tonic::transport::Channel;

use crate::Error;
use crate::job::{JobId, JobInfo, JobState, JobType};
use crate::proto::v1 as pb;
use crate::proto::v1::job_service_client::JobServiceClient;
use crate::proto::v1::queue_service_client::QueueServiceClient;
use crate::proto::v1::schedule_service_client::ScheduleServiceClient;
use crate::transport::Headers;

/// A connection to a jobwire server for enqueueing and managing jobs, queues and schedules.
///
/// Every call acts within one tenant: the one set with [`with_tenant`](Self::with_tenant), or
/// the server's `default` tenant. Every call carries the API key set with
/// [`ClientBuilder::api_key`] or [`with_api_key`](Self::with_api_key), if any.
#[derive(Debug, Clone)]
pub struct Client {
    /// The connection every service client below shares, kept for [`channel`](Self::channel).
    channel: Channel,
    /// Cloned per call: tonic clients take `&mut self`, and a clone shares the channel.
    jobs: JobServiceClient<Channel>,
    /// On the same channel as `jobs`, so administering queues opens no other connection.
    queues: QueueServiceClient<Channel>,
    /// On the same channel as `jobs`.
    schedules: ScheduleServiceClient<Channel>,
    /// Tenant and API key, put on every request by [`Headers::request`].
    headers: Headers,
}

impl Client {
    /// Connects to the server at `url` (such as `http://127.0.0.1:50051`), with no API key and
    /// the system's root certificates for an `https://` address; see [`builder`](Self::builder)
    /// for those.
    ///
    /// The first connection is made now, so a wrong address fails here rather than on the first
    /// call; later the channel reconnects by itself after the server restarts.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `url` is not a valid address, [`Error::Transport`] when the
    /// server cannot be reached.
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a client for the server at `url` (`http://host:port` for plaintext,
    /// `https://host:port` for TLS): its tenant, API key and TLS settings.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url.into())
    }

    /// A client over a channel built by the caller, for settings the SDK does not choose
    /// (timeouts, load balancing). Set the tenant and API key with
    /// [`with_tenant`](Self::with_tenant) and [`with_api_key`](Self::with_api_key).
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_headers(channel, Headers::default())
    }

    pub(crate) fn with_headers(channel: Channel, headers: Headers) -> Self {
        Self {
            jobs: JobServiceClient::new(channel.clone()),
            queues: QueueServiceClient::new(channel.clone()),
            schedules: ScheduleServiceClient::new(channel.clone()),
            channel,
            headers,
        }
    }

    /// The same client acting within `tenant` (sent as the `jobwire-tenant` header).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `tenant` is empty or not a valid header value.
    pub fn with_tenant(mut self, tenant: impl AsRef<str>) -> Result<Self, Error> {
        self.headers = self.headers.with_tenant(tenant.as_ref())?;
        Ok(self)
    }

    /// The same client sending `key` on every call (as `authorization: Bearer <key>`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `key` is empty or holds anything but visible ASCII.
    pub fn with_api_key(mut self, key: impl AsRef<str>) -> Result<Self, Error> {
        self.headers = self.headers.with_api_key(key.as_ref())?;
        Ok(self)
    }

    /// The tenant set with [`with_tenant`](Self::with_tenant), if any.
    pub fn tenant(&self) -> Option<&str> {
        self.headers.tenant()
    }

    /// The channel this client calls through, for what the typed API does not cover: build a
    /// generated client of [`crate::proto`] on it (a clone shares the connection, and its TLS
    /// settings) and wrap each message with [`request`](Self::request).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Wraps `message` in a request carrying this client's tenant and API key, for a call
    /// through a generated client on [`channel`](Self::channel).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.headers.request(message)
    }

    /// The events of the job with this id, as [`JobHandle::watch_from`] streams them, for a
    /// caller that does not know the job's type (such as a command-line tool): every event after
    /// `after_sequence` (0: from the job's beginning), once and in order, ending after its
    /// terminal state change.
    pub fn watch_job(&self, id: impl Into<JobId>, after_sequence: i64) -> JobEvents {
        watch::job_events(self.clone(), id.into(), after_sequence)
    }

    /// The events of a job and of its children (the jobs it enqueued with
    /// [`JobContext::enqueue_children`](crate::JobContext::enqueue_children)), interleaved in
    /// order, ending after the job's own terminal state change.
    pub fn watch_job_and_children(&self, id: impl Into<JobId>, after_sequence: i64) -> JobEvents {
        watch::family_events(self.clone(), id.into(), after_sequence)
    }

    /// Starts an enqueue of `payload`; set options on the builder, then await it (or call
    /// [`Enqueue::send`]).
    pub fn enqueue<J: JobType>(&self, payload: J) -> Enqueue<J> {
        Enqueue::new(self.clone(), payload)
    }

    /// Starts an enqueue of `payload` with `recipe`'s settings; options set on the builder
    /// win over the recipe's. The same as `enqueue(payload).recipe(recipe)`.
    pub fn enqueue_with<J: JobType>(&self, recipe: &Recipe, payload: J) -> Enqueue<J> {
        self.enqueue(payload).recipe(recipe)
    }

    /// Enqueues many jobs of one type in one transaction: all of them, or none when any is
    /// invalid. The results are in the order of `jobs`.
    ///
    /// Each job is a bare payload (server defaults for every option) or an [`Enqueue`] builder;
    /// a builder is only read for its options, and the batch goes through `self` whichever
    /// client made it.
    ///
    /// ```no_run
    /// # async fn demo<J: jobwire::JobType>(client: jobwire::Client, a: J, b: J) -> Result<(), jobwire::Error> {
    /// let plain = client.enqueue_many(vec![a]).await?;
    /// let keyed = client.enqueue_many([client.enqueue(b).idempotency_key("b-1")]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] when any job is invalid (then none was stored),
    /// [`Error::Encode`] when a payload cannot be encoded.
    pub async fn enqueue_many<I>(
        &self,
        jobs: I,
    ) -> Result<Vec<Enqueued<<I::Item as NewJob>::Job>>, Error>
    where
        I: IntoIterator,
        I::Item: NewJob,
    {
        self.enqueue_specs(specs(jobs)?, None).await
    }

    /// Reads every child of `parent`, oldest first, a page of the most a page holds at a time.
    pub(crate) async fn children(&self, parent: &JobId) -> Result<Vec<JobInfo>, Error> {
        let mut children = Vec::new();
        let mut token = None;
        loop {
            let mut list = self.list_jobs().parent(parent).page_size(1000);
            if let Some(token) = token.take() {
                list = list.page_token(token);
            }
            let page = list.send().await?;
            let next = page.next_page_token().map(str::to_owned);
            children.extend(page.into_jobs());
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        // Ids are version 7 UUIDs: in creation order once sorted (listings are newest first).
        children.sort_by(|a, b| a.id().as_str().cmp(b.id().as_str()));
        Ok(children)
    }

    /// Stores jobs already in their request form, as children of `parent` when it is given
    /// (the lease of the running attempt enqueuing them).
    pub(crate) async fn enqueue_specs<J: JobType>(
        &self,
        jobs: Vec<pb::JobSpec>,
        parent: Option<pb::LeaseRef>,
    ) -> Result<Vec<Enqueued<J>>, Error> {
        let mut request = self
            .headers
            .request(pb::EnqueueJobsRequest { jobs, parent });
        crate::trace::inject(&mut request);
        let response = self.jobs.clone().enqueue_jobs(request).await?.into_inner();
        response
            .jobs
            .into_iter()
            .map(|job| {
                Ok(Enqueued::new(
                    self.job(job.id),
                    JobState::from_proto(job.state)?,
                    job.created,
                ))
            })
            .collect()
    }

    /// A handle to an existing job, typed by the caller; nothing is checked until it is used.
    pub fn job<J: JobType>(&self, id: impl Into<JobId>) -> JobHandle<J> {
        JobHandle::new(self.clone(), id.into())
    }

    /// The job with this id, with its attempt history.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when no such job exists in this tenant.
    pub async fn get_job(&self, id: impl AsRef<str>) -> Result<JobInfo, Error> {
        self.fetch(id.as_ref(), pb::JobView::Full).await
    }

    /// Starts a listing of jobs, newest first; set filters on the builder, then
    /// [`send`](ListJobs::send) it.
    pub fn list_jobs(&self) -> ListJobs {
        ListJobs::new(self.clone())
    }

    /// Cancels a job that has not finished: a queued one at once, a running one through its
    /// worker. Returns the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job already finished, `NotFound` when
    /// it does not exist.
    pub async fn cancel_job(
        &self,
        id: impl AsRef<str>,
        reason: impl Into<String>,
    ) -> Result<JobInfo, Error> {
        let request = pb::CancelJobRequest {
            id: id.as_ref().to_owned(),
            reason: reason.into(),
        };
        let response = self
            .jobs
            .clone()
            .cancel_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Makes a FAILED or CANCELLED job available again with a fresh set of attempts. Returns the
    /// job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job is not FAILED or CANCELLED.
    pub async fn retry_job(&self, id: impl AsRef<str>) -> Result<JobInfo, Error> {
        let request = pb::RetryJobRequest {
            id: id.as_ref().to_owned(),
        };
        let response = self
            .jobs
            .clone()
            .retry_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Holds a job that has not finished: a queued one is PAUSED at once; a running one is
    /// asked to checkpoint and stop, and becomes PAUSED when it has (or when its lease lapses).
    /// A pause uses none of the job's attempts. Returns the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job cannot be paused (say, it already
    /// finished), `NotFound` when it does not exist.
    pub async fn pause_job(
        &self,
        id: impl AsRef<str>,
        reason: impl Into<String>,
    ) -> Result<JobInfo, Error> {
        let request = pb::PauseJobRequest {
            id: id.as_ref().to_owned(),
            reason: reason.into(),
        };
        let response = self
            .jobs
            .clone()
            .pause_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Makes a PAUSED job AVAILABLE again; its next attempt receives its last checkpoint.
    /// Returns the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job is not PAUSED, `NotFound` when it
    /// does not exist.
    pub async fn resume_job(&self, id: impl AsRef<str>) -> Result<JobInfo, Error> {
        let request = pb::ResumeJobRequest {
            id: id.as_ref().to_owned(),
        };
        let response = self
            .jobs
            .clone()
            .resume_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Lets a job AWAITING_APPROVAL run (AVAILABLE, or SCHEDULED until its time). `reason` is
    /// kept in its history. Returns the job after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job does not await approval.
    pub async fn approve_job(
        &self,
        id: impl AsRef<str>,
        reason: impl Into<String>,
    ) -> Result<JobInfo, Error> {
        let request = pb::ApproveJobRequest {
            id: id.as_ref().to_owned(),
            reason: reason.into(),
        };
        let response = self
            .jobs
            .clone()
            .approve_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Delivers a signal named `name`, with `payload` if given, to a job that has not ended; a
    /// handler waiting for it ([`JobContext::wait_signal`](crate::JobContext::wait_signal))
    /// runs again with it. With a `request_id`, a repeat of the call stores nothing more.
    /// Returns the signal's place among the job's signals of its name (1 for the first).
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job has ended, `NotFound` when there
    /// is no such job; [`Error::BadRequest`] for a bad name or an oversized payload.
    pub async fn signal_job(
        &self,
        id: impl AsRef<str>,
        name: impl Into<String>,
        payload: Option<prost_types::Any>,
        request_id: Option<&str>,
    ) -> Result<u32, Error> {
        let request = pb::SignalJobRequest {
            id: id.as_ref().to_owned(),
            name: name.into(),
            payload,
            request_id: request_id.unwrap_or_default().to_owned(),
        };
        let response = self
            .jobs
            .clone()
            .signal_job(self.headers.request(request))
            .await?
            .into_inner();
        Ok(u32::try_from(response.number).unwrap_or(0))
    }

    /// Refuses a job AWAITING_APPROVAL: it ends CANCELLED and never runs. Returns the job
    /// after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `FailedPrecondition` when the job does not await approval.
    pub async fn reject_job(
        &self,
        id: impl AsRef<str>,
        reason: impl Into<String>,
    ) -> Result<JobInfo, Error> {
        let request = pb::RejectJobRequest {
            id: id.as_ref().to_owned(),
            reason: reason.into(),
        };
        let response = self
            .jobs
            .clone()
            .reject_job(self.headers.request(request))
            .await?
            .into_inner();
        job_info(response.job)
    }

    /// Starts a watch of every job's events, filtered on the builder; call
    /// [`stream`](WatchJobs::stream) for the events.
    pub fn watch_jobs(&self) -> WatchJobs {
        WatchJobs::new(self.clone())
    }

    /// The tenant's queues by name, with their figures, from every page: a tenant has few
    /// queues, unlike jobs, so they are read in full.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] when the server refuses a page.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, Error> {
        let mut queues = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListQueuesRequest {
                page_size: MAX_PAGE_SIZE,
                page_token,
            };
            let response = self
                .queues
                .clone()
                .list_queues(self.headers.request(request))
                .await?
                .into_inner();
            queues.extend(response.queues.into_iter().map(QueueInfo::from_proto));
            if response.next_page_token.is_empty() {
                return Ok(queues);
            }
            page_token = response.next_page_token;
        }
    }

    /// A handle to a queue of this tenant; nothing is checked until it is used.
    pub fn queue(&self, name: impl Into<String>) -> QueueRef {
        QueueRef::new(self.clone(), name.into())
    }

    /// Starts the creation of a schedule that enqueues `payload` as a `J` job on each tick of
    /// `cron` (5 fields, or 6 with seconds first); set options on the builder, then await it
    /// (or call [`CreateSchedule::send`]).
    pub fn create_schedule<J: JobType>(
        &self,
        name: impl Into<String>,
        cron: impl Into<String>,
        payload: J,
    ) -> CreateSchedule<J> {
        CreateSchedule::new(self.clone(), name.into(), cron.into(), payload)
    }

    /// The tenant's schedules by name, from every page: a tenant has few schedules, unlike
    /// jobs, so they are read in full.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] when the server refuses a page, [`Error::Protocol`] when a schedule has
    /// a policy this SDK does not know.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let mut schedules = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListSchedulesRequest {
                page_size: MAX_PAGE_SIZE,
                page_token,
            };
            let response = self
                .schedules
                .clone()
                .list_schedules(self.headers.request(request))
                .await?
                .into_inner();
            for schedule in response.schedules {
                schedules.push(ScheduleInfo::from_proto(schedule)?);
            }
            if response.next_page_token.is_empty() {
                return Ok(schedules);
            }
            page_token = response.next_page_token;
        }
    }

    /// A handle to a schedule of this tenant; nothing is checked until it is used.
    pub fn schedule(&self, name: impl Into<String>) -> ScheduleRef {
        ScheduleRef::new(self.clone(), name.into())
    }

    /// One `GetJob` call with the given view.
    async fn fetch(&self, id: &str, view: pb::JobView) -> Result<JobInfo, Error> {
        job_info(self.fetch_raw(id, view).await?.job)
    }

    /// One `GetJob` call, keeping the status so a caller can tell a transport failure from the
    /// server's answer.
    async fn fetch_raw(
        &self,
        id: &str,
        view: pb::JobView,
    ) -> Result<pb::GetJobResponse, tonic::Status> {
        let request = pb::GetJobRequest {
            id: id.to_owned(),
            view: view as i32,
        };
        Ok(self
            .jobs
            .clone()
            .get_job(self.headers.request(request))
            .await?
            .into_inner())
    }

    /// One `EnqueueJob` call.
    async fn enqueue_one(&self, spec: pb::JobSpec) -> Result<pb::EnqueueJobResponse, Error> {
        let mut request = self.headers.request(pb::EnqueueJobRequest {
            job: Some(spec),
            parent: None,
        });
        crate::trace::inject(&mut request);
        Ok(self.jobs.clone().enqueue_job(request).await?.into_inner())
    }

    /// One `ListJobs` call.
    async fn list(&self, request: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, Error> {
        Ok(self
            .jobs
            .clone()
            .list_jobs(self.headers.request(request))
            .await?
            .into_inner())
    }
}

/// The largest page the list calls allow, so that reading a whole listing takes the fewest
/// round trips.
const MAX_PAGE_SIZE: i32 = 1000;

/// Names `path` in an update's field mask once, however often its setter is called.
fn mask_path(mask: &mut prost_types::FieldMask, path: &str) {
    if !mask.paths.iter().any(|named| named == path) {
        mask.paths.push(path.to_owned());
    }
}

/// A `u32` for an `int32` field; saturating keeps an absurd value absurd, so the server names
/// the field.
fn saturating_int32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The job every single-job response carries.
fn job_info(job: Option<pb::Job>) -> Result<JobInfo, Error> {
    JobInfo::from_proto(job.ok_or_else(|| Error::Protocol("the response has no job".into()))?)
}

/// Jobs for an enqueue in their request form.
pub(crate) fn specs<I>(jobs: I) -> Result<Vec<pb::JobSpec>, Error>
where
    I: IntoIterator,
    I::Item: NewJob,
{
    jobs.into_iter().map(|job| job.into_spec()).collect()
}
