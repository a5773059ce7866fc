//! What a job waiting PENDING for its dependencies does once they have moved on: wait on, run,
//! or be cancelled naming the dependency that failed. Decided here, applied by the store
//! (`Store::end_waits`), so every way a dependency can end (a settle, a cancel, the reaper, a
//! rejection) leads to the same answer. A parent waiting for its children is a job that runs
//! regardless: it waits while one is open, then runs to aggregate them however they ended.
//! And the other way round: a child whose parent ended CANCELLED or FAILED is cancelled,
//! naming its parent ([`orphan_reason`]).

use uuid::Uuid;

use super::JobState;

/// The longest reason kept for a cancelled dependent, as for CancelJob's reason.
const MAX_REASON_BYTES: usize = 1024;

/// A waiting job and its dependencies, as the scheduler reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// DependencyFailure RUN: every dependency ending is enough, however it ended.
    pub run_regardless: bool,
    /// Dependencies not yet SUCCEEDED, FAILED or CANCELLED.
    pub open: i64,
    /// The first dependency that ended FAILED or CANCELLED, if any did.
    pub broken: Option<Broken>,
}

/// A dependency that ended without succeeding.
#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    pub id: Uuid,
    pub job_type: String,
    pub state: JobState,
    /// Its cancel reason or last error's message (empty when it has none).
    pub why: String,
}

/// What becomes of a waiting job.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitEnd {
    /// Some dependency is still open.
    Wait,
    /// Every dependency ended as the job needs: it may run.
    Release,
    /// A dependency failed: CANCELLED with this reason.
    Cancel(String),
}

pub fn decide(waiting: &Waiting) -> WaitEnd {
    match &waiting.broken {
        Some(broken) if !waiting.run_regardless => WaitEnd::Cancel(reason("dependency", broken)),
        _ if waiting.open > 0 => WaitEnd::Wait,
        _ => WaitEnd::Release,
    }
}

/// Why a child not yet ended is cancelled: its parent ended without succeeding. A parent
/// cancelled for its own parent carries that reason, so down a tree every reason names the job
/// that was cancelled (or failed) first.
pub fn orphan_reason(parent: &Broken) -> String {
    reason("parent", parent)
}

/// Names the related job (a `dependency`, a `parent`) and why it ended. A job cancelled for its
/// own relation carries that reason, so down a chain every reason names the job that failed
/// first.
fn reason(relation: &str, broken: &Broken) -> String {
    let state = match broken.state {
        JobState::Failed => "FAILED",
        JobState::Cancelled => "CANCELLED",
        _ => "without succeeding",
    };
    let mut reason = format!(
        "{relation} {} ({}) ended {state}",
        broken.id, broken.job_type
    );
    if !broken.why.is_empty() {
        reason.push_str(": ");
        reason.push_str(&broken.why);
    }
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// What becomes of a job waiting PENDING for a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalWaitEnd {
    Wait,
    /// The signal it waits for has arrived.
    Received,
    /// Its wait's timeout passed first.
    TimedOut,
}

/// A signal that has arrived ends the wait, even one that arrived after the timeout passed: the
/// handler gets what it waited for.
pub fn signal_wait(received: bool, past_deadline: bool) -> SignalWaitEnd {
    match (received, past_deadline) {
        (true, _) => SignalWaitEnd::Received,
        (false, true) => SignalWaitEnd::TimedOut,
        (false, false) => SignalWaitEnd::Wait,
    }
}

/// A job of a batch that lies on a cycle of `depends_on` edges (by index), if any does.
pub fn cycle(edges: &[Vec<usize>]) -> Option<usize> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; edges.len()];
    for start in 0..edges.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Depth first without recursion: (node, next edge to follow).
        let mut stack = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            match edges.get(node).and_then(|to| to.get(*next)).copied() {
                Some(to) => {
                    *next += 1;
                    match marks.get(to) {
                        Some(Mark::Open) => return Some(to),
                        Some(Mark::New) => {
                            marks[to] = Mark::Open;
                            stack.push((to, 0));
                        }
                        _ => {}
                    }
                }
                None => {
                    marks[node] = Mark::Done;
                    stack.pop();
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broken(state: JobState, why: &str) -> Broken {
        Broken {
            id: Uuid::nil(),
            job_type: "download.verify".into(),
            state,
            why: why.into(),
        }
    }

    #[test]
    fn a_signal_wait_ends_when_the_signal_arrives_even_past_its_timeout() {
        assert_eq!(signal_wait(false, false), SignalWaitEnd::Wait);
        assert_eq!(signal_wait(true, false), SignalWaitEnd::Received);
        assert_eq!(signal_wait(true, true), SignalWaitEnd::Received);
        assert_eq!(signal_wait(false, true), SignalWaitEnd::TimedOut);
    }

    #[test]
    fn an_orphan_is_cancelled_naming_its_parent_and_why_it_ended() {
        let reason = orphan_reason(&broken(JobState::Cancelled, "operator stopped the batch"));
        assert_eq!(
            reason,
            format!(
                "parent {} (download.verify) ended CANCELLED: operator stopped the batch",
                Uuid::nil()
            )
        );
    }

    #[test]
    fn waits_while_a_dependency_is_open_and_runs_once_all_succeeded() {
        let mut w = Waiting {
            run_regardless: false,
            open: 2,
            broken: None,
        };
        assert_eq!(decide(&w), WaitEnd::Wait);
        w.open = 0;
        assert_eq!(decide(&w), WaitEnd::Release);
    }

    #[test]
    fn a_failed_dependency_cancels_at_once_naming_it_even_with_others_open() {
        let w = Waiting {
            run_regardless: false,
            open: 3,
            broken: Some(broken(JobState::Failed, "checksum mismatch")),
        };
        assert_eq!(
            decide(&w),
            WaitEnd::Cancel(format!(
                "dependency {} (download.verify) ended FAILED: checksum mismatch",
                Uuid::nil()
            ))
        );
    }

    #[test]
    fn run_regardless_waits_for_every_dependency_then_runs() {
        let mut w = Waiting {
            run_regardless: true,
            open: 1,
            broken: Some(broken(JobState::Cancelled, "")),
        };
        assert_eq!(decide(&w), WaitEnd::Wait);
        w.open = 0;
        assert_eq!(decide(&w), WaitEnd::Release);
    }

    #[test]
    fn a_cascaded_reason_names_the_first_failure_and_stays_within_bounds() {
        let inner = format!("dependency {} (a) ended FAILED: boom", Uuid::nil());
        let WaitEnd::Cancel(reason) = decide(&Waiting {
            run_regardless: false,
            open: 0,
            broken: Some(broken(JobState::Cancelled, &inner)),
        }) else {
            panic!("expected a cancel");
        };
        assert!(reason.ends_with(&inner), "{reason}");
        let long = "é".repeat(2000);
        let WaitEnd::Cancel(reason) = decide(&Waiting {
            run_regardless: false,
            open: 0,
            broken: Some(broken(JobState::Failed, &long)),
        }) else {
            panic!("expected a cancel");
        };
        assert!(reason.len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn cycles_are_found_and_chains_are_not() {
        assert_eq!(cycle(&[vec![1], vec![2], vec![]]), None);
        assert_eq!(cycle(&[vec![], vec![0], vec![0, 1]]), None);
        assert!(cycle(&[vec![1], vec![2], vec![0]]).is_some());
        assert!(cycle(&[vec![], vec![2], vec![3], vec![1]]).is_some());
        assert_eq!(cycle(&[]), None);
    }
}
