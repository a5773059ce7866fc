//! Connections left inside a transaction by a `begin` abandoned halfway, kept from their next
//! user.
//!
//! sqlx 0.9 leaves a connection so when a begin's future is dropped between sending its `BEGIN`
//! and reading the answer (a caller gone, a `select!` that chose another branch): it counts the
//! transaction only once the answer is read, so it queues no rollback, and the next user's
//! statements would run in that transaction, under its `SET LOCAL ROLE` and holding its locks.
//! Behind a pooler the transaction also pins a server connection. sqlx tracks the server's
//! transaction status but does not expose it, and `Connection::is_in_transaction` counts only
//! the begins that finished, so asking the server is the only way to know.
//!
//! Asking costs a round trip, too much for every connection returned to the pool: the store
//! returns one after nearly every statement outside the engine's warm connections. So each
//! begin of the store runs under [`guard`], which notes the time when one is abandoned, and the
//! pool asks only the connections returned within [`WINDOW`] of the last abandoned begin
//! ([`check_on_release`]), closing any still in a transaction. The store holds a connection
//! only for the statement using it, so an abandoned begin's connection is dropped with it, and
//! the pool takes it back in a task that drop spawns: well within the window, which only a
//! runtime stalled for that long would outlast.

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgConnection;

/// How long after an abandoned begin the connections returned to the pool are checked.
const WINDOW: Duration = Duration::from_secs(10);

/// The origin of [`LAST_ABANDONED`]'s clock.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// When a begin was last abandoned, in milliseconds after [`EPOCH`] plus one; 0 if never.
static LAST_ABANDONED: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Notes its begin as abandoned when dropped before the begin finished.
struct Pending {
    finished: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.finished {
            LAST_ABANDONED.store(now_ms().saturating_add(1), Ordering::Relaxed);
        }
    }
}

/// Runs `begin` (any of sqlx's `begin` futures), noting it if it is dropped before it finishes.
/// Every transaction the store opens begins through here.
pub(super) async fn guard<T>(begin: impl Future<Output = T>) -> T {
    let mut pending = Pending { finished: false };
    let out = begin.await;
    pending.finished = true;
    out
}

/// Whether a begin was abandoned within the last [`WINDOW`].
fn abandoned_lately() -> bool {
    // Read before the last abandonment, so that one noted meanwhile counts as just now.
    let now = now_ms();
    match LAST_ABANDONED.load(Ordering::Relaxed) {
        0 => false,
        last => now.saturating_add(1).saturating_sub(last) < WINDOW.as_millis() as u64,
    }
}

/// Whether `conn`, handed back to the pool, may go to its next user: always, unless a begin
/// was abandoned lately and `conn` is still inside a transaction. In a transaction begun by an
/// earlier statement, `now()` (the transaction's start) is earlier than this statement's start;
/// in the implicit transaction of a lone statement the two are equal. Sent as a simple query,
/// which needs no prepared statement, and which also sends a `BEGIN` an abandoned begin left
/// unsent in the connection's buffer.
pub(super) async fn check_on_release(conn: &mut PgConnection) -> sqlx::Result<bool> {
    use sqlx::Row as _;
    if !abandoned_lately() {
        return Ok(true);
    }
    let stale: bool = sqlx::raw_sql("SELECT now() <> statement_timestamp()")
        .fetch_one(conn)
        .await?
        .try_get(0)?;
    if stale {
        tracing::debug!("closing a connection an abandoned begin left inside a transaction");
    }
    Ok(!stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_begin_dropped_before_it_finished_opens_the_window() {
        guard(async {}).await;
        // Another test of this process may have abandoned one; this one finished.
        let before = LAST_ABANDONED.load(Ordering::Relaxed);
        let begin = guard(std::future::pending::<()>());
        let mut begin = Box::pin(begin);
        assert!(futures::poll!(&mut begin).is_pending());
        drop(begin);
        assert!(LAST_ABANDONED.load(Ordering::Relaxed) >= before.max(1));
        assert!(abandoned_lately());
    }
}
