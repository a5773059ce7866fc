//! Reading the event log: the watermark below which every event has committed, and the events
//! watchers replay or follow.
//!
//! `seq` comes from a sequence, so a transaction can commit an event with a smaller number after
//! another transaction's larger one is already visible. Readers therefore only go as far as
//! numbers are final. Up to a horizon, they are: the sequence's value read at some moment, once
//! every transaction that held a transaction id just after that moment has ended. Every event
//! writer modifies a row before it inserts its event (statements feed the insert from an UPDATE
//! or INSERT, or lock the job row first), so it holds a transaction id before it takes a number.
//! Past the horizon, a committed event is final when every number before it is final too: the
//! fanout follows such a run and stops at the first missing number, which may belong to a
//! transaction in progress (or to one that failed, until the horizon passes it). Both rules need
//! the numbers taken in the order they are handed out, so the sequence must stay uncached
//! (`CACHE 1`, as the migration creates it): a backend's cached block would be used out of order.
//! The server refuses to start on a database where it is not ([`check_event_numbering`]).
//!
//! The ids come from `pg_stat_activity.backend_xid`, read straight from each backend. A
//! snapshot's `xip` list would not do: it leaves out transactions whose id is newer than the
//! last completed one, though they are in progress. Seeing another role's `backend_xid` needs
//! that role or `pg_read_all_stats`, so every replica should connect as the same role. Only
//! this database's transactions count (no other can write its events); still, a long-running
//! writing transaction in this database holds the horizon back until it ends.

use std::collections::HashMap;

use sqlx::types::Json;
use uuid::Uuid;

use super::{
    Error, Result, Store, query_as,
    rows::{EventRow, JOB_COLUMNS, JobRow},
};
use crate::domain::{JobId, JobState, QueueName, TenantId};

/// Transaction ids held by backends at one moment.
pub type SnapshotXids = Vec<i64>;

/// A transaction in progress, as an operator finds it in `pg_stat_activity`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenTransaction {
    pub pid: i32,
    pub user_name: String,
    pub application_name: String,
    pub client: String,
    pub state: String,
    /// How long the transaction has been open, in seconds.
    pub open_secs: f64,
    /// The start of its latest statement.
    pub query: String,
}

/// What a WatchJobs stream asks for; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub queue: Option<QueueName>,
    pub job_type: Option<String>,
    pub states: Vec<JobState>,
    pub labels: HashMap<String, String>,
}

/// The last event number handed out, as an SQL expression (0 before the first).
///
/// Read with `pg_sequence_last_value()`, which holds the sequence's buffer lock while it reads,
/// never as a plain row of the sequence relation. `nextval()` logs numbers ahead (32 at a
/// time): under that lock it writes the value 32 numbers on into the tuple, logs it, and puts
/// the real value back. A plain read copies the tuple after dropping its own share lock, so it
/// can copy that value ahead, and a horizon built on it would cover numbers no transaction has
/// taken yet: events committed under them later would lie below the horizon and be skipped.
/// Public so that the tests can check it against numbers being taken.
pub const LAST_EVENT_NUMBER: &str =
    "coalesce(pg_sequence_last_value('job_events_seq_seq'::regclass), 0)";

const EVENT_COLUMNS: &str = "e.seq, e.tenant_id, e.job_id, e.kind, e.state, e.attempt, e.data, \
    e.created_at";
/// The job's columns of an [`EventRow`], from `jobs j`, and in their place when it is not read.
const JOB_COLUMNS_OF_EVENT: &str = "j.queue, j.job_type, j.labels, j.parent_id";
const NO_JOB_COLUMNS: &str =
    "NULL::text AS queue, NULL::text AS job_type, NULL::jsonb AS labels, NULL::uuid AS parent_id";

/// Refuses a database whose event sequence hands out numbers in blocks: with a cached block per
/// session, numbers are taken out of the order they are handed out, and watchers could miss or
/// reorder events. Migrations create it uncached; this catches a later change to it.
pub(super) async fn check_event_numbering(conn: &mut sqlx::PgConnection) -> Result<()> {
    let (cache,): (i64,) = query_as(
        "SELECT seqcache FROM pg_sequence \
         WHERE seqrelid = pg_get_serial_sequence('job_events', 'seq')::regclass",
    )
    .fetch_one(conn)
    .await?;
    if cache == 1 {
        Ok(())
    } else {
        Err(Error::Misconfigured(format!(
            "the sequence numbering job_events caches {cache} numbers per session; watchers \
             need them handed out one at a time: ALTER TABLE job_events ALTER COLUMN seq SET \
             CACHE 1"
        )))
    }
}

impl Store {
    /// The last event number handed out, then the transaction ids held right after, in that
    /// order (the order is what makes the horizon safe), in one statement. When the number is
    /// still `unless_still`, the backends are not read (`None`): nothing has been numbered
    /// since, so there is nothing new to wait for. Reading them costs the database a copy of
    /// every backend's status, which is not cheap when busy; without this check a replica with
    /// a watcher and nothing happening would pay it on every poll.
    pub async fn event_watermark(
        &self,
        unless_still: Option<i64>,
    ) -> Result<(i64, Option<SnapshotXids>)> {
        // The backends' subquery is an InitPlan, run only when its CASE branch is reached, and
        // so after the sequence has been read.
        let sql = static_sql!(
            "SELECT s.last, CASE WHEN s.last IS DISTINCT FROM $1 THEN ( \
                 SELECT coalesce(array_agg(backend_xid::text::int8), '{{}}') \
                 FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND datname = current_database()) END \
             FROM (SELECT {LAST_EVENT_NUMBER} AS last) s"
        );
        let query = query_as(sql).bind(unless_still);
        self.hot(async |c| Ok(query.fetch_one(c).await?)).await
    }

    /// The transactions of this database that still hold any of `xids`, oldest first, for an
    /// operator to find what holds back the horizon.
    pub async fn open_transactions(&self, xids: &[i64]) -> Result<Vec<OpenTransaction>> {
        self.pooled(async |c| {
            Ok(query_as(
                "SELECT pid, coalesce(usename::text, '') AS user_name, application_name, \
                 coalesce(host(client_addr), 'local') AS client, coalesce(state, '') AS state, \
                 extract(epoch FROM now() - xact_start)::float8 AS open_secs, \
                 left(query, 200) AS query \
             FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND datname = current_database() \
               AND backend_xid::text::int8 = ANY($1) \
             ORDER BY xact_start",
            )
            .bind(xids)
            .fetch_all(c)
            .await?)
        })
        .await
    }

    /// Events in `(after, upto]`, in order, at most `limit`; `with_job` reads their jobs'
    /// queues, types and labels too.
    pub async fn events_between(
        &self,
        after: i64,
        upto: i64,
        limit: i64,
        with_job: bool,
    ) -> Result<Vec<EventRow>> {
        let sql = if with_job {
            static_sql!(
                "SELECT {EVENT_COLUMNS}, {JOB_COLUMNS_OF_EVENT} FROM job_events e \
                 JOIN jobs j ON j.tenant_id = e.tenant_id AND j.id = e.job_id \
                 WHERE e.seq > $1 AND e.seq <= $2 ORDER BY e.seq LIMIT $3"
            )
        } else {
            static_sql!(
                "SELECT {EVENT_COLUMNS}, {NO_JOB_COLUMNS} FROM job_events e \
                 WHERE e.seq > $1 AND e.seq <= $2 ORDER BY e.seq LIMIT $3"
            )
        };
        let query = query_as::<EventRow>(sql).bind(after).bind(upto).bind(limit);
        self.hot(async |c| Ok(query.fetch_all(c).await?)).await
    }

    /// One job's events in `(after, upto]`, in order, at most `limit`.
    pub async fn job_events(
        &self,
        tenant: &TenantId,
        id: JobId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let sql = static_sql!(
            "SELECT {EVENT_COLUMNS}, {NO_JOB_COLUMNS} FROM job_events e \
             WHERE e.job_id = $1 AND e.tenant_id = $2 AND e.seq > $3 AND e.seq <= $4 \
             ORDER BY e.seq LIMIT $5"
        );
        self.events_of(sql, tenant, id, (after, upto), limit).await
    }

    /// The events of a job and of its children in `(after, upto]`, in order, at most `limit`.
    pub async fn family_events(
        &self,
        tenant: &TenantId,
        id: JobId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let sql = static_sql!(
            "SELECT {EVENT_COLUMNS}, {JOB_COLUMNS_OF_EVENT} FROM job_events e \
             JOIN jobs j ON j.tenant_id = e.tenant_id AND j.id = e.job_id \
             WHERE e.tenant_id = $2 AND e.seq > $3 AND e.seq <= $4 \
               AND e.job_id = ANY(ARRAY[$1::uuid] || ARRAY( \
                   SELECT c.id FROM jobs c WHERE c.tenant_id = $2 AND c.parent_id = $1)) \
             ORDER BY e.seq LIMIT $5"
        );
        self.events_of(sql, tenant, id, (after, upto), limit).await
    }

    /// Runs `sql`, a read of one job's events (`$1` the job, `$2` the tenant, `(after, upto]`
    /// in `$3` and `$4`, `$5` the limit), for the tenant.
    async fn events_of(
        &self,
        sql: &'static str,
        tenant: &TenantId,
        id: JobId,
        (after, upto): (i64, i64),
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<EventRow>(sql)
            .bind(id.0)
            .bind(tenant.as_str())
            .bind(after)
            .bind(upto)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// A tenant's events matching a filter in `(after, upto]`, in order, at most `limit`.
    pub async fn filtered_events(
        &self,
        tenant: &TenantId,
        filter: &EventFilter,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let sql = static_sql!(
            "SELECT {EVENT_COLUMNS}, {JOB_COLUMNS_OF_EVENT} FROM job_events e \
             JOIN jobs j ON j.tenant_id = e.tenant_id AND j.id = e.job_id \
             WHERE e.tenant_id = $1 AND e.seq > $2 AND e.seq <= $3 \
               AND ($4::text IS NULL OR j.queue = $4) \
               AND ($5::text IS NULL OR j.job_type = $5) \
               AND (cardinality($6::job_state[]) = 0 \
                    OR (e.kind = 'state' AND e.state = ANY($6))) \
               AND j.labels @> $7 \
             ORDER BY e.seq LIMIT $8"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let out = query_as::<EventRow>(sql)
            .bind(tenant.as_str())
            .bind(after)
            .bind(upto)
            .bind(filter.queue.as_ref().map(QueueName::as_str))
            .bind(filter.job_type.as_deref())
            .bind(&filter.states)
            .bind(Json(&filter.labels))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The sequence of a job's newest event (0 when it has none).
    pub async fn last_job_event(&self, tenant: &TenantId, id: JobId) -> Result<i64> {
        let mut tx = self.tenant_transaction(tenant).await?;
        let (last,): (Option<i64>,) =
            query_as("SELECT max(seq) FROM job_events WHERE job_id = $1 AND tenant_id = $2")
                .bind(id.0)
                .bind(tenant.as_str())
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(last.unwrap_or(0))
    }

    /// Jobs by tenant and id, for the snapshots state events carry.
    pub async fn jobs_by_ids(&self, keys: &[(&str, Uuid)]) -> Result<Vec<JobRow>> {
        let sql = static_sql!(
            "SELECT {JOB_COLUMNS} FROM UNNEST($1::text[], $2::uuid[]) AS k(tenant, job) \
             JOIN jobs ON tenant_id = k.tenant AND id = k.job"
        );
        let query = query_as::<JobRow>(sql)
            .bind(keys.iter().map(|(tenant, _)| *tenant).collect::<Vec<_>>())
            .bind(keys.iter().map(|(_, id)| *id).collect::<Vec<_>>());
        self.hot(async |c| Ok(query.fetch_all(c).await?)).await
    }
}
