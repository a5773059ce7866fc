//! ReplayJobs: dead letters made available again by filter, in one transaction, each request
//! id answered once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Error, Result, Store, jobs::CLEAR_WAITS, notify::send, query, query_as, query_scalar};
use crate::domain::{Actor, JobId, JobState, QueueName, TenantId};

/// How many ids an answer shows.
const SAMPLE: usize = 10;

/// Which finished jobs a replay takes; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// FAILED, CANCELLED or both.
    pub states: Vec<JobState>,
    pub queue: Option<QueueName>,
    pub job_type: Option<String>,
    pub finished_after: Option<DateTime<Utc>>,
    pub finished_before: Option<DateTime<Utc>>,
    pub error_kind: Option<String>,
    pub error_text: Option<String>,
    pub labels: HashMap<String, String>,
}

/// A job a replay takes, as a payload change sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replayable {
    pub id: Uuid,
    pub payload: Vec<u8>,
    pub job_type_version: Option<i32>,
}

/// What a replay did, or a dry run would do.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub count: i64,
    pub sample: Vec<Uuid>,
    pub truncated: bool,
    /// The answer of an earlier call with the same request id.
    pub repeated: bool,
}

/// A replay to run: `request` names it (None: a dry run, which changes nothing).
pub struct Replay<'a> {
    pub filter: &'a ReplayFilter,
    pub limit: i64,
    pub request: Option<&'a str>,
    pub actor: Option<&'a Actor>,
}

impl Store {
    /// Replays the jobs `replay` matches, oldest first, up to its limit. `change` gives a job's
    /// new payload (None: unchanged) or why it cannot; a job it refuses refuses the whole
    /// replay ([`Error::Refused`]), and nothing is written.
    pub async fn replay(
        &self,
        tenant: &TenantId,
        replay: Replay<'_>,
        change: impl Fn(Replayable) -> BoxFuture<'static, std::result::Result<Option<Vec<u8>>, String>>
        + Send
        + Sync,
    ) -> Result<Replayed> {
        let mut tx = self.tenant_transaction(tenant).await?;
        if let Some(request) = replay.request {
            // A concurrent call with the same id waits here until the first commits, then
            // reads its answer.
            let fresh: Option<i32> = query_scalar(
                "INSERT INTO replay_requests (tenant_id, request_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING RETURNING 1",
            )
            .bind(tenant.as_str())
            .bind(request)
            .fetch_optional(&mut *tx)
            .await?;
            if fresh.is_none() {
                let (count, sample, truncated): (i64, Vec<Uuid>, bool) = query_as(
                    "SELECT replayed, sample_ids, truncated FROM replay_requests \
                     WHERE tenant_id = $1 AND request_id = $2",
                )
                .bind(tenant.as_str())
                .bind(request)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Replayed {
                    count,
                    sample,
                    truncated,
                    repeated: true,
                });
            }
        }
        let f = replay.filter;
        let states: Vec<JobState> = if f.states.is_empty() {
            vec![JobState::Failed]
        } else {
            f.states.clone()
        };
        let sql = static_sql!(
            "SELECT id, payload, job_type_version FROM jobs \
             WHERE tenant_id = $1 AND state = ANY($2) \
               AND ($3::text IS NULL OR queue = $3) \
               AND ($4::text IS NULL OR job_type = $4) \
               AND ($5::timestamptz IS NULL OR finished_at >= $5) \
               AND ($6::timestamptz IS NULL OR finished_at < $6) \
               AND ($7::text IS NULL OR last_error->>'kind' = $7) \
               AND ($8::text IS NULL OR strpos(lower(last_error->>'message'), lower($8)) > 0) \
               AND labels @> $9 \
             ORDER BY id LIMIT $10 \
             FOR UPDATE"
        );
        let mut rows: Vec<Replayable> = query_as(sql)
            .bind(tenant.as_str())
            .bind(&states)
            .bind(f.queue.as_ref().map(QueueName::as_str))
            .bind(f.job_type.as_deref())
            .bind(f.finished_after)
            .bind(f.finished_before)
            .bind(f.error_kind.as_deref())
            .bind(f.error_text.as_deref())
            .bind(Json(&f.labels))
            .bind(replay.limit.saturating_add(1))
            .fetch_all(&mut *tx)
            .await?;
        let truncated = rows.len() as i64 > replay.limit;
        rows.truncate(usize::try_from(replay.limit).unwrap_or(usize::MAX));
        let sample: Vec<Uuid> = rows.iter().take(SAMPLE).map(|r| r.id).collect();
        let count = rows.len() as i64;
        let Some(request) = replay.request else {
            tx.commit().await?;
            return Ok(Replayed {
                count,
                sample,
                truncated,
                repeated: false,
            });
        };
        let mut payloads = Vec::with_capacity(rows.len());
        for row in &rows {
            payloads.push(change(row.clone()).await.map_err(|why| Error::Refused {
                id: JobId(row.id),
                why,
            })?);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let sql = static_sql!(
            "WITH r AS ( \
                 SELECT * FROM unnest($2::uuid[], $3::bytea[]) AS r(id, payload) \
             ), upd AS ( \
                 UPDATE jobs j SET attempt_base = attempt, {CLEAR_WAITS}, \
                        state = CASE WHEN j.depends_on IS NULL THEN 'available'::job_state \
                                     ELSE 'pending'::job_state END, \
                        run_at = now(), finished_at = NULL, cancel_reason = NULL, \
                        cancel_requested_at = NULL, pause_requested_at = NULL, \
                        result = NULL, result_type = NULL, \
                        payload = coalesce(r.payload, j.payload), updated_at = now() \
                 FROM r WHERE j.tenant_id = $1 AND j.id = r.id \
                 RETURNING j.tenant_id, j.id, j.queue, j.state, j.attempt \
             ), ev AS ( \
                 INSERT INTO job_events (tenant_id, job_id, kind, state, attempt, data) \
                 SELECT tenant_id, id, 'state', state, attempt, \
                        jsonb_build_object('reason', 'replayed (request ' || $4 || ')', \
                                           'actor', $5::jsonb) \
                 FROM upd \
             ), wake AS ( \
                 SELECT {work} FROM (SELECT DISTINCT tenant_id, queue FROM upd \
                                     WHERE state = 'available') q \
                 UNION ALL \
                 SELECT {due} FROM (SELECT 1 FROM upd WHERE state = 'pending' LIMIT 1) p \
             ) \
             SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM wake)",
            work = send::work("tenant_id", "queue"),
            due = send::due(),
        );
        let (replayed, _woken): (i64, i64) = query_as(sql)
            .bind(tenant.as_str())
            .bind(&ids)
            .bind(&payloads)
            .bind(request)
            .bind(replay.actor.map(Json))
            .fetch_one(&mut *tx)
            .await?;
        query(
            "UPDATE replay_requests SET replayed = $3, sample_ids = $4, truncated = $5 \
             WHERE tenant_id = $1 AND request_id = $2",
        )
        .bind(tenant.as_str())
        .bind(request)
        .bind(replayed)
        .bind(&sample)
        .bind(truncated)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Replayed {
            count: replayed,
            sample,
            truncated,
            repeated: false,
        })
    }
}
