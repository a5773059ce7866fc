//! Sends what handlers report (progress, log lines, checkpoints) and settles the server's
//! acknowledgements of it.
//!
//! Timing: a flush sends every dirty lease's latest progress and unsent log lines, and flushes
//! are at least the progress interval apart (100 ms by default), so no lease sends more than one
//! `ReportProgress` per interval however often its handler reports. A lease with a batch of
//! lines (`reports::LOG_BATCH`) sends them at once, without its progress. When a handler returns, the
//! worker sends what is left of its reports before its result (see [`Reporter::final_reports`]),
//! so the stored progress ends at the handler's last value.
//!
//! Bounds: a `ReportLogs` carries at most [`MAX_LINES_PER_MESSAGE`] lines; a lease with
//! [`WINDOW`] reports awaiting their acknowledgement sends nothing more until some are answered
//! (meanwhile its progress coalesces and its lines queue, up to the buffer's bound), so a server
//! that stops answering cannot make the worker's memory grow.
//!
//! Acknowledgements: `ABORTED` means the lease is stale; the caller stops the handler with
//! [`StopReason::LeaseLost`](crate::StopReason::LeaseLost), which closes the lease's buffer.
//! Nothing here outlives a stream: when one breaks, checkpoints awaiting their acknowledgement
//! fail with [`Error::Disconnected`], unsent log lines wait for the next stream, lines in flight
//! are not sent again, and the latest progress of each lease is sent again on the next stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::proto::limits::MAX_LOG_BATCH_BYTES;
use crate::proto::v1 as pb;
use crate::proto::v1::connect_request::Message;
use crate::worker::RequestIds;
use crate::worker::reports::{CheckpointRequest, Hub, LeaseReports, Links, Taken};

/// The most lines one `ReportLogs` may carry (the protocol's limit).
pub(super) const MAX_LINES_PER_MESSAGE: usize = 1000;
/// Progress and log messages a lease may have awaiting their acknowledgement.
pub(super) const WINDOW: usize = 16;

/// What a report awaiting its acknowledgement was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReportKind {
    Progress,
    Logs,
    Checkpoint,
}

impl ReportKind {
    fn name(self) -> &'static str {
        match self {
            Self::Progress => "progress",
            Self::Logs => "log lines",
            Self::Checkpoint => "checkpoint",
        }
    }
}

/// A report sent on the current stream and not acknowledged yet.
#[derive(Debug)]
struct InFlight {
    lease: pb::LeaseRef,
    kind: ReportKind,
    /// The lease's buffer, for reports it counts against its window; `None` for what was sent
    /// with a result (the buffer is closed by then).
    buffer: Option<Arc<LeaseReports>>,
    /// The handler waiting on a checkpoint.
    reply: Option<oneshot::Sender<Result<(), Error>>>,
}

/// What an acknowledgement of a report meant.
#[derive(Debug, PartialEq)]
pub(super) enum ReportAck {
    Applied,
    /// The lease is stale: its handler must be stopped.
    LeaseLost(pb::LeaseRef),
    /// Refused for another reason (such as a malformed report); logged, not retried.
    Refused {
        lease: pb::LeaseRef,
        kind: ReportKind,
        code: tonic::Code,
        message: String,
    },
}

/// The worker's reports on their way to the server.
pub(super) struct Reporter {
    hub: Arc<Hub>,
    links: Links,
    checkpoints: mpsc::Receiver<CheckpointRequest>,
    interval: Duration,
    last_flush: Option<Instant>,
    /// When the next flush is due; `None` while nothing is dirty.
    flush_at: Option<Instant>,
    in_flight: HashMap<u64, InFlight>,
}

impl Reporter {
    pub(super) fn new(interval: Duration) -> Self {
        let (links, hub, checkpoints) = Links::new();
        Self {
            hub,
            links,
            checkpoints,
            interval,
            last_flush: None,
            flush_at: None,
            in_flight: HashMap::new(),
        }
    }

    /// What the executor attaches to each lease it starts.
    pub(super) fn links(&self) -> Links {
        self.links.clone()
    }

    /// The hub whose wake-ups the session waits on.
    pub(super) fn hub(&self) -> Arc<Hub> {
        Arc::clone(&self.hub)
    }

    /// When the next flush is due, if one is.
    pub(super) fn flush_at(&self) -> Option<Instant> {
        self.flush_at
    }

    /// The next checkpoint a handler asked for; pending while none is.
    pub(super) async fn next_checkpoint(&mut self) -> CheckpointRequest {
        match self.checkpoints.recv().await {
            Some(request) => request,
            // The reporter's own links hold a sender, so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Acts on a wake-up from the hub: sends the leases' full batches of lines now and
    /// schedules a flush for the rest.
    pub(super) fn woken(&mut self, now: Instant, ids: &mut RequestIds) -> Vec<pb::ConnectRequest> {
        let mut out = Vec::new();
        for lease in self.hub.dirty() {
            if let Some(lines) = lease.take_batch(WINDOW) {
                self.push_lines(&lease, lines, ids, &mut out);
            }
        }
        self.schedule(now);
        out
    }

    /// A stream is up: whatever waited for it is flushed soon.
    pub(super) fn connected(&mut self, now: Instant) {
        self.schedule(now);
    }

    /// Sends every dirty lease's latest progress and unsent lines.
    pub(super) fn flush(&mut self, now: Instant, ids: &mut RequestIds) -> Vec<pb::ConnectRequest> {
        self.flush_at = None;
        self.last_flush = Some(now);
        let mut out = Vec::new();
        for lease in self.hub.take_dirty() {
            match lease.take(WINDOW) {
                Taken::Reports { progress, lines } => {
                    self.push_lines(&lease, lines, ids, &mut out);
                    if let Some(progress) = progress {
                        let request_id = ids.next();
                        out.push(progress_message(request_id, lease.lease(), progress));
                        self.track(
                            request_id,
                            lease.lease(),
                            ReportKind::Progress,
                            Some(&lease),
                        );
                    }
                }
                // Requeued: tried again at the next flush, once acknowledgements came.
                Taken::Blocked => self.hub.requeue(&lease),
                Taken::Closed => {}
            }
        }
        out
    }

    /// The messages to send before a result: its lease's unsent lines and its latest progress.
    /// They do not count against any window: the result must not wait.
    pub(super) fn final_reports(
        &mut self,
        lease: &pb::LeaseRef,
        lines: Vec<pb::LogLine>,
        progress: Option<pb::Progress>,
        ids: &mut RequestIds,
        out: &mut Vec<pb::ConnectRequest>,
    ) {
        for chunk in chunks(lines) {
            let request_id = ids.next();
            out.push(logs_message(request_id, lease, chunk));
            self.track(request_id, lease, ReportKind::Logs, None);
        }
        if let Some(progress) = progress {
            let request_id = ids.next();
            out.push(progress_message(request_id, lease, progress));
            self.track(request_id, lease, ReportKind::Progress, None);
        }
    }

    /// The message for a checkpoint, or `None` when its lease is closed (the handler is told
    /// so at once).
    pub(super) fn checkpoint(
        &mut self,
        request: CheckpointRequest,
        ids: &mut RequestIds,
    ) -> Option<pb::ConnectRequest> {
        let CheckpointRequest { lease, data, reply } = request;
        if !lease.is_open() {
            let _ = reply.send(Err(lease.lease_lost()));
            return None;
        }
        let request_id = ids.next();
        self.in_flight.insert(
            request_id,
            InFlight {
                lease: lease.lease().clone(),
                kind: ReportKind::Checkpoint,
                buffer: None,
                reply: Some(reply),
            },
        );
        Some(pb::ConnectRequest {
            message: Some(Message::Checkpoint(pb::SaveCheckpoint {
                request_id,
                lease: Some(lease.lease().clone()),
                data,
            })),
        })
    }

    /// Settles the report `ack` answers; `None` when it answers no report (but a result).
    pub(super) fn acknowledge(&mut self, ack: &pb::Ack) -> Option<ReportAck> {
        let in_flight = self.in_flight.remove(&ack.request_id)?;
        if let Some(buffer) = &in_flight.buffer {
            buffer.settled();
        }
        let code = tonic::Code::from(ack.code);
        let (answer, outcome) = match code {
            tonic::Code::Ok => (Ok(()), ReportAck::Applied),
            tonic::Code::Aborted => (
                Err(Error::LeaseLost {
                    job_id: in_flight.lease.job_id.clone().into(),
                    attempt: crate::job::count(in_flight.lease.attempt),
                }),
                ReportAck::LeaseLost(in_flight.lease.clone()),
            ),
            code => (
                Err(Error::Rpc {
                    code,
                    message: ack.message.clone(),
                }),
                ReportAck::Refused {
                    lease: in_flight.lease.clone(),
                    kind: in_flight.kind,
                    code,
                    message: ack.message.clone(),
                },
            ),
        };
        if let Some(reply) = in_flight.reply {
            // The handler may have stopped waiting; then nobody needs the answer.
            let _ = reply.send(answer);
        }
        Some(outcome)
    }

    /// The stream ended: nothing in flight will be acknowledged. Checkpoints fail, and each
    /// lease's latest progress is sent again on the next stream.
    pub(super) fn disconnected(&mut self) {
        for (_, in_flight) in self.in_flight.drain() {
            if let Some(buffer) = &in_flight.buffer {
                buffer.settled();
                if in_flight.kind == ReportKind::Progress {
                    buffer.resend_latest();
                }
            }
            if let Some(reply) = in_flight.reply {
                let _ = reply.send(Err(Error::Disconnected {
                    what: in_flight.kind.name(),
                }));
            }
        }
        self.flush_at = None;
    }

    /// Plans a flush, if anything is dirty and none is planned: now, or one interval after the
    /// last.
    fn schedule(&mut self, now: Instant) {
        if self.flush_at.is_some() || !self.hub.is_dirty() {
            return;
        }
        let earliest = self.last_flush.map_or(now, |last| last + self.interval);
        self.flush_at = Some(earliest.max(now));
    }

    fn push_lines(
        &mut self,
        lease: &Arc<LeaseReports>,
        lines: Vec<pb::LogLine>,
        ids: &mut RequestIds,
        out: &mut Vec<pb::ConnectRequest>,
    ) {
        for chunk in chunks(lines) {
            let request_id = ids.next();
            out.push(logs_message(request_id, lease.lease(), chunk));
            self.track(request_id, lease.lease(), ReportKind::Logs, Some(lease));
        }
    }

    fn track(
        &mut self,
        request_id: u64,
        lease: &pb::LeaseRef,
        kind: ReportKind,
        buffer: Option<&Arc<LeaseReports>>,
    ) {
        if let Some(buffer) = buffer {
            buffer.sent(1);
        }
        self.in_flight.insert(
            request_id,
            InFlight {
                lease: lease.clone(),
                kind,
                buffer: buffer.map(Arc::clone),
                reply: None,
            },
        );
    }
}

/// `lines` split into messages the server accepts: at most [`MAX_LINES_PER_MESSAGE`] lines and
/// [`MAX_LOG_BATCH_BYTES`] of text each.
fn chunks(lines: Vec<pb::LogLine>) -> impl Iterator<Item = Vec<pb::LogLine>> {
    let mut lines = lines.into_iter().peekable();
    std::iter::from_fn(move || {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some(line) = lines.peek() {
            let len = line.message.len();
            if chunk.len() == MAX_LINES_PER_MESSAGE
                || (!chunk.is_empty() && bytes + len > MAX_LOG_BATCH_BYTES)
            {
                break;
            }
            bytes += len;
            chunk.extend(lines.next());
        }
        (!chunk.is_empty()).then_some(chunk)
    })
}

fn progress_message(
    request_id: u64,
    lease: &pb::LeaseRef,
    progress: pb::Progress,
) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(Message::Progress(pb::ReportProgress {
            request_id,
            lease: Some(lease.clone()),
            progress: Some(progress),
        })),
    }
}

fn logs_message(
    request_id: u64,
    lease: &pb::LeaseRef,
    lines: Vec<pb::LogLine>,
) -> pb::ConnectRequest {
    pb::ConnectRequest {
        message: Some(Message::Logs(pb::ReportLogs {
            request_id,
            lease: Some(lease.clone()),
            lines,
        })),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn log_messages_stop_at_the_line_count_or_the_text_budget() {
        let line = |len: usize| pb::LogLine {
            message: "x".repeat(len),
            ..Default::default()
        };
        let sizes: Vec<usize> = chunks((0..2500).map(|_| line(10)).collect())
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let chunked: Vec<Vec<pb::LogLine>> =
            chunks((0..300).map(|_| line(8192)).collect()).collect();
        assert!(chunked.len() > 1);
        for chunk in &chunked {
            let text: usize = chunk.iter().map(|l| l.message.len()).sum();
            assert!(text <= MAX_LOG_BATCH_BYTES, "{text}");
        }
        assert_eq!(chunked.iter().map(Vec::len).sum::<usize>(), 300);
    }
    use super::*;
    use crate::report::LogLevel;
    use crate::worker::reports::{Final, LOG_BATCH, Reports};

    const INTERVAL: Duration = Duration::from_millis(100);

    fn lease(job_id: &str) -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: job_id.into(),
            attempt: 1,
        }
    }

    fn progress(done: i64) -> pb::Progress {
        pb::Progress {
            items_done: done,
            ..Default::default()
        }
    }

    fn attach(reporter: &Reporter, job_id: &str) -> Reports {
        reporter.links().attach(lease(job_id))
    }

    fn ack(request_id: u64, code: tonic::Code) -> pb::Ack {
        pb::Ack {
            request_id,
            code: code as i32,
            message: format!("{code:?}"),
        }
    }

    /// The request id and kind of each message.
    fn summary(messages: &[pb::ConnectRequest]) -> Vec<(u64, &'static str, usize)> {
        messages
            .iter()
            .map(|m| match &m.message {
                Some(Message::Progress(p)) => (
                    p.request_id,
                    "progress",
                    usize::try_from(p.progress.as_ref().map_or(0, |p| p.items_done)).unwrap_or(0),
                ),
                Some(Message::Logs(l)) => (l.request_id, "logs", l.lines.len()),
                Some(Message::Checkpoint(c)) => (c.request_id, "checkpoint", c.data.len()),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn flushes_are_an_interval_apart_and_send_the_latest_progress() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");
        let start = Instant::now();

        reports.progress(progress(1));
        assert!(reporter.woken(start, &mut ids).is_empty());
        assert_eq!(reporter.flush_at(), Some(start));
        let sent = reporter.flush(start, &mut ids);
        assert_eq!(summary(&sent), [(1, "progress", 1)]);
        assert_eq!(reporter.flush_at(), None);

        for done in 2..=100_000 {
            reports.progress(progress(done));
        }
        let soon = start + Duration::from_millis(10);
        reporter.woken(soon, &mut ids);
        assert_eq!(reporter.flush_at(), Some(start + INTERVAL));
        let sent = reporter.flush(start + INTERVAL, &mut ids);
        assert_eq!(summary(&sent), [(2, "progress", 100_000)]);

        // Nothing dirty: no flush is planned.
        reporter.woken(start + INTERVAL * 5, &mut ids);
        assert_eq!(reporter.flush_at(), None);
    }

    #[test]
    fn a_batch_of_lines_goes_at_once_in_bounded_messages() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");
        let now = Instant::now();
        reports.progress(progress(1));
        for n in 0..LOG_BATCH - 1 {
            reports.log(LogLevel::Info, n.to_string());
        }
        assert!(reporter.woken(now, &mut ids).is_empty());

        for n in 0..2500 {
            reports.log(LogLevel::Info, n.to_string());
        }
        // The progress waits for the flush; the lines do not.
        let sent = reporter.woken(now, &mut ids);
        assert_eq!(
            summary(&sent),
            [(1, "logs", 1000), (2, "logs", 1000), (3, "logs", 599)]
        );
        let sent = reporter.flush(now, &mut ids);
        assert_eq!(summary(&sent), [(4, "progress", 1)]);
    }

    #[test]
    fn a_full_window_holds_a_lease_back_until_acknowledgements_come() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");
        let mut now = Instant::now();
        for done in 1..=i64::try_from(WINDOW).unwrap_or(0) {
            reports.progress(progress(done));
            reporter.woken(now, &mut ids);
            assert_eq!(reporter.flush(now, &mut ids).len(), 1);
            now += INTERVAL;
        }
        reports.progress(progress(99));
        reporter.woken(now, &mut ids);
        assert!(reporter.flush(now, &mut ids).is_empty());
        assert_eq!(reporter.in_flight.len(), WINDOW);

        assert_eq!(
            reporter.acknowledge(&ack(1, tonic::Code::Ok)),
            Some(ReportAck::Applied)
        );
        now += INTERVAL;
        reporter.woken(now, &mut ids);
        assert_eq!(summary(&reporter.flush(now, &mut ids))[0].2, 99);
    }

    #[test]
    fn aborted_means_the_lease_is_lost() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");
        reports.progress(progress(1));
        let now = Instant::now();
        reporter.woken(now, &mut ids);
        reporter.flush(now, &mut ids);
        assert_eq!(
            reporter.acknowledge(&ack(1, tonic::Code::Aborted)),
            Some(ReportAck::LeaseLost(lease("j1")))
        );
        // An id no report has: the ack is a result's.
        assert_eq!(
            reporter.acknowledge(&ack(2, tonic::Code::InvalidArgument)),
            None
        );
    }

    #[tokio::test]
    async fn checkpoints_are_answered_by_their_ack() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");

        let saving = tokio::spawn({
            let reports = reports.clone();
            async move { reports.checkpoint(vec![1, 2, 3]).await }
        });
        let request = reporter.next_checkpoint().await;
        let message = reporter.checkpoint(request, &mut ids).expect("sent");
        assert_eq!(summary(&[message]), [(1, "checkpoint", 3)]);
        reporter.acknowledge(&ack(1, tonic::Code::Ok));
        assert!(saving.await.expect("joined").is_ok());

        let refused = tokio::spawn({
            let reports = reports.clone();
            async move { reports.checkpoint(vec![0; 10]).await }
        });
        let request = reporter.next_checkpoint().await;
        reporter.checkpoint(request, &mut ids).expect("sent");
        assert!(matches!(
            reporter.acknowledge(&ack(2, tonic::Code::InvalidArgument)),
            Some(ReportAck::Refused {
                kind: ReportKind::Checkpoint,
                code: tonic::Code::InvalidArgument,
                ..
            })
        ));
        assert!(matches!(
            refused.await.expect("joined"),
            Err(Error::Rpc {
                code: tonic::Code::InvalidArgument,
                ..
            })
        ));

        let lost = tokio::spawn({
            let reports = reports.clone();
            async move { reports.checkpoint(vec![1]).await }
        });
        let request = reporter.next_checkpoint().await;
        reporter.checkpoint(request, &mut ids).expect("sent");
        reporter.acknowledge(&ack(3, tonic::Code::Aborted));
        assert!(matches!(
            lost.await.expect("joined"),
            Err(Error::LeaseLost { .. })
        ));
    }

    #[tokio::test]
    async fn a_broken_stream_fails_checkpoints_and_resends_the_latest_progress() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let reports = attach(&reporter, "j1");
        let now = Instant::now();
        reports.progress(progress(7));
        reports.log(LogLevel::Info, "sent once".into());
        reporter.woken(now, &mut ids);
        assert_eq!(reporter.flush(now, &mut ids).len(), 2);

        let saving = tokio::spawn({
            let reports = reports.clone();
            async move { reports.checkpoint(vec![1]).await }
        });
        let request = reporter.next_checkpoint().await;
        reporter.checkpoint(request, &mut ids).expect("sent");

        reporter.disconnected();
        assert_eq!(reporter.in_flight.len(), 0);
        assert!(matches!(
            saving.await.expect("joined"),
            Err(Error::Disconnected { what: "checkpoint" })
        ));
        let later = now + INTERVAL;
        reporter.connected(later);
        assert_eq!(reporter.flush_at(), Some(later));
        // The progress again, the line not.
        let sent = reporter.flush(later, &mut ids);
        assert_eq!(summary(&sent), [(4, "progress", 7)]);
    }

    #[test]
    fn final_reports_precede_the_result_and_progress_is_resent_only_when_needed() {
        let mut reporter = Reporter::new(INTERVAL);
        let mut ids = RequestIds::default();
        let left = Final {
            lines: vec![pb::LogLine::default(); 1500],
            latest: Some(progress(9)),
            latest_unsent: false,
        };
        assert_eq!(left.progress_to_send(false), None);
        assert_eq!(left.progress_to_send(true), Some(progress(9)));
        let mut out = Vec::new();
        reporter.final_reports(
            &lease("j1"),
            left.lines.clone(),
            left.progress_to_send(true),
            &mut ids,
            &mut out,
        );
        assert_eq!(
            summary(&out),
            [(1, "logs", 1000), (2, "logs", 500), (3, "progress", 9)]
        );
        assert_eq!(reporter.in_flight.len(), 3);
    }
}
