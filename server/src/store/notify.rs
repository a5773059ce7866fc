//! Notifications between replicas: their channels, their payloads' one format (written by the
//! statements here, read back by [`Listener`]), and what they mean. A notification is only a
//! wake-up: whoever hears one re-reads the table.

use std::time::Duration;

use sqlx::postgres::PgListener;
use uuid::Uuid;

use super::{Error, Result, StopKind, Store, query};
use crate::domain::{JobId, LeaseRef, QueueName, TenantId};

/// Enqueues and promotions announce available work; payload: `tenant/queue` (tenant names hold no `/`).
const JOBS_CHANNEL: &str = "jobwire_jobs";

/// A queue's pause or limits changed; payload: the queue. Dispatchers re-read which queues are
/// limited.
const QUEUES_CHANNEL: &str = "jobwire_queues";

/// A queue was just paused or limited: workers hand back the leases they hold queued for it,
/// unstarted; payload: the queue. Apart from [`QUEUES_CHANNEL`] because a resume or a lifted
/// limit changes the queue too, and handing back leases then would only churn them.
const QUEUE_HOLDS_CHANNEL: &str = "jobwire_queue_holds";

/// A new SCHEDULED or RETRYING job, or a changed schedule, wakes the leader's timers, which
/// may now be due earlier than they planned; no payload.
const DUE_CHANNEL: &str = "jobwire_due";

/// A stop asked of a running attempt; payload: `tenant/job/attempt/cancel|pause`. Heartbeats re-read it too.
const CONTROL_CHANNEL: &str = "jobwire_control";

/// DrainWorker asked a worker to drain; payload: `tenant/worker_id` (the worker id is free
/// text and may hold `/`; the tenant never does). The replica serving the worker's stream tells
/// it; its heartbeat re-reads the request too.
const DRAINS_CHANNEL: &str = "jobwire_drains";

/// The SQL calls that send each notification, given the SQL expressions of their parts; the
/// statements of this module's siblings send nothing else, so [`Notification::parse`] reads
/// every payload they write.
pub mod send {
    use super::*;

    fn queue(channel: &str, tenant: &str, queue: &str) -> String {
        format!("pg_notify('{channel}', {tenant} || '/' || {queue})")
    }

    /// Work may be available in `queue` of `tenant`.
    pub fn work(tenant: &str, queue_name: &str) -> String {
        queue(JOBS_CHANNEL, tenant, queue_name)
    }

    /// The pause or limits of a queue changed.
    pub fn queue_changed(tenant: &str, queue_name: &str) -> String {
        queue(QUEUES_CHANNEL, tenant, queue_name)
    }

    /// Leases queued for a queue must go back unstarted.
    pub fn queue_hold(tenant: &str, queue_name: &str) -> String {
        queue(QUEUE_HOLDS_CHANNEL, tenant, queue_name)
    }

    /// Something may be due earlier than planned.
    pub fn due() -> String {
        format!("pg_notify('{DUE_CHANNEL}', '')")
    }

    /// A drain asked of the streams of a worker.
    pub fn drain(tenant: &str, worker_id: &str) -> String {
        format!("pg_notify('{DRAINS_CHANNEL}', {tenant} || '/' || {worker_id})")
    }

    /// A stop of an attempt; `stop` is `'cancel'` or `'pause'`.
    pub fn stop(tenant: &str, job: &str, attempt: &str, stop: &str) -> String {
        format!(
            "pg_notify('{CONTROL_CHANNEL}', \
             {tenant} || '/' || {job} || '/' || {attempt} || '/' || {stop})"
        )
    }
}

/// A notification, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Work may be available in a queue.
    Work { tenant: TenantId, queue: QueueName },
    /// A queue's pause or limits changed.
    QueueChanged { tenant: TenantId, queue: QueueName },
    /// Leases queued for a queue must go back unstarted.
    QueueHold { tenant: TenantId, queue: QueueName },
    /// Something may be due earlier than planned.
    Due,
    /// A stop was asked of a running attempt.
    Stop {
        tenant: TenantId,
        lease: LeaseRef,
        stop: StopKind,
    },
    /// A drain was asked of a worker's streams.
    Drain { tenant: TenantId, worker_id: String },
}

impl Notification {
    /// Reads a notification of `channel`; `None` for one this server does not understand.
    pub fn parse(channel: &str, payload: &str) -> Option<Self> {
        let queue = || {
            let (tenant, queue) = payload.split_once('/')?;
            Some((
                TenantId::new_unchecked(tenant),
                QueueName::new_unchecked(queue),
            ))
        };
        Some(match channel {
            JOBS_CHANNEL => {
                let (tenant, queue) = queue()?;
                Self::Work { tenant, queue }
            }
            QUEUES_CHANNEL => {
                let (tenant, queue) = queue()?;
                Self::QueueChanged { tenant, queue }
            }
            QUEUE_HOLDS_CHANNEL => {
                let (tenant, queue) = queue()?;
                Self::QueueHold { tenant, queue }
            }
            DUE_CHANNEL => Self::Due,
            DRAINS_CHANNEL => {
                let (tenant, worker_id) = payload.split_once('/')?;
                Self::Drain {
                    tenant: TenantId::new_unchecked(tenant),
                    worker_id: worker_id.to_owned(),
                }
            }
            CONTROL_CHANNEL => {
                let mut parts = payload.split('/');
                let tenant = TenantId::new_unchecked(parts.next()?);
                let job_id = JobId(Uuid::parse_str(parts.next()?).ok()?);
                let attempt = parts.next()?.parse().ok()?;
                let stop = match parts.next()? {
                    "cancel" => StopKind::Cancel,
                    "pause" => StopKind::Pause,
                    _ => return None,
                };
                Self::Stop {
                    tenant,
                    lease: LeaseRef { job_id, attempt },
                    stop,
                }
            }
            _ => return None,
        })
    }
}

/// What a [`Listener`] heard.
#[derive(Debug)]
pub enum Heard {
    Notification(Notification),
    /// The connection was lost (it reconnects by itself): notifications may have been missed.
    Lost,
}

/// A connection listening on every channel.
pub struct Listener(PgListener);

impl Listener {
    /// The next notification, or word that some may have been missed.
    pub async fn recv(&mut self) -> Result<Heard> {
        loop {
            match self.0.try_recv().await? {
                None => return Ok(Heard::Lost),
                Some(n) => match Notification::parse(n.channel(), n.payload()) {
                    Some(notification) => return Ok(Heard::Notification(notification)),
                    None => tracing::warn!(
                        channel = n.channel(),
                        payload = n.payload(),
                        "ignoring a notification this server does not understand"
                    ),
                },
            }
        }
    }
}

/// Where a listener's probe goes: a notification the listener sends itself through the pool
/// before it is trusted, which also shows that DATABASE_URL's notifications reach it.
const PROBE_CHANNEL: &str = "jobwire_probe";

/// How long a listener waits for its probe. A NOTIFY reaches the listeners of its database when
/// its transaction commits; only a listening connection that is no session of its own (a
/// transaction pooler lent it a server connection for the LISTEN, then took it back) never
/// hears it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// Whether this store has a session to listen on: not behind a transaction pooler without
    /// a direct connection, where notifications are off and the engine polls.
    pub fn can_listen(&self) -> bool {
        self.listen.is_some()
    }

    /// A listener on every channel, trusted only once a notification sent through the pool
    /// has reached it: a listener whose connection goes through a transaction pooler would
    /// otherwise hear nothing, and say nothing of it.
    pub async fn listener(&self) -> Result<Listener> {
        let Some(pool) = &self.listen else {
            return Err(Error::Misconfigured(
                "no direct connection to listen on (--direct-database-url)".to_owned(),
            ));
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener
            .listen_all([
                JOBS_CHANNEL,
                CONTROL_CHANNEL,
                QUEUES_CHANNEL,
                QUEUE_HOLDS_CHANNEL,
                DUE_CHANNEL,
                DRAINS_CHANNEL,
                PROBE_CHANNEL,
            ])
            .await?;
        let token = Uuid::now_v7().to_string();
        self.pooled(async |c| {
            query("SELECT pg_notify($1, $2)")
                .bind(PROBE_CHANNEL)
                .bind(&token)
                .execute(c)
                .await?;
            Ok(())
        })
        .await?;
        // Whatever else arrives first is dropped: a new listener's owner re-reads everything
        // anyway, for what was announced before it listened.
        let heard = tokio::time::timeout(PROBE_TIMEOUT, async {
            loop {
                match listener.try_recv().await? {
                    Some(n) if n.channel() == PROBE_CHANNEL && n.payload() == token => {
                        return Ok::<_, sqlx::Error>(true);
                    }
                    Some(_) => {}
                    None => return Ok(false),
                }
            }
        })
        .await;
        match heard {
            Ok(Ok(true)) => {
                listener.unlisten(PROBE_CHANNEL).await?;
                Ok(Listener(listener))
            }
            Ok(Ok(false)) => Err(Error::Database(sqlx::Error::Protocol(
                "the listening connection was lost before its probe arrived".to_owned(),
            ))),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(Error::Misconfigured(format!(
                "a notification sent through DATABASE_URL did not reach the listening \
                 connection within {PROBE_TIMEOUT:?}: that connection is no session of its own \
                 (a transaction pooler?). Give --direct-database-url a connection to PostgreSQL \
                 itself, or run with --database-pooling transaction and no direct URL to poll \
                 instead"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_payload_reads_back_as_written() {
        let job = Uuid::now_v7();
        assert_eq!(
            Notification::parse(JOBS_CHANNEL, "acme/emails"),
            Some(Notification::Work {
                tenant: TenantId::new_unchecked("acme"),
                queue: QueueName::new_unchecked("emails"),
            })
        );
        assert_eq!(
            Notification::parse(DUE_CHANNEL, ""),
            Some(Notification::Due)
        );
        assert_eq!(
            Notification::parse(CONTROL_CHANNEL, &format!("acme/{job}/3/pause")),
            Some(Notification::Stop {
                tenant: TenantId::new_unchecked("acme"),
                lease: LeaseRef {
                    job_id: JobId(job),
                    attempt: 3
                },
                stop: StopKind::Pause,
            })
        );
        assert_eq!(
            Notification::parse(CONTROL_CHANNEL, "acme/nope/3/pause"),
            None
        );
        assert_eq!(Notification::parse(QUEUES_CHANNEL, "no-slash"), None);
        assert_eq!(
            Notification::parse(DRAINS_CHANNEL, "acme/host-1/pid-2"),
            Some(Notification::Drain {
                tenant: TenantId::new_unchecked("acme"),
                worker_id: "host-1/pid-2".to_owned(),
            })
        );
        assert_eq!(Notification::parse("elsewhere", "acme/emails"), None);
    }
}
