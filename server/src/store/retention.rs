//! Statements of retention: pruning finished jobs past their queue's retention (archiving them
//! first when asked), and keeping the event log's time partitions, made ahead and dropped
//! whole once old.
//!
//! Pruning never waits for the hot path: a batch takes only rows no one else has locked (`FOR
//! UPDATE SKIP LOCKED`), at most a batch's worth, in one short transaction. Partitions are made
//! apart and attached, and dropped after a concurrent detach, so that neither locks the event
//! log against the statements writing and reading events (see migration 0020).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{Result, Store, Term, leases::millis, query, query_as};

/// The advisory lock that serializes the making of event partitions across replicas (each
/// makes them at start, and the leader after).
const PARTITION_LOCK: i64 = 0x6a77_6576_7061_7274; // "jwevpart"

/// How long partition DDL waits for a lock before it gives up until the next pass: it must
/// never queue the event log's readers and writers behind it for long.
const DDL_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// The start of both pruning statements ($1 tenant, $2 queue, $3 retention in milliseconds,
/// $4 batch size, $5 the leader's term): the batch of expired jobs no one else has locked,
/// deleted with their attempts, each returned whole for the archive, and with their signals
/// (migration 0033), which are not archived. The jobs are deleted by the row addresses their
/// lock returned (they cannot move while locked): a plan on the jobs' key could mistake a
/// table grown since its statistics for a small one, and scan the tenant's every job for each
/// batch.
const PRUNE: &str = concat!(
    "WITH doomed AS ( \
         SELECT ctid FROM jobs \
         WHERE tenant_id = $1 AND queue = $2 \
           AND state IN ('succeeded', 'failed', 'cancelled') \
           AND finished_at < now() - $3 * interval '1 millisecond' AND ",
    leader_fence!("$5"),
    " LIMIT $4 \
         FOR UPDATE SKIP LOCKED \
     ), gone AS ( \
         DELETE FROM jobs j WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM doomed)) \
         RETURNING j.* \
     ), gone_attempts AS ( \
         DELETE FROM job_attempts a WHERE a.job_id = ANY(ARRAY(SELECT id FROM gone)) \
         RETURNING a.* \
     ), gone_signals AS ( \
         DELETE FROM job_signals s \
         WHERE s.tenant_id = $1 AND s.job_id = ANY(ARRAY(SELECT id FROM gone WHERE has_signals)) \
     )"
);

/// A queue's finished jobs are kept this long after they finish.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueRetention {
    pub tenant_id: String,
    pub queue: String,
    pub retention_ms: i64,
}

/// What one pruning batch removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub attempts: u64,
    /// Events copied to `job_events_archive` (0 unless archiving).
    pub events_archived: u64,
}

/// A partition of the event log, as the catalog describes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventPartition {
    pub name: String,
    /// The end of its range: every event in it was written before.
    pub upper_bound: DateTime<Utc>,
    /// A detach began and did not finish (the server stopped during it).
    pub detach_pending: bool,
}

/// Whether pruned rows are copied to the archive tables first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    Keep,
    Discard,
}

impl Store {
    /// Makes the event log's partitions ahead of time, of `step` each, until one reaches
    /// `ahead` past now. Safe on any replica at any time: callers serialize on an advisory
    /// lock, and a partition already there is not made again. Returns how many were made.
    pub async fn ensure_event_partitions(&self, step: Duration, ahead: Duration) -> Result<i32> {
        let mut tx = self.begin().await?;
        query(DDL_LOCK_TIMEOUT).execute(&mut *tx).await?;
        query("SELECT pg_advisory_xact_lock($1)")
            .bind(PARTITION_LOCK)
            .execute(&mut *tx)
            .await?;
        let (made,): (i32,) = query_as(
            "SELECT jobwire_ensure_event_partitions($1 * interval '1 millisecond', \
                 clock_timestamp() + $2 * interval '1 millisecond')",
        )
        .bind(millis(step))
        .bind(millis(ahead))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(made)
    }

    /// Every queue with its retention: its own, or `default` when it sets none.
    pub async fn queue_retentions(&self, default: Duration) -> Result<Vec<QueueRetention>> {
        self.pooled(async |c| {
            Ok(query_as(
                "SELECT tenant_id, name AS queue, coalesce(retention_ms, $1) AS retention_ms \
             FROM queues ORDER BY tenant_id, name",
            )
            .bind(millis(default))
            .fetch_all(c)
            .await?)
        })
        .await
    }

    /// Deletes up to `limit` of a queue's finished jobs (SUCCEEDED, FAILED, CANCELLED) that
    /// finished more than `retention` ago, with their attempts, copying them and their events
    /// to the archive tables first when `archive` says so, in one statement. Jobs locked by
    /// anyone else (a RetryJob under way) are skipped, never waited for. Their idempotency
    /// keys are free again once it commits. Their events stay in the log until their
    /// partition is dropped; filtered watches and replays, which join their jobs, no longer
    /// see them.
    pub async fn prune_jobs(
        &self,
        term: Term,
        queue: &QueueRetention,
        limit: i64,
        archive: Archive,
    ) -> Result<Pruned> {
        let sql = match archive {
            Archive::Discard => static_sql!(
                "{PRUNE} SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_attempts), \
                     0::bigint"
            )
            .to_owned(),
            Archive::Keep => self.archiving_prune().await?,
        };
        // The commit does not wait for its WAL to reach the disk, so that pruning never waits
        // on the flushes of the hot path's commits nor adds its own. A crash may lose the last
        // batches, never half of one: their jobs come back whole and are pruned again. Any
        // later commit that saw them gone (an enqueue reusing a freed key) is flushed after
        // them, in WAL order.
        let mut tx = self.begin().await?;
        query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let (jobs, attempts, events): (i64, i64, i64) = query_as(AssertSqlSafe(sql))
            .bind(&queue.tenant_id)
            .bind(&queue.queue)
            .bind(queue.retention_ms)
            .bind(limit)
            .bind(term.0)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(Pruned {
            jobs: count(jobs),
            attempts: count(attempts),
            events_archived: count(events),
        })
    }

    /// The pruning statement that copies what it deletes to the archive tables, column by
    /// named column: the archives were made `LIKE` their sources and gained later columns
    /// after `archived_at`, so their columns are not in their sources' order. The names are
    /// read from the catalog each time, so that a leader started before a migration added a
    /// column still archives it (the migration adds it to both).
    async fn archiving_prune(&self) -> Result<String> {
        let (jobs, attempts, events): (String, String, String) = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT \
                         string_agg(quote_ident(attname), ', ' ORDER BY attnum) \
                             FILTER (WHERE attrelid = 'jobs'::regclass), \
                         string_agg(quote_ident(attname), ', ' ORDER BY attnum) \
                             FILTER (WHERE attrelid = 'job_attempts'::regclass), \
                         string_agg(quote_ident(attname), ', ' ORDER BY attnum) \
                             FILTER (WHERE attrelid = 'job_events'::regclass) \
                     FROM pg_attribute \
                     WHERE attrelid IN ('jobs'::regclass, 'job_attempts'::regclass, \
                                        'job_events'::regclass) \
                       AND attnum > 0 AND NOT attisdropped",
                )
                .fetch_one(c)
                .await?)
            })
            .await?;
        Ok(format!(
            "{PRUNE}, archived_jobs AS ( \
                 INSERT INTO jobs_archive ({jobs}) SELECT {jobs} FROM gone \
             ), archived_attempts AS ( \
                 INSERT INTO job_attempts_archive ({attempts}) \
                 SELECT {attempts} FROM gone_attempts \
             ), archived_events AS ( \
                 INSERT INTO job_events_archive ({events}) SELECT {events} FROM job_events \
                 WHERE tenant_id = $1 AND job_id = ANY(ARRAY(SELECT id FROM gone)) \
                 RETURNING 1 \
             ) \
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_attempts), \
                    (SELECT count(*) FROM archived_events)",
        ))
    }

    /// The partitions of the event log whose every event is older than `retention`, oldest
    /// first. The partition being written is never among them.
    pub async fn expired_event_partitions(
        &self,
        retention: Duration,
    ) -> Result<Vec<EventPartition>> {
        self.pooled(async |c| {
            Ok(query_as(
                "SELECT name, upper_bound, detach_pending FROM jobwire_event_partitions() \
             WHERE upper_bound < now() - $1 * interval '1 millisecond' ORDER BY upper_bound",
            )
            .bind(millis(retention))
            .fetch_all(c)
            .await?)
        })
        .await
    }

    /// Drops one expired partition of the event log. First the log's horizon is raised past
    /// every event in it (so that a watcher resuming below it is told, never handed a history
    /// with a hole), under the leader's term; then the partition is detached concurrently
    /// (only DDL waits on that lock, not the events' writers and readers), then dropped.
    /// Returns false when `term` no longer leads and nothing was done. A detach that a stop
    /// interrupted is finished here.
    pub async fn drop_event_partition(
        &self,
        term: Term,
        partition: &EventPartition,
    ) -> Result<bool> {
        let raised = self
            .pooled(async |c| {
                Ok(query(static_sql!(
                    "UPDATE event_log SET pruned_through = greatest(pruned_through, \
                 coalesce((SELECT max(seq) FROM job_events WHERE created_at < $1), 0)) \
             WHERE {fence}",
                    fence = leader_fence!("$2"),
                ))
                .bind(partition.upper_bound)
                .bind(term.0)
                .execute(c)
                .await?)
            })
            .await?
            .rows_affected();
        if raised == 0 {
            return Ok(false);
        }
        let (detach, drop): (String, String) = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT format('ALTER TABLE job_events DETACH PARTITION %I ' \
                     || CASE WHEN $2 THEN 'FINALIZE' ELSE 'CONCURRENTLY' END, $1::text), \
                    format('DROP TABLE IF EXISTS %I', $1::text)",
                )
                .bind(&partition.name)
                .bind(partition.detach_pending)
                .fetch_one(c)
                .await?)
            })
            .await?;
        // Both built by format('%I') from a name read from the catalog. A concurrent detach
        // cannot run in a transaction, so it goes alone, by the simple protocol.
        sqlx::raw_sql(AssertSqlSafe(detach))
            .execute(&self.pool)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    /// Drops partitions of the event log left detached (a server stopped between detaching
    /// and dropping one): the horizon was raised past their events before they were detached.
    /// Returns how many.
    pub async fn drop_detached_event_partitions(&self) -> Result<usize> {
        let drops: Vec<(String,)> = self
            .pooled(async |c| {
                Ok(query_as(
                    "SELECT format('DROP TABLE IF EXISTS %I', c.relname) FROM pg_class c \
             WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r' \
               AND c.relname LIKE 'job\\_events\\_p%' AND NOT c.relispartition",
                )
                .fetch_all(c)
                .await?)
            })
            .await?;
        for (drop,) in &drops {
            sqlx::raw_sql(AssertSqlSafe(drop.clone()))
                .execute(&self.pool)
                .await?;
        }
        Ok(drops.len())
    }

    /// The number through which events may have been pruned: every event after it is kept.
    pub async fn events_pruned_through(&self) -> Result<i64> {
        let (through,): (i64,) = self
            .pooled(async |c| {
                Ok(query_as("SELECT pruned_through FROM event_log")
                    .fetch_one(c)
                    .await?)
            })
            .await?;
        Ok(through)
    }
}
