//! The engine: every loop that owns timing and batching.
//!
//! | loop | runs on | job |
//! | --- | --- | --- |
//! | [`batch`] | (shared) | isolates the bad item of a failed batch statement |
//! | [`ending`] | (shared) | decides how attempts end and applies the decisions |
//! | [`dispatcher`] | every replica | leases available jobs to this replica's workers |
//! | [`enqueuer`] | every replica | group-commits concurrent single enqueues |
//! | [`completer`] | every replica | writes attempt outcomes in batches |
//! | [`notifier`] | every replica | turns NOTIFY into dispatcher wake-ups, stop and drain signals |
//! | [`fanout`] | every replica | delivers committed events to watchers, in order |
//! | [`leader`] | every replica | elects the one replica that runs the singletons |
//! | [`session`] | every worker stream | owns the leases one worker holds: delivery, starts, stops, ends, hand-backs |
//! | [`reaper`] | leader | retries or fails jobs whose lease lapsed |
//! | [`scheduler`] | leader | makes due SCHEDULED / RETRYING jobs AVAILABLE |
//! | [`cron`] | leader | creates the jobs of due cron schedule ticks |
//! | [`pruner`] | leader | prunes finished jobs past retention, drops old event partitions |
//! | [`statistics`] | leader | analyzes busy tables as they outgrow their statistics |
//! | [`sampler`] | every replica serving metrics | reads queue depths and pool use for the gauges |
//! | [`signals`] | (tests) | announces what the loops did, for a test to await (off here) |
//!
//! Each loop has one job and is wired here; every task runs on one [`TaskTracker`], so shutdown
//! can wait for all of them. The completer and the enqueuer stop last: only once every stream
//! and call holding a handle has ended and their queues are flushed.

pub mod batch;
pub mod completer;
pub mod cron;
pub mod dispatcher;
pub mod ending;
pub mod enqueuer;
pub mod error;
pub mod fanout;
pub mod leader;
pub mod notifier;
pub mod pruner;
pub mod reaper;
pub mod sampler;
pub mod scheduler;
pub mod session;
pub mod signals;
pub mod statistics;

pub use error::Error;

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::Config, store::Store};
use completer::{Completer, CompleterHandle};
use cron::Cron;
use dispatcher::{Dispatcher, DispatcherHandle};
use enqueuer::{Enqueuer, EnqueuerHandle};
use fanout::{Fanout, FanoutConfig, FanoutHandle};
use leader::{Elector, Leadership};
use notifier::{DrainSignal, DueSignal, Notifier, QueueHold, StopSignal};
use pruner::{Pruner, PrunerProgress};
use reaper::Reaper;
use scheduler::Scheduler;
use statistics::Statistics;

/// Stop signals buffered per worker stream; one that lags misses some, and its next heartbeat
/// delivers them instead.
const STOP_SIGNALS: usize = 1024;
/// Queue holds buffered for a slow worker stream; one that lags lets its worker's queued
/// leases wait out their 250 ms instead.
const QUEUE_HOLDS: usize = 256;
/// Drain requests buffered per worker stream; one that lags reads its request at its next
/// heartbeat instead.
const DRAINS: usize = 256;

/// Handles to the running engine, for the API layer.
#[derive(Clone)]
pub struct Engine {
    pub dispatcher: DispatcherHandle,
    pub completer: CompleterHandle,
    pub enqueuer: EnqueuerHandle,
    pub leadership: Leadership,
    pub fanout: FanoutHandle,
    /// Stop requests for running leases, for the worker streams to pick up.
    pub stops: broadcast::Sender<StopSignal>,
    /// Queues just paused or limited, for the worker streams whose workers queue leases.
    pub queue_holds: broadcast::Sender<QueueHold>,
    /// Drains asked of workers (DrainWorker), for the worker streams to pick up.
    pub drains: broadcast::Sender<DrainSignal>,
    /// What the pruner has removed, for metrics.
    pub pruned: Arc<PrunerProgress>,
}

impl Engine {
    /// Starts every loop on `tasks`. The loops stop on `shutdown`; the completer stops when the
    /// last [`CompleterHandle`] is dropped.
    pub fn start(
        store: &Store,
        config: &Config,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Self {
        let (dispatcher, dispatcher_handle) =
            Dispatcher::new(store.clone(), config.lease_duration, config.poll_interval);
        let (enqueuer, enqueuer_handle) = Enqueuer::new(store.clone(), dispatcher_handle.clone());
        let (elector, leadership) = Elector::new(store.clone(), config.leader_ttl);
        let (stops, _) = broadcast::channel(STOP_SIGNALS);
        let (queue_holds, _) = broadcast::channel(QUEUE_HOLDS);
        let (drains, _) = broadcast::channel(DRAINS);
        let due = DueSignal::default();
        let notifier = Notifier::new(
            store.clone(),
            dispatcher_handle.clone(),
            (stops.clone(), queue_holds.clone(), drains.clone()),
            due.clone(),
        );
        let (fanout, fanout_handle) = Fanout::new(
            store.clone(),
            FanoutConfig {
                interval: config.watch_poll_interval,
                stall_warning: config.watch_stall_warning,
                lag_limit: config.watch_lag_limit,
            },
        );
        let (completer, completer_handle) = Completer::new(store.clone(), fanout_handle.clone());
        let reaper = Reaper::new(store.clone(), config.reap_interval, leadership.clone());
        let scheduler = Scheduler::new(
            store.clone(),
            config.poll_interval,
            leadership.clone(),
            due.clone(),
        );
        let cron = Cron::new(store.clone(), config.poll_interval, leadership.clone(), due);
        let statistics = Statistics::new(store.clone(), leadership.clone());
        let (pruner, pruned) = Pruner::new(store.clone(), config.pruner(), leadership.clone());

        tasks.spawn(dispatcher.run(shutdown.clone()));
        tasks.spawn(completer.run());
        tasks.spawn(enqueuer.run());
        tasks.spawn(elector.run(shutdown.clone()));
        if store.can_listen() {
            tasks.spawn(notifier.run(shutdown.clone()));
        } else {
            tracing::warn!(
                poll_interval = ?config.poll_interval,
                "notifications are off (--database-pooling transaction without \
                 --direct-database-url): workers find new work within --poll-interval, and \
                 cancels, pauses and drains reach running jobs at their next heartbeat"
            );
        }
        tasks.spawn(reaper.run(shutdown.clone()));
        tasks.spawn(scheduler.run(shutdown.clone()));
        tasks.spawn(cron.run(shutdown.clone()));
        tasks.spawn(statistics.run(shutdown.clone()));
        tasks.spawn(pruner.run(shutdown.clone()));
        tasks.spawn(fanout.run(shutdown.clone()));

        Self {
            dispatcher: dispatcher_handle,
            completer: completer_handle,
            enqueuer: enqueuer_handle,
            leadership,
            fanout: fanout_handle,
            stops,
            queue_holds,
            drains,
            pruned,
        }
    }
}
