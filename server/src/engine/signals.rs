//! Test signals: what the engine's loops have just done, announced as they do it, so that a
//! test of one loop awaits the event it expects instead of sleeping and re-reading the database
//! (River's `testsignal`; docs/architecture.md, testing).
//!
//! Off unless a test turns them on with [`Signals::enabled`] and hands them to a loop's
//! `with_signals`: the loops the server wires carry the default, so each announcement costs
//! them one branch, and the signal itself is never built. A loop announces only after the
//! change it reports has committed, so what a test reads next is what the signal says.
//!
//! Signals travel on a bounded broadcast channel; a receiver that falls behind loses the oldest
//! ones (it sees [`broadcast::error::RecvError::Lagged`]), and a loop never waits for a test.

use tokio::sync::broadcast;

use super::dispatcher::SessionId;
use crate::store::Term;

/// Signals buffered for a receiver that has not read them yet: more than any test of one loop
/// lets pile up between two reads.
const CAPACITY: usize = 1024;

/// Something a loop did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// The dispatcher's claim for a worker session came back with this many leases (none when
    /// nothing it may run was available), and those that fit went to the session.
    Claimed { session: SessionId, leases: usize },
    /// The dispatcher handed back leases no worker started: their jobs are available again.
    HandedBack { leases: u64 },
    /// The completer wrote one batch of this many reports and answered their callers.
    Flushed { reports: usize },
    /// One pass of the reaper ended this many lapsed attempts.
    Reaped { leases: usize },
    /// One pass of the scheduler made this many due jobs available.
    Promoted { jobs: u64 },
    /// One round of the elector: this replica leads under the term, or does not lead.
    Campaigned { term: Option<Term> },
}

/// Where loops announce [`Signal`]s; cheap to clone, and off by default.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    tx: Option<broadcast::Sender<Signal>>,
}

impl Signals {
    /// Signals that are announced, for a test to [`subscribe`](Self::subscribe) to.
    pub fn enabled() -> Self {
        Self {
            tx: Some(broadcast::channel(CAPACITY).0),
        }
    }

    /// The signals announced from now on. Off, the receiver is closed at once, so a test that
    /// forgot to turn signals on fails at its first wait instead of hanging.
    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        match &self.tx {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Announces the signal `signal` builds, if anyone can hear it; built only then.
    pub(crate) fn send(&self, signal: impl FnOnce() -> Signal) {
        if let Some(tx) = &self.tx {
            // No receiver is fine: the test is not listening for this one.
            let _ = tx.send(signal());
        }
    }
}
