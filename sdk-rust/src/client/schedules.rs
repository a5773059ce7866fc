//! Recurring jobs through `ScheduleService`: a cron expression, a time zone and a typed job
//! template, stored on the server.
//!
//! The server's elected scheduler creates each tick's job at most once, even across a failover,
//! so nothing runs on this side: a schedule outlives the client that created it. The template's
//! payload is encoded as an enqueue's is, under the job type's [`prost::Name`] type URL, so a
//! worker cannot tell a scheduled job from an enqueued one by its payload. As for enqueues, the
//! server checks cron syntax, time zones and ranges, and names the field at fault.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::Error;
use crate::client::Client;
use crate::job::{self, JobId, JobInfo, JobType, RetryPolicy};
use crate::proto::v1 as pb;

/// What a tick does while the job of the previous tick has not finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OverlapPolicy {
    /// Create the job anyway; runs may overlap. The server's default.
    #[default]
    Allow,
    /// Create no job for this tick.
    Skip,
    /// Cancel the previous job, then create this tick's.
    CancelPrevious,
}

impl OverlapPolicy {
    /// The policy as the protocol numbers it.
    pub fn to_proto(self) -> pb::OverlapPolicy {
        match self {
            Self::Allow => pb::OverlapPolicy::Allow,
            Self::Skip => pb::OverlapPolicy::Skip,
            Self::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
        }
    }

    /// Unspecified reads as the server's default; an unknown number is a protocol error.
    fn from_proto(value: i32) -> Result<Self, Error> {
        match pb::OverlapPolicy::try_from(value) {
            Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Allow) => Ok(Self::Allow),
            Ok(pb::OverlapPolicy::Skip) => Ok(Self::Skip),
            Ok(pb::OverlapPolicy::CancelPrevious) => Ok(Self::CancelPrevious),
            Err(_) => Err(Error::Protocol(format!("unknown overlap policy {value}"))),
        }
    }
}

/// What happens to ticks missed while no replica ran the schedules (all replicas down, or a
/// failover): ticks found due more than the misfire grace after their time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CatchUpPolicy {
    /// One job, for the latest missed tick. The server's default.
    #[default]
    Once,
    /// No job for a missed tick.
    Skip,
    /// One job for each missed tick, oldest first, at most
    /// [`max_catch_up`](CreateSchedule::max_catch_up) (the latest ones).
    All,
}

impl CatchUpPolicy {
    /// The policy as the protocol numbers it.
    pub fn to_proto(self) -> pb::CatchUpPolicy {
        match self {
            Self::Once => pb::CatchUpPolicy::Once,
            Self::Skip => pb::CatchUpPolicy::Skip,
            Self::All => pb::CatchUpPolicy::All,
        }
    }

    /// Unspecified reads as the server's default; an unknown number is a protocol error.
    fn from_proto(value: i32) -> Result<Self, Error> {
        match pb::CatchUpPolicy::try_from(value) {
            Ok(pb::CatchUpPolicy::Unspecified | pb::CatchUpPolicy::Once) => Ok(Self::Once),
            Ok(pb::CatchUpPolicy::Skip) => Ok(Self::Skip),
            Ok(pb::CatchUpPolicy::All) => Ok(Self::All),
            Err(_) => Err(Error::Protocol(format!("unknown catch-up policy {value}"))),
        }
    }
}

/// A snapshot of a schedule as the server stored it when asked.
///
/// The common fields have typed accessors; [`as_proto`](Self::as_proto) gives the whole
/// message (the job template's priority, retry policy, labels and timeout).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleInfo {
    overlap: OverlapPolicy,
    catch_up: CatchUpPolicy,
    schedule: pb::Schedule,
}

impl ScheduleInfo {
    /// Checks what the typed accessors rely on: the policies must be known ones.
    pub(super) fn from_proto(schedule: pb::Schedule) -> Result<Self, Error> {
        Ok(Self {
            overlap: OverlapPolicy::from_proto(schedule.overlap_policy)?,
            catch_up: CatchUpPolicy::from_proto(schedule.catch_up_policy)?,
            schedule,
        })
    }

    /// The id the server assigned; the jobs the schedule creates carry it
    /// ([`JobInfo::schedule_id`]).
    pub fn id(&self) -> &str {
        &self.schedule.id
    }

    /// The schedule's name, unique within its tenant.
    pub fn name(&self) -> &str {
        &self.schedule.name
    }

    /// The operators' description, if one was given.
    pub fn description(&self) -> Option<&str> {
        job::non_empty(&self.schedule.description)
    }

    /// The cron expression, such as `0 3 * * *`.
    pub fn cron(&self) -> &str {
        &self.schedule.cron
    }

    /// The IANA time zone the cron expression is read in, such as `Europe/Berlin`.
    pub fn time_zone(&self) -> &str {
        &self.schedule.time_zone
    }

    /// What a tick does while the previous tick's job has not finished.
    pub fn overlap(&self) -> OverlapPolicy {
        self.overlap
    }

    /// What happens to ticks missed while no replica ran the schedules.
    pub fn catch_up(&self) -> CatchUpPolicy {
        self.catch_up
    }

    /// For [`CatchUpPolicy::All`]: at most this many missed ticks run.
    pub fn max_catch_up(&self) -> u32 {
        job::count(self.schedule.max_catch_up)
    }

    /// How late a tick may be found and still count as on time.
    pub fn misfire_grace(&self) -> Option<Duration> {
        self.schedule
            .misfire_grace
            .and_then(|grace| Duration::try_from(grace).ok())
    }

    /// Whether a pause stops the schedule from creating jobs.
    pub fn is_paused(&self) -> bool {
        self.schedule.paused
    }

    /// The next tick; `None` while the schedule is paused.
    pub fn next_run_at(&self) -> Option<SystemTime> {
        job::system_time(self.schedule.next_run_at.as_ref())
    }

    /// The tick (or trigger) of the last job the schedule created, if it created any.
    pub fn last_run_at(&self) -> Option<SystemTime> {
        job::system_time(self.schedule.last_run_at.as_ref())
    }

    /// The last job the schedule created, if it created any.
    pub fn last_job_id(&self) -> Option<JobId> {
        job::non_empty(&self.schedule.last_job_id).map(JobId::from)
    }

    /// The type of the jobs the schedule creates.
    pub fn job_type(&self) -> &str {
        self.template().map_or("", |template| &template.job_type)
    }

    /// The queue the schedule's jobs go to.
    pub fn queue(&self) -> &str {
        self.template().map_or("", |template| &template.queue)
    }

    /// The payload every job of the schedule gets, decoded as `J`; fails when the schedule
    /// creates jobs of another type.
    pub fn payload<J: JobType>(&self) -> Result<J, Error> {
        job::decode(
            self.template()
                .and_then(|template| template.payload.as_ref()),
            "job payload",
        )
    }

    /// When the schedule was created.
    pub fn created_at(&self) -> Option<SystemTime> {
        job::system_time(self.schedule.created_at.as_ref())
    }

    /// When the schedule last changed.
    pub fn updated_at(&self) -> Option<SystemTime> {
        job::system_time(self.schedule.updated_at.as_ref())
    }

    /// The whole message as the server sent it.
    pub fn as_proto(&self) -> &pb::Schedule {
        &self.schedule
    }

    /// The whole message as the server sent it.
    pub fn into_proto(self) -> pb::Schedule {
        self.schedule
    }

    fn template(&self) -> Option<&pb::JobTemplate> {
        self.schedule.job.as_ref()
    }
}

/// A schedule about to be created; await it (or call [`send`](Self::send)) to store it.
///
/// Options left unset stay unset on the wire, so the server's defaults apply (time zone `UTC`,
/// queue `default`, [`OverlapPolicy::Allow`], [`CatchUpPolicy::Once`], a misfire grace of
/// 60 s).
///
/// ```no_run
/// # async fn demo(client: jobwire::Client, payload: impl jobwire::JobType) -> Result<(), jobwire::Error> {
/// use std::time::Duration;
/// use jobwire::{CatchUpPolicy, OverlapPolicy};
/// let schedule = client
///     .create_schedule("nightly-report", "0 3 * * *", payload)
///     .time_zone("Europe/Berlin")
///     .queue("reports")
///     .overlap(OverlapPolicy::Skip)
///     .catch_up(CatchUpPolicy::Once)
///     .timeout(Duration::from_secs(600))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a schedule is not created until it is awaited or sent"]
pub struct CreateSchedule<J: JobType> {
    client: Client,
    payload: J,
    /// Everything but the template's payload, which is encoded when the schedule is sent, as
    /// an enqueue's is.
    schedule: pb::Schedule,
    paused: bool,
}

impl<J: JobType> CreateSchedule<J> {
    pub(super) fn new(client: Client, name: String, cron: String, payload: J) -> Self {
        Self {
            client,
            payload,
            schedule: pb::Schedule {
                name,
                cron,
                job: Some(pb::JobTemplate {
                    job_type: J::JOB_TYPE.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            paused: false,
        }
    }

    /// The IANA time zone the cron expression is read in, such as `Europe/Berlin` (default
    /// `UTC`); daylight saving shifts the ticks with the wall clock.
    pub fn time_zone(mut self, time_zone: impl Into<String>) -> Self {
        self.schedule.time_zone = time_zone.into();
        self
    }

    /// Free text for operators (at most 1024 characters).
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.schedule.description = description.into();
        self
    }

    /// The queue the schedule's jobs go to (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.template().queue = queue.into();
        self
    }

    /// The priority of the schedule's jobs, 0 to 100, higher first (default 50); see
    /// [`Enqueue::priority`](crate::Enqueue::priority) for the bands.
    pub fn priority(mut self, priority: i32) -> Self {
        self.template().priority = Some(priority);
        self
    }

    /// How the schedule's jobs retry failed attempts; unset settings take the server's
    /// defaults.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.template().retry_policy = Some(policy.to_proto());
        self
    }

    /// Adds a label to every job of the schedule; a repeated key keeps the last value.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.template().labels.insert(key.into(), value.into());
        self
    }

    /// How long one attempt of each job may run (default: no limit).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.template().timeout = Some(job::duration_to_proto(timeout));
        self
    }

    /// What a tick does while the previous tick's job has not finished (default
    /// [`OverlapPolicy::Allow`]).
    pub fn overlap(mut self, policy: OverlapPolicy) -> Self {
        self.schedule.overlap_policy = policy.to_proto() as i32;
        self
    }

    /// What happens to ticks missed while no replica ran the schedules (default
    /// [`CatchUpPolicy::Once`]).
    pub fn catch_up(mut self, policy: CatchUpPolicy) -> Self {
        self.schedule.catch_up_policy = policy.to_proto() as i32;
        self
    }

    /// For [`CatchUpPolicy::All`]: at most this many missed ticks run, the latest ones (1 to
    /// 1000; default 100).
    pub fn max_catch_up(mut self, ticks: u32) -> Self {
        self.schedule.max_catch_up = super::saturating_int32(ticks);
        self
    }

    /// How late a tick may be found and still count as on time rather than missed (default
    /// 60 s, at most 1 day).
    pub fn misfire_grace(mut self, grace: Duration) -> Self {
        self.schedule.misfire_grace = Some(job::duration_to_proto(grace));
        self
    }

    /// Creates the schedule paused: it creates no job until it is resumed.
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// Stores the schedule and returns it as the server does, with its id and next tick.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `AlreadyExists` when the tenant has a schedule of that name,
    /// [`Error::BadRequest`] (naming the field) for a bad cron expression, time zone or range;
    /// [`Error::Encode`] when the payload cannot be encoded.
    pub async fn send(self) -> Result<ScheduleInfo, Error> {
        let client = self.client.clone();
        let request = client.headers.request(self.into_request()?);
        let response = client
            .schedules
            .clone()
            .create_schedule(request)
            .await?
            .into_inner();
        schedule_info(response.schedule)
    }

    /// The request as it goes on the wire, apart from the tenant header.
    fn into_request(mut self) -> Result<pb::CreateScheduleRequest, Error> {
        self.template().payload = Some(job::encode(&self.payload, "job payload")?);
        Ok(pb::CreateScheduleRequest {
            schedule: Some(self.schedule),
            paused: self.paused,
        })
    }

    fn template(&mut self) -> &mut pb::JobTemplate {
        self.schedule.job.get_or_insert_default()
    }
}

impl<J: JobType> IntoFuture for CreateSchedule<J> {
    type Output = Result<ScheduleInfo, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A schedule of the client's tenant, by name; nothing is checked until it is used.
#[derive(Debug, Clone)]
pub struct ScheduleRef {
    client: Client,
    name: String,
}

impl ScheduleRef {
    pub(super) fn new(client: Client, name: String) -> Self {
        Self { client, name }
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schedule as stored now.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name.
    pub async fn get(&self) -> Result<ScheduleInfo, Error> {
        let request = pb::GetScheduleRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .schedules
            .clone()
            .get_schedule(self.client.headers.request(request))
            .await?
            .into_inner();
        schedule_info(response.schedule)
    }

    /// Stops the schedule from creating jobs; ticks passed while it is paused are not caught
    /// up. Returns the schedule after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name.
    pub async fn pause(&self) -> Result<ScheduleInfo, Error> {
        let request = pb::PauseScheduleRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .schedules
            .clone()
            .pause_schedule(self.client.headers.request(request))
            .await?
            .into_inner();
        schedule_info(response.schedule)
    }

    /// Lets a paused schedule create jobs again, from its next tick after now. Returns the
    /// schedule after the change.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name.
    pub async fn resume(&self) -> Result<ScheduleInfo, Error> {
        let request = pb::ResumeScheduleRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .schedules
            .clone()
            .resume_schedule(self.client.headers.request(request))
            .await?
            .into_inner();
        schedule_info(response.schedule)
    }

    /// Deletes the schedule; the jobs it created are kept.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name.
    pub async fn delete(&self) -> Result<(), Error> {
        let request = pb::DeleteScheduleRequest {
            name: self.name.clone(),
        };
        self.client
            .schedules
            .clone()
            .delete_schedule(self.client.headers.request(request))
            .await?;
        Ok(())
    }

    /// Creates a job from the schedule's template now, outside its ticks and whatever its
    /// overlap policy; the next tick is unchanged. Returns the new job, whose
    /// [`schedule_tick`](JobInfo::schedule_tick) is `None`.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name.
    pub async fn trigger(&self) -> Result<JobInfo, Error> {
        let request = pb::TriggerScheduleRequest {
            name: self.name.clone(),
        };
        let response = self
            .client
            .schedules
            .clone()
            .trigger_schedule(self.client.headers.request(request))
            .await?
            .into_inner();
        super::job_info(response.job)
    }

    /// Starts a change of the schedule; set the fields to change on the builder, then await it
    /// (or call [`UpdateSchedule::send`]).
    pub fn update(&self) -> UpdateSchedule {
        UpdateSchedule::new(self.client.clone(), self.name.clone())
    }
}

/// A change of a schedule about to be sent; await it (or call [`send`](Self::send)).
///
/// Only the fields set on the builder change: each setter names its field in the request's
/// update mask. A new cron expression or time zone takes effect from now.
///
/// ```no_run
/// # async fn demo(client: jobwire::Client) -> Result<(), jobwire::Error> {
/// let schedule = client
///     .schedule("nightly-report")
///     .update()
///     .cron("30 2 * * *")
///     .time_zone("America/New_York")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "an update does nothing until it is awaited or sent"]
pub struct UpdateSchedule {
    client: Client,
    schedule: pb::Schedule,
    update_mask: prost_types::FieldMask,
}

impl UpdateSchedule {
    fn new(client: Client, name: String) -> Self {
        Self {
            client,
            schedule: pb::Schedule {
                name,
                ..Default::default()
            },
            update_mask: prost_types::FieldMask::default(),
        }
    }

    /// A new cron expression, of 5 fields or 6 (seconds first).
    pub fn cron(mut self, cron: impl Into<String>) -> Self {
        self.schedule.cron = cron.into();
        super::mask_path(&mut self.update_mask, "cron");
        self
    }

    /// A new IANA time zone to read the cron expression in.
    pub fn time_zone(mut self, time_zone: impl Into<String>) -> Self {
        self.schedule.time_zone = time_zone.into();
        super::mask_path(&mut self.update_mask, "time_zone");
        self
    }

    /// A new description; an empty one removes it.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.schedule.description = description.into();
        super::mask_path(&mut self.update_mask, "description");
        self
    }

    /// A new overlap policy.
    pub fn overlap(mut self, policy: OverlapPolicy) -> Self {
        self.schedule.overlap_policy = policy.to_proto() as i32;
        super::mask_path(&mut self.update_mask, "overlap_policy");
        self
    }

    /// A new catch-up policy.
    pub fn catch_up(mut self, policy: CatchUpPolicy) -> Self {
        self.schedule.catch_up_policy = policy.to_proto() as i32;
        super::mask_path(&mut self.update_mask, "catch_up_policy");
        self
    }

    /// A new bound on the missed ticks [`CatchUpPolicy::All`] runs (1 to 1000).
    pub fn max_catch_up(mut self, ticks: u32) -> Self {
        self.schedule.max_catch_up = super::saturating_int32(ticks);
        super::mask_path(&mut self.update_mask, "max_catch_up");
        self
    }

    /// A new misfire grace (at most 1 day).
    pub fn misfire_grace(mut self, grace: Duration) -> Self {
        self.schedule.misfire_grace = Some(job::duration_to_proto(grace));
        super::mask_path(&mut self.update_mask, "misfire_grace");
        self
    }

    /// Applies the change and returns the schedule after it.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] with `NotFound` when the tenant has no schedule of that name,
    /// [`Error::BadRequest`] (naming the field) for a bad value or when no field was set.
    pub async fn send(self) -> Result<ScheduleInfo, Error> {
        let request = self.client.headers.request(self.to_request());
        let response = self
            .client
            .schedules
            .clone()
            .update_schedule(request)
            .await?
            .into_inner();
        schedule_info(response.schedule)
    }

    /// The request as it goes on the wire, apart from the tenant header.
    fn to_request(&self) -> pb::UpdateScheduleRequest {
        pb::UpdateScheduleRequest {
            schedule: Some(self.schedule.clone()),
            update_mask: Some(self.update_mask.clone()),
        }
    }
}

impl IntoFuture for UpdateSchedule {
    type Output = Result<ScheduleInfo, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// The schedule every single-schedule response carries.
fn schedule_info(schedule: Option<pb::Schedule>) -> Result<ScheduleInfo, Error> {
    ScheduleInfo::from_proto(
        schedule.ok_or_else(|| Error::Protocol("the response has no schedule".into()))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Report {
        #[prost(string, tag = "1")]
        name: String,
    }

    impl prost::Name for Report {
        const NAME: &'static str = "Report";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Report {
        const JOB_TYPE: &'static str = "test.report";
        type Output = ();
    }

    fn report() -> Report {
        Report {
            name: "daily".into(),
        }
    }

    /// A client whose channel never connects: the builders only need one to exist.
    fn client() -> Client {
        Client::from_channel(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        )
    }

    #[test]
    fn policies_round_trip_and_unspecified_is_the_default() {
        for policy in [
            OverlapPolicy::Allow,
            OverlapPolicy::Skip,
            OverlapPolicy::CancelPrevious,
        ] {
            let number = policy.to_proto() as i32;
            assert_eq!(OverlapPolicy::from_proto(number).ok(), Some(policy));
        }
        for policy in [CatchUpPolicy::Once, CatchUpPolicy::Skip, CatchUpPolicy::All] {
            let number = policy.to_proto() as i32;
            assert_eq!(CatchUpPolicy::from_proto(number).ok(), Some(policy));
        }
        assert_eq!(
            OverlapPolicy::from_proto(0).ok(),
            Some(OverlapPolicy::default())
        );
        assert_eq!(
            CatchUpPolicy::from_proto(0).ok(),
            Some(CatchUpPolicy::default())
        );
        assert!(matches!(
            OverlapPolicy::from_proto(99),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            CatchUpPolicy::from_proto(99),
            Err(Error::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn a_bare_create_leaves_every_option_to_the_server() {
        let request = client()
            .create_schedule("nightly", "0 3 * * *", report())
            .into_request()
            .expect("request");
        assert!(!request.paused);
        let schedule = request.schedule.expect("schedule");
        assert_eq!(
            (schedule.name.as_str(), schedule.cron.as_str()),
            ("nightly", "0 3 * * *")
        );
        assert_eq!(schedule.time_zone, "");
        assert_eq!(schedule.overlap_policy, 0);
        assert_eq!(schedule.catch_up_policy, 0);
        assert_eq!(schedule.max_catch_up, 0);
        assert_eq!(schedule.misfire_grace, None);
        let template = schedule.job.expect("template");
        assert_eq!(template.job_type, "test.report");
        assert_eq!(template.queue, "");
        assert_eq!(template.priority, None);
        assert_eq!(template.retry_policy, None);
        assert_eq!(template.timeout, None);
        let payload = template.payload.expect("payload");
        assert_eq!(payload.type_url, "type.googleapis.com/jobwire.test.Report");
        assert_eq!(payload.to_msg::<Report>().ok(), Some(report()));
    }

    #[tokio::test]
    async fn create_options_reach_the_request() {
        let request = client()
            .create_schedule("nightly", "0 3 * * *", report())
            .time_zone("Europe/Berlin")
            .description("the nightly report")
            .queue("reports")
            .priority(40)
            .retry(RetryPolicy::no_retries())
            .label("team", "data")
            .timeout(Duration::from_secs(600))
            .overlap(OverlapPolicy::CancelPrevious)
            .catch_up(CatchUpPolicy::All)
            .max_catch_up(5)
            .misfire_grace(Duration::from_secs(30))
            .paused()
            .into_request()
            .expect("request");
        assert!(request.paused);
        let schedule = request.schedule.expect("schedule");
        assert_eq!(schedule.time_zone, "Europe/Berlin");
        assert_eq!(schedule.description, "the nightly report");
        assert_eq!(
            schedule.overlap_policy,
            pb::OverlapPolicy::CancelPrevious as i32
        );
        assert_eq!(schedule.catch_up_policy, pb::CatchUpPolicy::All as i32);
        assert_eq!(schedule.max_catch_up, 5);
        assert_eq!(
            schedule.misfire_grace,
            Some(prost_types::Duration {
                seconds: 30,
                nanos: 0
            })
        );
        let template = schedule.job.expect("template");
        assert_eq!(template.queue, "reports");
        assert_eq!(template.priority, Some(40));
        assert_eq!(template.retry_policy.and_then(|p| p.max_attempts), Some(1));
        assert_eq!(
            template.labels.get("team").map(String::as_str),
            Some("data")
        );
        assert_eq!(
            template.timeout,
            Some(prost_types::Duration {
                seconds: 600,
                nanos: 0
            })
        );
    }

    #[tokio::test]
    async fn an_update_names_only_the_fields_it_sets() {
        let request = client()
            .schedule("nightly")
            .update()
            .cron("30 2 * * *")
            .overlap(OverlapPolicy::Skip)
            .cron("0 2 * * *")
            .to_request();
        assert_eq!(
            request.update_mask.expect("mask").paths,
            ["cron", "overlap_policy"]
        );
        let schedule = request.schedule.expect("schedule");
        assert_eq!(schedule.name, "nightly");
        assert_eq!(schedule.cron, "0 2 * * *");
        assert_eq!(schedule.overlap_policy, pb::OverlapPolicy::Skip as i32);

        let request = client()
            .schedule("nightly")
            .update()
            .time_zone("UTC")
            .description("")
            .catch_up(CatchUpPolicy::Skip)
            .max_catch_up(10)
            .misfire_grace(Duration::from_secs(5))
            .to_request();
        assert_eq!(
            request.update_mask.expect("mask").paths,
            [
                "time_zone",
                "description",
                "catch_up_policy",
                "max_catch_up",
                "misfire_grace"
            ]
        );
    }

    #[test]
    fn schedule_info_maps_unset_to_none() {
        let info = ScheduleInfo::from_proto(pb::Schedule {
            id: "s1".into(),
            name: "nightly".into(),
            cron: "0 3 * * *".into(),
            time_zone: "UTC".into(),
            job: Some(pb::JobTemplate {
                job_type: "test.report".into(),
                queue: "reports".into(),
                payload: Some(prost_types::Any::from_msg(&report()).expect("encode")),
                ..Default::default()
            }),
            catch_up_policy: pb::CatchUpPolicy::Skip as i32,
            last_job_id: "j1".into(),
            last_run_at: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .expect("valid schedule");
        assert_eq!((info.id(), info.name()), ("s1", "nightly"));
        assert_eq!(info.description(), None);
        assert_eq!(info.overlap(), OverlapPolicy::Allow);
        assert_eq!(info.catch_up(), CatchUpPolicy::Skip);
        assert_eq!((info.job_type(), info.queue()), ("test.report", "reports"));
        assert_eq!(info.payload::<Report>().ok(), Some(report()));
        assert_eq!(info.next_run_at(), None);
        assert_eq!(
            info.last_run_at(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
        );
        assert_eq!(info.last_job_id(), Some(JobId::from("j1")));

        let bare = ScheduleInfo::from_proto(pb::Schedule::default()).expect("valid schedule");
        assert_eq!(bare.last_job_id(), None);
        assert_eq!(bare.job_type(), "");
        assert!(matches!(bare.payload::<Report>(), Err(Error::Protocol(_))));

        let unknown = pb::Schedule {
            overlap_policy: 99,
            ..Default::default()
        };
        assert!(matches!(
            ScheduleInfo::from_proto(unknown),
            Err(Error::Protocol(_))
        ));
    }
}
