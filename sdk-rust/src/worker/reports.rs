//! What handlers report while they run (progress, log lines, checkpoints) that the worker has
//! not sent yet.
//!
//! A handler's `progress` and `log` calls must be cheap and never wait, since a handler may make
//! them in a tight loop: each only takes its own lease's small mutex. Progress coalesces to the
//! latest value; log lines queue up to [`MAX_PENDING_LINES`], beyond which the oldest are dropped
//! and counted, and the count is reported (in the worker's log, and as a line in the job's own
//! log) so that nothing disappears silently. A lease with something to send lists itself once
//! in the [`Hub`] and wakes the session, whose `Reporter` decides when to send it. Checkpoints,
//! which the handler awaits, travel on a bounded channel instead: its capacity makes handlers
//! wait rather than pile up data.
//!
//! A lease's buffer closes when its lease is lost or its result is recorded, and takes nothing
//! more after that: the server would refuse it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::SystemTime;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::Error;
use crate::job;
use crate::proto::v1 as pb;
use crate::report::LogLevel;

/// Log lines a lease may hold unsent; beyond this the oldest are dropped.
pub(super) const MAX_PENDING_LINES: usize = 10_000;
/// Unsent log lines that make the session send them without waiting for its next flush.
pub(super) const LOG_BATCH: usize = 100;
/// The longest log line the server accepts, in characters.
const MAX_LINE_BYTES: usize = 8192;
/// Checkpoints that may wait for the session; beyond this `checkpoint` waits for room.
const CHECKPOINT_CAPACITY: usize = 64;

/// The leases with something to send, and the session's wake-up.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    /// Each lease appears at most once (its `queued` flag says whether it is here). Weak, so
    /// that a lease whose attempt ended is not kept alive by a list nobody flushes.
    dirty: Mutex<Vec<Weak<LeaseReports>>>,
    wake: Notify,
}

impl Hub {
    /// Resolves when a lease became dirty or has a batch of log lines to send. A wake-up that
    /// came while nobody waited is kept for the next call.
    pub(super) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether any lease has something to send.
    pub(super) fn is_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// The dirty leases, which stay listed.
    pub(super) fn dirty(&self) -> Vec<Arc<LeaseReports>> {
        lock(&self.dirty).iter().filter_map(Weak::upgrade).collect()
    }

    /// The dirty leases, which are no longer listed.
    pub(super) fn take_dirty(&self) -> Vec<Arc<LeaseReports>> {
        std::mem::take(&mut *lock(&self.dirty))
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Lists a lease again that could not be sent yet.
    pub(super) fn requeue(&self, lease: &Arc<LeaseReports>) {
        lock(&self.dirty).push(Arc::downgrade(lease));
        self.wake.notify_one();
    }

    fn wake(&self, lease: &Arc<LeaseReports>, wake: Wake) {
        match wake {
            Wake::No => {}
            Wake::Queue => self.requeue(lease),
            Wake::Poke => self.wake.notify_one(),
        }
    }
}

/// What a change to a buffer asks of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Nothing: the lease is already listed, or closed.
    No,
    /// List the lease and wake the session.
    Queue,
    /// The lease is listed; wake the session, which has a batch of lines to send.
    Poke,
}

/// Whether a lease's buffer still takes reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    /// The lease is lost: reports would be refused.
    Lost,
    /// The attempt's result was recorded, with whatever was left here.
    Finished,
}

/// One lease's unsent reports. Pure bookkeeping, so that its bounds can be tested alone.
#[derive(Debug)]
struct Buffer {
    /// The latest progress not sent yet; each new one replaces it.
    progress: Option<pb::Progress>,
    /// The latest progress sent, to send again after a reconnect or with the result.
    last_sent: Option<pb::Progress>,
    lines: VecDeque<pb::LogLine>,
    /// Lines dropped since the last send, because `lines` was full.
    dropped: u64,
    /// Whether the lease is in the hub's dirty list.
    queued: bool,
    /// Progress and log messages sent and not acknowledged yet, which the reporter bounds.
    unacked: usize,
    status: Status,
}

/// What a flush took from a buffer.
#[derive(Debug, PartialEq)]
pub(super) enum Taken {
    /// The reports to send.
    Reports {
        progress: Option<pb::Progress>,
        lines: Vec<pb::LogLine>,
    },
    /// Too many reports await their acknowledgement; try again later.
    Blocked,
    /// The buffer is closed.
    Closed,
}

/// What is left of a lease's reports when its result is recorded, to send before the result.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Final {
    /// Lines not sent yet.
    pub(super) lines: Vec<pb::LogLine>,
    /// The latest progress the handler reported, sent or not.
    pub(super) latest: Option<pb::Progress>,
    /// Whether `latest` was never sent.
    pub(super) latest_unsent: bool,
}

impl Final {
    /// The progress to send before the result on this stream: the latest value when it was
    /// never sent, or on a later stream (`resent`), when what was sent may not have arrived.
    pub(super) fn progress_to_send(&self, resent: bool) -> Option<pb::Progress> {
        (self.latest_unsent || resent)
            .then(|| self.latest.clone())
            .flatten()
    }
}

impl Buffer {
    fn new() -> Self {
        Self {
            progress: None,
            last_sent: None,
            lines: VecDeque::new(),
            dropped: 0,
            queued: false,
            unacked: 0,
            status: Status::Open,
        }
    }

    fn set_progress(&mut self, progress: pb::Progress) -> Wake {
        if self.status != Status::Open {
            return Wake::No;
        }
        self.progress = Some(progress);
        self.queue()
    }

    fn push_line(&mut self, line: pb::LogLine) -> Wake {
        if self.status != Status::Open {
            return Wake::No;
        }
        if self.lines.len() >= MAX_PENDING_LINES {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
        match self.queue() {
            Wake::No if self.lines.len() == LOG_BATCH => Wake::Poke,
            wake => wake,
        }
    }

    fn queue(&mut self) -> Wake {
        if self.queued {
            Wake::No
        } else {
            self.queued = true;
            Wake::Queue
        }
    }

    /// Everything unsent, unless `window` reports already await their acknowledgement. The
    /// lease leaves the dirty list unless blocked.
    fn take(&mut self, window: usize, now: SystemTime) -> Taken {
        if self.status != Status::Open {
            self.queued = false;
            return Taken::Closed;
        }
        if self.unacked >= window {
            return Taken::Blocked;
        }
        self.queued = false;
        let progress = self.progress.take();
        if progress.is_some() {
            self.last_sent.clone_from(&progress);
        }
        Taken::Reports {
            progress,
            lines: self.take_lines(now),
        }
    }

    /// The unsent lines, led by a warning line when some were dropped.
    fn take_lines(&mut self, now: SystemTime) -> Vec<pb::LogLine> {
        let mut lines = Vec::with_capacity(self.lines.len() + 1);
        if self.dropped > 0 {
            lines.push(pb::LogLine {
                level: LogLevel::Warn.to_proto() as i32,
                message: format!(
                    "{} log line(s) dropped here: the handler logged faster than the worker \
                     could send them (at most {MAX_PENDING_LINES} wait)",
                    self.dropped
                ),
                time: Some(now.into()),
            });
            self.dropped = 0;
        }
        lines.extend(self.lines.drain(..));
        lines
    }

    /// Closes the buffer for a recorded result and hands over what is left.
    fn finish(&mut self, now: SystemTime) -> Final {
        let lines = if self.status == Status::Open {
            self.take_lines(now)
        } else {
            Vec::new()
        };
        let unsent = self.progress.take();
        let latest_unsent = unsent.is_some();
        self.status = Status::Finished;
        Final {
            lines,
            latest: unsent.or_else(|| self.last_sent.take()),
            latest_unsent,
        }
    }

    /// Closes the buffer for a lost lease; what it held would be refused.
    fn lose(&mut self) -> usize {
        if self.status == Status::Open {
            self.status = Status::Lost;
        }
        self.progress = None;
        let discarded = self.lines.len();
        self.lines.clear();
        discarded
    }

    /// After a reconnect: the progress sent on the broken stream is sent again, unless a newer
    /// one waits.
    fn resend_latest(&mut self) -> Wake {
        if self.status != Status::Open || self.progress.is_some() || self.last_sent.is_none() {
            return Wake::No;
        }
        self.progress.clone_from(&self.last_sent);
        self.queue()
    }
}

/// One lease's unsent reports, shared by its handler's context, the executor and the reporter.
#[derive(Debug)]
pub(crate) struct LeaseReports {
    lease: pb::LeaseRef,
    hub: Arc<Hub>,
    buffer: Mutex<Buffer>,
}

impl LeaseReports {
    pub(super) fn lease(&self) -> &pb::LeaseRef {
        &self.lease
    }

    /// Replaces the unsent progress.
    fn progress(self: &Arc<Self>, progress: pb::Progress) {
        let wake = self.lock().set_progress(progress);
        self.hub.wake(self, wake);
    }

    /// Queues a log line.
    fn log(self: &Arc<Self>, line: pb::LogLine) {
        let wake = self.lock().push_line(line);
        self.hub.wake(self, wake);
    }

    /// Whether reports are still taken.
    pub(super) fn is_open(&self) -> bool {
        self.lock().status == Status::Open
    }

    /// The error for a report made after the buffer closed.
    pub(super) fn lease_lost(&self) -> Error {
        Error::LeaseLost {
            job_id: self.lease.job_id.clone().into(),
            attempt: job::count(self.lease.attempt),
        }
    }

    /// Takes everything unsent for a flush; see [`Taken`].
    pub(super) fn take(&self, window: usize) -> Taken {
        let mut buffer = self.lock();
        let dropped = buffer.dropped;
        let taken = buffer.take(window, SystemTime::now());
        drop(buffer);
        if matches!(taken, Taken::Reports { .. }) {
            self.warn_dropped(dropped);
        }
        taken
    }

    /// Takes the unsent lines, when there is a batch of them and fewer than `window` reports
    /// await their acknowledgement.
    pub(super) fn take_batch(&self, window: usize) -> Option<Vec<pb::LogLine>> {
        let mut buffer = self.lock();
        if buffer.status != Status::Open
            || buffer.unacked >= window
            || buffer.lines.len() < LOG_BATCH
        {
            return None;
        }
        let dropped = buffer.dropped;
        let lines = buffer.take_lines(SystemTime::now());
        drop(buffer);
        self.warn_dropped(dropped);
        Some(lines)
    }

    /// Closes the buffer for a recorded result and hands over what is left.
    pub(super) fn finish(&self) -> Final {
        let mut buffer = self.lock();
        let dropped = buffer.dropped;
        let left = buffer.finish(SystemTime::now());
        drop(buffer);
        self.warn_dropped(dropped);
        left
    }

    /// Closes the buffer: the lease is lost.
    pub(super) fn lose(&self) {
        let discarded = self.lock().lose();
        if discarded > 0 {
            tracing::debug!(
                job_id = %self.lease.job_id,
                attempt = self.lease.attempt,
                discarded,
                "log lines of a lost lease discarded"
            );
        }
    }

    /// Counts reports sent for the lease and not acknowledged yet.
    pub(super) fn sent(&self, messages: usize) {
        self.lock().unacked += messages;
    }

    /// One report sent for the lease was acknowledged (or will never be, its stream broke).
    pub(super) fn settled(&self) {
        let mut buffer = self.lock();
        buffer.unacked = buffer.unacked.saturating_sub(1);
    }

    /// After a reconnect: sends the latest progress again, unless a newer one waits.
    pub(super) fn resend_latest(self: &Arc<Self>) {
        let wake = self.lock().resend_latest();
        self.hub.wake(self, wake);
    }

    fn warn_dropped(&self, dropped: u64) {
        if dropped > 0 {
            tracing::warn!(
                job_id = %self.lease.job_id,
                attempt = self.lease.attempt,
                dropped,
                "log lines dropped: the handler logged faster than the worker could send them"
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        lock(&self.buffer)
    }
}

/// A checkpoint a handler waits on.
#[derive(Debug)]
pub(crate) struct CheckpointRequest {
    pub(super) lease: Arc<LeaseReports>,
    pub(super) data: Vec<u8>,
    pub(super) reply: oneshot::Sender<Result<(), Error>>,
}

/// Where every lease's reports go: made once per worker, attached to each lease it starts.
#[derive(Debug, Clone)]
pub(crate) struct Links {
    hub: Arc<Hub>,
    checkpoints: mpsc::Sender<CheckpointRequest>,
}

impl Links {
    /// The links, the hub the session watches, and the receiving end of checkpoints.
    pub(crate) fn new() -> (Self, Arc<Hub>, mpsc::Receiver<CheckpointRequest>) {
        let hub = Arc::new(Hub::default());
        let (checkpoints, receiver) = mpsc::channel(CHECKPOINT_CAPACITY);
        let links = Self {
            hub: Arc::clone(&hub),
            checkpoints,
        };
        (links, hub, receiver)
    }

    /// The reports of a lease that starts now.
    pub(crate) fn attach(&self, lease: pb::LeaseRef) -> Reports {
        Reports {
            lease: Arc::new(LeaseReports {
                lease,
                hub: Arc::clone(&self.hub),
                buffer: Mutex::new(Buffer::new()),
            }),
            checkpoints: self.checkpoints.clone(),
        }
    }
}

/// A handler's way to report, held by its [`JobContext`](crate::JobContext).
#[derive(Debug, Clone)]
pub(crate) struct Reports {
    lease: Arc<LeaseReports>,
    checkpoints: mpsc::Sender<CheckpointRequest>,
}

impl Reports {
    /// The buffer, for the executor that closes it.
    pub(super) fn shared(&self) -> Arc<LeaseReports> {
        Arc::clone(&self.lease)
    }

    pub(crate) fn progress(&self, progress: pb::Progress) {
        self.lease.progress(progress);
    }

    /// Queues a line, fitted to the server's length limit.
    pub(crate) fn log(&self, level: LogLevel, message: String) {
        self.lease.log(pb::LogLine {
            level: level.to_proto() as i32,
            message: for_the_wire(message, MAX_LINE_BYTES),
            time: Some(SystemTime::now().into()),
        });
    }

    /// Sends a checkpoint and waits for the server's acknowledgement.
    pub(crate) async fn checkpoint(&self, data: Vec<u8>) -> Result<(), Error> {
        if !self.lease.is_open() {
            return Err(self.lease.lease_lost());
        }
        let (reply, answer) = oneshot::channel();
        let request = CheckpointRequest {
            lease: Arc::clone(&self.lease),
            data,
            reply,
        };
        let disconnected = Error::Disconnected { what: "checkpoint" };
        if self.checkpoints.send(request).await.is_err() {
            return Err(disconnected);
        }
        answer.await.unwrap_or(Err(disconnected))
    }
}

/// `text` as the server takes it: U+0000 (which the server refuses, as PostgreSQL cannot store
/// it) replaced by U+FFFD, and cut to at most `max_bytes` bytes on a character boundary,
/// ending in "..." when cut. No copy when it fits and holds no NUL.
pub(crate) fn for_the_wire(mut text: String, max_bytes: usize) -> String {
    if text.contains('\0') {
        text = text.replace('\0', "\u{FFFD}");
    }
    if text.len() <= max_bytes {
        return text;
    }
    let marker = "...";
    let mut cut = max_bytes.saturating_sub(marker.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{marker}", &text[..cut])
}

/// The buffers hold no invariant a panic could break halfway, so a poisoned lock is used as is
/// rather than taking the worker down with the handler that panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: i64) -> pb::Progress {
        pb::Progress {
            items_done: done,
            ..Default::default()
        }
    }

    fn line(n: usize) -> pb::LogLine {
        pb::LogLine {
            level: pb::LogLevel::Info as i32,
            message: n.to_string(),
            time: None,
        }
    }

    fn lease() -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: "j1".into(),
            attempt: 1,
        }
    }

    #[test]
    fn progress_coalesces_to_the_latest_value_and_queues_once() {
        let mut buffer = Buffer::new();
        assert_eq!(buffer.set_progress(progress(0)), Wake::Queue);
        for done in 1..100_000 {
            assert_eq!(buffer.set_progress(progress(done)), Wake::No);
        }
        let Taken::Reports {
            progress: sent,
            lines,
        } = buffer.take(8, SystemTime::now())
        else {
            panic!("expected reports");
        };
        assert_eq!(sent, Some(progress(99_999)));
        assert!(lines.is_empty());
        // Taken: the next report lists the lease again.
        assert_eq!(buffer.set_progress(progress(1)), Wake::Queue);
    }

    #[test]
    fn a_batch_of_lines_pokes_the_session_once() {
        let mut buffer = Buffer::new();
        let wakes: Vec<Wake> = (0..LOG_BATCH * 2)
            .map(|n| buffer.push_line(line(n)))
            .collect();
        assert_eq!(wakes[0], Wake::Queue);
        assert_eq!(wakes[LOG_BATCH - 1], Wake::Poke);
        assert_eq!(wakes.iter().filter(|&&w| w != Wake::No).count(), 2);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_lines_and_says_so() {
        let mut buffer = Buffer::new();
        for n in 0..MAX_PENDING_LINES + 5 {
            buffer.push_line(line(n));
        }
        assert_eq!(buffer.lines.len(), MAX_PENDING_LINES);
        let Taken::Reports { lines, .. } = buffer.take(8, SystemTime::now()) else {
            panic!("expected reports");
        };
        assert_eq!(lines.len(), MAX_PENDING_LINES + 1);
        assert_eq!(lines[0].level, pb::LogLevel::Warn as i32);
        assert!(lines[0].message.starts_with("5 log line(s) dropped"));
        assert_eq!(lines[1].message, "5");
        assert_eq!(
            lines[MAX_PENDING_LINES].message,
            (MAX_PENDING_LINES + 4).to_string()
        );
        assert_eq!(buffer.dropped, 0);
    }

    #[test]
    fn unacknowledged_reports_block_the_next_flush() {
        let mut buffer = Buffer::new();
        buffer.set_progress(progress(1));
        buffer.unacked = 2;
        assert_eq!(buffer.take(2, SystemTime::now()), Taken::Blocked);
        assert!(buffer.queued);
        buffer.unacked = 1;
        assert!(matches!(
            buffer.take(2, SystemTime::now()),
            Taken::Reports { .. }
        ));
    }

    #[test]
    fn finishing_hands_over_the_latest_progress_and_unsent_lines() {
        let mut buffer = Buffer::new();
        buffer.set_progress(progress(1));
        buffer.take(8, SystemTime::now());
        buffer.push_line(line(7));
        let left = buffer.finish(SystemTime::now());
        assert_eq!(left.latest, Some(progress(1)));
        assert!(!left.latest_unsent);
        assert_eq!(left.lines, [line(7)]);
        assert_eq!(buffer.set_progress(progress(2)), Wake::No);
        assert_eq!(buffer.push_line(line(8)), Wake::No);

        let mut buffer = Buffer::new();
        buffer.set_progress(progress(3));
        let left = buffer.finish(SystemTime::now());
        assert_eq!(left.latest, Some(progress(3)));
        assert!(left.latest_unsent);
    }

    #[test]
    fn a_lost_lease_takes_nothing_more() {
        let mut buffer = Buffer::new();
        buffer.push_line(line(1));
        assert_eq!(buffer.lose(), 1);
        assert_eq!(buffer.set_progress(progress(1)), Wake::No);
        assert_eq!(buffer.take(8, SystemTime::now()), Taken::Closed);
        assert_eq!(buffer.finish(SystemTime::now()), Final::default());
    }

    #[test]
    fn the_latest_progress_is_sent_again_after_a_reconnect() {
        let mut buffer = Buffer::new();
        assert_eq!(buffer.resend_latest(), Wake::No);
        buffer.set_progress(progress(4));
        buffer.take(8, SystemTime::now());
        assert_eq!(buffer.resend_latest(), Wake::Queue);
        assert_eq!(buffer.progress, Some(progress(4)));
        // A newer value waiting wins.
        buffer.set_progress(progress(5));
        assert_eq!(buffer.resend_latest(), Wake::No);
        assert_eq!(buffer.progress, Some(progress(5)));
    }

    #[test]
    fn the_hub_lists_a_lease_once_and_forgets_ended_ones() {
        let (links, hub, _checkpoints) = Links::new();
        let reports = links.attach(lease());
        for done in 0..10 {
            reports.progress(progress(done));
        }
        assert_eq!(hub.dirty().len(), 1);
        let taken = hub.take_dirty();
        assert_eq!(taken.len(), 1);
        assert!(!hub.is_dirty());

        let ended = links.attach(pb::LeaseRef {
            job_id: "j2".into(),
            attempt: 1,
        });
        ended.log(LogLevel::Info, "bye".into());
        drop(ended);
        assert!(hub.is_dirty());
        assert!(hub.take_dirty().is_empty());
    }

    #[tokio::test]
    async fn a_checkpoint_of_a_closed_lease_fails_at_once() {
        let (links, _hub, _checkpoints) = Links::new();
        let reports = links.attach(lease());
        reports.shared().lose();
        assert!(matches!(
            reports.checkpoint(vec![1]).await,
            Err(Error::LeaseLost { attempt: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_checkpoint_nobody_answers_is_disconnected() {
        let (links, _hub, checkpoints) = Links::new();
        let reports = links.attach(lease());
        drop(checkpoints);
        assert!(matches!(
            reports.checkpoint(vec![1]).await,
            Err(Error::Disconnected { .. })
        ));
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_nul_replaced() {
        assert_eq!(for_the_wire("abc".into(), 3), "abc");
        let cut = for_the_wire("é".repeat(10), 8);
        assert_eq!(cut, "éé...", "2 bytes each: 4 bytes kept, then the marker");
        assert!(cut.len() <= 8);
        assert_eq!(for_the_wire("é".repeat(4), 8), "é".repeat(4));
        assert_eq!(for_the_wire("a\0b".into(), 10), "a\u{FFFD}b");
    }
}
