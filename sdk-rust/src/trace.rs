//! W3C trace context across the queue, with the `opentelemetry` feature: an enqueue carries the
//! caller's current span as `traceparent` and `tracestate` metadata, and a worker makes the
//! context its lease carries (`Lease.traceparent`) the remote parent of the handler's `job` span,
//! so a job's attempts join the trace of the code that enqueued it.
//!
//! The SDK only creates `tracing` spans and sets their parents through `tracing-opentelemetry`;
//! exporting them is the application's OpenTelemetry pipeline (a `tracing-opentelemetry` layer on
//! its subscriber). Without that layer, or without the feature, these functions do nothing.

use jobwire_proto::v1 as pb;
use tracing::Span;

/// Adds the current span's trace context to an enqueue request.
#[cfg(feature = "opentelemetry")]
pub(crate) fn inject<T>(request: &mut tonic::Request<T>) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = Span::current().context();
    let span = context.span();
    let span = span.span_context();
    if !span.is_valid() {
        return;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    );
    let metadata = request.metadata_mut();
    if let Ok(value) = traceparent.parse() {
        metadata.insert("traceparent", value);
    }
    let tracestate = span.trace_state().header();
    if !tracestate.is_empty()
        && let Ok(value) = tracestate.parse()
    {
        metadata.insert("tracestate", value);
    }
}

/// Without the `opentelemetry` feature, requests carry no trace context.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn inject<T>(_request: &mut tonic::Request<T>) {}

/// Makes the lease's trace context, if it has one, the remote parent of `span`.
#[cfg(feature = "opentelemetry")]
pub(crate) fn adopt(span: &Span, lease: &pb::Lease) {
    use std::str::FromStr;

    use opentelemetry::{
        Context,
        trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    // The server checked the context at the enqueue: `00-<trace id>-<span id>-<flags>`.
    let mut parts = lease.traceparent.split('-').skip(1);
    let (Some(trace_id), Some(span_id), Some(flags)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(trace_id), Ok(span_id), Ok(flags)) = (
        TraceId::from_hex(trace_id),
        SpanId::from_hex(span_id),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    let state = TraceState::from_str(&lease.tracestate).unwrap_or_default();
    let remote = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    // Fails only when the application has no OpenTelemetry layer: then nothing is exported.
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
}

/// Without the `opentelemetry` feature, handler spans have no remote parent.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn adopt(_span: &Span, _lease: &pb::Lease) {}
