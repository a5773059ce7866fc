//! The setup of in-process engine tests: one loop at a time, built from its parts on a database
//! of its own (no server binary), announcing what it does through test signals
//! (`engine::signals`) that a test awaits instead of sleeping (River's `setup` helpers and
//! `testsignal`).
//!
//! [`setup`] gives the store, a tenant and the signals; its methods start the loops a test needs
//! on them, each stopped when the [`Setup`] is dropped. Rows are read and nudged with plain SQL
//! where a test needs what no store function returns (when a handler started) or must move a
//! clock (a lapsed lease, a job come due) without waiting for it.

use std::time::Duration;

use jobwire_proto::v1 as pb;
use jobwire_server::{
    api::validate,
    domain::{JobId, JobState, LeaseRef, QueueName, TenantId},
    engine::{
        Engine,
        completer::{Completer, CompleterHandle},
        dispatcher::{Dispatcher, DispatcherHandle, Outgoing, Registration, SessionId},
        enqueuer::Enqueuer,
        fanout::{Fanout, FanoutConfig, FanoutHandle},
        leader::{Elector, Leadership},
        notifier::DueSignal,
        reaper::Reaper,
        scheduler::Scheduler,
        session::SessionConfig,
        signals::{Signal, Signals},
    },
    store::{JobRow, LeasedRow, NewJob, Store, Term, Worker},
};
use sqlx::PgPool;
use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{TestDb, test_db};

/// The event log's partitions the in-process engines write to: a day each.
const DAY: Duration = Duration::from_secs(24 * 3600);

/// How long a test waits for a signal before it fails: far longer than any loop needs on a
/// loaded machine, and a passing test never waits it out.
pub const WAIT: Duration = Duration::from_secs(10);

/// A lease long enough never to lapse in a test unless the test lapses it.
pub const LEASE: Duration = Duration::from_secs(60);

/// The job type and queue most tests use.
pub const JOB_TYPE: &str = "engine.test";
pub const QUEUE: &str = "default";

/// A database, a store on it, and the test signals every loop started here announces on.
pub struct Setup {
    pub store: Store,
    pub tenant: TenantId,
    pub signals: Signals,
    /// A pool of the test's own, for reading and nudging rows.
    pub pool: PgPool,
    shutdown: CancellationToken,
    /// Dropped with the setup, after the loops were told to stop.
    _db: TestDb,
}

/// A fresh database with the schema, and signals turned on.
pub async fn setup() -> Setup {
    crate::init_tracing();
    let db = test_db().await;
    let store = Store::connect(db.url(), 8)
        .await
        .unwrap_or_else(|e| panic!("connecting a store to {}: {e}", db.url()));
    // As a server does at start: the migration's partition of the event log covers only its
    // first seconds.
    store
        .ensure_event_partitions(DAY, 3 * DAY)
        .await
        .expect("event partitions");
    Setup {
        store,
        tenant: TenantId::new_unchecked("default"),
        signals: Signals::enabled(),
        pool: db.pool().await,
        shutdown: CancellationToken::new(),
        _db: db,
    }
}

impl Drop for Setup {
    /// Stops every loop the test started before its database goes.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A job of `job_type` in `queue`, due now, with the server's defaults.
pub fn job(queue: &str, job_type: &str) -> NewJob {
    let spec = pb::JobSpec {
        job_type: job_type.into(),
        queue: queue.into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/test.Payload".into(),
            value: b"x".to_vec(),
        }),
        ..Default::default()
    };
    validate::job_spec(&spec, 1024).unwrap_or_else(|e| panic!("an invalid test job: {e:?}"))
}

/// The lease a claimed row holds.
pub fn lease_of(row: &LeasedRow) -> LeaseRef {
    LeaseRef {
        job_id: JobId(row.job.id),
        attempt: row.job.attempt,
    }
}

impl Setup {
    /// The signals announced from now on.
    pub fn heard(&self) -> Heard {
        Heard(self.signals.subscribe())
    }

    /// Enqueues `jobs` for the test's tenant; their ids in order.
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Vec<JobId> {
        self.enqueue_for(&self.tenant, jobs).await
    }

    pub async fn enqueue_for(&self, tenant: &TenantId, jobs: Vec<NewJob>) -> Vec<JobId> {
        self.store
            .enqueue_many(tenant, &jobs)
            .await
            .unwrap_or_else(|e| panic!("enqueueing: {e}"))
            .into_iter()
            .map(|outcome| JobId(outcome.job.id))
            .collect()
    }

    /// Leases up to `limit` jobs of the default queue and type to `worker`, as a claim would.
    pub async fn claim(&self, worker: &str, limit: i64, reports_started: bool) -> Vec<LeasedRow> {
        self.store
            .claim(
                &self.tenant,
                &[QueueName::new_unchecked(QUEUE)],
                &[JOB_TYPE.to_owned()],
                limit,
                &Worker {
                    id: worker,
                    lease: LEASE,
                    reports_started,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("claiming: {e}"))
    }

    pub async fn job(&self, id: JobId) -> JobRow {
        self.store
            .get_job(&self.tenant, id)
            .await
            .unwrap_or_else(|e| panic!("reading job {id:?}: {e}"))
    }

    pub async fn state(&self, id: JobId) -> JobState {
        self.job(id).await.state
    }

    /// How many of the tenant's jobs are in `state`.
    pub async fn count(&self, state: JobState) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant_id = $1 AND state = $2")
            .bind(self.tenant.as_str())
            .bind(state)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("counting {state:?} jobs: {e}"))
    }

    /// Whether the handler of the job's running attempt has been noted as started.
    pub async fn handler_started(&self, id: JobId) -> bool {
        sqlx::query_scalar("SELECT handler_started_at IS NOT NULL FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("reading job {id:?}: {e}"))
    }

    /// Lapses the job's lease now, as if its worker had stopped heartbeating a lease ago.
    pub async fn lapse(&self, id: JobId) {
        self.nudge(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            id,
        )
        .await;
    }

    /// Makes a SCHEDULED job due now, as if its time had come.
    pub async fn make_due(&self, id: JobId) {
        self.nudge(
            "UPDATE jobs SET run_at = now() - interval '1 second' WHERE id = $1",
            id,
        )
        .await;
    }

    /// Starts the job's running attempt an hour ago, so its timeout has passed.
    pub async fn overrun(&self, id: JobId) {
        self.nudge(
            "UPDATE jobs SET attempt_started_at = now() - interval '1 hour' WHERE id = $1",
            id,
        )
        .await;
    }

    async fn nudge(&self, sql: &'static str, id: JobId) {
        let done = sqlx::query(sql)
            .bind(id.0)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(done.rows_affected(), 1, "{sql} for {id:?}");
    }

    /// A token that stops with the setup, or earlier when cancelled.
    fn stopper(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// A running dispatcher that polls every `poll_interval`.
    pub fn dispatcher(&self, poll_interval: Duration) -> DispatcherHandle {
        let (dispatcher, handle) = Dispatcher::new(self.store.clone(), LEASE, poll_interval);
        tokio::spawn(
            dispatcher
                .with_signals(self.signals.clone())
                .run(self.stopper()),
        );
        handle
    }

    /// A fanout that is not running: the completer only tells it that events committed.
    fn idle_fanout(&self) -> FanoutHandle {
        let (_fanout, handle) = Fanout::new(
            self.store.clone(),
            FanoutConfig {
                interval: Duration::from_millis(5),
                stall_warning: Duration::from_secs(10),
                lag_limit: Duration::from_secs(10),
            },
        );
        handle
    }

    /// A running completer; it stops once its last handle is dropped.
    pub fn completer(&self) -> CompleterHandle {
        let (completer, handle) = Completer::new(self.store.clone(), self.idle_fanout());
        tokio::spawn(completer.with_signals(self.signals.clone()).run());
        handle
    }

    /// A running elector with a time to live of `ttl` and signals of its own, so a test can
    /// tell candidates apart.
    pub fn candidate(&self, ttl: Duration) -> Candidate {
        let signals = Signals::enabled();
        let (elector, leadership) = Elector::new(self.store.clone(), ttl);
        let stop = self.stopper();
        let heard = Heard(signals.subscribe());
        let task = tokio::spawn(elector.with_signals(signals).run(stop.clone()));
        Candidate {
            leadership,
            heard,
            stop,
            task,
        }
    }

    /// A running reaper that reaps every `interval` while `leadership` leads.
    pub fn reaper(&self, leadership: &Leadership, interval: Duration) {
        let reaper = Reaper::new(self.store.clone(), interval, leadership.clone());
        tokio::spawn(
            reaper
                .with_signals(self.signals.clone())
                .run(self.stopper()),
        );
    }

    /// A running scheduler that looks for due jobs at least every `poll_interval` while
    /// `leadership` leads.
    pub fn scheduler(&self, leadership: &Leadership, poll_interval: Duration) {
        let scheduler = Scheduler::new(
            self.store.clone(),
            poll_interval,
            leadership.clone(),
            DueSignal::default(),
        );
        tokio::spawn(
            scheduler
                .with_signals(self.signals.clone())
                .run(self.stopper()),
        );
    }

    /// The parts of an engine a worker session drives: a running dispatcher (polling every
    /// `poll_interval`), completer and enqueuer; no notifier, and no leadership (its elector
    /// never runs).
    pub fn engine(&self, poll_interval: Duration) -> Engine {
        let dispatcher = self.dispatcher(poll_interval);
        let (enqueuer, enqueuer_handle) = Enqueuer::new(self.store.clone(), dispatcher.clone());
        tokio::spawn(enqueuer.run());
        let (_elector, leadership) = Elector::new(self.store.clone(), LEASE);
        Engine {
            dispatcher,
            completer: self.completer(),
            enqueuer: enqueuer_handle,
            leadership,
            fanout: self.idle_fanout(),
            stops: broadcast::channel(16).0,
            queue_holds: broadcast::channel(16).0,
            drains: broadcast::channel(16).0,
            pruned: Default::default(),
        }
    }

    /// A registration for worker session `session` of the test's tenant, with its lease
    /// channel's receiving end.
    pub fn registration(
        &self,
        session: SessionId,
        queues: &[&str],
        job_types: &[&str],
        slots: u32,
    ) -> (Registration, mpsc::Receiver<Outgoing>) {
        let (leases, rx) = mpsc::channel(usize::try_from(slots).unwrap_or(1).max(1));
        let registration = Registration {
            session,
            tenant: self.tenant.clone(),
            worker_id: format!("worker-{session}"),
            queues: queues
                .iter()
                .map(|q| QueueName::new_unchecked(*q))
                .collect(),
            job_types: job_types.iter().map(|t| (*t).to_owned()).collect(),
            slots,
            prefetch: 0,
            held: 0,
            reports_started: false,
            leases,
        };
        (registration, rx)
    }
}

/// The timings of a worker session in a test: nothing lapses or times out unless the test
/// makes it.
pub fn session_config() -> SessionConfig {
    SessionConfig {
        lease_duration: LEASE,
        heartbeat_interval: Duration::from_secs(5),
        stop_grace: Duration::from_secs(10),
        replica: "test-replica".to_owned(),
    }
}

/// An elector campaigning on the test's database.
pub struct Candidate {
    pub leadership: Leadership,
    /// What its own rounds announced.
    pub heard: Heard,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Candidate {
    /// The term of its next round that leads.
    pub async fn leads(&mut self) -> Term {
        self.heard
            .wait_for("a round that leads", |signal| match signal {
                Signal::Campaigned { term: Some(term) } => Some(*term),
                _ => None,
            })
            .await
    }

    /// The outcome of its next round: the term it leads under, or none.
    pub async fn round(&mut self) -> Option<Term> {
        self.heard
            .wait_for("a round", |signal| match signal {
                Signal::Campaigned { term } => Some(*term),
                _ => None,
            })
            .await
    }

    /// Stops it as shutdown does: it gives leadership up at once.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .unwrap_or_else(|e| panic!("the elector failed: {e}"));
    }

    /// Stops it dead, as a stalled process stops: no renewal, and no giving up.
    pub fn stall(&self) {
        self.task.abort();
    }
}

/// Signals announced since a test subscribed.
pub struct Heard(broadcast::Receiver<Signal>);

impl Heard {
    /// The first signal from now that `pick` accepts, as `pick` maps it; the others are
    /// skipped. Fails the test after [`WAIT`].
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl FnMut(&Signal) -> Option<T>) -> T {
        self.wait_within(WAIT, what, pick)
            .await
            .unwrap_or_else(|| panic!("no signal of {what} within {WAIT:?}"))
    }

    /// The first signal `pick` accepts within `within`, if one comes.
    pub async fn wait_within<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut pick: impl FnMut(&Signal) -> Option<T>,
    ) -> Option<T> {
        let wait = async {
            loop {
                match self.0.recv().await {
                    Ok(signal) => {
                        if let Some(picked) = pick(&signal) {
                            return picked;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        panic!("waiting for {what}, the test fell {missed} signals behind")
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        panic!("waiting for {what}: signals are off or every loop has gone")
                    }
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }

    /// Checks that no signal `pick` accepts comes within `within`: the bounded wait a test of
    /// something that must not happen needs, as the absence of a signal has no signal.
    pub async fn none_within(
        &mut self,
        within: Duration,
        what: &str,
        pick: impl FnMut(&Signal) -> Option<()>,
    ) {
        assert!(
            self.wait_within(within, what, pick).await.is_none(),
            "{what} within {within:?}"
        );
    }
}
