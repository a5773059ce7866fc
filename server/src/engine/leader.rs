//! Leader election: one replica at a time runs the singleton loops (reaper, scheduler).
//!
//! Leadership is a PostgreSQL advisory lock held on a dedicated connection. Followers try to take
//! it every interval; the leader checks its connection on the same beat and steps down when the
//! check fails (the lock went with the session). On shutdown the lock is released explicitly so
//! a successor takes over within one interval rather than after a connection timeout.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::notifier::DueSignal;
use crate::store::{LeaderLock, Store};

/// A view of whether this replica leads, for the singleton loops.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// Returns at once when leading, otherwise when leadership is won. Returns false when the
    /// elector has stopped (shutdown).
    pub async fn wait_leading(&mut self) -> bool {
        self.rx.wait_for(|leading| *leading).await.is_ok()
    }

    pub fn is_leading(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Campaigns for leadership until shutdown.
pub struct Elector {
    store: Store,
    interval: Duration,
    tx: watch::Sender<bool>,
}

impl Elector {
    pub fn new(store: Store, interval: Duration) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(false);
        (
            Self {
                store,
                interval,
                tx,
            },
            Leadership { rx },
        )
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut lock: Option<LeaderLock> = None;
        let mut leading = false;
        loop {
            let step = async {
                let conn = match lock.as_mut() {
                    Some(conn) => conn,
                    None => lock.insert(self.store.leader_lock().await?),
                };
                if leading {
                    conn.check().await.map(|()| true)
                } else {
                    conn.try_acquire().await
                }
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                result = step => result,
            };
            let now_leading = match result {
                Ok(v) => v,
                Err(error) => {
                    tracing::warn!(%error, "leader election connection failed");
                    lock = None;
                    false
                }
            };
            if now_leading != leading {
                leading = now_leading;
                tracing::info!(leading, "leadership changed");
                self.tx.send_replace(leading);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        self.tx.send_replace(false);
        if let Some(lock) = lock.filter(|_| leading)
            && let Err(error) = lock.release().await
        {
            tracing::warn!(%error, "could not release leadership");
        }
    }
}

/// The shape of every timed singleton loop: while this replica leads, run `pass`, then wait for
/// the time it returns or for `due` to signal something earlier, until shutdown.
pub async fn lead_on_timer<F, Fut>(
    mut leadership: Leadership,
    due: &DueSignal,
    shutdown: CancellationToken,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Duration>,
{
    let mut due = due.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            leading = leadership.wait_leading() => if !leading { return },
        }
        due.mark_unchanged();
        let sleep = pass().await;
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
