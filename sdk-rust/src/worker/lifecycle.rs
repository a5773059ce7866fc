//! The phases of a worker's life and the clock that moves it through them.
//!
//! Shutdown is an input: the caller's future starts a drain, and from then on only time moves
//! the worker on. Serving → (shutdown resolves) → Draining → (drain timeout) → Aborting, when
//! handlers are told to stop → (abort grace) → Finished, when whatever is left is abandoned.
//! Every loop of the worker races [`Lifecycle::changed`] against its work, so a phase change is
//! seen wherever the worker is waiting: on a stream, or between reconnects.
//!
//! The server may start the drain too ([`Lifecycle::drain`], when an operator calls
//! DrainWorker): the worker then goes through the same phases as on its own shutdown.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Taking leases.
    Serving,
    /// No new leases; running handlers finish and their results are delivered.
    Draining,
    /// The drain timed out: handlers have been told to stop and get a short grace.
    Aborting,
    /// The grace is over; the worker exits with whatever is left.
    Finished,
}

impl Phase {
    /// Whether shutdown has begun.
    pub(super) fn is_stopping(self) -> bool {
        self != Self::Serving
    }
}

/// The shutdown trigger plus the deadlines that follow it.
pub(super) struct Lifecycle<'a> {
    shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    phase: Phase,
    drain_timeout: Duration,
    abort_grace: Duration,
    /// When the current phase ends, once shutdown began.
    deadline: Instant,
}

impl<'a> Lifecycle<'a> {
    pub(super) fn new(
        shutdown: impl Future<Output = ()> + Send + 'a,
        drain_timeout: Duration,
        abort_grace: Duration,
    ) -> Self {
        Self {
            shutdown: Box::pin(shutdown),
            phase: Phase::Serving,
            drain_timeout,
            abort_grace,
            deadline: Instant::now(),
        }
    }

    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    /// Waits for the next phase and returns it; pending forever once finished.
    ///
    /// Cancel-safe: the phase only moves after the wait completes, and the shutdown future is
    /// kept across calls, so dropping this future loses nothing.
    pub(super) async fn changed(&mut self) -> Phase {
        match self.phase {
            Phase::Serving => {
                self.shutdown.as_mut().await;
                self.enter(Phase::Draining, self.drain_timeout);
            }
            Phase::Draining => {
                tokio::time::sleep_until(self.deadline).await;
                self.enter(Phase::Aborting, self.abort_grace);
            }
            Phase::Aborting => {
                tokio::time::sleep_until(self.deadline).await;
                self.phase = Phase::Finished;
            }
            Phase::Finished => std::future::pending().await,
        }
        self.phase
    }

    /// Starts the drain now, as if the shutdown future had resolved: the server asked for it.
    /// True when this began the drain; false when shutdown had already begun.
    pub(super) fn drain(&mut self) -> bool {
        if self.phase != Phase::Serving {
            return false;
        }
        self.enter(Phase::Draining, self.drain_timeout);
        true
    }

    fn enter(&mut self, phase: Phase, lasting: Duration) {
        self.phase = phase;
        self.deadline = Instant::now() + lasting;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shutdown_starts_a_drain_that_times_out() {
        let (trigger, signal) = tokio::sync::oneshot::channel::<()>();
        let mut lifecycle = Lifecycle::new(
            async {
                let _ = signal.await;
            },
            Duration::from_secs(30),
            Duration::from_secs(2),
        );
        assert_eq!(lifecycle.phase(), Phase::Serving);

        // Nothing moves before the shutdown future resolves, however long it takes.
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), lifecycle.changed())
                .await
                .is_err()
        );
        assert_eq!(lifecycle.phase(), Phase::Serving);

        let _ = trigger.send(());
        assert_eq!(lifecycle.changed().await, Phase::Draining);
        let drain_started = Instant::now();
        assert_eq!(lifecycle.changed().await, Phase::Aborting);
        assert_eq!(drain_started.elapsed(), Duration::from_secs(30));
        assert_eq!(lifecycle.changed().await, Phase::Finished);
        assert_eq!(drain_started.elapsed(), Duration::from_secs(32));
        assert!(lifecycle.phase().is_stopping());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_asked_by_the_server_runs_like_a_shutdown() {
        let mut lifecycle = Lifecycle::new(
            std::future::pending(),
            Duration::from_secs(30),
            Duration::from_secs(2),
        );
        assert!(lifecycle.drain());
        assert_eq!(lifecycle.phase(), Phase::Draining);
        assert!(!lifecycle.drain(), "a drain begins once");
        let drain_started = Instant::now();
        assert_eq!(lifecycle.changed().await, Phase::Aborting);
        assert_eq!(drain_started.elapsed(), Duration::from_secs(30));
        assert_eq!(lifecycle.changed().await, Phase::Finished);
    }
}
