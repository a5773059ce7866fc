//! The prefetch queue: leases that wait for a slot.
//!
//! They start in arrival order, go back to the server when they have waited too long (oldest
//! first: a lease the server held before sending it can be older than one that arrived before
//! it) or when their queue changes, and are looked up by lease on every arrival and every stop.
//! A worker may queue up to 10,000, so each of those is indexed rather than a scan of the queue,
//! which the session loop would otherwise pay on every pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use crate::proto::v1 as pb;
use crate::worker::registry::ErasedHandler;

/// A lease waiting for a slot.
pub(super) struct Queued {
    pub(super) lease: pb::Lease,
    pub(super) handler: ErasedHandler,
    /// When its attempt began, as this worker's clock reckons it: its arrival, less the time
    /// the server says it held the lease before sending it.
    pub(super) since: Instant,
}

#[derive(Default)]
pub(super) struct LeaseQueue {
    /// The next arrival's number.
    next: u64,
    by_arrival: BTreeMap<u64, Queued>,
    by_lease: HashMap<pb::LeaseRef, u64>,
    by_age: BTreeSet<(Instant, u64)>,
}

impl LeaseQueue {
    pub(super) fn len(&self) -> usize {
        self.by_arrival.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_arrival.is_empty()
    }

    pub(super) fn contains(&self, lease: &pb::LeaseRef) -> bool {
        self.by_lease.contains_key(lease)
    }

    pub(super) fn push(&mut self, queued: Queued) {
        let n = self.next;
        self.next += 1;
        self.by_lease.insert(lease_ref(&queued.lease), n);
        self.by_age.insert((queued.since, n));
        self.by_arrival.insert(n, queued);
    }

    /// The first to arrive of those still waiting.
    pub(super) fn pop_front(&mut self) -> Option<Queued> {
        let n = *self.by_arrival.keys().next()?;
        self.take(n)
    }

    pub(super) fn remove(&mut self, lease: &pb::LeaseRef) -> Option<Queued> {
        let n = *self.by_lease.get(lease)?;
        self.take(n)
    }

    /// When the oldest began.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.by_age.first().map(|(since, _)| *since)
    }

    /// Takes off those that began at or before `cutoff`, oldest first.
    pub(super) fn take_begun_by(&mut self, cutoff: Instant) -> Vec<Queued> {
        let mut taken = Vec::new();
        while let Some(&(since, n)) = self.by_age.first() {
            if since > cutoff {
                break;
            }
            taken.extend(self.take(n));
        }
        taken
    }

    /// Takes off those `pick` chooses, in arrival order.
    pub(super) fn take_where(&mut self, mut pick: impl FnMut(&Queued) -> bool) -> Vec<Queued> {
        let picked: Vec<u64> = self
            .by_arrival
            .iter()
            .filter(|(_, queued)| pick(queued))
            .map(|(n, _)| *n)
            .collect();
        picked.into_iter().filter_map(|n| self.take(n)).collect()
    }

    /// Every lease, in arrival order.
    pub(super) fn leases(&self) -> impl Iterator<Item = &pb::Lease> {
        self.by_arrival.values().map(|queued| &queued.lease)
    }

    fn take(&mut self, n: u64) -> Option<Queued> {
        let queued = self.by_arrival.remove(&n)?;
        self.by_lease.remove(&lease_ref(&queued.lease));
        self.by_age.remove(&(queued.since, n));
        Some(queued)
    }
}

pub(super) fn lease_ref(lease: &pb::Lease) -> pb::LeaseRef {
    pb::LeaseRef {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queued(job: &str, since: Instant) -> Queued {
        Queued {
            lease: pb::Lease {
                job_id: job.into(),
                attempt: 1,
                queue: if job.ends_with('b') { "b" } else { "a" }.into(),
                ..Default::default()
            },
            handler: ErasedHandler::echo(),
            since,
        }
    }

    fn jobs(queued: &[Queued]) -> Vec<&str> {
        queued.iter().map(|q| q.lease.job_id.as_str()).collect()
    }

    fn lease(job: &str) -> pb::LeaseRef {
        pb::LeaseRef {
            job_id: job.into(),
            attempt: 1,
        }
    }

    #[test]
    fn leases_start_in_arrival_order_and_go_stale_oldest_first() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        let mut queue = LeaseQueue::default();
        // j3 arrived last but was held by the server longest: it began first.
        for (job, since) in [
            ("j1", ms(100)),
            ("j2b", ms(200)),
            ("j3", ms(50)),
            ("j4b", ms(300)),
        ] {
            queue.push(queued(job, since));
        }
        assert_eq!(queue.len(), 4);
        assert_eq!(queue.oldest(), Some(ms(50)));
        assert!(queue.contains(&lease("j2b")));

        assert_eq!(jobs(&queue.take_begun_by(ms(49))), Vec::<&str>::new());
        assert_eq!(jobs(&queue.take_begun_by(ms(150))), ["j3", "j1"]);
        assert_eq!(queue.oldest(), Some(ms(200)));
        assert!(!queue.contains(&lease("j1")));

        queue.push(queued("j5", ms(400)));
        assert_eq!(
            queue.pop_front().map(|q| q.lease.job_id),
            Some("j2b".into())
        );
        assert_eq!(
            queue
                .leases()
                .map(|l| l.job_id.as_str())
                .collect::<Vec<_>>(),
            ["j4b", "j5"]
        );
        assert_eq!(queue.oldest(), Some(ms(300)));
    }

    #[test]
    fn leases_come_off_by_lease_and_by_queue_leaving_the_rest_indexed() {
        let t = Instant::now();
        let mut queue = LeaseQueue::default();
        for (n, job) in ["j1", "j2b", "j3", "j4b", "j5"].into_iter().enumerate() {
            queue.push(queued(job, t + Duration::from_millis(n as u64)));
        }
        assert!(queue.remove(&lease("j3")).is_some());
        assert!(queue.remove(&lease("j3")).is_none(), "taken once");
        assert_eq!(
            jobs(&queue.take_where(|q| q.lease.queue == "b")),
            ["j2b", "j4b"]
        );
        assert_eq!(queue.oldest(), Some(t));
        assert_eq!(jobs(&queue.take_begun_by(t)), ["j1"]);
        assert_eq!(queue.pop_front().map(|q| q.lease.job_id), Some("j5".into()));
        assert!(queue.is_empty());
        assert_eq!(queue.oldest(), None);
        assert!(queue.pop_front().is_none());
        // The same attempt may queue again once off the queue.
        queue.push(queued("j3", t));
        assert!(queue.contains(&lease("j3")));
    }
}
