//! Leader election: one replica at a time runs the singleton loops (reaper, scheduler, cron,
//! statistics), and a leader that stops making progress loses the role (invariant 10).
//!
//! Leadership is a lease in the `leader` table, with a time to live, renewed by this loop every
//! third of it. A replica whose process stalls (a paused VM, a hung runtime) stops renewing, so
//! another takes the lease over once it expires, under the next term, and ends the sessions the
//! stalled one left idle in a transaction (the locks they hold would hold its successor back).
//! The stalled replica cannot act as leader when it wakes: its view of its own leadership lapses
//! with the lease's time to live, counted on its own clock from the renewal that granted it,
//! and every statement of a leader-only loop is fenced by its term in the database.
//!
//! On shutdown the lease is given up at once, so a successor takes over within one renewal
//! interval rather than a time to live.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    notifier::DueSignal,
    signals::{Signal, Signals},
};
use crate::store::{Store, Term};

/// Leadership as this replica holds it: the term, until when (on this replica's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    term: Term,
    valid_until: Instant,
}

/// A view of whether this replica leads, for the singleton loops.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<Option<Lease>>,
}

impl Leadership {
    /// The term under which this replica leads now, if it does.
    pub fn current(&self) -> Option<Term> {
        self.rx
            .borrow()
            .filter(|lease| Instant::now() < lease.valid_until)
            .map(|lease| lease.term)
    }

    /// The term under which this replica leads: at once when leading, otherwise once
    /// leadership is won. `None` when the elector has stopped (shutdown).
    pub async fn wait_leading(&mut self) -> Option<Term> {
        loop {
            if let Some(term) = self.current() {
                return Some(term);
            }
            // A lease that lapsed without a change (a stall) waits for the next renewal.
            let lapsed = self.rx.borrow_and_update().is_some();
            if lapsed {
                self.rx.changed().await.ok()?;
            } else {
                self.rx.wait_for(Option::is_some).await.ok()?;
            }
        }
    }
}

/// Campaigns for leadership until shutdown.
pub struct Elector {
    store: Store,
    /// The lease's time to live; it is renewed every third of it.
    ttl: Duration,
    /// Who this replica is in the `leader` table: drawn at start, so a restarted process is a
    /// new candidate.
    holder: String,
    tx: watch::Sender<Option<Lease>>,
    signals: Signals,
}

impl Elector {
    pub fn new(store: Store, ttl: Duration) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                store,
                ttl,
                holder: uuid::Uuid::now_v7().to_string(),
                tx,
                signals: Signals::default(),
            },
            Leadership { rx },
        )
    }

    /// Announces the outcome of each round (the term led under, or none), for a test to await.
    pub fn with_signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let app = self.store.application_name();
        let interval = self.ttl / 3;
        let mut held: Option<Lease> = None;
        loop {
            let asked = Instant::now();
            let attempt = self.store.hold_leadership(
                &self.holder,
                &app,
                held.map(|lease| lease.term),
                self.ttl,
            );
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                result = attempt => result,
            };
            let now_held = match result {
                Ok(Some(granted)) => {
                    if let Some(stalled) = &granted.taken_from
                        && held.is_none()
                    {
                        self.end_stalled(stalled).await;
                    }
                    // Valid for the time to live from when it was asked: the database granted
                    // it no earlier, so this replica never believes in it longer than it lasts.
                    Some(Lease {
                        term: granted.term,
                        valid_until: asked + self.ttl,
                    })
                }
                Ok(None) => None,
                Err(error) => {
                    tracing::warn!(%error, "renewing leadership failed");
                    // Kept until it lapses on its own: the next renewal may get through.
                    held.filter(|lease| Instant::now() < lease.valid_until)
                }
            };
            if now_held.map(|l| l.term) != held.map(|l| l.term) {
                match now_held {
                    Some(lease) => tracing::info!(term = lease.term.0, "leadership taken"),
                    None => tracing::info!("leadership lost"),
                }
            }
            held = now_held;
            crate::metrics::leader(held.is_some());
            self.tx.send_replace(held);
            self.signals.send(|| Signal::Campaigned {
                term: held.map(|lease| lease.term),
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        self.tx.send_replace(None);
        crate::metrics::leader(false);
        if let Some(lease) = held
            && let Err(error) = self
                .store
                .release_leadership(&self.holder, lease.term)
                .await
        {
            tracing::warn!(%error, "could not give leadership up");
        }
    }

    /// Ends what a stalled predecessor left holding locks.
    async fn end_stalled(&self, app: &str) {
        match self.store.end_stalled_sessions(app).await {
            Ok(0) => {}
            Ok(ended) => tracing::warn!(
                predecessor = app,
                sessions = ended,
                "ended the stalled leader's sessions left idle in a transaction"
            ),
            Err(error) => tracing::warn!(%error, "could not end the stalled leader's sessions"),
        }
    }
}

/// The shape of every timed singleton loop: while this replica leads, run `pass` under its
/// term, then wait for the time it returns or for `due` to signal something earlier, until
/// shutdown.
pub async fn lead_on_timer<F, Fut>(
    mut leadership: Leadership,
    due: &DueSignal,
    shutdown: CancellationToken,
    mut pass: F,
) where
    F: FnMut(Term) -> Fut,
    Fut: Future<Output = Duration>,
{
    let mut due = due.subscribe();
    loop {
        let term = tokio::select! {
            _ = shutdown.cancelled() => return,
            term = leadership.wait_leading() => match term {
                Some(term) => term,
                None => return,
            },
        };
        due.mark_unchanged();
        let sleep = pass(term).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = due.changed() => {}
        }
    }
}

/// How long to sleep until `next` (at least 1 ms), never longer than `max`; `max` when nothing
/// is due.
pub fn sleep_until(next: Option<DateTime<Utc>>, max: Duration) -> Duration {
    next.map_or(max, |at| {
        (at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .clamp(Duration::from_millis(1), max)
    })
}
