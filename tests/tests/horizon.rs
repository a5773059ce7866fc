//! The fanout's horizon (invariant 5): the event number it reads as the last handed out is
//! never one that no transaction has taken yet.
//!
//! `nextval()` writes, under the sequence buffer's lock, the value 32 numbers ahead into the
//! sequence's tuple while it logs that value (SEQ_LOG_VALS), then puts the real value back. A
//! read that copies the tuple without the lock can see the value ahead: a horizon covering
//! numbers no transaction holds yet, so events committed later under them would be skipped by
//! every watcher. The window is a few microseconds, so the reads run in a loop inside the
//! database, beside connections taking numbers as fast as they can.

use jobwire_server::store::{LAST_EVENT_NUMBER, Store};
use std::time::Duration;

use jobwire_tests::{eventually, test_db};
use sqlx::Connection;

/// Reads of the last number, each checked against the value read under the lock after it.
const READS: i64 = 600_000;
/// Connections taking numbers meanwhile, each this many.
const TAKERS: usize = 3;
const TAKEN_EACH: i64 = 20_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_event_number_never_runs_ahead_of_numbers_handed_out() {
    let db = test_db().await;
    // Migrates the database, so the event sequence exists.
    let store = Store::connect(db.url(), 4).await.expect("store");
    store.close().await;
    let mut takers = Vec::new();
    for _ in 0..TAKERS {
        let url = db.url().to_owned();
        takers.push(tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            // Ends with an error once the reader cancels it.
            let _ = sqlx::query(
                "SELECT count(nextval(pg_get_serial_sequence('job_events', 'seq'))) \
                 FROM generate_series(1, $1)",
            )
            .bind(TAKEN_EACH)
            .execute(&mut conn)
            .await;
        }));
    }
    let mut conn = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    // On a busy machine the takers may be slow to start: read only once they run.
    eventually("the takers take numbers", Duration::from_secs(60), || {
        // A taker that ended already could not connect: its panic says why.
        assert!(
            takers.iter().all(|taker| !taker.is_finished()),
            "a taker ended before taking numbers"
        );
        let url = db.url().to_owned();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            let taken: i64 = sqlx::query_scalar(
                "SELECT coalesce(pg_sequence_last_value( \
                     pg_get_serial_sequence('job_events', 'seq')), 0)",
            )
            .fetch_one(&mut conn)
            .await
            .expect("last value");
            (taken > 0).then_some(())
        }
    })
    .await;
    // Numbers only grow, so a read above the value read under the lock right after it named a
    // number not yet handed out.
    let check = format!(
        "DO $$ \
         DECLARE seen bigint; handed_out bigint; ahead bigint := 0; worst bigint := 0; \
         BEGIN \
             FOR i IN 1..{READS} LOOP \
                 seen := {LAST_EVENT_NUMBER}; \
                 handed_out := coalesce(pg_sequence_last_value( \
                     pg_get_serial_sequence('job_events', 'seq')), 0); \
                 IF seen > handed_out THEN \
                     ahead := ahead + 1; worst := greatest(worst, seen - handed_out); \
                 END IF; \
             END LOOP; \
             RAISE NOTICE 'ahead=% worst=%', ahead, worst; \
             IF ahead > 0 THEN \
                 RAISE EXCEPTION '% of {READS} reads ran ahead of the numbers handed out, by up \
                     to %', ahead, worst; \
             END IF; \
         END $$"
    );
    let outcome = sqlx::query(sqlx::AssertSqlSafe(check))
        .execute(&mut conn)
        .await;
    let taken: i64 = sqlx::query_scalar(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('job_events', 'seq')), 0)",
    )
    .fetch_one(&mut conn)
    .await
    .expect("last value");
    sqlx::query(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut conn)
    .await
    .expect("stop the takers");
    for taker in takers {
        taker.await.expect("taker");
    }
    assert!(
        taken > 100_000,
        "only {taken} numbers were taken while reading"
    );
    outcome.expect("every read of the last event number");
}
