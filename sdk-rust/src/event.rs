//! Typed job events, as [`JobHandle::watch`](crate::JobHandle::watch) and
//! [`Client::watch_jobs`](crate::Client::watch_jobs) yield them.
//!
//! Each protocol `JobEvent` is converted once, here, into a [`JobEvent`] whose
//! [`kind`](JobEvent::kind) a caller can match on; [`as_proto`](JobEvent::as_proto) keeps the
//! message as the server sent it. An event this SDK cannot read (a kind or state added to the
//! protocol after it was built) converts to `None`, so that the stream skips it rather than
//! ending over it; its sequence still counts for resuming.

use std::time::SystemTime;

use crate::error::JobFailure;
use crate::job::{self, JobError, JobId, JobInfo, JobState};
use crate::proto::v1 as pb;
use crate::proto::v1::job_event::Event;
use crate::report::{LogLevel, ProgressInfo};

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    job_id: JobId,
    kind: JobEventKind,
    event: pb::JobEvent,
}

/// What a [`JobEvent`] says happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum JobEventKind {
    /// The job changed state.
    #[non_exhaustive]
    StateChanged {
        /// The state it is in now.
        state: JobState,
        /// Why, when there is more to say than the state: a cancel reason, "lease expired", ...
        reason: Option<String>,
        /// The worker that took the lease, for [`JobState::Running`].
        worker_id: Option<String>,
        /// The failure, for [`JobState::Retrying`] and [`JobState::Failed`].
        error: Option<JobError>,
        /// The job as it was when the event was delivered (not when it happened: a replayed
        /// event shows the job's later state). Boxed: it is much larger than the other kinds.
        job: Option<Box<JobInfo>>,
        /// Who made the change, for changes made through the API (approve, reject, cancel,
        /// pause, resume, retry).
        actor: Option<Actor>,
    },
    /// The handler reported progress (coalesced on the way: the latest value at each write).
    Progress(ProgressInfo),
    /// The handler logged a line.
    #[non_exhaustive]
    Log {
        /// Its severity.
        level: LogLevel,
        /// The line.
        message: String,
        /// When the handler logged it.
        time: Option<SystemTime>,
    },
    /// A cancel or pause reached the running job; its worker has been told to stop.
    #[non_exhaustive]
    StopRequested {
        /// [`JobState::Cancelled`] or [`JobState::Paused`].
        target: JobState,
        /// Why, if a reason was given.
        reason: Option<String>,
        /// Who asked for the stop.
        actor: Option<Actor>,
    },
    /// A signal was delivered to the job ([`Client::signal_job`](crate::Client::signal_job)).
    #[non_exhaustive]
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Who sent it.
        actor: Option<Actor>,
    },
}

/// The caller behind a change: the API key it used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Actor {
    /// The key's id; `None` on a server running without keys.
    pub key_id: Option<String>,
    /// The key's name when it acted.
    pub key_name: String,
}

impl Actor {
    fn from_proto(actor: &pb::Actor) -> Self {
        Self {
            key_id: owned(&actor.key_id),
            key_name: actor.key_name.clone(),
        }
    }
}

impl JobEvent {
    /// The typed event, or `None` when this SDK cannot read it (an unknown kind, or a state
    /// change into an unknown state).
    pub(crate) fn from_proto(event: pb::JobEvent) -> Option<Self> {
        let kind = match event.event.as_ref()? {
            Event::StateChanged(change) => JobEventKind::StateChanged {
                state: JobState::from_proto(change.state).ok()?,
                reason: owned(&change.reason),
                worker_id: owned(&change.worker_id),
                error: change.error.as_ref().map(JobError::from_proto),
                // A snapshot that does not convert is left out; the event itself still counts.
                job: change
                    .job
                    .clone()
                    .and_then(|job| JobInfo::from_proto(job).ok())
                    .map(Box::new),
                actor: change.actor.as_ref().map(Actor::from_proto),
            },
            Event::Progress(progress) => {
                JobEventKind::Progress(ProgressInfo::from_proto(progress.clone()))
            }
            Event::Log(line) => JobEventKind::Log {
                level: LogLevel::from_proto(line.level),
                message: line.message.clone(),
                time: job::system_time(line.time.as_ref()),
            },
            Event::StopRequested(stop) => JobEventKind::StopRequested {
                target: JobState::from_proto(stop.target_state).ok()?,
                reason: owned(&stop.reason),
                actor: stop.actor.as_ref().map(Actor::from_proto),
            },
            Event::SignalReceived(signal) => JobEventKind::SignalReceived {
                name: signal.name.clone(),
                actor: signal.actor.as_ref().map(Actor::from_proto),
            },
        };
        Some(Self {
            job_id: JobId::from(event.job_id.clone()),
            kind,
            event,
        })
    }

    /// The event's place in the tenant's order of events; resume a watch after it with
    /// [`JobHandle::watch_from`](crate::JobHandle::watch_from) or
    /// [`WatchJobs::after_sequence`](crate::WatchJobs::after_sequence).
    pub fn sequence(&self) -> i64 {
        self.event.sequence
    }

    /// The job it happened to.
    pub fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// When it happened.
    pub fn time(&self) -> Option<SystemTime> {
        job::system_time(self.event.time.as_ref())
    }

    /// The attempt it belongs to (0 before the first).
    pub fn attempt(&self) -> u32 {
        job::count(self.event.attempt)
    }

    /// What happened.
    pub fn kind(&self) -> &JobEventKind {
        &self.kind
    }

    /// What happened.
    pub fn into_kind(self) -> JobEventKind {
        self.kind
    }

    /// The state the job entered, when this event is a state change.
    pub fn state(&self) -> Option<JobState> {
        match &self.kind {
            JobEventKind::StateChanged { state, .. } => Some(*state),
            _ => None,
        }
    }

    /// Whether the job finished with this event: a state change into SUCCEEDED, FAILED or
    /// CANCELLED. A job's watch ends after it.
    pub fn is_terminal(&self) -> bool {
        self.state().is_some_and(JobState::is_terminal)
    }

    /// The whole message as the server sent it.
    pub fn as_proto(&self) -> &pb::JobEvent {
        &self.event
    }

    /// How the job ended, when this event is its change into FAILED or CANCELLED. The job's
    /// snapshot is preferred when it still shows that state (it is richer); otherwise, as when
    /// the job has been retried since, the event's own fields describe the failure.
    pub(crate) fn failure(&self) -> Option<JobFailure> {
        let JobEventKind::StateChanged {
            state,
            reason,
            error,
            job,
            ..
        } = &self.kind
        else {
            return None;
        };
        if let Some(failure) = job
            .as_deref()
            .filter(|job| job.state() == *state)
            .and_then(JobFailure::from_info)
        {
            return Some(failure);
        }
        matches!(state, JobState::Failed | JobState::Cancelled).then(|| {
            JobFailure::new(
                self.job_id.clone(),
                *state,
                self.attempt(),
                error.clone(),
                reason.clone().filter(|_| *state == JobState::Cancelled),
            )
        })
    }
}

/// Proto3 strings are empty when unset; the typed API says `None` instead.
fn owned(value: &str) -> Option<String> {
    job::non_empty(value).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn event(kind: Event) -> pb::JobEvent {
        pb::JobEvent {
            sequence: 42,
            job_id: "j1".into(),
            time: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            attempt: 2,
            event: Some(kind),
        }
    }

    fn state_changed(state: pb::JobState, job: Option<pb::Job>) -> Event {
        Event::StateChanged(pb::StateChanged {
            state: state as i32,
            reason: String::new(),
            worker_id: "w1".into(),
            error: None,
            job,
            actor: None,
        })
    }

    #[test]
    fn common_fields_are_typed() {
        let converted =
            JobEvent::from_proto(event(state_changed(pb::JobState::Running, None))).expect("known");
        assert_eq!(converted.sequence(), 42);
        assert_eq!(converted.job_id().as_str(), "j1");
        assert_eq!(
            converted.time(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100))
        );
        assert_eq!(converted.attempt(), 2);
        assert_eq!(converted.as_proto().sequence, 42);
        assert_eq!(converted.state(), Some(JobState::Running));
        assert!(!converted.is_terminal());
        let JobEventKind::StateChanged {
            state,
            reason,
            worker_id,
            error,
            job,
            actor,
        } = converted.into_kind()
        else {
            panic!("expected a state change");
        };
        assert_eq!(state, JobState::Running);
        assert_eq!(reason, None);
        assert_eq!(actor, None);
        assert_eq!(worker_id.as_deref(), Some("w1"));
        assert_eq!(error, None);
        assert_eq!(job, None);
    }

    #[test]
    fn every_kind_converts() {
        let progress = JobEvent::from_proto(event(Event::Progress(pb::Progress {
            fraction: Some(0.5),
            ..Default::default()
        })))
        .expect("known");
        assert!(matches!(progress.kind(), JobEventKind::Progress(p) if p.fraction() == Some(0.5)));

        let log = JobEvent::from_proto(event(Event::Log(pb::LogLine {
            level: pb::LogLevel::Warn as i32,
            message: "disk almost full".into(),
            time: None,
        })))
        .expect("known");
        assert!(matches!(
            log.kind(),
            JobEventKind::Log { level: LogLevel::Warn, message, time: None } if message == "disk almost full"
        ));

        let stop = JobEvent::from_proto(event(Event::StopRequested(pb::StopRequested {
            target_state: pb::JobState::Paused as i32,
            reason: "maintenance".into(),
            actor: Some(pb::Actor {
                key_id: "0190f0a0-0000-7000-8000-000000000001".into(),
                key_name: "ops".into(),
            }),
        })))
        .expect("known");
        assert!(matches!(
            stop.kind(),
            JobEventKind::StopRequested { target: JobState::Paused, reason: Some(r), actor: Some(a) }
                if r == "maintenance" && a.key_name == "ops" && a.key_id.is_some()
        ));
        assert_eq!(stop.state(), None);
    }

    #[test]
    fn unreadable_events_convert_to_none() {
        let mut empty = event(state_changed(pb::JobState::Running, None));
        empty.event = None;
        assert!(JobEvent::from_proto(empty).is_none());
        let unknown_state = event(Event::StateChanged(pb::StateChanged {
            state: 99,
            ..Default::default()
        }));
        assert!(JobEvent::from_proto(unknown_state).is_none());
    }

    #[test]
    fn terminal_changes_carry_the_snapshot() {
        let snapshot = pb::Job {
            id: "j1".into(),
            state: pb::JobState::Succeeded as i32,
            ..Default::default()
        };
        let done = JobEvent::from_proto(event(state_changed(
            pb::JobState::Succeeded,
            Some(snapshot),
        )))
        .expect("known");
        assert!(done.is_terminal());
        assert!(matches!(
            done.kind(),
            JobEventKind::StateChanged { job: Some(job), .. } if job.state() == JobState::Succeeded
        ));
        assert_eq!(done.failure(), None);
    }

    #[test]
    fn a_failure_comes_from_the_event_when_the_snapshot_moved_on() {
        let retried = pb::Job {
            id: "j1".into(),
            state: pb::JobState::Available as i32,
            ..Default::default()
        };
        let failed = JobEvent::from_proto(event(Event::StateChanged(pb::StateChanged {
            state: pb::JobState::Failed as i32,
            error: Some(pb::JobError {
                message: "disk full".into(),
                attempt: 2,
                ..Default::default()
            }),
            job: Some(retried),
            ..Default::default()
        })))
        .expect("known");
        let failure = failed.failure().expect("a failure");
        assert_eq!(failure.state(), JobState::Failed);
        assert_eq!(failure.attempt(), 2);
        assert_eq!(
            failure.last_error().map(JobError::message),
            Some("disk full")
        );

        let cancelled = JobEvent::from_proto(event(Event::StateChanged(pb::StateChanged {
            state: pb::JobState::Cancelled as i32,
            reason: "not needed".into(),
            ..Default::default()
        })))
        .expect("known");
        let failure = cancelled.failure().expect("a failure");
        assert_eq!(failure.cancel_reason(), Some("not needed"));
    }
}
