//! Isolating the bad item of a batch (invariant 8).
//!
//! The enqueuer and the completer write many callers' items in one statement; that is their
//! speed. Validation keeps out what PostgreSQL would refuse, but a batch that fails anyway for a
//! reason that retrying will not cure (a value the database refuses, a constraint) must fail
//! only the caller whose item caused it. So such a batch is written again in halves, and each
//! half that fails in halves again, down to the items that fail alone. A batch that succeeds
//! costs nothing more; one bad item in `n` costs about `2 log2 n` more statements.

use std::ops::Range;

/// Writes `len` items with `write`, given the range of items to write, which answers one result
/// per item in order or fails whole. When it fails and `splits` says the failure may be one
/// item's doing, the halves are written on their own, recursively; otherwise every item of the
/// failed range gets the error.
pub async fn isolate<R, E, Fut>(
    len: usize,
    mut write: impl FnMut(Range<usize>) -> Fut,
    splits: impl Fn(&E) -> bool,
) -> Vec<Result<R, E>>
where
    E: Clone,
    Fut: Future<Output = Result<Vec<R>, E>>,
{
    let mut out = Vec::with_capacity(len);
    // The top of the stack is always the leftmost range not yet written (a split pushes its
    // right half first), so answers are appended in item order.
    let mut ranges: Vec<Range<usize>> = Vec::new();
    ranges.push(0..len);
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        match write(range.clone()).await {
            Ok(results) => out.extend(results.into_iter().map(Ok)),
            Err(error) if range.len() > 1 && splits(&error) => {
                if range.len() == len {
                    tracing::warn!(
                        items = len,
                        "a batch failed; writing it in parts to find the items at fault"
                    );
                }
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
            Err(error) => out.extend(range.map(|_| Err(error.clone()))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails whole when the batch holds an odd number, else doubles each item.
    async fn write(items: &[u32]) -> Result<Vec<u32>, String> {
        if let Some(bad) = items.iter().find(|i| *i % 2 == 1) {
            return Err(format!("{bad} is odd"));
        }
        Ok(items.iter().map(|i| i * 2).collect())
    }

    #[tokio::test]
    async fn only_the_bad_items_fail() {
        let items = [2, 4, 7, 8, 10, 12, 14, 15];
        let mut calls = Vec::new();
        let results = isolate(
            items.len(),
            |range| {
                calls.push(items[range.clone()].to_vec());
                write(&items[range])
            },
            |_| true,
        )
        .await;
        let ok: Vec<_> = results.iter().map(|r| r.as_ref().ok().copied()).collect();
        assert_eq!(
            ok,
            [
                Some(4),
                Some(8),
                None,
                Some(16),
                Some(20),
                Some(24),
                Some(28),
                None
            ]
        );
        assert_eq!(results[2], Err("7 is odd".to_owned()));
        assert_eq!(results[7], Err("15 is odd".to_owned()));
        assert_eq!(calls[0], items, "the whole batch first");
        assert!(calls.len() <= 1 + 2 * 2 * 3, "{} writes", calls.len());
    }

    #[tokio::test]
    async fn a_failure_that_is_not_an_items_fails_the_whole_batch_once() {
        let mut calls = 0;
        let results: Vec<Result<u32, &str>> = isolate(
            3,
            |_| {
                calls += 1;
                async { Err("database unavailable") }
            },
            |_| false,
        )
        .await;
        assert_eq!(calls, 1);
        assert!(results.iter().all(|r| *r == Err("database unavailable")));
    }

    #[tokio::test]
    async fn a_good_batch_is_written_once() {
        let mut calls = 0;
        let items = [1, 2, 3];
        let results = isolate(
            items.len(),
            |range| {
                calls += 1;
                let chunk = items[range].to_vec();
                async move { Ok::<_, ()>(chunk) }
            },
            |_| true,
        )
        .await;
        assert_eq!(calls, 1);
        assert_eq!(results, [Ok(1), Ok(2), Ok(3)]);
    }
}
