//! Exponential backoff, shared by [`JobHandle::wait`](crate::JobHandle::wait) polling and the
//! worker's reconnect loop so that neither hammers a server that is slow or down.
//!
//! Each delay doubles up to a cap. Jitter only ever shortens a delay (by up to the given
//! fraction), so the cap stays a true upper bound while many workers restarted by the same
//! server crash still spread their reconnects out.

use std::time::Duration;

/// Delays that grow from `initial` to `max`, doubling each time.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// Fraction of each delay that may be removed at random, 0.0 to 1.0.
    jitter: f64,
    /// The delay before jitter that the next call returns.
    current: Duration,
}

impl Backoff {
    /// Delays from `initial` to `max`, without jitter.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: 0.0,
            current: initial.min(max),
        }
    }

    /// Removes up to `fraction` (clamped to 0.0..=1.0) of each delay at random.
    pub(crate) fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = jittered(self.current, self.jitter, rand::random::<f64>());
        self.current = self.current.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over from the initial delay, after something succeeded.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial.min(self.max);
    }
}

/// `base` shortened by `jitter * unit` of itself, where `unit` is a random draw in 0.0..1.0.
fn jittered(base: Duration, jitter: f64, unit: f64) -> Duration {
    base.mul_f64(1.0 - jitter * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(10 * MS, 500 * MS);
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 320, 500, 500].map(|ms| ms * MS)
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(100 * MS, 5000 * MS);
        backoff.next_delay();
        backoff.next_delay();
        backoff.reset();
        assert_eq!(backoff.next_delay(), 100 * MS);
    }

    #[test]
    fn jitter_only_shortens() {
        assert_eq!(jittered(1000 * MS, 0.5, 0.0), 1000 * MS);
        assert_eq!(jittered(1000 * MS, 0.5, 1.0), 500 * MS);
        assert_eq!(jittered(1000 * MS, 0.5, 0.5), 750 * MS);
    }

    #[test]
    fn jittered_delays_stay_within_bounds() {
        let mut backoff = Backoff::new(100 * MS, 5000 * MS).with_jitter(0.5);
        let mut base = 100 * MS;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= base && delay >= base / 2, "{delay:?} vs {base:?}");
            base = (base * 2).min(5000 * MS);
        }
    }

    #[test]
    fn initial_above_cap_is_capped() {
        let mut backoff = Backoff::new(10_000 * MS, 5000 * MS);
        assert_eq!(backoff.next_delay(), 5000 * MS);
    }
}
