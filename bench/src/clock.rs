//! Wall-clock timestamps that cross process boundaries. A producer in this process, the handlers
//! in the worker subprocess and the watchers all run on one machine, so their wall clocks agree
//! and a time taken in one process can be subtracted from a time taken in another, which an
//! `Instant` cannot do. Spans measured within one process use `Instant`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (0 for a clock set before it).
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|since| i64::try_from(since.as_nanos()).ok())
        .unwrap_or_default()
}

/// The time from `earlier` to `later`, both from [`unix_nanos`]; zero when the clock stepped
/// back in between.
pub fn between(earlier: i64, later: i64) -> Duration {
    Duration::from_nanos(u64::try_from(later.saturating_sub(earlier)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_never_go_negative() {
        assert_eq!(between(10, 25), Duration::from_nanos(15));
        assert_eq!(between(25, 10), Duration::ZERO);
        assert!(unix_nanos() > 1_600_000_000_000_000_000);
    }
}
