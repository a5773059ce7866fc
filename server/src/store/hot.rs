//! The engine's connections, reused newest first.
//!
//! sqlx's pool hands out its idle connections oldest first. A steady stream of statements then
//! walks every connection of the pool in turn, and each connection pays its first use of each
//! statement: the parse, the generic plan, the catalog caches, and the page faults of a backend
//! touching shared buffers it has not mapped yet. A statement run in bursts, such as a wave of
//! progress reports or a bulk enqueue, keeps meeting a connection that has not run it yet, and
//! pays those first-use costs again and again in its tail latency.
//!
//! So the engine's statements (claims, settles, progress, enqueues, the event fanout's reads)
//! take the most recently returned connection, as PgBouncer reuses its server connections, and
//! the connections they need at their busiest stay warm while the rest of the pool serves
//! everything else. A connection goes back on this stack only after a statement that
//! succeeded. One whose statement failed, or whose statement was abandoned halfway (its future
//! dropped), goes back to the pool, which tests it as it is released.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection, PgPool, Postgres, pool::PoolConnection};

use super::{IDLE_BEFORE_PING, Result};

/// How long a connection stays in this rotation before it goes back to the pool, where sqlx
/// closes it once past its own lifetime (by default also 30 minutes): a backend's caches grow
/// with the statements it has seen, and reconnecting now and then returns that memory.
const HOT_LIFETIME: Duration = Duration::from_secs(30 * 60);

struct Idle {
    conn: PoolConnection<Postgres>,
    /// When it came back after its last statement.
    since: Instant,
    /// When it was taken from the pool into this rotation.
    joined: Instant,
}

/// A stack of idle connections taken from the pool, at most `capacity`: the rest of the pool
/// stays free for the callers that acquire from it directly.
pub(super) struct HotConnections {
    idle: Mutex<Vec<Idle>>,
    capacity: usize,
    /// Set as the pool closes: from then on every connection goes straight back to it.
    closed: AtomicBool,
}

impl std::fmt::Debug for HotConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map(|idle| idle.len()).unwrap_or(0);
        f.debug_struct("HotConnections")
            .field("idle", &idle)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl HotConnections {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
            closed: AtomicBool::new(false),
        }
    }

    /// Runs `statement` on the newest idle connection, or one from `pool` when none is idle.
    pub(super) async fn run<T>(
        &self,
        pool: &PgPool,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let (mut conn, joined) = self.take(pool).await?;
        let result = statement(&mut conn).await;
        if result.is_ok() {
            self.put(conn, joined);
        }
        result
    }

    async fn take(&self, pool: &PgPool) -> Result<(PoolConnection<Postgres>, Instant)> {
        while let Some(idle) = self.pop() {
            let mut conn = idle.conn;
            // As the pool's own acquire does: a connection idle long enough for the server or
            // the network to have dropped it is tested first. One that fails the test is
            // dropped back to the pool, which discards it.
            if idle.since.elapsed() < IDLE_BEFORE_PING || conn.ping().await.is_ok() {
                return Ok((conn, idle.joined));
            }
        }
        Ok((pool.acquire().await?, Instant::now()))
    }

    /// How many connections wait here for the next statement.
    pub(super) fn idle_len(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Hands every idle connection back to the pool, which waits for them as it closes.
    pub(super) fn clear(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let idle = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        drop(idle);
    }

    fn pop(&self) -> Option<Idle> {
        self.idle.lock().ok()?.pop()
    }

    /// Keeps `conn` for the next statement; past the capacity or its time in this rotation it
    /// is dropped back to the pool instead.
    fn put(&self, conn: PoolConnection<Postgres>, joined: Instant) {
        if joined.elapsed() >= HOT_LIFETIME || self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.capacity
        {
            idle.push(Idle {
                conn,
                since: Instant::now(),
                joined,
            });
        }
    }
}
