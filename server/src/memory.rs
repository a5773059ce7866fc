//! Gives memory that ended streams freed back to the operating system.
//!
//! A burst of streams (ten thousand dashboards connecting, then going away) allocates tens of
//! kilobytes each across the runtime's threads. Once they end that memory is free, but glibc's
//! allocator keeps freed pages inside its arenas, so the process's resident size stays at the
//! burst's peak, and grows further with each burst that lands in other arenas. After enough
//! streams have ended, this loop asks the allocator to hand free pages back (`malloc_trim`),
//! which costs a walk of the arenas: rare and bounded, never per stream.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// Streams that must have ended since the last trim for the next one to be worth it.
const ENDED_BEFORE_TRIM: usize = 1000;
/// How often the count is looked at.
const INTERVAL: Duration = Duration::from_secs(2);

/// Counts ended streams, for [`Trimmer::run`] to act on.
#[derive(Debug, Clone, Default)]
pub struct Ended(Arc<AtomicUsize>);

impl Ended {
    pub fn stream_ended(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> usize {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// The loop that trims the allocator after many streams have ended.
pub struct Trimmer {
    ended: Ended,
}

impl Trimmer {
    pub fn new() -> (Self, Ended) {
        let ended = Ended::default();
        (
            Self {
                ended: ended.clone(),
            },
            ended,
        )
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut pending = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
            pending += self.ended.take();
            if pending >= ENDED_BEFORE_TRIM {
                tracing::debug!(streams = pending, "returning freed memory to the system");
                pending = 0;
                // A blocking walk of the allocator's arenas; off the runtime's threads.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: `malloc_trim` only releases free memory the allocator holds; it may be called at
    // any time from any thread, and takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
