//! W3C trace context (<https://www.w3.org/TR/trace-context/>) as an enqueue carries it and a job
//! keeps it: the `traceparent` of the producer's span and its vendors' `tracestate`.
//!
//! Propagation is best effort, as the recommendation asks: a malformed `traceparent` is dropped
//! (the job simply starts no trace of its own), never a reason to refuse the enqueue, and a
//! `tracestate` is kept only beside a valid `traceparent` and within [`MAX_TRACESTATE`].

/// The length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT_LEN: usize = 55;
/// The longest `tracestate` kept: the 512 bytes the recommendation asks every vendor to pass on.
pub const MAX_TRACESTATE: usize = 512;

/// A job's trace context, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// Version 00, lower-case hex, with a non-zero trace id and parent id.
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of the `traceparent` and `tracestate` headers, or `None` when `traceparent`
    /// is missing or malformed. A later version's `traceparent` is read as version 00 (its
    /// first 55 characters), as the recommendation says.
    pub fn parse(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let header = traceparent?.trim();
        let version = header.get(..2)?;
        let parent = match version {
            "00" if header.len() == TRACEPARENT_LEN => header,
            "ff" => return None,
            v if v != "00" && is_hex(v) && header.len() >= TRACEPARENT_LEN => {
                let cut = header.get(..TRACEPARENT_LEN)?;
                if header.len() > TRACEPARENT_LEN && !header[TRACEPARENT_LEN..].starts_with('-') {
                    return None;
                }
                cut
            }
            _ => return None,
        };
        let mut parts = parent.split('-');
        let (_, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = trace_id.len() == 32
            && span_id.len() == 16
            && flags.len() == 2
            && [trace_id, span_id, flags].iter().all(|p| is_hex(p))
            && trace_id.bytes().any(|b| b != b'0')
            && span_id.bytes().any(|b| b != b'0');
        if !valid {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE && s.is_ascii())
            .map(str::to_owned);
        Some(Self {
            traceparent: format!("00-{trace_id}-{span_id}-{flags}"),
            tracestate,
        })
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The producer's span id, 16 hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        u8::from_str_radix(&self.traceparent[53..55], 16).unwrap_or(0)
    }
}

/// Lower-case hex only, as version 00 requires.
fn is_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_with_its_parts() {
        let context = TraceContext::parse(Some(VALID), Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(context.traceparent, VALID);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(context.flags(), 1);
        assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_traceparents_are_dropped() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(Some(bad), None), None, "{bad:?}");
        }
        assert_eq!(TraceContext::parse(None, Some("a=b")), None);
    }

    #[test]
    fn a_later_version_is_read_as_version_00_and_oversized_state_is_dropped() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let context = TraceContext::parse(Some(later), Some(&"x".repeat(MAX_TRACESTATE + 1)))
            .expect("read as 00");
        assert_eq!(context.traceparent, VALID);
        assert_eq!(context.tracestate, None);
    }
}
