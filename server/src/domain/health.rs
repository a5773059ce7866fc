//! A queue's health: how long its oldest available job has waited, against the thresholds set
//! on the queue. Decided here, in code, from figures the store read (lessons: "decide in code,
//! apply in SQL"), so the rule is one function with its own tests.

use std::time::Duration;

/// How a queue keeps up; `QueueHealth` in queue_service.proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QueueHealth {
    Ok,
    Warning,
    Critical,
}

/// The waits at which a queue turns WARNING and CRITICAL; `None` never turns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthThresholds {
    pub warn_after: Option<Duration>,
    pub critical_after: Option<Duration>,
}

impl HealthThresholds {
    /// The health of a queue whose oldest available job has waited `oldest_available_age`
    /// (`None`: nothing is waiting). A threshold is crossed once the wait reaches it; the worse
    /// state wins, so thresholds set the wrong way round (warn after critical) still report
    /// CRITICAL at the critical one.
    pub fn judge(&self, oldest_available_age: Option<Duration>) -> QueueHealth {
        let Some(age) = oldest_available_age else {
            return QueueHealth::Ok;
        };
        let crossed = |threshold: Option<Duration>| threshold.is_some_and(|t| age >= t);
        if crossed(self.critical_after) {
            QueueHealth::Critical
        } else if crossed(self.warn_after) {
            QueueHealth::Warning
        } else {
            QueueHealth::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn an_empty_queue_is_ok_whatever_its_thresholds() {
        let thresholds = HealthThresholds {
            warn_after: secs(1),
            critical_after: secs(2),
        };
        assert_eq!(thresholds.judge(None), QueueHealth::Ok);
    }

    #[test]
    fn a_queue_without_thresholds_is_always_ok() {
        assert_eq!(
            HealthThresholds::default().judge(secs(365 * 24 * 3600)),
            QueueHealth::Ok
        );
    }

    #[test]
    fn the_wait_crosses_each_threshold_as_it_reaches_it() {
        let thresholds = HealthThresholds {
            warn_after: secs(60),
            critical_after: secs(300),
        };
        assert_eq!(thresholds.judge(secs(0)), QueueHealth::Ok);
        assert_eq!(
            thresholds.judge(Some(Duration::from_millis(59_999))),
            QueueHealth::Ok
        );
        assert_eq!(thresholds.judge(secs(60)), QueueHealth::Warning);
        assert_eq!(thresholds.judge(secs(299)), QueueHealth::Warning);
        assert_eq!(thresholds.judge(secs(300)), QueueHealth::Critical);
        assert_eq!(thresholds.judge(secs(10_000)), QueueHealth::Critical);
    }

    #[test]
    fn either_threshold_alone_works() {
        let warn_only = HealthThresholds {
            warn_after: secs(10),
            critical_after: None,
        };
        assert_eq!(warn_only.judge(secs(9)), QueueHealth::Ok);
        assert_eq!(warn_only.judge(secs(1_000_000)), QueueHealth::Warning);
        let critical_only = HealthThresholds {
            warn_after: None,
            critical_after: secs(10),
        };
        assert_eq!(critical_only.judge(secs(9)), QueueHealth::Ok);
        assert_eq!(critical_only.judge(secs(10)), QueueHealth::Critical);
    }

    #[test]
    fn thresholds_the_wrong_way_round_report_the_worse_state() {
        let thresholds = HealthThresholds {
            warn_after: secs(300),
            critical_after: secs(60),
        };
        assert_eq!(thresholds.judge(secs(30)), QueueHealth::Ok);
        assert_eq!(thresholds.judge(secs(60)), QueueHealth::Critical);
        assert_eq!(thresholds.judge(secs(400)), QueueHealth::Critical);
    }
}
