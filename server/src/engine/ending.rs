//! Ending attempts: turns what a worker or the reaper reports into decisions
//! (`domain::ending::decide`) and hands them to the one statement that applies them
//! (`Store::end_attempts`). Completions, failures, hand-backs and lapses all end here, so an
//! attempt ends the same way whichever of them ends it.

use std::time::Duration;

use rand::Rng;

use crate::{
    domain::{
        LeaseRef, TenantId,
        ending::{self, Decision, Failure as FailureReport, Lapse, Report},
    },
    store::{self, AttemptEnd, Guard, Resend, SettleResult, SignalWait, Store, Term},
};

/// A successful attempt to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub result_type: Option<String>,
    pub result: Option<Vec<u8>>,
    /// The handler returned to wait rather than with a result.
    pub wait: Option<Wait>,
}

/// What a handler that returned without a result waits for.
#[derive(Debug, Clone)]
pub enum Wait {
    /// Every child it enqueued to end.
    Children,
    /// A signal, for at most `timeout`.
    Signal {
        wait: SignalWait,
        timeout: Option<Duration>,
    },
}

/// A failed attempt to record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub message: String,
    pub kind: String,
    pub non_retryable: bool,
    /// Overrides the policy's backoff when set.
    pub retry_after: Option<Duration>,
    /// The worker stopped the attempt because it ran past its timeout.
    pub timed_out: bool,
}

/// Why leases are handed back: the event says it.
pub const NOT_DELIVERED: &str = "lease not delivered";

/// A uniform draw in [-1, 1] for a backoff's jitter.
fn draw() -> f64 {
    rand::rng().random_range(-1.0..=1.0)
}

/// The end of a completion (or of a wait for children): it needs nothing of its job to be
/// decided. A result after the attempt's deadline is refused (the attempt timed out).
pub fn completion(completion: &Completion) -> AttemptEnd {
    let result = completion
        .result_type
        .clone()
        .zip(completion.result.clone());
    AttemptEnd {
        tenant: completion.tenant.clone(),
        lease: completion.lease,
        decision: match completion.wait {
            None => Decision::completed(),
            Some(Wait::Children) => Decision::waits_for_children(),
            Some(Wait::Signal { .. }) => Decision::waits_for_signal(),
        },
        result,
        guard: Guard::InTime,
        resend: Resend::Completion,
        signal_wait: match &completion.wait {
            Some(Wait::Signal { wait, timeout }) => Some((wait.clone(), *timeout)),
            _ => None,
        },
    }
}

/// The ends of failures: each decided from its attempt's facts, read in one statement. A
/// failure past the attempt's deadline is a timeout, whatever the worker called it.
pub async fn failures(store: &Store, failures: &[Failure]) -> store::Result<Vec<AttemptEnd>> {
    let leases: Vec<(TenantId, LeaseRef)> = failures
        .iter()
        .map(|f| (f.tenant.clone(), f.lease))
        .collect();
    let running = store.running_attempts(&leases).await?;
    Ok(failures
        .iter()
        .zip(running)
        .map(|(failure, running)| {
            let decision = match running {
                Some(running) => ending::decide(
                    &running.attempt,
                    &Report::Failed(FailureReport {
                        message: failure.message.clone(),
                        kind: failure.kind.clone(),
                        non_retryable: failure.non_retryable,
                        retry_after: failure.retry_after,
                        timed_out: failure.timed_out || running.past_deadline,
                    }),
                    running.now,
                    draw(),
                ),
                // No longer running: the statement will match nothing, and find whether this is
                // a resend of the failure that ended it.
                None => Decision::released(NOT_DELIVERED),
            };
            AttemptEnd {
                tenant: failure.tenant.clone(),
                lease: failure.lease,
                decision,
                result: None,
                guard: Guard::None,
                resend: Resend::Failure,
                signal_wait: None,
            }
        })
        .collect())
}

/// Hands back leases this server never delivered: the attempts do not count, and the jobs are
/// available again at once (or cancelled or paused, as asked meanwhile).
pub async fn release(store: &Store, tenant: &TenantId, leases: &[LeaseRef]) -> store::Result<u64> {
    end_unstarted(store, tenant, leases, Guard::None).await
}

/// Hands back leases a worker held, as [`release`] does, but only those no handler started: a
/// started one stays the worker's until it reports or its lease lapses, and then counts. A
/// worker that does not report starts had each lease counted as started on delivery.
pub async fn hand_back(
    store: &Store,
    tenant: &TenantId,
    leases: &[LeaseRef],
) -> store::Result<u64> {
    end_unstarted(store, tenant, leases, Guard::Unstarted).await
}

async fn end_unstarted(
    store: &Store,
    tenant: &TenantId,
    leases: &[LeaseRef],
    guard: Guard,
) -> store::Result<u64> {
    let ends: Vec<AttemptEnd> = leases
        .iter()
        .map(|lease| AttemptEnd {
            tenant: tenant.clone(),
            lease: *lease,
            decision: Decision::released(NOT_DELIVERED),
            result: None,
            guard,
            resend: Resend::Never,
            signal_wait: None,
        })
        .collect();
    let results = store.end_attempts(&ends).await?;
    let released = results
        .iter()
        .filter(|r| matches!(r, SettleResult::Applied(_)))
        .count();
    Ok(u64::try_from(released).unwrap_or(u64::MAX))
}

/// Ends up to `limit` attempts whose lease lapsed (invariant 2: never RUNNING forever), as the
/// leader of `term`.
/// Returns how many ended.
pub async fn reap(store: &Store, term: Term, limit: i64) -> store::Result<usize> {
    let lapsed = store.lapsed_attempts(term, limit).await?;
    if lapsed.is_empty() {
        return Ok(0);
    }
    let ends: Vec<AttemptEnd> = lapsed
        .into_iter()
        .map(|l| AttemptEnd {
            decision: ending::decide(
                &l.attempt,
                &Report::Lapsed(Lapse {
                    started: l.started,
                    timed_out: l.timed_out,
                    worker: l.worker,
                    timeout: l
                        .timeout_ms
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map(Duration::from_millis),
                }),
                l.now,
                draw(),
            ),
            tenant: l.tenant,
            lease: l.lease,
            result: None,
            guard: Guard::Lapsed,
            resend: Resend::Never,
            signal_wait: None,
        })
        .collect();
    let results = store.end_attempts(&ends).await?;
    Ok(results
        .iter()
        .filter(|r| matches!(r, SettleResult::Applied(_)))
        .count())
}
