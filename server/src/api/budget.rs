//! The size budget on the wire (`jobwire_proto::limits`): the transport's limits, the status a
//! request over them gets, and the pages that stop early to stay within them.

use std::task::{Context, Poll};

use jobwire_proto::{
    limits::{MAX_ATTEMPTS_BYTES, MAX_MESSAGE_BYTES, MAX_PAGE_BYTES},
    v1 as pb,
};
use prost::Message;
use tonic::{Code, Status};

/// What a too-large message got from the transport (tonic's wording, code OUT_OF_RANGE).
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Answers a request the transport refused as too large with RESOURCE_EXHAUSTED naming the
/// limit: tonic answers OUT_OF_RANGE, which says the request's values are wrong rather than
/// that it is too big for this server.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Oversize<S> {
    inner: S,
}

impl<S, Req, B> tower::Service<Req> for Oversize<S>
where
    S: tower::Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(http::Response<B>) -> http::Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        use futures::TryFutureExt;
        self.inner.call(request).map_ok(rename_oversize)
    }
}

/// Rewrites a trailers-only OUT_OF_RANGE "too large" answer as RESOURCE_EXHAUSTED.
fn rename_oversize<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if let Some(renamed) = Status::from_header_map(headers).and_then(|s| oversize(&s)) {
        // Fails only for a message that cannot be a header, which this one always can.
        let _ = renamed.add_header(headers);
    }
    response
}

/// The RESOURCE_EXHAUSTED naming the limit for the transport's refusal of a message too large
/// to decode; `None` for any other status.
pub fn oversize(status: &Status) -> Option<Status> {
    if status.code() != Code::OutOfRange || !status.message().starts_with(TOO_LARGE) {
        return None;
    }
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("more");
    Some(Status::resource_exhausted(format!(
        "the message is {found} bytes, over the limit of {MAX_MESSAGE_BYTES} bytes (4 MiB) per \
         message; send fewer items per message, or smaller ones"
    )))
}

/// Keeps the newest of a job's attempts that fit [`MAX_ATTEMPTS_BYTES`], and counts the older
/// ones left out in `attempts_omitted`.
pub fn trim_attempts(job: &mut pb::Job) {
    let mut bytes = 0;
    let kept = job
        .attempts
        .iter()
        .rev()
        .take_while(|a| {
            bytes += a.encoded_len() + 8;
            bytes <= MAX_ATTEMPTS_BYTES
        })
        .count();
    let omitted = job.attempts.len() - kept;
    job.attempts.drain(..omitted);
    job.attempts_omitted = i32::try_from(omitted).unwrap_or(i32::MAX);
}

/// A page of a List call: the items that fit, and whether more follow.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// True when items were left out, by the page size or by the byte budget.
    pub more: bool,
}

/// Takes `candidates` in order, at most `size` of them, while the page stays within
/// [`MAX_PAGE_BYTES`]; the first is always taken (each item fits a message on its own). `more`
/// also says whether the store had candidates beyond those given (`truncated`).
pub fn fill<T: Message>(candidates: Vec<T>, size: usize, truncated: bool) -> Page<T> {
    let offered = candidates.len();
    let mut bytes = 0;
    let mut items = Vec::with_capacity(offered.min(size));
    for item in candidates {
        let len = item.encoded_len() + 8;
        if items.len() == size || (!items.is_empty() && bytes + len > MAX_PAGE_BYTES) {
            break;
        }
        bytes += len;
        items.push(item);
    }
    let more = truncated || items.len() < offered;
    Page { items, more }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> prost_types::Any {
        prost_types::Any {
            type_url: String::new(),
            value: vec![0; len],
        }
    }

    #[test]
    fn a_page_stops_at_its_size_or_its_bytes_and_takes_at_least_one() {
        let page = fill((0..10).map(|_| blob(10)).collect(), 4, false);
        assert_eq!((page.items.len(), page.more), (4, true));
        let page = fill((0..3).map(|_| blob(10)).collect(), 4, false);
        assert_eq!((page.items.len(), page.more), (3, false));
        let page = fill((0..3).map(|_| blob(10)).collect(), 4, true);
        assert_eq!((page.items.len(), page.more), (3, true));
        let mib = 1024 * 1024;
        let page = fill((0..7).map(|_| blob(mib)).collect(), 100, false);
        assert_eq!((page.items.len(), page.more), (2, true), "3 MiB hold two");
        let page = fill(vec![blob(4 * mib)], 100, false);
        assert_eq!((page.items.len(), page.more), (1, false), "one always goes");
    }

    #[test]
    fn the_newest_attempts_are_kept_within_the_budget() {
        let attempt = |n| pb::JobAttempt {
            attempt: n,
            error: Some(pb::JobError {
                message: "x".repeat(8000),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut job = pb::Job {
            attempts: (1..=100).map(attempt).collect(),
            ..Default::default()
        };
        trim_attempts(&mut job);
        let kept = job.attempts.len();
        assert!((30..100).contains(&kept), "{kept}");
        assert_eq!(job.attempts_omitted as usize, 100 - kept);
        assert_eq!(job.attempts.last().map(|a| a.attempt), Some(100));
        assert!(job.attempts.iter().map(Message::encoded_len).sum::<usize>() <= MAX_ATTEMPTS_BYTES);
    }

    #[test]
    fn an_oversize_answer_is_renamed_with_the_limit() {
        let response: http::Response<()> = Status::out_of_range(format!(
            "{TOO_LARGE}: found 5243000 bytes, the limit is: 4194304 bytes"
        ))
        .into_http();
        let renamed = rename_oversize(response);
        let status = Status::from_header_map(renamed.headers()).expect("a status");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("5243000 bytes"), "{status:?}");
        assert!(status.message().contains("4194304"), "{status:?}");
        let other: http::Response<()> = Status::out_of_range("priority too high").into_http();
        let kept = rename_oversize(other);
        let status = Status::from_header_map(kept.headers()).expect("a status");
        assert_eq!(status.code(), Code::OutOfRange);
    }
}
