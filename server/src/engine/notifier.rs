//! The notifier: turns PostgreSQL notifications into dispatcher wake-ups.
//!
//! Enqueues and promotions `NOTIFY` the queue that received work, on whichever replica they ran,
//! so a worker connected to any replica learns of it without polling. A notification is only a
//! hint: when the listening connection drops, notifications may have been missed, so every
//! worker is woken to re-read the table.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dispatcher::DispatcherHandle;
use crate::{
    domain::{QueueName, TenantId},
    store::Store,
};

pub struct Notifier {
    store: Store,
    dispatcher: DispatcherHandle,
}

impl Notifier {
    pub fn new(store: Store, dispatcher: DispatcherHandle) -> Self {
        Self { store, dispatcher }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = tokio::select! {
                _ = shutdown.cancelled() => return,
                listener = self.store.jobs_listener() => listener,
            };
            let mut listener = match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for notifications; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Anything announced while we were not listening must be found by a re-read.
            self.dispatcher.wake_all().await;
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => {
                        if let Some((tenant, queue)) = notification.payload().split_once('/') {
                            self.dispatcher
                                .wake(
                                    TenantId::new_unchecked(tenant),
                                    QueueName::new_unchecked(queue),
                                )
                                .await;
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("notification connection lost; reconnecting");
                        self.dispatcher.wake_all().await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "notification listener failed");
                        break;
                    }
                }
            }
        }
    }
}
