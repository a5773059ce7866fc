//! Smoke test of the harness itself: a test database is real, private and writable.

use jobwire_tests::test_db;

#[tokio::test]
async fn test_db_is_a_fresh_writable_database() {
    let db = test_db().await;
    assert!(db.name().starts_with("jobwire_t_"));
    assert!(db.url().contains(db.name()), "{}", db.url());

    let pool = db.pool().await;
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("current_database()");
    assert_eq!(current, db.name());

    sqlx::query("CREATE TABLE greeting (id int PRIMARY KEY, text text NOT NULL)")
        .execute(&pool)
        .await
        .expect("create table");
    sqlx::query("INSERT INTO greeting VALUES (1, 'hello'), (2, 'world')")
        .execute(&pool)
        .await
        .expect("insert");
    let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM greeting ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("select");
    assert_eq!(texts, ["hello", "world"]);
}

#[tokio::test]
async fn test_dbs_are_isolated_and_dropped() {
    let (a, b) = (test_db().await, test_db().await);
    assert_ne!(a.name(), b.name());
    let name = a.name().to_owned();
    let observer = b.pool().await;
    drop(a);

    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&observer)
            .await
            .expect("query pg_database");
    assert!(!exists, "{name} is dropped with its TestDb");
}
