//! How an attempt ends: the one decision for every way a running attempt can end (its handler
//! completed or failed, its lease lapsed, or it was handed back before its handler started).
//!
//! The decision is made here, in code, and applied by one store statement (`Store::end_attempts`)
//! that only selects among the branches decided here: the branch for a job with a cancel asked,
//! one for a pause asked, and one for neither. The job's row is the only place a stop request
//! can be read atomically with the change, so the statement picks the branch under the row's
//! lock; what each branch means is decided here and nowhere else.
//!
//! What counts: an attempt counts against `max_attempts` when a handler started it (a completion
//! or a failure proves it did; a lapsed lease says whether its worker said so). A paused attempt
//! and an attempt handed back or lapsed before its handler started do not count. Its number (the
//! fencing token) is never reused either way.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{AttemptOutcome, JobState};

/// What is known of a running attempt when it ends. Fixed while its lease is held: the number
/// fences every change, so none of these can move under it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The attempt's number, its lease's fencing token.
    pub number: i32,
    /// Attempts that did not count before this one (paused, handed back unstarted).
    pub uncounted: i32,
    pub max_attempts: i32,
    pub backoff: Backoff,
    /// The job's retry rules by failure kind (RetryPolicy.by_kind).
    pub rules: Vec<KindRule>,
}

/// How failures of one kind are retried, overriding the policy for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindRule {
    pub kind: String,
    /// A failure of this kind is never retried.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never: bool,
    /// The delay before the next attempt, instead of the backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<i64>,
}

impl Attempt {
    /// The attempts counted once this one counts too.
    fn counted_with_this(&self) -> i32 {
        self.number - self.uncounted
    }
}

/// A job's retry delays: `initial * multiplier^(n - 1)` before the attempt after the n-th
/// counted one, at most `max`, with `jitter` of it drawn at random either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub initial_ms: i64,
    pub max_ms: i64,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Backoff {
    /// The delay after `counted` counted attempts; `draw` is a uniform number in [-1, 1].
    pub fn delay(&self, counted: i32, draw: f64) -> Duration {
        // Past 60 growths every delay is at its maximum anyway; the cap keeps `powi` finite.
        let growths = (counted - 1).clamp(0, 60);
        let grown = self.initial_ms as f64 * self.multiplier.powi(growths);
        let base = grown.min(self.max_ms as f64).max(0.0);
        let jittered = base * (1.0 + self.jitter * draw.clamp(-1.0, 1.0));
        Duration::from_millis(jittered.max(0.0).round() as u64)
    }
}

/// How an attempt ended, as its worker or the reaper reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The handler returned a result.
    Completed,
    /// The handler returned to wait for the children it enqueued.
    WaitsForChildren,
    /// The handler returned to wait for a signal.
    WaitsForSignal,
    /// The handler failed.
    Failed(Failure),
    /// The lease lapsed: the worker stopped heartbeating, or would not stop.
    Lapsed(Lapse),
    /// The worker, or this server, handed the lease back before a handler started.
    Released,
}

/// A handler's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    pub kind: String,
    pub non_retryable: bool,
    /// The worker's own delay before the next attempt, instead of the backoff.
    pub retry_after: Option<Duration>,
    /// The attempt ran past its timeout (the worker says so, or its deadline had passed).
    pub timed_out: bool,
}

/// A lapsed lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Lapse {
    /// Whether a handler started the attempt: one that never started does not count.
    pub started: bool,
    /// The attempt ran past its timeout (and its worker did not stop it in time).
    pub timed_out: bool,
    /// The worker that held it, for the message.
    pub worker: String,
    pub timeout: Option<Duration>,
}

/// A failure as kept in `jobs.last_error` and `job_attempts.error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub message: String,
    #[serde(default)]
    pub kind: String,
    pub retryable: bool,
    pub attempt: i32,
    pub occurred_at: DateTime<Utc>,
}

/// One branch of a decision: the state the job enters, whether the attempt counts, and the
/// outcome its attempt row records (`None`: no row, as for a success, kept in the job's row, or
/// an attempt that never started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub state: JobState,
    pub counts: bool,
    pub outcome: Option<AttemptOutcome>,
}

/// How an attempt ends, for each stop request its job may hold when the end is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// No stop was asked.
    pub otherwise: End,
    /// A cancel was asked.
    pub on_cancel: End,
    /// A pause was asked.
    pub on_pause: End,
    /// How long after the end (the statement that applies it) the next attempt may start, for
    /// a RETRYING end: a delay, not a time, so that the wait is counted from the end itself.
    pub retry_in: Option<Duration>,
    /// The failure kept as the job's last error, for a FAILED or RETRYING end.
    pub error: Option<ErrorRecord>,
    /// Why the job is available again, for an end that makes it so.
    pub reason: Option<&'static str>,
}

/// Why a job waits PENDING after its attempt, in its event.
pub const WAITING_FOR_CHILDREN: &str = "waiting for its children";
/// Why a job waits PENDING after an attempt that waits for a signal.
pub const WAITING_FOR_SIGNAL: &str = "waiting for a signal";

/// The failure kind of an attempt that ran past its timeout.
pub const TIMEOUT_KIND: &str = "timeout";
/// The failure kind of an attempt whose lease lapsed.
pub const LAPSED_KIND: &str = "lease_expired";

/// Decides how `attempt` ends after `report`, at `now`; `draw` is a uniform number in [-1, 1]
/// for the backoff's jitter.
pub fn decide(attempt: &Attempt, report: &Report, now: DateTime<Utc>, draw: f64) -> Decision {
    match report {
        Report::Completed => Decision::completed(),
        Report::WaitsForChildren => Decision::waits_for_children(),
        Report::WaitsForSignal => Decision::waits_for_signal(),
        Report::Failed(failure) => failed(attempt, failure, now, draw),
        Report::Lapsed(lapse) if lapse.started => {
            let message = match (lapse.timed_out, lapse.timeout) {
                (true, Some(timeout)) => format!(
                    "timed out after {} ms; worker {} did not stop",
                    timeout.as_millis(),
                    lapse.worker
                ),
                _ => format!(
                    "lease expired: worker {} stopped heartbeating",
                    lapse.worker
                ),
            };
            let kind = if lapse.timed_out {
                TIMEOUT_KIND
            } else {
                LAPSED_KIND
            };
            let failure = Failure {
                message,
                kind: kind.to_owned(),
                non_retryable: false,
                retry_after: None,
                timed_out: lapse.timed_out,
            };
            let mut decision = failed(attempt, &failure, now, draw);
            if !lapse.timed_out {
                decision.otherwise.outcome = Some(AttemptOutcome::LeaseExpired);
            }
            decision
        }
        Report::Lapsed(_) => Decision::released("the lease lapsed before its handler started"),
        Report::Released => Decision::released("lease not delivered"),
    }
}

impl Decision {
    /// A completion: the handler finished first, so its result stands, whatever was asked
    /// meanwhile. Nothing of the attempt is needed to decide it.
    pub fn completed() -> Self {
        let succeeded = End {
            state: JobState::Succeeded,
            counts: true,
            outcome: Some(AttemptOutcome::Succeeded),
        };
        Self {
            otherwise: succeeded,
            on_cancel: succeeded,
            on_pause: succeeded,
            retry_in: None,
            error: None,
            reason: None,
        }
    }

    /// A handler that returned to wait for its children: the job waits PENDING until every
    /// child has ended, and its next attempt aggregates them. The attempt does not count: the
    /// job runs again to finish its work, not because it failed. A cancel asked meanwhile ends
    /// it cancelled (its children then too), a pause pauses it.
    pub fn waits_for_children() -> Self {
        Self::suspended(WAITING_FOR_CHILDREN)
    }

    /// A handler that returned to wait for a signal: as [`waits_for_children`], until the
    /// signal arrives or the wait times out.
    ///
    /// [`waits_for_children`]: Self::waits_for_children
    pub fn waits_for_signal() -> Self {
        Self::suspended(WAITING_FOR_SIGNAL)
    }

    /// An attempt whose handler returned to wait, for `reason`.
    fn suspended(reason: &'static str) -> Self {
        Self {
            otherwise: End {
                state: JobState::Pending,
                counts: false,
                outcome: Some(AttemptOutcome::Suspended),
            },
            on_cancel: End {
                state: JobState::Cancelled,
                counts: true,
                outcome: Some(AttemptOutcome::Cancelled),
            },
            on_pause: End {
                state: JobState::Paused,
                counts: false,
                outcome: Some(AttemptOutcome::Paused),
            },
            retry_in: None,
            error: None,
            reason: Some(reason),
        }
    }

    /// An attempt no handler started, for `reason`: it does not count, and the job is
    /// available again, or cancelled or paused as asked meanwhile (back in the queue, a
    /// cancelled job would be claimed and run until a heartbeat passed the cancel on).
    pub fn released(reason: &'static str) -> Self {
        let end = |state| End {
            state,
            counts: false,
            outcome: None,
        };
        Self {
            otherwise: end(JobState::Available),
            on_cancel: end(JobState::Cancelled),
            on_pause: end(JobState::Paused),
            retry_in: None,
            error: None,
            reason: Some(reason),
        }
    }
}

/// A started attempt that failed: retried after its backoff while attempts remain and the
/// failure allows, failed otherwise; a cancel ends it cancelled, a pause paused (uncounted).
fn failed(attempt: &Attempt, failure: &Failure, now: DateTime<Utc>, draw: f64) -> Decision {
    let outcome = if failure.timed_out {
        AttemptOutcome::TimedOut
    } else {
        AttemptOutcome::Failed
    };
    let counted = attempt.counted_with_this();
    let exhausted = counted >= attempt.max_attempts;
    let rule = attempt.rules.iter().find(|r| r.kind == failure.kind);
    let never = rule.is_some_and(|r| r.never);
    let retry = !(failure.non_retryable || never || exhausted);
    let (otherwise, retry_in) = if retry {
        let delay = failure.retry_after.unwrap_or_else(|| {
            rule.and_then(|r| r.backoff_ms)
                .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
                .unwrap_or_else(|| attempt.backoff.delay(counted, draw))
        });
        let end = End {
            state: JobState::Retrying,
            counts: true,
            outcome: Some(outcome),
        };
        (end, Some(delay))
    } else {
        let end = End {
            state: JobState::Failed,
            counts: true,
            outcome: Some(outcome),
        };
        (end, None)
    };
    Decision {
        otherwise,
        on_cancel: End {
            state: JobState::Cancelled,
            counts: true,
            outcome: Some(AttemptOutcome::Cancelled),
        },
        on_pause: End {
            state: JobState::Paused,
            counts: false,
            outcome: Some(AttemptOutcome::Paused),
        },
        retry_in,
        error: Some(ErrorRecord {
            message: failure.message.clone(),
            kind: failure.kind.clone(),
            retryable: !(failure.non_retryable || never),
            attempt: attempt.number,
            occurred_at: now,
        }),
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(number: i32, uncounted: i32, max_attempts: i32) -> Attempt {
        Attempt {
            number,
            uncounted,
            max_attempts,
            backoff: Backoff {
                initial_ms: 1000,
                max_ms: 60_000,
                multiplier: 2.0,
                jitter: 0.0,
            },
            rules: Vec::new(),
        }
    }

    fn failed_with(kind: &str) -> Report {
        Report::Failed(Failure {
            message: "broke".into(),
            kind: kind.into(),
            non_retryable: false,
            retry_after: None,
            timed_out: false,
        })
    }

    #[test]
    fn a_rule_by_kind_stops_retries_or_sets_the_delay_and_other_kinds_follow_the_policy() {
        let mut a = attempt(1, 0, 5);
        a.rules = vec![
            KindRule {
                kind: "http_4xx".into(),
                never: true,
                backoff_ms: None,
            },
            KindRule {
                kind: "rate_limited".into(),
                never: false,
                backoff_ms: Some(30_000),
            },
        ];
        let now = Utc::now();
        let d = decide(&a, &failed_with("http_4xx"), now, 0.0);
        assert_eq!(d.otherwise.state, JobState::Failed);
        assert_eq!(d.error.as_ref().map(|e| e.retryable), Some(false));
        let d = decide(&a, &failed_with("rate_limited"), now, 0.0);
        assert_eq!(d.otherwise.state, JobState::Retrying);
        assert_eq!(d.retry_in, Some(Duration::from_secs(30)));
        let d = decide(&a, &failed_with("http_5xx"), now, 0.0);
        assert_eq!(d.otherwise.state, JobState::Retrying);
        assert_eq!(
            d.retry_in,
            Some(Duration::from_secs(1)),
            "the policy's backoff"
        );
    }

    fn failure(non_retryable: bool, timed_out: bool) -> Report {
        Report::Failed(Failure {
            message: "broke".into(),
            kind: "io".into(),
            non_retryable,
            retry_after: None,
            timed_out,
        })
    }

    fn lapse(started: bool, timed_out: bool) -> Report {
        Report::Lapsed(Lapse {
            started,
            timed_out,
            worker: "w1".into(),
            timeout: Some(Duration::from_millis(500)),
        })
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    const CANCELLED: End = End {
        state: JobState::Cancelled,
        counts: true,
        outcome: Some(AttemptOutcome::Cancelled),
    };
    const PAUSED: End = End {
        state: JobState::Paused,
        counts: false,
        outcome: Some(AttemptOutcome::Paused),
    };

    #[test]
    fn a_completion_succeeds_whatever_was_asked_meanwhile() {
        let d = decide(&attempt(1, 0, 1), &Report::Completed, now(), 0.0);
        for end in [d.otherwise, d.on_cancel, d.on_pause] {
            assert_eq!(end.state, JobState::Succeeded);
            assert!(end.counts);
        }
        assert_eq!((d.retry_in, d.error), (None, None));
    }

    /// Every combination of failure, attempts left and stop request.
    #[test]
    fn a_failure_retries_while_attempts_remain_and_the_failure_allows() {
        for (number, uncounted, max, non_retryable, timed_out, retry) in [
            (1, 0, 3, false, false, true),
            (2, 0, 3, false, false, true),
            (3, 0, 3, false, false, false),
            (3, 1, 3, false, false, true),
            (1, 0, 1, false, false, false),
            (1, 0, 3, true, false, false),
            (1, 0, 3, false, true, true),
            (3, 0, 3, false, true, false),
        ] {
            let d = decide(
                &attempt(number, uncounted, max),
                &failure(non_retryable, timed_out),
                now(),
                0.0,
            );
            let what = format!("attempt {number} (-{uncounted}) of {max}, fatal {non_retryable}");
            let outcome = if timed_out {
                AttemptOutcome::TimedOut
            } else {
                AttemptOutcome::Failed
            };
            assert_eq!(d.otherwise.outcome, Some(outcome), "{what}");
            assert!(d.otherwise.counts, "{what}");
            if retry {
                assert_eq!(d.otherwise.state, JobState::Retrying, "{what}");
                assert!(d.retry_in.is_some(), "{what}");
            } else {
                assert_eq!(d.otherwise.state, JobState::Failed, "{what}");
                assert_eq!(d.retry_in, None, "{what}");
            }
            assert_eq!(d.on_cancel, CANCELLED, "{what}");
            assert_eq!(d.on_pause, PAUSED, "{what}");
            let error = d.error.expect("an error");
            assert_eq!((error.attempt, error.retryable), (number, !non_retryable));
        }
    }

    #[test]
    fn the_backoff_grows_per_counted_attempt_to_its_cap_or_follows_the_worker() {
        let d = decide(&attempt(1, 0, 10), &failure(false, false), now(), 0.0);
        assert_eq!(d.retry_in, Some(Duration::from_secs(1)));
        let d = decide(&attempt(3, 0, 10), &failure(false, false), now(), 0.0);
        assert_eq!(d.retry_in, Some(Duration::from_secs(4)));
        let d = decide(&attempt(4, 1, 10), &failure(false, false), now(), 0.0);
        assert_eq!(
            d.retry_in,
            Some(Duration::from_secs(4)),
            "an uncounted attempt does not grow it"
        );
        let d = decide(&attempt(9, 0, 10), &failure(false, false), now(), 0.0);
        assert_eq!(d.retry_in, Some(Duration::from_secs(60)), "capped");
        let told = Report::Failed(Failure {
            message: "later".into(),
            kind: String::new(),
            non_retryable: false,
            retry_after: Some(Duration::from_millis(250)),
            timed_out: false,
        });
        let d = decide(&attempt(5, 0, 10), &told, now(), 0.0);
        assert_eq!(d.retry_in, Some(Duration::from_millis(250)));
        let backoff = attempt(1, 0, 1).backoff;
        let jittered = Backoff {
            jitter: 0.5,
            ..backoff.clone()
        };
        assert_eq!(jittered.delay(1, -1.0), Duration::from_millis(500));
        assert_eq!(jittered.delay(1, 1.0), Duration::from_millis(1500));
        assert_eq!(
            backoff.delay(10_000, 1.0),
            Duration::from_secs(60),
            "no overflow"
        );
    }

    #[test]
    fn a_lapsed_lease_counts_only_when_its_handler_started() {
        let started = decide(&attempt(1, 0, 3), &lapse(true, false), now(), 0.0);
        assert_eq!(started.otherwise.state, JobState::Retrying);
        assert_eq!(
            started.otherwise.outcome,
            Some(AttemptOutcome::LeaseExpired)
        );
        assert!(started.otherwise.counts);
        let error = started.error.expect("error");
        assert_eq!(error.kind, LAPSED_KIND);
        assert!(error.message.contains("w1"), "{}", error.message);

        let last = decide(&attempt(1, 0, 1), &lapse(true, false), now(), 0.0);
        assert_eq!(last.otherwise.state, JobState::Failed);

        let timed_out = decide(&attempt(1, 0, 1), &lapse(true, true), now(), 0.0);
        assert_eq!(timed_out.otherwise.outcome, Some(AttemptOutcome::TimedOut));
        assert_eq!(
            timed_out.error.map(|e| e.kind),
            Some(TIMEOUT_KIND.to_owned())
        );

        // Never started (claimed ahead and lost with its server, or a claim whose commit was
        // lost): the job is available again and keeps its attempts, even its last one.
        let unstarted = decide(&attempt(1, 0, 1), &lapse(false, false), now(), 0.0);
        assert_eq!(unstarted.otherwise.state, JobState::Available);
        for end in [unstarted.otherwise, unstarted.on_cancel, unstarted.on_pause] {
            assert!(!end.counts);
            assert_eq!(end.outcome, None);
        }
        assert_eq!(unstarted.on_cancel.state, JobState::Cancelled);
        assert_eq!(unstarted.on_pause.state, JobState::Paused);
    }

    #[test]
    fn a_hand_back_never_counts() {
        let d = decide(&attempt(7, 2, 3), &Report::Released, now(), 0.0);
        assert_eq!(d.otherwise.state, JobState::Available);
        assert_eq!(d.on_cancel.state, JobState::Cancelled);
        assert_eq!(d.on_pause.state, JobState::Paused);
        assert!(
            ![d.otherwise, d.on_cancel, d.on_pause]
                .iter()
                .any(|e| e.counts)
        );
        assert!(d.reason.is_some());
    }

    #[test]
    fn a_wait_for_children_does_not_count_unless_a_cancel_was_asked() {
        let d = decide(&attempt(1, 0, 1), &Report::WaitsForChildren, now(), 0.0);
        assert_eq!(d.otherwise.state, JobState::Pending);
        assert!(!d.otherwise.counts);
        assert_eq!(d.otherwise.outcome, Some(AttemptOutcome::Suspended));
        assert_eq!(d.reason, Some(WAITING_FOR_CHILDREN));
        assert_eq!(d.on_cancel.state, JobState::Cancelled);
        assert!(d.on_cancel.counts);
        assert_eq!(d.on_pause.state, JobState::Paused);
        assert!(!d.on_pause.counts);
        assert!(d.error.is_none() && d.retry_in.is_none());

        let signal = decide(&attempt(1, 0, 1), &Report::WaitsForSignal, now(), 0.0);
        assert_eq!(signal.otherwise, d.otherwise);
        assert_eq!(signal.reason, Some(WAITING_FOR_SIGNAL));
    }
}
