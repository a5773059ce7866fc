//! Statements on the job type registry. Versions are immutable rows; the latest is the highest.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;

use super::{Error, Listed, Result, Store, query_as};
use crate::domain::{TenantId, approval::Condition, ending::KindRule};

/// What a job of a type gets when its enqueue leaves a field unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent_by_payload: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_approval: bool,
    /// RetryPolicy.by_kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_rules: Vec<KindRule>,
    /// Conditions on the payload under which a job needs approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approval_when: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval_timeout_fails: bool,
}

/// A named example payload, kept as the JSON it was registered with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub slug: String,
    pub name: String,
    pub payload: serde_json::Value,
}

/// A version to register.
#[derive(Debug, Clone)]
pub struct NewJobType {
    pub name: String,
    pub payload_type: String,
    pub output_type: String,
    pub descriptor_set: Vec<u8>,
    pub defaults: TypeDefaults,
    pub examples: Vec<Example>,
}

/// One version of a job type.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobTypeRow {
    pub name: String,
    pub version: i32,
    pub latest: bool,
    pub payload_type: String,
    pub output_type: String,
    pub descriptor_set: Vec<u8>,
    pub defaults: Json<TypeDefaults>,
    pub examples: Json<Vec<Example>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "t.name, t.version, \
    t.version = (SELECT max(version) FROM job_types m \
                 WHERE m.tenant_id = t.tenant_id AND m.name = t.name) AS latest, \
    t.payload_type, t.output_type, t.descriptor_set, t.defaults, t.examples, t.created_at";

/// Runs an insert that numbers a new version, again when a concurrent one took the number
/// (a unique violation), a few times at most.
async fn retry_on_conflict<T, F, Fut>(mut insert: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match insert().await {
            Err(Error::Database(sqlx::Error::Database(db)))
                if db.code().as_deref() == Some("23505") && tries < 5 =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

impl Store {
    /// Stores the next version of a job type (1 for a new type). Two registrations racing for
    /// the same number are told apart by the primary key; the loser takes the next number.
    pub async fn register_job_type(
        &self,
        tenant: &TenantId,
        new: &NewJobType,
    ) -> Result<JobTypeRow> {
        let sql = static_sql!(
            "WITH t AS ( \
                 INSERT INTO job_types (tenant_id, name, version, payload_type, output_type, \
                     descriptor_set, defaults, examples) \
                 SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4, $5, $6, $7 \
                 FROM job_types WHERE tenant_id = $1 AND name = $2 \
                 RETURNING * \
             ) \
             SELECT t.name, t.version, true AS latest, t.payload_type, t.output_type, \
                    t.descriptor_set, t.defaults, t.examples, t.created_at FROM t"
        );
        retry_on_conflict(|| {
            let query = query_as::<JobTypeRow>(sql)
                .bind(tenant.as_str())
                .bind(&new.name)
                .bind(&new.payload_type)
                .bind(&new.output_type)
                .bind(&new.descriptor_set)
                .bind(Json(&new.defaults))
                .bind(Json(&new.examples));
            self.as_tenant(tenant, async |c| Ok(query.fetch_one(c).await?))
        })
        .await
    }

    /// Registers what a connecting worker declared, unless the latest version already has the
    /// same schema and defaults; a new version keeps the latest one's examples (workers do not
    /// carry them). Returns the version created, if one was.
    pub async fn register_job_type_from_worker(
        &self,
        tenant: &TenantId,
        new: &NewJobType,
    ) -> Result<Option<JobTypeRow>> {
        let sql = static_sql!(
            "WITH latest AS ( \
                 SELECT * FROM job_types WHERE tenant_id = $1 AND name = $2 \
                 ORDER BY version DESC LIMIT 1 \
             ), t AS ( \
                 INSERT INTO job_types (tenant_id, name, version, payload_type, output_type, \
                     descriptor_set, defaults, examples) \
                 SELECT $1, $2, coalesce((SELECT version FROM latest), 0) + 1, $3, $4, $5, $6, \
                        coalesce((SELECT examples FROM latest), '[]') \
                 WHERE NOT EXISTS ( \
                     SELECT 1 FROM latest WHERE payload_type = $3 AND output_type = $4 \
                       AND descriptor_set = $5 AND defaults = $6) \
                 RETURNING * \
             ) \
             SELECT t.name, t.version, true AS latest, t.payload_type, t.output_type, \
                    t.descriptor_set, t.defaults, t.examples, t.created_at FROM t"
        );
        // Another worker may register the same version first; the retry compares with it.
        retry_on_conflict(|| {
            let query = query_as::<JobTypeRow>(sql)
                .bind(tenant.as_str())
                .bind(&new.name)
                .bind(&new.payload_type)
                .bind(&new.output_type)
                .bind(&new.descriptor_set)
                .bind(Json(&new.defaults));
            self.as_tenant(tenant, async |c| Ok(query.fetch_optional(c).await?))
        })
        .await
    }

    /// One version of a job type; `None` for the latest.
    pub async fn get_job_type(
        &self,
        tenant: &TenantId,
        name: &str,
        version: Option<i32>,
    ) -> Result<JobTypeRow> {
        let sql = static_sql!(
            "SELECT {COLUMNS} FROM job_types t \
             WHERE t.tenant_id = $1 AND t.name = $2 AND ($3::int4 IS NULL OR t.version = $3) \
             ORDER BY t.version DESC LIMIT 1"
        );
        let query = query_as::<JobTypeRow>(sql)
            .bind(tenant.as_str())
            .bind(name)
            .bind(version);
        self.as_tenant(tenant, async |c| Ok(query.fetch_optional(c).await?))
            .await?
            .ok_or(Error::NotFound)
    }

    /// The latest version of each job type after `after` by name, at most `limit`.
    pub async fn list_job_types(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Listed<JobTypeRow>> {
        // As `list_jobs`: the candidates (each name's latest version), of which those whose
        // schemas and examples fit `max_bytes`.
        let sql = static_sql!(
            "WITH latest AS ( \
                 SELECT DISTINCT ON (t.name) t.name, t.version, t.payload_type, t.output_type, \
                        t.descriptor_set, t.defaults, t.examples, t.created_at \
                 FROM job_types t \
                 WHERE t.tenant_id = $1 AND ($2::text IS NULL OR t.name > $2) \
                 ORDER BY t.name, t.version DESC LIMIT $3 \
             ), candidate AS ( \
                 SELECT name, row_number() OVER (ORDER BY name) AS n, \
                        sum(octet_length(descriptor_set) + octet_length(examples::text)) \
                            OVER (ORDER BY name) AS bytes \
                 FROM latest \
             ) \
             SELECT l.name, l.version, true AS latest, l.payload_type, l.output_type, \
                    l.descriptor_set, l.defaults, l.examples, l.created_at, \
                    (SELECT count(*) FROM candidate) AS candidates \
             FROM latest l JOIN candidate c USING (name) \
             WHERE c.n = 1 OR c.bytes <= $4 \
             ORDER BY l.name"
        );
        let mut tx = self.tenant_transaction(tenant).await?;
        let rows = query_as(sql)
            .bind(tenant.as_str())
            .bind(after)
            .bind(limit)
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Listed::from_rows(rows))
    }
}
