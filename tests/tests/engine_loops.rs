//! The engine's loops, each on its own and in process: the dispatcher, the completer, the
//! reaper, the scheduler, the elector and a worker's session, on a database per test. Each test
//! starts only the loops it is about (`jobwire_tests::engine::setup`) and awaits the test
//! signals they announce (`engine::signals`) rather than sleeping; where a test proves that
//! something does not happen, it waits a bounded while for a signal that must not come.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use jobwire_server::{
    domain::{AttemptOutcome, EventKind, JobId, JobState, LeaseRef, QueueName, TenantId},
    engine::{
        Error,
        completer::Settle,
        dispatcher::Outgoing,
        ending::{self, Completion, Failure},
        session::{Close, Inbound, Outbound, WorkerSession},
        signals::Signal,
    },
    store::{LeasedRow, LogBatch, ProgressUpdate, SettleResult},
};
use jobwire_tests::engine::{Heard, JOB_TYPE, QUEUE, Setup, job, lease_of, session_config, setup};
use tokio::sync::mpsc;

/// A poll interval short enough that a bounded wait of [`QUIET`] spans several polls.
const POLL: Duration = Duration::from_millis(50);
/// How long a test waits to see that something does not happen: several polls or passes of
/// the loop under test.
const QUIET: Duration = Duration::from_millis(300);
/// A poll interval no test outlasts: whatever happens, happened for another reason.
const NEVER: Duration = Duration::from_secs(3600);
/// A leader's time to live: short, so that a successor takes over within a renewal interval
/// (a third of it) of a graceful stop, and within about this long of a stall.
const TTL: Duration = Duration::from_secs(1);
const REAP_INTERVAL: Duration = Duration::from_millis(20);

/// The number of leases a claim for `session` brought, from the next claim for it.
async fn claimed(heard: &mut Heard, session: u64) -> usize {
    heard
        .wait_for("a claim", |signal| match signal {
            Signal::Claimed {
                session: for_session,
                leases,
            } if *for_session == session => Some(*leases),
            _ => None,
        })
        .await
}

/// Lapsed attempts the reaper ends from now, counted until `total` have ended.
async fn reaped(heard: &mut Heard, total: usize) {
    let mut ended = 0;
    while ended < total {
        ended += heard
            .wait_for("a reaping pass", |signal| match signal {
                Signal::Reaped { leases } => Some(*leases),
                _ => None,
            })
            .await;
    }
    assert_eq!(ended, total);
}

/// The leases waiting in a session's channel, without waiting for more.
fn delivered(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<LeasedRow> {
    let mut rows = Vec::new();
    while let Ok(outgoing) = rx.try_recv() {
        rows.push(outgoing.row);
    }
    rows
}

/// Whether the job has spent any of its attempts: each test's jobs run once, so whether that
/// one counted.
async fn counted(s: &Setup, id: JobId) -> bool {
    let row = s.job(id).await;
    row.attempt > row.attempt_base
}

mod dispatcher {
    use super::*;

    #[tokio::test]
    async fn leases_only_the_jobs_of_its_tenant_queues_and_types() {
        let s = setup().await;
        let mine = s
            .enqueue((0..3).map(|_| job("alpha", JOB_TYPE)).collect())
            .await;
        let mut others = s
            .enqueue(vec![job("alpha", "other.type"), job("beta", JOB_TYPE)])
            .await;
        let elsewhere = TenantId::new_unchecked("elsewhere");
        others.extend(
            s.enqueue_for(&elsewhere, vec![job("alpha", JOB_TYPE)])
                .await,
        );
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(POLL);
        let (registration, mut rx) = s.registration(1, &["alpha"], &[JOB_TYPE], 10);
        dispatcher.register(registration).await;

        assert_eq!(
            claimed(&mut heard, 1).await,
            3,
            "a slot for each of its jobs"
        );
        let rows = delivered(&mut rx);
        let ids: HashSet<_> = rows.iter().map(|r| JobId(r.job.id)).collect();
        assert_eq!(ids, mine.iter().copied().collect::<HashSet<_>>());
        for id in &mine {
            let row = s.job(*id).await;
            assert_eq!(row.state, JobState::Running);
            assert_eq!(row.lease_owner.as_deref(), Some("worker-1"));
        }
        // The poll tries again; the other jobs are still not its to run.
        assert_eq!(claimed(&mut heard, 1).await, 0);
        for id in &others[..2] {
            assert_eq!(s.state(*id).await, JobState::Available);
        }
        let other_tenant = s.store.get_job(&elsewhere, others[2]).await.expect("job");
        assert_eq!(other_tenant.state, JobState::Available);
        assert!(delivered(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn holds_no_more_than_its_slots_until_one_is_credited() {
        let s = setup().await;
        s.enqueue((0..10).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(POLL);
        let (registration, mut rx) = s.registration(1, &[QUEUE], &[JOB_TYPE], 3);
        dispatcher.register(registration).await;

        assert_eq!(claimed(&mut heard, 1).await, 3);
        assert_eq!(delivered(&mut rx).len(), 3);
        // No slot frees, so however often it polls, it claims nothing more.
        heard
            .none_within(QUIET, "a claim while every slot is busy", |signal| {
                matches!(signal, Signal::Claimed { .. }).then_some(())
            })
            .await;
        assert_eq!(s.count(JobState::Running).await, 3);

        dispatcher.credit(1, 1).await;
        let leases = claimed(&mut heard, 1).await;
        assert_eq!(delivered(&mut rx).len(), 1, "one slot freed, one lease");
        // A claim may take leases ahead of free slots at the worker's measured pace (at most 50
        // a slot); they wait in the dispatcher, and none reaches the worker before a slot frees.
        assert!((1..=1 + 3 * 50).contains(&leases), "{leases} claimed");
        assert_eq!(s.count(JobState::Running).await, 3 + leases as i64);
    }

    #[tokio::test]
    async fn a_paused_queue_is_not_leased_until_it_resumes() {
        let s = setup().await;
        let queue = QueueName::new_unchecked(QUEUE);
        s.store
            .ensure_queues(&s.tenant, std::slice::from_ref(&queue))
            .await
            .expect("queue");
        s.store
            .pause_queue(&s.tenant, &queue, "test")
            .await
            .expect("pause");
        s.enqueue(vec![job(QUEUE, JOB_TYPE), job(QUEUE, JOB_TYPE)])
            .await;
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(POLL);
        let (registration, mut rx) = s.registration(1, &[QUEUE], &[JOB_TYPE], 5);
        dispatcher.register(registration).await;

        assert_eq!(claimed(&mut heard, 1).await, 0, "paused");
        assert_eq!(s.count(JobState::Available).await, 2);

        s.store
            .resume_queue(&s.tenant, &queue)
            .await
            .expect("resume");
        dispatcher.queue_changed(s.tenant.clone(), queue).await;
        let leases = heard
            .wait_for("a claim that leases", |signal| match signal {
                Signal::Claimed { leases, .. } if *leases > 0 => Some(*leases),
                _ => None,
            })
            .await;
        assert_eq!(leases, 2);
        assert_eq!(delivered(&mut rx).len(), 2);
    }

    #[tokio::test]
    async fn a_wake_claims_at_once_without_waiting_for_the_poll() {
        let s = setup().await;
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(NEVER);
        let (registration, mut rx) = s.registration(1, &[QUEUE], &[JOB_TYPE], 2);
        dispatcher.register(registration).await;
        assert_eq!(claimed(&mut heard, 1).await, 0, "nothing to run yet");

        let id = s.enqueue(vec![job(QUEUE, JOB_TYPE)]).await[0];
        // No notifier runs: without a wake-up the job waits for the poll, an hour away.
        heard
            .none_within(QUIET, "a claim without a wake-up", |signal| {
                matches!(signal, Signal::Claimed { .. }).then_some(())
            })
            .await;
        dispatcher
            .wake(s.tenant.clone(), QueueName::new_unchecked(QUEUE))
            .await;
        assert_eq!(claimed(&mut heard, 1).await, 1);
        let rows = delivered(&mut rx);
        assert_eq!(rows.len(), 1);
        assert_eq!(JobId(rows[0].job.id), id);
    }

    #[tokio::test]
    async fn leases_a_gone_worker_cannot_take_are_handed_back_uncounted() {
        let s = setup().await;
        let ids = s
            .enqueue((0..3).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(NEVER);
        let (registration, rx) = s.registration(1, &[QUEUE], &[JOB_TYPE], 3);
        drop(rx);
        dispatcher.register(registration).await;

        assert_eq!(claimed(&mut heard, 1).await, 3);
        let handed_back = heard
            .wait_for("a hand-back", |signal| match signal {
                Signal::HandedBack { leases } => Some(*leases),
                _ => None,
            })
            .await;
        assert_eq!(handed_back, 3);
        for id in ids {
            let row = s.job(id).await;
            assert_eq!(row.state, JobState::Available);
            assert_eq!(
                (row.attempt, row.attempt_base),
                (1, 1),
                "the attempt did not count"
            );
        }
    }

    #[tokio::test]
    async fn unregistering_hands_back_the_leases_claimed_ahead() {
        const SLOTS: u32 = 200;
        let s = setup().await;
        s.enqueue((0..500).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let mut heard = s.heard();
        let dispatcher = s.dispatcher(NEVER);
        let (registration, mut rx) = s.registration(1, &[QUEUE], &[JOB_TYPE], SLOTS);
        dispatcher.register(registration).await;
        assert_eq!(claimed(&mut heard, 1).await, SLOTS as usize);
        assert_eq!(delivered(&mut rx).len(), SLOTS as usize);

        // A worker that finishes every slot within moments has a pace that a claim's round trip
        // cannot keep up with, so the next claim takes leases ahead of its free slots. The pace
        // is measured over at least 10 ms from registration: let that pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
        dispatcher.credit(1, SLOTS).await;
        let leases = claimed(&mut heard, 1).await;
        assert_eq!(
            delivered(&mut rx).len(),
            SLOTS as usize,
            "a lease per free slot"
        );
        let ahead = leases - SLOTS as usize;
        assert!(ahead > 0, "no lease claimed ahead of a fast worker's slots");

        dispatcher.unregister(1).await;
        let handed_back = heard
            .wait_for("a hand-back", |signal| match signal {
                Signal::HandedBack { leases } => Some(*leases),
                _ => None,
            })
            .await;
        assert_eq!(handed_back, ahead as u64);
        assert_eq!(s.count(JobState::Running).await, 2 * i64::from(SLOTS));
        assert_eq!(
            s.count(JobState::Available).await,
            500 - 2 * i64::from(SLOTS)
        );
    }
}

mod completer {
    use super::*;

    fn completion(s: &Setup, lease: LeaseRef) -> Settle {
        Settle::Complete(Completion {
            wait: Default::default(),
            tenant: s.tenant.clone(),
            lease,
            result_type: Some("type.googleapis.com/test.Result".into()),
            result: Some(b"done".to_vec()),
        })
    }

    fn failure(s: &Setup, lease: LeaseRef) -> Settle {
        Settle::Fail(Failure {
            tenant: s.tenant.clone(),
            lease,
            message: "it broke".into(),
            kind: "test".into(),
            non_retryable: false,
            retry_after: None,
            timed_out: false,
        })
    }

    #[tokio::test]
    async fn a_completion_is_written_succeeded_with_its_event() {
        let s = setup().await;
        let id = s.enqueue(vec![job(QUEUE, JOB_TYPE)]).await[0];
        let lease = lease_of(&s.claim("w", 1, false).await[0]);
        let completer = s.completer();

        let result = completer.settle(completion(&s, lease)).await;
        assert_eq!(
            result.expect("settled"),
            SettleResult::Applied(JobState::Succeeded)
        );
        let row = s.job(id).await;
        assert_eq!(row.state, JobState::Succeeded);
        assert_eq!(row.result.as_deref(), Some(&b"done"[..]));
        assert!(row.finished_at.is_some());
        let events = s
            .store
            .job_events(&s.tenant, id, 0, i64::MAX, 100)
            .await
            .expect("events");
        let states: Vec<_> = events.iter().filter_map(|e| e.state).collect();
        assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");

        let resent = completer.settle(completion(&s, lease)).await;
        assert_eq!(resent.expect("answered"), SettleResult::AlreadySettled);
    }

    #[tokio::test]
    async fn a_report_for_a_lease_not_held_or_past_its_deadline_is_refused() {
        let s = setup().await;
        let mut timed = job(QUEUE, JOB_TYPE);
        timed.timeout_ms = Some(60_000);
        let ids = s.enqueue(vec![job(QUEUE, JOB_TYPE), timed]).await;
        let rows = s.claim("w", 2, false).await;
        let lease = |id: JobId| {
            lease_of(
                rows.iter()
                    .find(|r| JobId(r.job.id) == id)
                    .expect("claimed"),
            )
        };
        let completer = s.completer();

        let (held, timed) = (lease(ids[0]), lease(ids[1]));
        let older = LeaseRef {
            attempt: held.attempt - 1,
            ..held
        };
        let newer = LeaseRef {
            attempt: held.attempt + 1,
            ..held
        };
        for stale in [older, newer] {
            let result = completer.settle(completion(&s, stale)).await;
            assert_eq!(result.expect("answered"), SettleResult::Stale, "{stale:?}");
        }
        let foreign = Settle::Complete(Completion {
            wait: Default::default(),
            tenant: TenantId::new_unchecked("elsewhere"),
            lease: held,
            result_type: None,
            result: None,
        });
        let result = completer.settle(foreign).await;
        assert_eq!(
            result.expect("answered"),
            SettleResult::Stale,
            "another tenant's job"
        );
        assert_eq!(s.state(ids[0]).await, JobState::Running, "nothing changed");

        s.overrun(ids[1]).await;
        let late = completer.settle(completion(&s, timed)).await;
        assert_eq!(late.expect("answered"), SettleResult::Late);
        assert_eq!(
            s.state(ids[1]).await,
            JobState::Running,
            "the result was refused"
        );
    }

    /// Every report below is queued before the completer first runs: a test runs on one
    /// thread, and `join_all` sends them all in its first poll, before the test yields to the
    /// completer's task. So they form one batch, whose statements must still answer each caller
    /// for its own report.
    /// A worker sends a lease's log lines ahead of its progress; when both land in one batch,
    /// the line's event comes first, as the handler wrote them.
    #[tokio::test]
    async fn a_line_logged_before_a_progress_report_gets_the_earlier_event() {
        const JOBS: usize = 8;
        const ROUNDS: usize = 6;
        let s = setup().await;
        let ids = s
            .enqueue((0..JOBS).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let rows = s.claim("w", JOBS as i64, false).await;
        let completer = s.completer();
        for round in 0..ROUNDS {
            let reports = rows.iter().flat_map(|row| {
                let lease = lease_of(row);
                [
                    Settle::Logs(LogBatch {
                        tenant: s.tenant.clone(),
                        lease,
                        lines: vec![serde_json::json!({
                            "level": "INFO",
                            "message": format!("round {round}"),
                            "time": "2026-12-07T00:00:00Z",
                        })],
                    }),
                    Settle::Progress(ProgressUpdate {
                        tenant: s.tenant.clone(),
                        lease,
                        progress: serde_json::json!({"message": format!("round {round}")}),
                        fraction: None,
                    }),
                ]
            });
            let answers = futures::future::join_all(reports.map(|r| completer.settle(r))).await;
            assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        }
        for id in ids {
            let kinds: Vec<EventKind> = s
                .store
                .job_events(&s.tenant, id, 0, i64::MAX, 100)
                .await
                .expect("events")
                .into_iter()
                .map(|e| e.kind)
                .filter(|kind| matches!(kind, EventKind::Log | EventKind::Progress))
                .collect();
            let expected: Vec<EventKind> = (0..ROUNDS)
                .flat_map(|_| [EventKind::Log, EventKind::Progress])
                .collect();
            assert_eq!(kinds, expected, "job {id}");
        }
    }

    #[tokio::test]
    async fn concurrent_reports_share_a_batch_and_each_caller_gets_its_own_answer() {
        const JOBS: usize = 12;
        let s = setup().await;
        let mut jobs: Vec<_> = (0..JOBS).map(|_| job(QUEUE, JOB_TYPE)).collect();
        for spec in &mut jobs[JOBS / 2..] {
            spec.max_attempts = 1;
        }
        let ids = s.enqueue(jobs).await;
        let rows = s.claim("w", JOBS as i64, false).await;
        assert_eq!(rows.len(), JOBS);
        let lease = |id: JobId| {
            lease_of(
                rows.iter()
                    .find(|r| JobId(r.job.id) == id)
                    .expect("claimed"),
            )
        };
        // Per job, by its index modulo 3: a completion, a failure, or a completion for a lease
        // of an attempt it never had.
        let reports: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| match i % 3 {
                0 => completion(&s, lease(*id)),
                1 => failure(&s, lease(*id)),
                _ => completion(
                    &s,
                    LeaseRef {
                        attempt: 7,
                        ..lease(*id)
                    },
                ),
            })
            .collect();
        let mut heard = s.heard();
        let completer = s.completer();

        let answers =
            futures::future::join_all(reports.into_iter().map(|r| completer.settle(r))).await;
        let batch = heard
            .wait_for("a batch", |signal| match signal {
                Signal::Flushed { reports } => Some(*reports),
                _ => None,
            })
            .await;
        assert_eq!(batch, JOBS, "one batch");
        for (i, (id, answer)) in ids.iter().zip(answers).enumerate() {
            let answer = answer.unwrap_or_else(|e| panic!("job {i}: {e}"));
            let (expected, state) = match i % 3 {
                0 => (
                    SettleResult::Applied(JobState::Succeeded),
                    JobState::Succeeded,
                ),
                1 if i < JOBS / 2 => (
                    SettleResult::Applied(JobState::Retrying),
                    JobState::Retrying,
                ),
                1 => (SettleResult::Applied(JobState::Failed), JobState::Failed),
                _ => (SettleResult::Stale, JobState::Running),
            };
            assert_eq!(answer, expected, "job {i}");
            assert_eq!(s.state(*id).await, state, "job {i}");
        }
    }
}

mod reaper {
    use super::*;

    #[tokio::test]
    async fn a_lapsed_started_attempt_is_retried_or_failed_once_attempts_run_out() {
        let s = setup().await;
        let mut last = job(QUEUE, JOB_TYPE);
        last.max_attempts = 1;
        let ids = s.enqueue(vec![job(QUEUE, JOB_TYPE), last]).await;
        // Not reporting starts: every attempt counts as started at its claim.
        assert_eq!(s.claim("w", 2, false).await.len(), 2);
        for id in &ids {
            s.lapse(*id).await;
        }
        let mut heard = s.heard();
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        s.reaper(&leader.leadership, REAP_INTERVAL);
        reaped(&mut heard, 2).await;

        let retried = s.job(ids[0]).await;
        assert_eq!(retried.state, JobState::Retrying);
        assert!(counted(&s, ids[0]).await);
        let error = retried.last_error.expect("an error").0;
        assert_eq!(error.kind, "lease_expired");
        assert!(retried.run_at > retried.attempt_started_at.expect("started"));

        let failed = s.job(ids[1]).await;
        assert_eq!(failed.state, JobState::Failed);
        assert!(failed.finished_at.is_some());
        let attempts = s
            .store
            .list_attempts(&s.tenant, ids[1])
            .await
            .expect("attempts");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome, AttemptOutcome::LeaseExpired);
    }

    #[tokio::test]
    async fn a_lapsed_attempt_never_started_goes_back_uncounted_and_a_live_one_stays() {
        let s = setup().await;
        let mut only = job(QUEUE, JOB_TYPE);
        only.max_attempts = 1;
        let ids = s.enqueue(vec![only, job(QUEUE, JOB_TYPE)]).await;
        // Reporting starts, and none reported: neither handler started.
        assert_eq!(s.claim("w", 2, true).await.len(), 2);
        s.lapse(ids[0]).await;
        let mut heard = s.heard();
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        s.reaper(&leader.leadership, REAP_INTERVAL);
        reaped(&mut heard, 1).await;

        let released = s.job(ids[0]).await;
        assert_eq!(
            released.state,
            JobState::Available,
            "its one attempt is not spent"
        );
        assert!(!counted(&s, ids[0]).await);
        assert!(released.last_error.is_none());
        // Passes go on, and the lease that has not lapsed is left alone.
        let next = heard
            .wait_for("another pass", |signal| match signal {
                Signal::Reaped { leases } => Some(*leases),
                _ => None,
            })
            .await;
        assert_eq!(next, 0);
        assert_eq!(s.state(ids[1]).await, JobState::Running);
    }

    #[tokio::test]
    async fn a_replica_that_does_not_lead_does_not_reap() {
        let s = setup().await;
        let id = s.enqueue(vec![job(QUEUE, JOB_TYPE)]).await[0];
        s.claim("w", 1, false).await;
        s.lapse(id).await;
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        let mut follower = s.candidate(TTL);
        assert_eq!(follower.round().await, None, "the lease is taken");
        let mut heard = s.heard();
        s.reaper(&follower.leadership, REAP_INTERVAL);

        heard
            .none_within(QUIET, "a pass of a reaper that does not lead", |signal| {
                matches!(signal, Signal::Reaped { .. }).then_some(())
            })
            .await;
        assert_eq!(s.state(id).await, JobState::Running);

        leader.stop().await;
        follower.leads().await;
        reaped(&mut heard, 1).await;
        assert_eq!(s.state(id).await, JobState::Retrying);
    }
}

mod scheduler {
    use super::*;

    /// Jobs the scheduler promotes from now, counted until `total` have been.
    async fn promoted(heard: &mut Heard, total: u64) {
        let mut made = 0;
        while made < total {
            made += heard
                .wait_for("a scheduling pass", |signal| match signal {
                    Signal::Promoted { jobs } => Some(*jobs),
                    _ => None,
                })
                .await;
        }
        assert_eq!(made, total);
    }

    /// A job due in `delay`.
    fn later(delay: Duration) -> jobwire_server::store::NewJob {
        let mut job = job(QUEUE, JOB_TYPE);
        job.run_at = Some(chrono::Utc::now() + delay);
        job
    }

    #[tokio::test]
    async fn due_scheduled_and_retrying_jobs_become_available_and_others_wait() {
        let s = setup().await;
        let ids = s
            .enqueue(vec![
                later(Duration::from_millis(300)),
                later(Duration::from_secs(3600)),
                job(QUEUE, JOB_TYPE),
            ])
            .await;
        assert_eq!(s.state(ids[0]).await, JobState::Scheduled);
        let lease = lease_of(&s.claim("w", 1, false).await[0]);
        let failed = s
            .completer()
            .settle(Settle::Fail(Failure {
                tenant: s.tenant.clone(),
                lease,
                message: "again".into(),
                kind: "test".into(),
                non_retryable: false,
                retry_after: Some(Duration::from_millis(200)),
                timed_out: false,
            }))
            .await;
        assert_eq!(
            failed.expect("failed"),
            SettleResult::Applied(JobState::Retrying)
        );
        let mut heard = s.heard();
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        // Polling only hourly: the scheduler wakes for each job at its time.
        s.scheduler(&leader.leadership, NEVER);

        promoted(&mut heard, 2).await;
        assert_eq!(s.state(ids[0]).await, JobState::Available);
        assert_eq!(s.state(ids[2]).await, JobState::Available);
        assert_eq!(
            s.state(ids[1]).await,
            JobState::Scheduled,
            "not due for an hour"
        );
    }

    #[tokio::test]
    async fn only_the_leader_promotes() {
        let s = setup().await;
        let id = s.enqueue(vec![later(Duration::from_secs(3600))]).await[0];
        s.make_due(id).await;
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        let mut follower = s.candidate(TTL);
        assert_eq!(follower.round().await, None, "the lease is taken");
        let mut heard = s.heard();
        s.scheduler(&follower.leadership, POLL);

        heard
            .none_within(
                QUIET,
                "a pass of a scheduler that does not lead",
                |signal| matches!(signal, Signal::Promoted { .. }).then_some(()),
            )
            .await;
        assert_eq!(s.state(id).await, JobState::Scheduled);

        leader.stop().await;
        follower.leads().await;
        promoted(&mut heard, 1).await;
        assert_eq!(s.state(id).await, JobState::Available);
    }
}

mod leader {
    use super::*;
    use jobwire_tests::engine::Candidate;

    /// Of two candidates that have each had a round, the one that leads and the other.
    async fn elect(s: &Setup) -> (Candidate, Candidate) {
        let (mut a, mut b) = (s.candidate(TTL), s.candidate(TTL));
        let (ra, rb) = (a.round().await, b.round().await);
        match (ra, rb) {
            (Some(_), None) => (a, b),
            (None, Some(_)) => (b, a),
            _ => panic!("not exactly one leads: {ra:?} and {rb:?}"),
        }
    }

    #[tokio::test]
    async fn of_two_electors_exactly_one_leads_and_keeps_its_term() {
        let s = setup().await;
        let (mut leader, mut follower) = elect(&s).await;
        let term = leader.leadership.current().expect("leads");
        for _ in 0..3 {
            assert_eq!(leader.round().await, Some(term), "renewed under its term");
            assert_eq!(follower.round().await, None);
            assert_eq!(follower.leadership.current(), None);
        }
    }

    #[tokio::test]
    async fn a_stalled_leader_is_succeeded_within_its_time_to_live_under_a_higher_term() {
        let s = setup().await;
        let (leader, mut follower) = elect(&s).await;
        let old = leader.leadership.current().expect("leads");

        leader.stall();
        let stalled = Instant::now();
        let new = follower.leads().await;
        let took = stalled.elapsed();
        assert!(
            took <= TTL + Duration::from_secs(1),
            "took over after {took:?}"
        );
        assert!(new.0 > old.0, "term {new:?} after {old:?}");
        // The stalled one's own view lapsed no later than the lease in the database.
        assert_eq!(leader.leadership.current(), None);
        assert_eq!(follower.leadership.current(), Some(new));
    }

    #[tokio::test]
    async fn a_statement_fenced_by_an_old_term_does_nothing() {
        let s = setup().await;
        let ids = s
            .enqueue(vec![job(QUEUE, JOB_TYPE), {
                let mut job = job(QUEUE, JOB_TYPE);
                job.run_at = Some(chrono::Utc::now() + chrono::TimeDelta::hours(1));
                job
            }])
            .await;
        s.claim("w", 1, false).await;
        s.lapse(ids[0]).await;
        s.make_due(ids[1]).await;
        let (leader, mut follower) = elect(&s).await;
        let old = leader.leadership.current().expect("leads");
        leader.stop().await;
        let new = follower.leads().await;

        assert_eq!(s.store.promote_due(old, 10).await.expect("promote"), 0);
        assert_eq!(ending::reap(&s.store, old, 10).await.expect("reap"), 0);
        assert_eq!(s.state(ids[0]).await, JobState::Running);
        assert_eq!(s.state(ids[1]).await, JobState::Scheduled);

        assert_eq!(s.store.promote_due(new, 10).await.expect("promote"), 1);
        assert_eq!(ending::reap(&s.store, new, 10).await.expect("reap"), 1);
        assert_eq!(s.state(ids[0]).await, JobState::Retrying);
        assert_eq!(s.state(ids[1]).await, JobState::Available);
    }
}

mod session {
    use super::*;
    use jobwire_server::engine::session::SessionSpec;

    fn spec(s: &Setup, slots: u32, reports_started: bool) -> SessionSpec {
        SessionSpec {
            tenant: s.tenant.clone(),
            worker_id: "session-worker".into(),
            job_types: vec![JOB_TYPE.into()],
            queues: vec![QueueName::new_unchecked(QUEUE)],
            slots,
            prefetch: 0,
            running: Vec::new(),
            reports_started,
            version: String::new(),
            host: String::new(),
        }
    }

    fn completion(s: &Setup, lease: LeaseRef) -> Completion {
        Completion {
            wait: Default::default(),
            tenant: s.tenant.clone(),
            lease,
            result_type: None,
            result: None,
        }
    }

    /// The session's next message, which must come within the test's wait.
    async fn next(session: &mut WorkerSession) -> Outbound {
        tokio::time::timeout(jobwire_tests::engine::WAIT, session.next())
            .await
            .expect("a message for the worker")
            .expect("the engine is running")
    }

    /// The lease the session delivers next.
    async fn lease(session: &mut WorkerSession) -> LeaseRef {
        match next(session).await {
            Outbound::Lease { row, .. } => lease_of(&row),
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    /// The session's next `n` messages, as leases delivered and acks.
    async fn messages(
        session: &mut WorkerSession,
        n: usize,
    ) -> (Vec<LeaseRef>, Vec<(u64, Result<(), Error>)>) {
        let (mut leases, mut acks) = (Vec::new(), Vec::new());
        for _ in 0..n {
            match next(session).await {
                Outbound::Lease { row, .. } => leases.push(lease_of(&row)),
                Outbound::Ack(id, result) => acks.push((id, result)),
                other => panic!("expected a lease or an ack, got {other:?}"),
            }
        }
        (leases, acks)
    }

    #[tokio::test]
    async fn a_lease_frees_its_slot_once_however_often_its_outcome_is_sent() {
        let s = setup().await;
        let ids = s
            .enqueue((0..3).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let engine = s.engine(POLL);
        let (mut session, welcome) =
            WorkerSession::open(&engine, &s.store, session_config(), 1, spec(&s, 1, false))
                .await
                .expect("opened");
        assert!(welcome.rejected.is_empty());

        let first = lease(&mut session).await;
        session
            .handle(Inbound::Complete(1, completion(&s, first)))
            .await;
        let (leases, acks) = messages(&mut session, 2).await;
        assert!(matches!(acks[..], [(1, Ok(()))]), "{acks:?}");
        assert_eq!(leases.len(), 1, "the freed slot takes the next job");
        let second = leases[0];
        assert_eq!(s.state(first.job_id).await, JobState::Succeeded);

        // The same outcome again (a worker resends what it was not acknowledged) is answered,
        // and frees no second slot: the one slot is the second lease's.
        session
            .handle(Inbound::Complete(2, completion(&s, first)))
            .await;
        let (_, acks) = messages(&mut session, 1).await;
        assert!(matches!(acks[..], [(2, Ok(()))]), "{acks:?}");
        let more = tokio::time::timeout(QUIET, session.next()).await;
        assert!(
            more.is_err(),
            "a lease beyond the worker's one slot: {more:?}"
        );
        assert_eq!(s.count(JobState::Available).await, 1);

        session
            .handle(Inbound::Complete(3, completion(&s, second)))
            .await;
        let (leases, acks) = messages(&mut session, 2).await;
        assert!(matches!(acks[..], [(3, Ok(()))]), "{acks:?}");
        let last = ids
            .iter()
            .find(|id| ![first.job_id, second.job_id].contains(id))
            .expect("a third job");
        assert_eq!(leases.iter().map(|l| l.job_id).collect::<Vec<_>>(), [*last]);
        session.close(Close::WorkerLeft).await;
    }

    #[tokio::test]
    async fn a_report_for_a_lease_moved_on_or_past_its_deadline_is_refused_with_its_error() {
        let s = setup().await;
        let mut timed = job(QUEUE, JOB_TYPE);
        timed.timeout_ms = Some(60_000);
        let ids = s.enqueue(vec![job(QUEUE, JOB_TYPE), timed]).await;
        let engine = s.engine(POLL);
        let (mut session, _) =
            WorkerSession::open(&engine, &s.store, session_config(), 1, spec(&s, 2, false))
                .await
                .expect("opened");
        let (leases, _) = messages(&mut session, 2).await;
        let of = |id: JobId| *leases.iter().find(|l| l.job_id == id).expect("delivered");

        let moved_on = LeaseRef {
            attempt: of(ids[0]).attempt + 1,
            ..of(ids[0])
        };
        session
            .handle(Inbound::Complete(1, completion(&s, moved_on)))
            .await;
        let (_, acks) = messages(&mut session, 1).await;
        assert!(
            matches!(&acks[..], [(1, Err(Error::Stale(lease)))] if *lease == moved_on),
            "{acks:?}"
        );

        s.overrun(ids[1]).await;
        session
            .handle(Inbound::Complete(2, completion(&s, of(ids[1]))))
            .await;
        let (_, acks) = messages(&mut session, 1).await;
        assert!(
            matches!(&acks[..], [(2, Err(Error::Late(lease)))] if *lease == of(ids[1])),
            "{acks:?}"
        );
        assert_eq!(s.state(ids[1]).await, JobState::Running);
        session.close(Close::WorkerLeft).await;
    }

    /// A worker that left holds three leases: one it started, one delivered and not started,
    /// and one still on its way to it. The last goes back at once; the two it held lapse, and
    /// only the started one counts.
    #[tokio::test]
    async fn a_worker_that_left_spends_an_attempt_only_on_what_it_started() {
        let s = setup().await;
        let ids = s
            .enqueue((0..3).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let mut heard = s.heard();
        let engine = s.engine(NEVER);
        let (mut session, _) =
            WorkerSession::open(&engine, &s.store, session_config(), 1, spec(&s, 3, true))
                .await
                .expect("opened");
        assert_eq!(claimed(&mut heard, 1).await, 3);
        let (started, unstarted) = (lease(&mut session).await, lease(&mut session).await);

        session.handle(Inbound::Started(vec![started])).await;
        // Closing drives the report of the start to the completer, which notes it in a batch.
        let acks = session.close(Close::WorkerLeft).await;
        assert!(acks.is_empty(), "a start is not acknowledged: {acks:?}");
        let reports = heard
            .wait_for("a batch", |signal| match signal {
                Signal::Flushed { reports } => Some(*reports),
                _ => None,
            })
            .await;
        assert_eq!(reports, 1);
        assert!(s.handler_started(started.job_id).await);
        assert!(!s.handler_started(unstarted.job_id).await);

        assert_eq!(
            s.count(JobState::Available).await,
            1,
            "the lease on its way went back"
        );
        let on_its_way = ids
            .iter()
            .find(|id| ![started.job_id, unstarted.job_id].contains(id))
            .expect("a third job");
        assert_eq!(s.state(*on_its_way).await, JobState::Available);
        assert!(!counted(&s, *on_its_way).await);
        assert_eq!(s.state(started.job_id).await, JobState::Running);
        assert_eq!(s.state(unstarted.job_id).await, JobState::Running);

        s.lapse(started.job_id).await;
        s.lapse(unstarted.job_id).await;
        let mut leader = s.candidate(TTL);
        leader.leads().await;
        s.reaper(&leader.leadership, REAP_INTERVAL);
        reaped(&mut heard, 2).await;
        assert_eq!(s.state(started.job_id).await, JobState::Retrying);
        assert!(counted(&s, started.job_id).await);
        assert_eq!(s.state(unstarted.job_id).await, JobState::Available);
        assert!(!counted(&s, unstarted.job_id).await);
    }

    #[tokio::test]
    async fn a_drained_session_hands_back_what_its_worker_holds_uncounted() {
        let s = setup().await;
        let ids = s
            .enqueue((0..2).map(|_| job(QUEUE, JOB_TYPE)).collect())
            .await;
        let engine = s.engine(POLL);
        let (mut session, _) =
            WorkerSession::open(&engine, &s.store, session_config(), 1, spec(&s, 2, true))
                .await
                .expect("opened");
        let (leases, _) = messages(&mut session, 2).await;
        assert_eq!(leases.len(), 2);

        session.handle(Inbound::Drain).await;
        session.close(Close::Drained).await;
        for id in ids {
            assert_eq!(s.state(id).await, JobState::Available);
            assert!(!counted(&s, id).await);
        }
    }
}
