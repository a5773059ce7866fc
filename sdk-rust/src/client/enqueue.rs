//! The enqueue builder: a typed payload plus the options of `JobSpec`, turned into a request in
//! one place so that single and batch enqueues build identical specs.
//!
//! Nothing is validated here beyond encoding the payload: the server owns the rules (name
//! syntax, priority range, label limits) and names the field at fault, so checking twice could
//! only make the two disagree.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::Error;
use crate::client::{Client, JobHandle, Recipe};
use crate::job::{self, JobId, JobState, JobType, RetryPolicy};
use crate::proto::v1 as pb;
use crate::proto::v1::job_spec::Schedule;

/// A job about to be enqueued; await it (or call [`send`](Self::send)) to store it.
///
/// ```no_run
/// # async fn demo(client: jobwire::Client, payload: impl jobwire::JobType) -> Result<(), jobwire::Error> {
/// use std::time::Duration;
/// let handle = client
///     .enqueue(payload)
///     .queue("emails")
///     .priority(80)
///     .delay(Duration::from_secs(30))
///     .timeout(Duration::from_secs(300))
///     .idempotency_key("welcome-mail:user-42")
///     .label("user", "42")
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "an enqueue does nothing until it is awaited or sent"]
pub struct Enqueue<J: JobType> {
    client: Client,
    draft: Draft<J>,
}

impl<J: JobType> Enqueue<J> {
    pub(super) fn new(client: Client, payload: J) -> Self {
        Self {
            client,
            draft: Draft::new(payload),
        }
    }

    /// The queue to put the job in (default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.draft.queue = Some(queue.into());
        self
    }

    /// 0 to 100, higher first (default 50). Bands: 90-100 safety and repair, 70-89
    /// user-triggered, 40-69 daily batches, 1-39 background.
    pub fn priority(mut self, priority: i32) -> Self {
        self.draft.priority = Some(priority);
        self
    }

    /// Runs the job no earlier than `delay` from when the server stores it. Replaces any
    /// [`run_at`](Self::run_at).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.draft.schedule = Some(When::After(delay));
        self
    }

    /// Runs the job no earlier than `time`. Replaces any [`delay`](Self::delay).
    pub fn run_at(mut self, time: SystemTime) -> Self {
        self.draft.schedule = Some(When::At(time));
        self
    }

    /// How failed attempts are retried; unset settings take the server's defaults.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.draft.retry = Some(policy);
        self
    }

    /// Makes the enqueue safe to repeat: while a job enqueued with the same key in the same
    /// tenant is retained, the server returns it instead of creating another. A key held by a
    /// job of another job type or payload is refused (ALREADY_EXISTS, with that job's id)
    /// unless [`accept_existing`](Self::accept_existing) is set.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.draft.idempotency_key = Some(key.into());
        self
    }

    /// Takes the job holding the idempotency key even when its job type or payload differs
    /// from this one's, rather than being refused.
    pub fn accept_existing(mut self) -> Self {
        self.draft.accept_existing = true;
        self
    }

    /// How long one attempt may run (default: no limit). When it runs over, its handler is
    /// told to stop ([`StopReason::TimedOut`](crate::StopReason::TimedOut)) and the attempt
    /// counts as a retryable failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.draft.timeout = Some(timeout);
        self
    }

    /// Holds the job AWAITING_APPROVAL until [`Client::approve_job`] (or
    /// [`Client::reject_job`]). A job type whose schema asks for approval needs it anyway.
    pub fn needs_approval(mut self) -> Self {
        self.draft.needs_approval = true;
        self
    }

    /// Makes the job wait PENDING until the job `id` (of the same tenant) has SUCCEEDED; call
    /// it once per dependency. When a dependency ends FAILED or CANCELLED the job is CANCELLED
    /// with a reason naming it, unless [`run_if_dependencies_fail`](Self::run_if_dependencies_fail).
    /// The handler finds them in [`JobContext::depends_on`](crate::JobContext::depends_on).
    pub fn depends_on(mut self, id: &JobId) -> Self {
        self.draft.depends_on.push(id.as_str().to_owned());
        self
    }

    /// Runs the job once every dependency has ended, however it ended, rather than cancel it
    /// when one fails.
    pub fn run_if_dependencies_fail(mut self) -> Self {
        self.draft.run_regardless = true;
        self
    }

    /// Adds a label for filtering and display; a repeated key keeps the last value.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.draft.labels.insert(key.into(), value.into());
        self
    }

    /// Applies `recipe`: each of its settings this enqueue has not set (before or after this
    /// call) is taken from it, its labels are added under the keys this enqueue does not set,
    /// and its approval is asked for if it asks. With two recipes, the first applied wins.
    pub fn recipe(mut self, recipe: &Recipe) -> Self {
        self.draft.recipes.push(recipe.clone());
        self
    }

    /// Stores the job and returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] (naming the fields) when the server refuses the job,
    /// [`Error::Encode`] when the payload cannot be encoded.
    pub async fn send(self) -> Result<JobHandle<J>, Error> {
        self.send_detailed().await.map(Enqueued::into_handle)
    }

    /// Stores the job and also reports whether it was created or an existing job with the same
    /// idempotency key was returned.
    ///
    /// # Errors
    ///
    /// As for [`send`](Self::send).
    pub async fn send_detailed(self) -> Result<Enqueued<J>, Error> {
        let spec = self.draft.into_spec()?;
        let response = self.client.enqueue_one(spec).await?;
        let job = super::job_info(response.job)?;
        let state = job.state();
        Ok(Enqueued::new(
            self.client.job(job.id().clone()),
            state,
            response.created,
        ))
    }
}

impl<J: JobType> IntoFuture for Enqueue<J> {
    type Output = Result<JobHandle<J>, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

impl<J: JobType + fmt::Debug> fmt::Debug for Enqueue<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enqueue")
            .field("job_type", &J::JOB_TYPE)
            .field("payload", &self.draft.payload)
            .finish_non_exhaustive()
    }
}

/// A job for [`Client::enqueue_many`]: a bare payload, which leaves every option to the
/// server, or an [`Enqueue`] builder with its options. Sealed: the SDK alone turns these into
/// requests.
pub trait NewJob: sealed::Sealed {
    /// The job's type.
    type Job: JobType;
}

impl<J: JobType> NewJob for J {
    type Job = J;
}

impl<J: JobType> NewJob for Enqueue<J> {
    type Job = J;
}

pub(super) mod sealed {
    use super::{Draft, Enqueue, Error, JobType, pb};

    pub trait Sealed {
        /// The request form; the same for a single enqueue and a batch.
        fn into_spec(self) -> Result<pb::JobSpec, Error>;
    }

    impl<J: JobType> Sealed for J {
        fn into_spec(self) -> Result<pb::JobSpec, Error> {
            Draft::new(self).into_spec()
        }
    }

    impl<J: JobType> Sealed for Enqueue<J> {
        fn into_spec(self) -> Result<pb::JobSpec, Error> {
            self.draft.into_spec()
        }
    }
}

/// The outcome of storing one job: its handle, its state right after, and whether it was new.
#[derive(Debug)]
pub struct Enqueued<J: JobType> {
    handle: JobHandle<J>,
    state: JobState,
    created: bool,
}

impl<J: JobType> Clone for Enqueued<J> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            state: self.state,
            created: self.created,
        }
    }
}

impl<J: JobType> Enqueued<J> {
    pub(super) fn new(handle: JobHandle<J>, state: JobState, created: bool) -> Self {
        Self {
            handle,
            state,
            created,
        }
    }

    /// The job's handle.
    pub fn handle(&self) -> &JobHandle<J> {
        &self.handle
    }

    /// The job's handle.
    pub fn into_handle(self) -> JobHandle<J> {
        self.handle
    }

    /// The job's state just after the enqueue (such as AVAILABLE or SCHEDULED, or any state
    /// of an existing job returned for its idempotency key).
    pub fn state(&self) -> JobState {
        self.state
    }

    /// False when the idempotency key matched an existing job, which was returned instead.
    pub fn created(&self) -> bool {
        self.created
    }
}

/// When to run a job; the two forms of the protocol's `schedule` oneof.
#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    At(SystemTime),
    After(Duration),
}

/// The options of one job, apart from the client that sends it.
struct Draft<J> {
    payload: J,
    queue: Option<String>,
    priority: Option<i32>,
    schedule: Option<When>,
    retry: Option<RetryPolicy>,
    idempotency_key: Option<String>,
    labels: HashMap<String, String>,
    timeout: Option<Duration>,
    needs_approval: bool,
    accept_existing: bool,
    depends_on: Vec<String>,
    run_regardless: bool,
    /// Recipes applied, first first; their settings fill what the draft leaves unset when the
    /// spec is built, so the call's own settings win whatever the order of the calls.
    recipes: Vec<Recipe>,
}

impl<J: JobType> Draft<J> {
    fn new(payload: J) -> Self {
        Self {
            payload,
            queue: None,
            priority: None,
            schedule: None,
            retry: None,
            idempotency_key: None,
            labels: HashMap::new(),
            timeout: None,
            needs_approval: false,
            accept_existing: false,
            depends_on: Vec::new(),
            run_regardless: false,
            recipes: Vec::new(),
        }
    }

    /// The draft with its recipes' settings filled in where it has none of its own.
    fn with_recipes(mut self) -> Self {
        for recipe in std::mem::take(&mut self.recipes) {
            self.queue = self.queue.or(recipe.queue);
            self.priority = self.priority.or(recipe.priority);
            self.retry = self.retry.or(recipe.retry);
            self.timeout = self.timeout.or(recipe.timeout);
            self.needs_approval |= recipe.needs_approval;
            for (key, value) in recipe.labels {
                self.labels.entry(key).or_insert(value);
            }
        }
        self
    }

    /// Unset options stay unset on the wire, so the server's defaults apply.
    fn into_spec(self) -> Result<pb::JobSpec, Error> {
        let this = self.with_recipes();
        Ok(pb::JobSpec {
            job_type: J::JOB_TYPE.to_owned(),
            payload: Some(job::encode(&this.payload, "job payload")?),
            queue: this.queue.unwrap_or_default(),
            priority: this.priority,
            schedule: this.schedule.map(|when| match when {
                When::At(time) => Schedule::RunAt(time.into()),
                When::After(delay) => Schedule::Delay(job::duration_to_proto(delay)),
            }),
            retry_policy: this.retry.map(RetryPolicy::to_proto),
            idempotency_key: this.idempotency_key.unwrap_or_default(),
            labels: this.labels,
            timeout: this.timeout.map(job::duration_to_proto),
            // Typed payloads travel encoded; JSON and examples are for untyped callers.
            payload_json: None,
            example: String::new(),
            job_type_version: 0,
            needs_approval: this.needs_approval,
            accept_existing: this.accept_existing,
            depends_on: this.depends_on,
            depends_on_index: Vec::new(),
            // The job type's approval timeout applies.
            approval_timeout: None,
            on_approval_timeout: pb::ApprovalTimeoutAction::Unspecified.into(),
            on_dependency_failure: if this.run_regardless {
                pb::DependencyFailure::Run
            } else {
                pb::DependencyFailure::Unspecified
            }
            .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Ping {
        #[prost(string, tag = "1")]
        text: String,
    }

    impl prost::Name for Ping {
        const NAME: &'static str = "Ping";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Ping {
        const JOB_TYPE: &'static str = "test.ping";
        type Output = ();
    }

    fn ping() -> Ping {
        Ping { text: "hi".into() }
    }

    #[test]
    fn a_bare_enqueue_leaves_every_option_to_the_server() {
        let spec = Draft::new(ping()).into_spec().expect("spec");
        assert_eq!(spec.job_type, "test.ping");
        assert_eq!(spec.queue, "");
        assert_eq!(spec.priority, None);
        assert_eq!(spec.schedule, None);
        assert_eq!(spec.retry_policy, None);
        assert_eq!(spec.idempotency_key, "");
        assert!(spec.labels.is_empty());
        assert_eq!(spec.timeout, None);
        let payload = spec.payload.expect("payload");
        assert_eq!(payload.type_url, "type.googleapis.com/jobwire.test.Ping");
        assert_eq!(payload.to_msg::<Ping>().ok(), Some(ping()));
    }

    #[test]
    fn options_reach_the_spec() {
        let mut draft = Draft::new(ping());
        draft.queue = Some("emails".into());
        draft.priority = Some(80);
        draft.schedule = Some(When::After(Duration::from_millis(2500)));
        draft.retry = Some(RetryPolicy::no_retries());
        draft.idempotency_key = Some("k1".into());
        draft.labels.insert("user".into(), "42".into());
        draft.timeout = Some(Duration::from_secs(90));
        let spec = draft.into_spec().expect("spec");
        assert_eq!(spec.queue, "emails");
        assert_eq!(spec.priority, Some(80));
        assert_eq!(
            spec.schedule,
            Some(Schedule::Delay(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000
            }))
        );
        assert_eq!(spec.retry_policy.and_then(|p| p.max_attempts), Some(1));
        assert_eq!(spec.idempotency_key, "k1");
        assert_eq!(spec.labels.get("user").map(String::as_str), Some("42"));
        assert_eq!(
            spec.timeout,
            Some(prost_types::Duration {
                seconds: 90,
                nanos: 0
            })
        );
    }

    #[test]
    fn a_recipe_fills_what_the_call_leaves_unset() {
        let recipe = Recipe::new()
            .queue("backups")
            .priority(30)
            .retry(RetryPolicy::no_retries())
            .timeout(Duration::from_secs(60))
            .label("team", "storage")
            .label("tier", "gold")
            .needs_approval();
        let mut draft = Draft::new(ping());
        draft.priority = Some(90);
        draft.labels.insert("tier".into(), "silver".into());
        draft.recipes.push(recipe.clone());
        // A second recipe fills only what neither the call nor the first one set.
        draft
            .recipes
            .push(Recipe::new().queue("other").label("extra", "yes"));
        let spec = draft.into_spec().expect("spec");
        assert_eq!(spec.queue, "backups");
        assert_eq!(spec.priority, Some(90), "the call's priority wins");
        assert_eq!(spec.retry_policy.and_then(|p| p.max_attempts), Some(1));
        assert_eq!(spec.timeout.map(|t| t.seconds), Some(60));
        assert!(spec.needs_approval);
        let mut labels: Vec<_> = spec.labels.into_iter().collect();
        labels.sort();
        assert_eq!(
            labels,
            [
                ("extra".to_owned(), "yes".to_owned()),
                ("team".to_owned(), "storage".to_owned()),
                ("tier".to_owned(), "silver".to_owned()),
            ]
        );
    }

    #[test]
    fn run_at_becomes_a_timestamp() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut draft = Draft::new(ping());
        draft.schedule = Some(When::At(time));
        let spec = draft.into_spec().expect("spec");
        assert_eq!(
            spec.schedule,
            Some(Schedule::RunAt(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0
            }))
        );
    }
}
