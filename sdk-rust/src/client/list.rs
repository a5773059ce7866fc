//! Filtered, paged reads of many jobs (AIP-158 page tokens).
//!
//! Pages are fetched one call at a time on purpose: the caller decides how far to read, so a
//! listing of a large tenant never loads everything into memory.

use crate::Error;
use crate::client::Client;
use crate::job::{JobInfo, JobState};
use crate::proto::v1 as pb;

/// A listing of jobs about to be read; [`send`](Self::send) it for one page.
///
/// ```no_run
/// # async fn demo(client: jobwire::Client) -> Result<(), jobwire::Error> {
/// use jobwire::JobState;
/// let mut token = None;
/// loop {
///     let mut list = client.list_jobs().state(JobState::Failed).queue("emails");
///     if let Some(token) = token.take() {
///         list = list.page_token(token);
///     }
///     let page = list.send().await?;
///     for job in page.jobs() {
///         println!("{} {}", job.id(), job.state());
///     }
///     match page.next_page_token() {
///         Some(next) => token = Some(next.to_owned()),
///         None => break,
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a listing does nothing until it is sent"]
pub struct ListJobs {
    client: Client,
    request: pb::ListJobsRequest,
}

impl ListJobs {
    pub(super) fn new(client: Client) -> Self {
        Self {
            client,
            request: pb::ListJobsRequest::default(),
        }
    }

    /// Only jobs in this state; may be repeated to accept several (any state when never set).
    pub fn state(mut self, state: JobState) -> Self {
        self.request.states.push(state.to_proto() as i32);
        self
    }

    /// Only jobs of this queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.request.queue = queue.into();
        self
    }

    /// Only jobs of this type.
    pub fn job_type(mut self, job_type: impl Into<String>) -> Self {
        self.request.job_type = job_type.into();
        self
    }

    /// Only the children of this job (those it enqueued from its handler with
    /// [`JobContext::enqueue_children`](crate::JobContext::enqueue_children)).
    pub fn parent(mut self, id: &crate::JobId) -> Self {
        self.request.parent_id = id.as_str().to_owned();
        self
    }

    /// Jobs per page, 1 to 1000 (default 50).
    pub fn page_size(mut self, size: u32) -> Self {
        self.request.page_size = i32::try_from(size).unwrap_or(i32::MAX);
        self
    }

    /// Continues after the page that returned this token; the filters must not change
    /// between pages.
    pub fn page_token(mut self, token: impl Into<String>) -> Self {
        self.request.page_token = token.into();
        self
    }

    /// Includes each job's attempt history (the FULL view).
    pub fn with_attempts(mut self) -> Self {
        self.request.view = pb::JobView::Full as i32;
        self
    }

    /// Reads one page.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] for a bad page size or a token that does not match the filters.
    pub async fn send(self) -> Result<JobPage, Error> {
        let response = self.client.list(self.request).await?;
        Ok(JobPage {
            jobs: response
                .jobs
                .into_iter()
                .map(JobInfo::from_proto)
                .collect::<Result<_, _>>()?,
            next_page_token: (!response.next_page_token.is_empty())
                .then_some(response.next_page_token),
        })
    }
}

/// One page of a listing, newest job first.
#[derive(Debug, Clone)]
pub struct JobPage {
    jobs: Vec<JobInfo>,
    next_page_token: Option<String>,
}

impl JobPage {
    /// The jobs of this page.
    pub fn jobs(&self) -> &[JobInfo] {
        &self.jobs
    }

    /// The jobs of this page.
    pub fn into_jobs(self) -> Vec<JobInfo> {
        self.jobs
    }

    /// The token for the next page; `None` on the last page.
    pub fn next_page_token(&self) -> Option<&str> {
        self.next_page_token.as_deref()
    }
}
