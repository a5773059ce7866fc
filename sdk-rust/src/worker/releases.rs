//! Leases the worker hands back without starting them, until the server acknowledges that.
//!
//! A lease is handed back when it waited too long in the prefetch queue, when it was stopped
//! before it started, or when the worker drains. A hand-back lost with its stream is sent again
//! on the next one, as is one the database could not take: without it the job would wait for its
//! lease to lapse. A repeat changes nothing: the server skips leases no longer running, and a
//! lease's attempt number is never given to a later claim.

use std::collections::HashMap;

use tonic::Code;

use crate::proto::v1 as pb;
use crate::proto::v1::connect_request::Message as Outbound;
use crate::worker::RequestIds;

/// The most leases in one message; the protocol allows twice the most slots.
const MAX_PER_MESSAGE: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Releases {
    unsent: Vec<pb::LeaseRef>,
    /// Sent on the current stream, by request id, until acknowledged.
    sent: HashMap<u64, Vec<pb::LeaseRef>>,
}

impl Releases {
    pub(super) fn add(&mut self, leases: impl IntoIterator<Item = pb::LeaseRef>) {
        self.unsent.extend(leases);
    }

    /// Nothing is left to send or to be acknowledged.
    pub(super) fn is_empty(&self) -> bool {
        self.unsent.is_empty() && self.sent.is_empty()
    }

    /// The messages for the leases not sent yet, which count as sent from here on.
    pub(super) fn outgoing(&mut self, ids: &mut RequestIds, into: &mut Vec<pb::ConnectRequest>) {
        while !self.unsent.is_empty() {
            let rest = self
                .unsent
                .split_off(self.unsent.len().min(MAX_PER_MESSAGE));
            let leases = std::mem::replace(&mut self.unsent, rest);
            let request_id = ids.next();
            into.push(pb::ConnectRequest {
                message: Some(Outbound::Release(pb::ReleaseLeases {
                    request_id,
                    leases: leases.clone(),
                })),
            });
            self.sent.insert(request_id, leases);
        }
    }

    /// Takes an acknowledgement if it answers a hand-back; false if it answers something else.
    pub(super) fn acknowledge(&mut self, ack: &pb::Ack) -> bool {
        let Some(leases) = self.sent.remove(&ack.request_id) else {
            return false;
        };
        let code = Code::from(ack.code);
        if code == Code::Ok {
            tracing::debug!(count = leases.len(), "leases handed back");
        } else if code == Code::Unavailable {
            tracing::warn!(
                count = leases.len(),
                message = %ack.message,
                "the server could not take leases back yet; they go again with the next message"
            );
            self.unsent.extend(leases);
        } else {
            // Nothing to retry with: those leases lapse and the server retries their jobs.
            tracing::warn!(
                count = leases.len(),
                ?code,
                message = %ack.message,
                "the server refused leases handed back; they will lapse"
            );
        }
        true
    }

    /// The stream ended: what was sent on it and not acknowledged goes again on the next.
    pub(super) fn rewind(&mut self) {
        for (_, leases) in self.sent.drain() {
            self.unsent.extend(leases);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(n: usize) -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: format!("job-{n}"),
            attempt: 1,
        }
    }

    fn sent(messages: &[pb::ConnectRequest]) -> Vec<(u64, usize)> {
        messages
            .iter()
            .map(|m| match &m.message {
                Some(Outbound::Release(r)) => (r.request_id, r.leases.len()),
                other => panic!("not a release: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_hand_back_lost_with_its_stream_goes_again_until_acknowledged() {
        let mut releases = Releases::default();
        let mut ids = RequestIds::default();
        releases.add((0..3).map(lease));
        let mut first = Vec::new();
        releases.outgoing(&mut ids, &mut first);
        assert_eq!(sent(&first), vec![(1, 3)]);
        assert!(!releases.is_empty(), "unacknowledged");

        releases.rewind();
        let mut again = Vec::new();
        releases.outgoing(&mut ids, &mut again);
        assert_eq!(sent(&again), vec![(2, 3)]);

        let ack = |request_id| pb::Ack {
            request_id,
            code: 0,
            message: String::new(),
        };
        assert!(
            !releases.acknowledge(&ack(1)),
            "the first id went with its stream"
        );
        assert!(!releases.acknowledge(&ack(7)));
        assert!(releases.acknowledge(&ack(2)));
        assert!(releases.is_empty());
    }

    #[test]
    fn a_hand_back_the_database_could_not_take_goes_again() {
        let mut releases = Releases::default();
        let mut ids = RequestIds::default();
        releases.add((0..2).map(lease));
        let mut first = Vec::new();
        releases.outgoing(&mut ids, &mut first);
        let unavailable = pb::Ack {
            request_id: 1,
            code: Code::Unavailable as i32,
            message: "database unavailable".into(),
        };
        assert!(releases.acknowledge(&unavailable));
        let mut again = Vec::new();
        releases.outgoing(&mut ids, &mut again);
        assert_eq!(sent(&again), vec![(2, 2)]);

        let refused = pb::Ack {
            request_id: 2,
            code: Code::InvalidArgument as i32,
            message: "release.leases[0].job_id: not a UUID".into(),
        };
        assert!(releases.acknowledge(&refused));
        assert!(releases.is_empty(), "a refusal is not retried");
    }

    #[test]
    fn many_leases_are_split_across_messages() {
        let mut releases = Releases::default();
        let mut ids = RequestIds::default();
        releases.add((0..MAX_PER_MESSAGE + 5).map(lease));
        let mut messages = Vec::new();
        releases.outgoing(&mut ids, &mut messages);
        assert_eq!(sent(&messages), vec![(1, MAX_PER_MESSAGE), (2, 5)]);
    }
}
