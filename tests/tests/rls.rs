//! Row-level security, the second wall between tenants: inside a transaction the server scopes
//! to one tenant, statements that name no tenant at all still cannot read, change, delete or
//! write another tenant's rows. The tables are found in the catalog (every table with a
//! `tenant_id` column), so a table added without a policy fails here. A scoped begin abandoned
//! before its answer leaves no connection inside its transaction (and its role) for the next
//! user.

use jobwire_server::{domain::TenantId, store::Store};
use jobwire_tests::test_db;
use sqlx::{AssertSqlSafe, PgPool, Row};

/// How long a connection's return to the pool may take to be seen, on a loaded machine.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Two rows per tenant-scoped table for each of `acme` and `globex`, written as the tables'
/// owner (which the policies do not bind).
async fn seed(pool: &PgPool) {
    for tenant in ["acme", "globex"] {
        for n in 0..2 {
            let job: uuid::Uuid = sqlx::query_scalar(
                "INSERT INTO jobs (id, tenant_id, queue, job_type, payload_type, payload, \
                     priority, state, max_attempts, retry_initial_ms, retry_max_ms, \
                     retry_multiplier, retry_jitter, run_at, idempotency_key) \
                 VALUES (gen_random_uuid(), $1, 'q', 't', 'p', '\\x00', 50, 'available', 3, \
                     10, 100, 2, 0, now(), $1 || $2) RETURNING id",
            )
            .bind(tenant)
            .bind(n.to_string())
            .fetch_one(pool)
            .await
            .expect("job");
            sqlx::query(
                "INSERT INTO job_attempts (job_id, attempt, tenant_id, worker_id, outcome) \
                 VALUES ($1, 1, $2, 'w', 'failed')",
            )
            .bind(job)
            .bind(tenant)
            .execute(pool)
            .await
            .expect("attempt");
            sqlx::query(
                "INSERT INTO job_events (tenant_id, job_id, kind, state, attempt) \
                 VALUES ($1, $2, 'state', 'available', 0)",
            )
            .bind(tenant)
            .bind(job)
            .execute(pool)
            .await
            .expect("event");
            sqlx::query("INSERT INTO job_signals (tenant_id, job_id, name) VALUES ($1, $2, 'go')")
                .bind(tenant)
                .bind(job)
                .execute(pool)
                .await
                .expect("signal");
            sqlx::query("INSERT INTO queues (tenant_id, name) VALUES ($1, 'q' || $2)")
                .bind(tenant)
                .bind(n.to_string())
                .execute(pool)
                .await
                .expect("queue");
            sqlx::query(
                "INSERT INTO schedules (id, tenant_id, name, cron, time_zone, job_type, \
                     payload_type, payload, queue, priority, max_attempts, retry_initial_ms, \
                     retry_max_ms, retry_multiplier, retry_jitter, overlap_policy, \
                     catch_up_policy, max_catch_up, misfire_grace_ms, paused) \
                 VALUES (gen_random_uuid(), $1, 's' || $2, '0 3 * * *', 'UTC', 't', 'p', \
                     '\\x00', 'q', 50, 3, 10, 100, 2, 0, 'allow', 'once', 1, 0, true)",
            )
            .bind(tenant)
            .bind(n.to_string())
            .execute(pool)
            .await
            .expect("schedule");
            sqlx::query(
                "INSERT INTO job_types (tenant_id, name, version, payload_type, output_type, \
                     descriptor_set) VALUES ($1, 't', $2, 'p', 'o', '\\x00')",
            )
            .bind(tenant)
            .bind(n + 1)
            .execute(pool)
            .await
            .expect("job type");
            sqlx::query(
                "INSERT INTO api_keys (id, tenant_id, name, roles, secret_sha256) \
                 VALUES (gen_random_uuid(), $1, 'k', '{admin}', sha256('x'::bytea))",
            )
            .bind(tenant)
            .execute(pool)
            .await
            .expect("key");
            sqlx::query(
                "INSERT INTO audit_log (tenant_id, key_name, method, request) \
                 VALUES ($1, 'k', 'm', '{}')",
            )
            .bind(tenant)
            .execute(pool)
            .await
            .expect("audit entry");
            // The archives, as the pruner writes them: copies of the rows above.
            for archive in [
                "INSERT INTO jobs_archive SELECT (jsonb_populate_record(NULL::jobs_archive, \
                     to_jsonb(j) || '{\"archived_at\": \"2026-01-01T00:00:00Z\"}')).* \
                 FROM jobs j WHERE id = $1",
                "INSERT INTO job_attempts_archive SELECT (jsonb_populate_record( \
                     NULL::job_attempts_archive, \
                     to_jsonb(a) || '{\"archived_at\": \"2026-01-01T00:00:00Z\"}')).* \
                 FROM job_attempts a WHERE job_id = $1",
                "INSERT INTO job_events_archive SELECT (jsonb_populate_record( \
                     NULL::job_events_archive, \
                     to_jsonb(e) || '{\"archived_at\": \"2026-01-01T00:00:00Z\"}')).* \
                 FROM job_events e WHERE job_id = $1",
            ] {
                sqlx::query(archive)
                    .bind(job)
                    .execute(pool)
                    .await
                    .expect("archive row");
            }
            sqlx::query(
                "INSERT INTO workers (id, tenant_id, worker_id, replica, queues, job_types, \
                     slots, prefetch) \
                 VALUES (gen_random_uuid(), $1, 'w' || $2, 'r', '{q}', '{t}', 1, 0)",
            )
            .bind(tenant)
            .bind(n.to_string())
            .execute(pool)
            .await
            .expect("worker");
            sqlx::query(
                "INSERT INTO replay_requests (tenant_id, request_id) VALUES ($1, 'r' || $2)",
            )
            .bind(tenant)
            .bind(n.to_string())
            .execute(pool)
            .await
            .expect("replay request");
        }
    }
}

/// Every table of the schema with a `tenant_id` column; with `partitions`, the partitions of
/// partitioned tables too (the event log's), which are otherwise reached through their parent.
async fn tenant_tables(pool: &PgPool, partitions: bool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
           AND ($1 OR NOT c.relispartition) ORDER BY 1",
    )
    .bind(partitions)
    .fetch_all(pool)
    .await
    .expect("tables")
}

async fn count(pool: &PgPool, table: &str, tenant: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE tenant_id = $1"
    )))
    .bind(tenant)
    .fetch_one(pool)
    .await
    .expect("count")
}

fn code(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

#[tokio::test]
async fn a_statement_without_a_tenant_filter_reaches_only_its_own_tenant() {
    let db = test_db().await;
    let store = Store::connect(db.url(), 4).await.expect("store");
    store
        .ensure_event_partitions(
            std::time::Duration::from_secs(24 * 3600),
            std::time::Duration::from_secs(3 * 24 * 3600),
        )
        .await
        .expect("event partitions");
    let pool = db.pool().await;
    seed(&pool).await;
    let globex = TenantId::new_unchecked("globex");

    let tables = tenant_tables(&pool, false).await;
    assert!(tables.len() >= 8, "tenant tables: {tables:?}");
    // Partitions (the event log's) are reached only through their parent, whose policy holds
    // for them: the tenant role has no right on any of them.
    let partitions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, \
             has_table_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, DELETE') \
         FROM pg_class c WHERE c.relispartition AND c.relkind = 'r' \
           AND c.relnamespace = current_schema()::regnamespace",
    )
    .bind(jobwire_server::store::TENANT_ROLE)
    .fetch_all(&pool)
    .await
    .expect("partitions");
    assert!(!partitions.is_empty(), "the event log is partitioned");
    for (partition, granted) in &partitions {
        assert!(!granted, "{partition}: the tenant role may use it directly");
    }
    for table in &tables {
        let acme_rows = count(&pool, table, "acme").await;
        let globex_rows = count(&pool, table, "globex").await;
        assert!(
            acme_rows > 0 && globex_rows > 0,
            "{table}: seed() must give it rows of both tenants to test"
        );

        // Reads: the whole table is globex's.
        let mut tx = store.tenant_transaction(&globex).await.expect("scope");
        let seen: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *tx)
            .await
            .expect("read");
        assert_eq!(seen, globex_rows, "{table}: rows seen");
        let foreign: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE tenant_id = 'acme'"
        )))
        .fetch_one(&mut *tx)
        .await
        .expect("read");
        assert_eq!(foreign, 0, "{table}: acme's rows asked for by name");
        tx.rollback().await.expect("rollback");

        // Moving globex's rows to acme is refused by the policy's check.
        let mut tx = store.tenant_transaction(&globex).await.expect("scope");
        let moved = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET tenant_id = 'acme'"
        )))
        .execute(&mut *tx)
        .await
        .expect_err("rows moved to another tenant");
        assert_eq!(code(&moved), Some("42501".into()), "{table}: {moved}");
        tx.rollback().await.expect("rollback");

        // An UPDATE and a DELETE of every row touch globex's rows only.
        let mut tx = store.tenant_transaction(&globex).await.expect("scope");
        let updated = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET tenant_id = tenant_id"
        )))
        .execute(&mut *tx)
        .await
        .expect("update")
        .rows_affected();
        assert_eq!(
            updated,
            u64::try_from(globex_rows).expect("count"),
            "{table}: updated"
        );
        let deleted = sqlx::query(AssertSqlSafe(format!("DELETE FROM {table}")))
            .execute(&mut *tx)
            .await
            .expect("delete")
            .rows_affected();
        assert_eq!(
            deleted,
            u64::try_from(globex_rows).expect("count"),
            "{table}: deleted"
        );
        tx.commit().await.expect("commit");
        assert_eq!(
            count(&pool, table, "acme").await,
            acme_rows,
            "{table}: acme's rows"
        );
        assert_eq!(
            count(&pool, table, "globex").await,
            0,
            "{table}: globex's rows"
        );
    }

    // An insert in another tenant's name fails with the policy's error.
    let mut tx = store.tenant_transaction(&globex).await.expect("scope");
    let refused = sqlx::query("INSERT INTO queues (tenant_id, name) VALUES ('acme', 'smuggled')")
        .execute(&mut *tx)
        .await
        .expect_err("an acme row written in globex's scope");
    assert_eq!(code(&refused), Some("42501".into()), "{refused}");
    tx.rollback().await.expect("rollback");

    // The attempt history view reads its tables as the caller, so the policies hold there too.
    let mut tx = store
        .tenant_transaction(&TenantId::new_unchecked("acme"))
        .await
        .expect("scope");
    let tenants: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant_id FROM job_attempt_history")
            .fetch_all(&mut *tx)
            .await
            .expect("view");
    assert_eq!(tenants, vec!["acme".to_owned()]);
    tx.rollback().await.expect("rollback");
}

/// The role tenant statements run as can bypass nothing, and without a tenant set it reads
/// nothing at all: the policies fail closed.
#[tokio::test]
async fn the_tenant_role_bypasses_nothing_and_fails_closed() {
    let db = test_db().await;
    let store = Store::connect(db.url(), 2).await.expect("store");
    store
        .ensure_event_partitions(
            std::time::Duration::from_secs(24 * 3600),
            std::time::Duration::from_secs(3 * 24 * 3600),
        )
        .await
        .expect("event partitions");
    let pool = db.pool().await;
    seed(&pool).await;
    let row = sqlx::query("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1")
        .bind(jobwire_server::store::TENANT_ROLE)
        .fetch_one(&pool)
        .await
        .expect("role");
    assert!(
        !row.get::<bool, _>(0) && !row.get::<bool, _>(1),
        "superuser or BYPASSRLS"
    );

    for table in tenant_tables(&pool, true).await {
        let forced: (bool, i64) = sqlx::query_as(
            "SELECT c.relrowsecurity, (SELECT count(*) FROM pg_policies p \
                 WHERE p.tablename = c.relname AND $2::name = ANY(p.roles)) \
             FROM pg_class c WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace",
        )
        .bind(&table)
        .bind(jobwire_server::store::TENANT_ROLE)
        .fetch_one(&pool)
        .await
        .expect("catalog");
        assert_eq!(
            forced,
            (true, 1),
            "{table}: row-level security and one policy"
        );

        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SET LOCAL ROLE jobwire_tenant")
            .execute(&mut *tx)
            .await
            .expect("set role");
        let unscoped = sqlx::query(AssertSqlSafe(format!("SELECT * FROM {table}")))
            .fetch_all(&mut *tx)
            .await;
        assert!(unscoped.is_err(), "{table}: read without a tenant set");
        tx.rollback().await.expect("rollback");
    }
}

/// Backends of the store under test (this process's `jobwire-server/<pid>` connections to
/// the test's database) that sit inside a transaction with no statement running.
async fn idle_in_transaction(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
           AND application_name = $1 AND state = 'idle in transaction'",
    )
    .bind(format!("jobwire-server/{}", std::process::id()))
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

#[tokio::test]
async fn a_scoped_begin_abandoned_before_its_answer_leaves_no_transaction_behind() {
    use futures::FutureExt as _;

    let db = test_db().await;
    let store = Store::connect(db.url(), 2).await.expect("store");
    let pool = db.pool().await;
    let acme = TenantId::new_unchecked("acme");
    let mut abandoned = 0;
    for _ in 0..20 {
        store.ping().await.expect("ping");
        // The connection goes back to the pool in a task of its own: wait for it, so that the
        // begin below acquires at once and gets as far as sending its BEGIN.
        jobwire_tests::eventually("a connection idle in the pool", WAIT, || async {
            (store.pool_use().0 > 0).then_some(())
        })
        .await;
        // Polled once, then dropped: the BEGIN (with its SET LOCAL ROLE) is sent, its answer
        // never read. sqlx counts no transaction and queues no rollback for it.
        if store.tenant_transaction(&acme).now_or_never().is_none() {
            abandoned += 1;
        }
    }
    assert!(abandoned > 0, "no begin was left pending");
    // The store goes on working, on connections outside any transaction: one an abandoned
    // begin left inside its transaction is closed as it returns to the pool, not reused (its
    // next user would run as the tenant role, in that transaction, holding its locks).
    for _ in 0..4 {
        store.ping().await.expect("ping after abandoned begins");
    }
    jobwire_tests::eventually("no connection left in a transaction", WAIT, || async {
        (idle_in_transaction(&pool).await == 0).then_some(())
    })
    .await;
    let tx = store.tenant_transaction(&acme).await.expect("scope");
    drop(tx);
    store.ping().await.expect("ping");
}
