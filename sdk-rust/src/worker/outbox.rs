//! Results on their way to the server: every `CompleteJob` and `FailJob` the worker sent and
//! the server has not acknowledged yet.
//!
//! A result stays here until an `Ack` with its request id arrives, so that a stream that breaks
//! in between loses nothing: the next stream sends every pending result again. Re-sending is
//! safe because each result carries its lease's fencing token, and the server refuses (with
//! ABORTED) one whose attempt is no longer current. The outbox is bounded by the worker's slots:
//! each result frees the slot of the handler that produced it.

use std::collections::BTreeMap;

use prost_types::Any;

use crate::error::HandlerError;
use crate::job;
use crate::proto::v1 as pb;
use crate::proto::v1::connect_request::Message;

/// The longest failure message the server accepts, in characters.
const MAX_MESSAGE_CHARS: usize = 8192;

/// A result awaiting its acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pending {
    pub(super) lease: pb::LeaseRef,
    pub(super) job_type: String,
    message: Message,
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

/// Results sent and not yet acknowledged, by request id.
#[derive(Debug)]
pub(super) struct Outbox {
    /// Request ids are unique per worker, across streams, so a late ack can never settle the
    /// wrong result.
    next_request_id: u64,
    /// Ordered by request id, so a reconnect re-sends in the original order.
    pending: BTreeMap<u64, Pending>,
}

impl Outbox {
    pub(super) fn new() -> Self {
        Self {
            next_request_id: 1,
            pending: BTreeMap::new(),
        }
    }

    /// Records a successful attempt and returns the message to send.
    pub(super) fn complete(
        &mut self,
        lease: pb::LeaseRef,
        job_type: String,
        result: Any,
    ) -> pb::ConnectRequest {
        self.push(lease, job_type, |request_id, lease| {
            Message::Complete(pb::CompleteJob {
                request_id,
                lease: Some(lease),
                result: Some(result),
            })
        })
    }

    /// Records a failed attempt and returns the message to send.
    pub(super) fn fail(
        &mut self,
        lease: pb::LeaseRef,
        job_type: String,
        error: &HandlerError,
    ) -> pb::ConnectRequest {
        self.push(lease, job_type, |request_id, lease| {
            Message::Fail(pb::FailJob {
                request_id,
                lease: Some(lease),
                message: failure_message(error.message()),
                kind: error.kind().unwrap_or_default().to_owned(),
                non_retryable: !error.is_retryable(),
                retry_after: error.retry_after().map(job::duration_to_proto),
            })
        })
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

    /// Every pending result, in the order first sent, for a new stream.
    pub(super) fn resend(&self) -> impl Iterator<Item = pb::ConnectRequest> + '_ {
        self.pending.values().map(|pending| pb::ConnectRequest {
            message: Some(pending.message.clone()),
        })
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn push(
        &mut self,
        lease: pb::LeaseRef,
        job_type: String,
        build: impl FnOnce(u64, pb::LeaseRef) -> Message,
    ) -> pb::ConnectRequest {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let message = build(request_id, lease.clone());
        self.pending.insert(
            request_id,
            Pending {
                lease,
                job_type,
                message: message.clone(),
            },
        );
        pb::ConnectRequest {
            message: Some(message),
        }
    }
}

/// The server requires a non-empty message of bounded length; a handler's message is fitted to
/// that rather than having its failure refused and lost.
fn failure_message(message: &str) -> String {
    if message.is_empty() {
        return "the handler failed without a message".to_owned();
    }
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => message.to_owned(),
        Some(_) => {
            let marker = "...";
            let keep = MAX_MESSAGE_CHARS - marker.len();
            let end = message
                .char_indices()
                .nth(keep)
                .map_or(message.len(), |(i, _)| i);
            format!("{}{marker}", &message[..end])
        }
    }
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

    fn request_id(request: &pb::ConnectRequest) -> u64 {
        match &request.message {
            Some(Message::Complete(complete)) => complete.request_id,
            Some(Message::Fail(fail)) => fail.request_id,
            other => panic!("not a result: {other:?}"),
        }
    }

    fn ack(request_id: u64, code: tonic::Code) -> pb::Ack {
        pb::Ack {
            request_id,
            code: code as i32,
            message: format!("{code:?}"),
        }
    }

    #[test]
    fn results_get_fresh_request_ids_and_carry_the_fencing_token() {
        let mut outbox = Outbox::new();
        let first = outbox.complete(lease("j1"), "t".into(), Any::default());
        let second = outbox.fail(lease("j2"), "t".into(), &HandlerError::retryable("x"));
        assert_eq!((request_id(&first), request_id(&second)), (1, 2));
        let Some(Message::Fail(fail)) = second.message else {
            panic!("expected a FailJob");
        };
        assert_eq!(fail.lease, Some(lease("j2")));
        assert!(!fail.non_retryable);
        assert_eq!(fail.retry_after, None);
        assert_eq!(outbox.len(), 2);
    }

    #[test]
    fn handler_errors_map_onto_fail_job() {
        let mut outbox = Outbox::new();
        let error = HandlerError::fatal("bad input")
            .with_kind("validation")
            .with_retry_after(Duration::from_secs(2));
        let Some(Message::Fail(fail)) = outbox.fail(lease("j1"), "t".into(), &error).message else {
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
        let mut outbox = Outbox::new();
        let ok = request_id(&outbox.complete(lease("j1"), "t".into(), Any::default()));
        let stale = request_id(&outbox.complete(lease("j2"), "t".into(), Any::default()));
        let bad = request_id(&outbox.complete(lease("j3"), "t".into(), Any::default()));

        assert!(matches!(
            outbox.acknowledge(&ack(ok, tonic::Code::Ok)),
            Acknowledged::Applied(p) if p.lease == lease("j1")
        ));
        assert!(matches!(
            outbox.acknowledge(&ack(stale, tonic::Code::Aborted)),
            Acknowledged::Stale(p, _) if p.lease == lease("j2")
        ));
        assert!(matches!(
            outbox.acknowledge(&ack(bad, tonic::Code::InvalidArgument)),
            Acknowledged::Refused(p, tonic::Code::InvalidArgument, _) if p.lease == lease("j3")
        ));
        assert!(outbox.is_empty());
        assert_eq!(
            outbox.acknowledge(&ack(ok, tonic::Code::Ok)),
            Acknowledged::Unknown(ok)
        );
    }

    #[test]
    fn unacknowledged_results_are_resent_in_order_with_their_ids() {
        let mut outbox = Outbox::new();
        let first = outbox.complete(lease("j1"), "t".into(), Any::default());
        let second = outbox.fail(lease("j2"), "t".into(), &HandlerError::retryable("x"));
        let third = outbox.complete(lease("j3"), "t".into(), Any::default());
        outbox.acknowledge(&ack(request_id(&second), tonic::Code::Ok));
        let resent: Vec<_> = outbox.resend().collect();
        assert_eq!(resent, [first, third]);
    }

    #[test]
    fn failure_messages_fit_the_protocol() {
        assert_eq!(failure_message("x"), "x");
        assert!(!failure_message("").is_empty());
        let long = "é".repeat(MAX_MESSAGE_CHARS + 10);
        let fitted = failure_message(&long);
        assert_eq!(fitted.chars().count(), MAX_MESSAGE_CHARS);
        assert!(fitted.ends_with("..."));
        let exact = "a".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(failure_message(&exact), exact);
    }
}
