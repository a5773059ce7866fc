//! Results on their way to the server: every `CompleteJob` and `FailJob` the worker recorded
//! and the server has not acknowledged yet.
//!
//! A result stays here until an `Ack` with its request id arrives, so that a stream that breaks
//! in between loses nothing: each new stream [rewinds](Outbox::rewind) the outbox and sends every
//! pending result again. Re-sending is safe because each result carries its lease's fencing
//! token, and the server refuses (with ABORTED) one whose attempt is no longer current. The
//! outbox is bounded by the worker's slots: each result frees the slot of the handler that
//! produced it.
//!
//! A result also carries what was left of its lease's reports when the handler returned, to be
//! sent just before it: unsent log lines (once: lines are never sent twice) and the latest
//! progress (again on every later stream, since what was sent on a broken one may not have
//! arrived), so that the stored progress ends at the handler's last value.

use std::collections::{BTreeMap, VecDeque};

use prost_types::Any;

use crate::error::{HandlerError, Wait};
use crate::job;
use crate::proto::v1 as pb;
use crate::proto::v1::connect_request::Message;
use crate::worker::reports::{self, Final};

/// The longest failure message the server accepts, in characters.
const MAX_MESSAGE_BYTES: usize = 8192;
const MAX_KIND_BYTES: usize = 128;

/// A result awaiting its acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pending {
    pub(super) lease: pb::LeaseRef,
    pub(super) job_type: String,
    message: Message,
    /// What was left of the lease's reports.
    left: Final,
    /// Streams the result was sent on, the current one included.
    sends: u32,
}

/// A result to send on the current stream, with what must precede it.
#[derive(Debug, PartialEq)]
pub(super) struct Unsent {
    pub(super) lease: pb::LeaseRef,
    pub(super) lines: Vec<pb::LogLine>,
    pub(super) progress: Option<pb::Progress>,
    pub(super) result: pb::ConnectRequest,
}

/// What an acknowledgement meant for the result it answers.
#[derive(Debug, PartialEq)]
pub(super) enum Acknowledged {
    /// The server applied the result.
    Applied(Pending),
    /// The lease was stale (ABORTED): another attempt owns the job now, or it was cancelled.
    Stale(Pending, String),
    /// The server refused the result for another reason; sending it again would not help.
    Refused(Pending, tonic::Code, String),
    /// No pending result has this request id (an ack from before a reconnect).
    Unknown(u64),
}

/// Results recorded and not yet acknowledged, by request id.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// Ordered by request id, so a reconnect re-sends in the original order.
    pending: BTreeMap<u64, Pending>,
    /// The request ids of the pending results not sent on the current stream yet, in order.
    /// Kept apart because `pending` holds every result the server has yet to acknowledge,
    /// hundreds on a busy worker, and finding the few new ones among them on every send cost
    /// W1's worker 3 % of the machine.
    unsent: VecDeque<u64>,
}

impl Outbox {
    /// Records a successful attempt, to be sent by [`unsent`](Self::unsent).
    pub(super) fn complete(
        &mut self,
        request_id: u64,
        lease: pb::LeaseRef,
        job_type: String,
        result: Any,
        left: Final,
    ) {
        let message = Message::Complete(pb::CompleteJob {
            request_id,
            lease: Some(lease.clone()),
            result: Some(result),
            wait_for_children: false,
            wait_signal: None,
        });
        self.push(request_id, lease, job_type, message, left);
    }

    /// Records an attempt whose handler returned to wait (`error` says for what), to be sent
    /// by [`unsent`](Self::unsent): a completion without a result.
    pub(super) fn wait(
        &mut self,
        request_id: u64,
        lease: pb::LeaseRef,
        job_type: String,
        error: &HandlerError,
        left: Final,
    ) {
        let (wait_for_children, wait_signal) = match error.wait() {
            Some(Wait::Children) | None => (true, None),
            Some(Wait::Signal {
                name,
                count,
                timeout,
            }) => (
                false,
                Some(pb::WaitSignal {
                    name: name.clone(),
                    count: *count,
                    timeout: timeout.map(job::duration_to_proto),
                }),
            ),
        };
        let message = Message::Complete(pb::CompleteJob {
            request_id,
            lease: Some(lease.clone()),
            result: None,
            wait_for_children,
            wait_signal,
        });
        self.push(request_id, lease, job_type, message, left);
    }

    /// Records a failed attempt, to be sent by [`unsent`](Self::unsent).
    pub(super) fn fail(
        &mut self,
        request_id: u64,
        lease: pb::LeaseRef,
        job_type: String,
        error: &HandlerError,
        left: Final,
        timed_out: bool,
    ) {
        let message = Message::Fail(pb::FailJob {
            request_id,
            lease: Some(lease.clone()),
            message: failure_message(error.message()),
            kind: reports::for_the_wire(
                error.kind().unwrap_or_default().to_owned(),
                MAX_KIND_BYTES,
            ),
            non_retryable: !error.is_retryable(),
            retry_after: error.retry_after().map(job::duration_to_proto),
            timed_out,
        });
        self.push(request_id, lease, job_type, message, left);
    }

    /// Settles the result that `ack` answers.
    pub(super) fn acknowledge(&mut self, ack: &pb::Ack) -> Acknowledged {
        let Some(pending) = self.pending.remove(&ack.request_id) else {
            return Acknowledged::Unknown(ack.request_id);
        };
        match tonic::Code::from(ack.code) {
            tonic::Code::Ok => Acknowledged::Applied(pending),
            tonic::Code::Aborted => Acknowledged::Stale(pending, ack.message.clone()),
            code => Acknowledged::Refused(pending, code, ack.message.clone()),
        }
    }

    /// The results not sent on the current stream yet, in the order first recorded; they
    /// count as sent from now on.
    pub(super) fn unsent(&mut self) -> Vec<Unsent> {
        let mut unsent = Vec::with_capacity(self.unsent.len());
        for request_id in self.unsent.drain(..) {
            // Acknowledged meanwhile (an ack that crossed a reconnect).
            let Some(pending) = self.pending.get_mut(&request_id) else {
                continue;
            };
            let progress = pending.left.progress_to_send(pending.sends > 0);
            pending.sends += 1;
            unsent.push(Unsent {
                lease: pending.lease.clone(),
                lines: std::mem::take(&mut pending.left.lines),
                progress,
                result: pb::ConnectRequest {
                    message: Some(pending.message.clone()),
                },
            });
        }
        unsent
    }

    /// A new stream: every pending result is to be sent again.
    pub(super) fn rewind(&mut self) {
        self.unsent = self.pending.keys().copied().collect();
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn push(
        &mut self,
        request_id: u64,
        lease: pb::LeaseRef,
        job_type: String,
        message: Message,
        left: Final,
    ) {
        self.pending.insert(
            request_id,
            Pending {
                lease,
                job_type,
                message,
                left,
                sends: 0,
            },
        );
        self.unsent.push_back(request_id);
    }
}

/// The server requires a non-empty message of bounded length; a handler's message is fitted to
/// that rather than having its failure refused and lost.
fn failure_message(message: &str) -> String {
    if message.is_empty() {
        return "the handler failed without a message".to_owned();
    }
    reports::for_the_wire(message.to_owned(), MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lease(job_id: &str) -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: job_id.into(),
            attempt: 2,
        }
    }

    fn request_id(unsent: &Unsent) -> u64 {
        match &unsent.result.message {
            Some(Message::Complete(complete)) => complete.request_id,
            Some(Message::Fail(fail)) => fail.request_id,
            other => panic!("not a result: {other:?}"),
        }
    }

    fn ids(unsent: &[Unsent]) -> Vec<u64> {
        unsent.iter().map(request_id).collect()
    }

    fn ack(request_id: u64, code: tonic::Code) -> pb::Ack {
        pb::Ack {
            request_id,
            code: code as i32,
            message: format!("{code:?}"),
        }
    }

    fn progress(done: i64) -> pb::Progress {
        pb::Progress {
            items_done: done,
            ..Default::default()
        }
    }

    #[test]
    fn results_keep_their_request_ids_and_carry_the_fencing_token() {
        let mut outbox = Outbox::default();
        outbox.complete(1, lease("j1"), "t".into(), Any::default(), Final::default());
        outbox.fail(
            2,
            lease("j2"),
            "t".into(),
            &HandlerError::retryable("x"),
            Final::default(),
            false,
        );
        let unsent = outbox.unsent();
        assert_eq!(ids(&unsent), [1, 2]);
        let Some(Message::Fail(fail)) = &unsent[1].result.message else {
            panic!("expected a FailJob");
        };
        assert_eq!(fail.lease, Some(lease("j2")));
        assert!(!fail.non_retryable);
        assert_eq!(fail.retry_after, None);
        assert_eq!(outbox.len(), 2);
        assert!(outbox.unsent().is_empty(), "sent once per stream");
    }

    #[test]
    fn handler_errors_map_onto_fail_job() {
        let mut outbox = Outbox::default();
        let error = HandlerError::fatal("bad input")
            .with_kind("validation")
            .with_retry_after(Duration::from_secs(2));
        outbox.fail(1, lease("j1"), "t".into(), &error, Final::default(), false);
        let unsent = outbox.unsent();
        let Some(Message::Fail(fail)) = &unsent[0].result.message else {
            panic!("expected a FailJob");
        };
        assert_eq!(fail.message, "bad input");
        assert_eq!(fail.kind, "validation");
        assert!(fail.non_retryable);
        assert_eq!(
            fail.retry_after,
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 0
            })
        );
    }

    #[test]
    fn acks_settle_by_request_id_and_code() {
        let mut outbox = Outbox::default();
        for (id, job) in [(1, "j1"), (2, "j2"), (3, "j3")] {
            outbox.complete(id, lease(job), "t".into(), Any::default(), Final::default());
        }
        assert!(matches!(
            outbox.acknowledge(&ack(1, tonic::Code::Ok)),
            Acknowledged::Applied(p) if p.lease == lease("j1")
        ));
        assert!(matches!(
            outbox.acknowledge(&ack(2, tonic::Code::Aborted)),
            Acknowledged::Stale(p, _) if p.lease == lease("j2")
        ));
        assert!(matches!(
            outbox.acknowledge(&ack(3, tonic::Code::InvalidArgument)),
            Acknowledged::Refused(p, tonic::Code::InvalidArgument, _) if p.lease == lease("j3")
        ));
        assert!(outbox.is_empty());
        assert_eq!(
            outbox.acknowledge(&ack(1, tonic::Code::Ok)),
            Acknowledged::Unknown(1)
        );
    }

    #[test]
    fn unacknowledged_results_are_resent_in_order_on_a_new_stream() {
        let mut outbox = Outbox::default();
        outbox.complete(1, lease("j1"), "t".into(), Any::default(), Final::default());
        outbox.fail(
            2,
            lease("j2"),
            "t".into(),
            &HandlerError::retryable("x"),
            Final::default(),
            false,
        );
        outbox.complete(3, lease("j3"), "t".into(), Any::default(), Final::default());
        let first = outbox.unsent();
        outbox.acknowledge(&ack(2, tonic::Code::Ok));
        outbox.rewind();
        let again = outbox.unsent();
        assert_eq!(ids(&again), [1, 3]);
        assert_eq!(again[0].result, first[0].result);
    }

    #[test]
    fn a_result_acknowledged_after_a_reconnect_is_not_sent_again() {
        let mut outbox = Outbox::default();
        outbox.complete(1, lease("j1"), "t".into(), Any::default(), Final::default());
        outbox.complete(2, lease("j2"), "t".into(), Any::default(), Final::default());
        assert_eq!(ids(&outbox.unsent()), [1, 2]);
        outbox.rewind();
        outbox.acknowledge(&ack(1, tonic::Code::Ok));
        outbox.complete(3, lease("j3"), "t".into(), Any::default(), Final::default());
        assert_eq!(ids(&outbox.unsent()), [2, 3]);
        assert!(outbox.unsent().is_empty());
    }

    #[test]
    fn lines_go_once_and_the_latest_progress_on_every_later_stream() {
        let mut outbox = Outbox::default();
        let left = Final {
            lines: vec![pb::LogLine::default(); 3],
            latest: Some(progress(5)),
            latest_unsent: false,
        };
        outbox.complete(1, lease("j1"), "t".into(), Any::default(), left);
        let first = outbox.unsent();
        assert_eq!(first[0].lines.len(), 3);
        assert_eq!(
            first[0].progress, None,
            "sent with the lease's reports already"
        );
        outbox.rewind();
        let again = outbox.unsent();
        assert!(again[0].lines.is_empty());
        assert_eq!(again[0].progress, Some(progress(5)));
    }

    #[test]
    fn failure_messages_fit_the_protocol() {
        assert_eq!(failure_message("x"), "x");
        assert!(!failure_message("").is_empty());
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let fitted = failure_message(&long);
        assert!(fitted.len() <= MAX_MESSAGE_BYTES);
        assert!(fitted.ends_with("..."));
        let exact = "a".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(failure_message(&exact), exact);
        assert_eq!(failure_message("a\0b"), "a\u{FFFD}b");
    }
}
