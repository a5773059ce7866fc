//! The notifier: turns PostgreSQL notifications into dispatcher wake-ups and stop signals.
//!
//! Enqueues and promotions `NOTIFY` the queue that received work, on whichever replica they ran,
//! so a worker connected to any replica learns of it without polling. CancelJob and PauseJob of
//! a running job notify the control channel; the signal is broadcast to this replica's worker
//! streams, and the one holding the lease tells its worker. A notification is only a hint: when
//! the listening connection drops, notifications may have been missed, so every worker is woken
//! to re-read the table, and stop requests still reach workers through their next heartbeat.

use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::dispatcher::DispatcherHandle;
use crate::{
    domain::{LeaseRef, QueueName, TenantId},
    store::{Error as StoreError, Heard, Notification, StopKind, Store},
};

/// The longest wait between attempts to listen after a failure.
const RETRY: Duration = Duration::from_secs(5);

/// The longest wait between attempts to listen on a connection that does not hear what is
/// sent (a pooler in the way): each attempt costs its probe's wait, and an error in the log.
const MISCONFIGURED_RETRY: Duration = Duration::from_secs(60);

/// A stop requested for a running lease, for whichever stream holds it.
#[derive(Debug, Clone)]
pub struct StopSignal {
    pub tenant: TenantId,
    pub lease: LeaseRef,
    pub stop: StopKind,
}

/// A drain asked of a worker's streams (DrainWorker), for whichever stream serves it.
#[derive(Debug, Clone)]
pub struct DrainSignal {
    pub tenant: TenantId,
    pub worker_id: String,
}

/// A queue that was just paused or limited: workers hand back the leases they queued for it.
#[derive(Debug, Clone)]
pub struct QueueHold {
    pub tenant: TenantId,
    pub queue: QueueName,
}

pub struct Notifier {
    store: Store,
    dispatcher: DispatcherHandle,
    stops: broadcast::Sender<StopSignal>,
    queue_holds: broadcast::Sender<QueueHold>,
    drains: broadcast::Sender<DrainSignal>,
    due: DueSignal,
}

/// Wakes the leader's timed loops (delayed jobs, cron schedules): something may now be due
/// earlier than they planned. A counter, so a wake-up sent while a loop was busy is seen when
/// it next waits.
#[derive(Debug, Clone)]
pub struct DueSignal {
    tx: std::sync::Arc<watch::Sender<u64>>,
}

impl Default for DueSignal {
    fn default() -> Self {
        Self {
            tx: std::sync::Arc::new(watch::channel(0).0),
        }
    }
}

impl DueSignal {
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    fn wake(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Notifier {
    pub fn new(
        store: Store,
        dispatcher: DispatcherHandle,
        (stops, queue_holds, drains): (
            broadcast::Sender<StopSignal>,
            broadcast::Sender<QueueHold>,
            broadcast::Sender<DrainSignal>,
        ),
        due: DueSignal,
    ) -> Self {
        Self {
            store,
            dispatcher,
            stops,
            queue_holds,
            drains,
            due,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = tokio::select! {
                _ = shutdown.cancelled() => return,
                listener = self.store.listener() => listener,
            };
            let mut listener = match listener {
                Ok(listener) => listener,
                Err(error) => {
                    // Until then the engine finds work by polling, and stops and drains at
                    // heartbeats: slower, never stalled.
                    let max = if matches!(error, StoreError::Misconfigured(_)) {
                        tracing::error!(%error, "notifications are not heard; polling meanwhile");
                        MISCONFIGURED_RETRY
                    } else {
                        tracing::warn!(%error, "cannot listen for notifications; retrying");
                        RETRY
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Anything announced while we were not listening must be found by a re-read.
            self.dispatcher.wake_all().await;
            self.due.wake();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = listener.recv() => next,
                };
                match next {
                    Ok(Heard::Notification(notification)) => self.deliver(notification).await,
                    Ok(Heard::Lost) => {
                        tracing::warn!("notification connection lost; reconnecting");
                        self.dispatcher.wake_all().await;
                        self.due.wake();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "notification listener failed");
                        break;
                    }
                }
            }
        }
    }

    async fn deliver(&self, notification: Notification) {
        match notification {
            Notification::Work { tenant, queue } => self.dispatcher.wake(tenant, queue).await,
            Notification::QueueChanged { tenant, queue } => {
                self.dispatcher.queue_changed(tenant, queue).await
            }
            Notification::QueueHold { tenant, queue } => {
                // No stream listening is fine: no worker queues leases.
                let _ = self.queue_holds.send(QueueHold { tenant, queue });
            }
            Notification::Due => self.due.wake(),
            Notification::Drain { tenant, worker_id } => {
                // No stream listening is fine: the worker is connected elsewhere.
                let _ = self.drains.send(DrainSignal { tenant, worker_id });
            }
            Notification::Stop {
                tenant,
                lease,
                stop,
            } => {
                // No stream listening is fine: the lease is held elsewhere.
                let _ = self.stops.send(StopSignal {
                    tenant,
                    lease,
                    stop,
                });
            }
        }
    }
}
