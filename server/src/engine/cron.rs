//! The cron loop: creates the jobs of due schedule ticks. Runs on the leader only.
//!
//! It sleeps until the earliest next tick of any schedule (never longer than the poll
//! interval), woken early when a schedule is created or changed on any replica. Each pass locks
//! the due schedules, decides which ticks get a job (catch-up policy) and whether the previous
//! job is in the way (overlap policy), and commits the jobs with the schedules' advance. A
//! replica that loses leadership mid-pass cannot double a tick: the store refuses a second job
//! for the same schedule and tick.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use super::{
    leader::{Leadership, lead_on_timer, sleep_until},
    notifier::DueSignal,
};
use crate::{
    domain::{CronSchedule, JobId, TenantId},
    store::{CatchUpPolicy, DueSchedule, OverlapPolicy, StopKind, Store, Term},
};

/// Schedules fired per transaction.
const BATCH: i64 = 100;
/// Ticks found on time that one pass creates at most, per schedule; the rest count as missed.
const MAX_ON_TIME: usize = 1000;

pub struct Cron {
    store: Store,
    poll_interval: Duration,
    leadership: Leadership,
    due: DueSignal,
}

impl Cron {
    pub fn new(
        store: Store,
        poll_interval: Duration,
        leadership: Leadership,
        due: DueSignal,
    ) -> Self {
        Self {
            store,
            poll_interval,
            leadership,
            due,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let (leadership, due) = (self.leadership.clone(), self.due.clone());
        lead_on_timer(leadership, &due, shutdown, |term| self.pass(term)).await;
    }

    /// Fires what is due and returns how long to sleep.
    async fn pass(&self, term: Term) -> Duration {
        loop {
            match self.fire_batch(term).await {
                Ok(n) if n >= BATCH as usize => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "firing schedules failed");
                    return self.poll_interval;
                }
            }
        }
        match self.store.next_schedule_tick().await {
            Ok(next) => sleep_until(next, self.poll_interval),
            Err(error) => {
                tracing::warn!(%error, "reading the next schedule tick failed");
                self.poll_interval
            }
        }
    }

    /// One transaction over up to [`BATCH`] due schedules. Returns how many were due.
    async fn fire_batch(&self, term: Term) -> crate::store::Result<usize> {
        let (mut firing, due) = self.store.begin_firing(term, BATCH).await?;
        let mut cancels = Vec::new();
        for schedule in &due {
            let decision = decide(schedule);
            let created = firing
                .fire(&schedule.schedule, &decision.ticks, decision.next_run_at)
                .await?;
            let s = &schedule.schedule;
            if decision.skipped_for_overlap > 0 {
                tracing::info!(schedule = %s.name, tenant = %s.tenant_id,
                    ticks = decision.skipped_for_overlap, "ticks skipped: the last job runs on");
            }
            if !created.is_empty() {
                tracing::debug!(schedule = %s.name, jobs = created.len(), "schedule fired");
                if let (Some(previous), true) = (s.last_job_id, decision.cancel_previous) {
                    cancels.push((TenantId::new_unchecked(&s.tenant_id), JobId(previous)));
                }
            }
            if decision.next_run_at.is_none() {
                tracing::warn!(schedule = %s.name, tenant = %s.tenant_id,
                    "schedule can never tick again (or its time zone is unknown); paused");
            }
        }
        firing.commit().await?;
        for (tenant, id) in cancels {
            self.cancel_previous(&tenant, id).await;
        }
        Ok(due.len())
    }

    /// Cancels the job an overlapping tick displaced. Best effort: the new job exists already,
    /// and a job that finished meanwhile needs nothing.
    async fn cancel_previous(&self, tenant: &TenantId, id: JobId) {
        const REASON: &str = "replaced by the next tick of its schedule";
        let result = match self.store.cancel_queued(tenant, id, REASON, None).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => self
                .store
                .request_stop(tenant, id, StopKind::Cancel, REASON, None)
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::warn!(%error, job_id = %id, "could not cancel the previous run");
        }
    }
}

/// What to do with one due schedule.
#[derive(Debug, PartialEq)]
struct Decision {
    /// Ticks to create jobs for, oldest first.
    ticks: Vec<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
    cancel_previous: bool,
    skipped_for_overlap: usize,
}

fn decide(due: &DueSchedule) -> Decision {
    let s = &due.schedule;
    let Ok(cron) = CronSchedule::parse(&s.cron, &s.time_zone) else {
        return Decision {
            ticks: Vec::new(),
            next_run_at: None,
            cancel_previous: false,
            skipped_for_overlap: 0,
        };
    };
    let now = due.db_now;
    let mut ticks = match s.next_run_at {
        Some(first) => due_ticks(
            &cron,
            first,
            now,
            TimeDelta::milliseconds(s.misfire_grace_ms),
            s.catch_up_policy,
            usize::try_from(s.max_catch_up).unwrap_or(1),
        ),
        None => Vec::new(),
    };
    let previous_running = due.last_job_state.is_some_and(|state| !state.is_terminal());
    let mut skipped_for_overlap = 0;
    let mut cancel_previous = false;
    if previous_running && !ticks.is_empty() {
        match s.overlap_policy {
            OverlapPolicy::Allow => {}
            OverlapPolicy::Skip => {
                skipped_for_overlap = ticks.len();
                ticks.clear();
            }
            OverlapPolicy::CancelPrevious => cancel_previous = true,
        }
    }
    Decision {
        ticks,
        next_run_at: cron.next_after(now),
        cancel_previous,
        skipped_for_overlap,
    }
}

/// The ticks from `first` up to `now` that get a job, oldest first: every tick at most `grace`
/// late, and of the older (missed) ones what the catch-up policy keeps. Walks back from `now`,
/// so a long outage costs only the ticks kept.
fn due_ticks(
    cron: &CronSchedule,
    first: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: TimeDelta,
    policy: CatchUpPolicy,
    max_catch_up: usize,
) -> Vec<DateTime<Utc>> {
    let keep_missed = match policy {
        CatchUpPolicy::Once => 1,
        CatchUpPolicy::Skip => 0,
        CatchUpPolicy::All => max_catch_up,
    };
    let mut on_time = Vec::new();
    let mut missed = Vec::new();
    let mut tick = cron.previous(now, true);
    while let Some(t) = tick.filter(|t| *t >= first) {
        if now - t <= grace && on_time.len() < MAX_ON_TIME {
            on_time.push(t);
        } else if missed.len() < keep_missed {
            missed.push(t);
        } else {
            break;
        }
        tick = cron.previous(t, false);
    }
    on_time.into_iter().chain(missed).rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap()
    }

    fn every_minute() -> CronSchedule {
        CronSchedule::parse("* * * * *", "UTC").unwrap()
    }

    #[test]
    fn on_time_ticks_all_run_whatever_the_policy() {
        let ticks = due_ticks(
            &every_minute(),
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:02:30Z"),
            TimeDelta::minutes(5),
            CatchUpPolicy::Skip,
            10,
        );
        assert_eq!(
            ticks,
            vec![
                at("2026-01-01T00:00:00Z"),
                at("2026-01-01T00:01:00Z"),
                at("2026-01-01T00:02:00Z")
            ]
        );
    }

    #[test]
    fn missed_ticks_follow_the_catch_up_policy() {
        let run = |policy, max| {
            due_ticks(
                &every_minute(),
                at("2026-01-01T00:00:00Z"),
                at("2026-01-01T01:00:30Z"),
                TimeDelta::seconds(60),
                policy,
                max,
            )
        };
        // 01:00 is on time; 00:00 to 00:59 were missed.
        assert_eq!(
            run(CatchUpPolicy::Skip, 100),
            vec![at("2026-01-01T01:00:00Z")]
        );
        assert_eq!(
            run(CatchUpPolicy::Once, 100),
            vec![at("2026-01-01T00:59:00Z"), at("2026-01-01T01:00:00Z")]
        );
        let all = run(CatchUpPolicy::All, 100);
        assert_eq!(all.len(), 61);
        assert_eq!(all[0], at("2026-01-01T00:00:00Z"));
        let bounded = run(CatchUpPolicy::All, 3);
        assert_eq!(
            bounded,
            vec![
                at("2026-01-01T00:57:00Z"),
                at("2026-01-01T00:58:00Z"),
                at("2026-01-01T00:59:00Z"),
                at("2026-01-01T01:00:00Z")
            ]
        );
    }

    #[test]
    fn a_time_zone_moves_the_ticks() {
        let cron = CronSchedule::parse("0 3 * * *", "Europe/Berlin").unwrap();
        // 03:00 in Berlin in winter is 02:00 UTC.
        assert_eq!(
            cron.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T02:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_told_apart() {
        assert!(matches!(
            CronSchedule::parse("* * *", "UTC"),
            Err(crate::domain::CronError::Expression(_))
        ));
        assert!(matches!(
            CronSchedule::parse("61 * * * *", "UTC"),
            Err(crate::domain::CronError::Expression(_))
        ));
        assert!(matches!(
            CronSchedule::parse("* * * * *", "Mars/Olympus"),
            Err(crate::domain::CronError::TimeZone(_))
        ));
        assert!(CronSchedule::parse("*/5 * * * * *", "UTC").is_ok());
    }
}
