//! Recipes: reusable enqueue profiles. A recipe names the settings a family of jobs shares
//! (queue, priority, retry policy, labels, timeout, approval) once, and any number of job
//! types are enqueued with it; what a call sets itself wins over the recipe.
//!
//! A recipe is plain data on the client's side: the server sees ordinary job specs, so a recipe
//! changes nothing for jobs enqueued without one.

use std::collections::HashMap;
use std::time::Duration;

use crate::job::RetryPolicy;

/// A reusable enqueue profile, applied with [`Enqueue::recipe`](crate::Enqueue::recipe) or
/// [`Client::enqueue_with`](crate::Client::enqueue_with).
///
/// Each setting a recipe has applies unless the call sets its own (whether before or after
/// the recipe is applied); labels are merged, the call's value winning for a key both set.
/// Approval, once asked for by the recipe or the call, stays asked.
///
/// ```no_run
/// # async fn demo(client: jobwire::Client, a: impl jobwire::JobType, b: impl jobwire::JobType) -> Result<(), jobwire::Error> {
/// use std::time::Duration;
/// use jobwire::{Recipe, RetryPolicy};
///
/// let durable = Recipe::new()
///     .queue("backups")
///     .priority(30)
///     .retry(RetryPolicy::default().max_attempts(10))
///     .timeout(Duration::from_secs(3600))
///     .label("team", "storage");
/// client.enqueue_with(&durable, a).await?;
/// client.enqueue(b).recipe(&durable).priority(90).await?; // priority 90, the rest the recipe's
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use]
pub struct Recipe {
    pub(super) queue: Option<String>,
    pub(super) priority: Option<i32>,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) labels: HashMap<String, String>,
    pub(super) timeout: Option<Duration>,
    pub(super) needs_approval: bool,
}

impl Recipe {
    /// A recipe that sets nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The queue of the recipe's jobs.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Their priority, 0 to 100.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Their retry policy, taken whole: a call's own policy replaces it.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// A label the recipe's jobs carry; a repeated key keeps the last value.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// How long one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Holds the recipe's jobs AWAITING_APPROVAL until approved.
    pub fn needs_approval(mut self) -> Self {
        self.needs_approval = true;
        self
    }
}
