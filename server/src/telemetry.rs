//! OpenTelemetry traces: the OTLP export (`--otlp-endpoint`) and the spans a job's trace
//! context is the parent of.
//!
//! A producer's W3C trace context, taken from EnqueueJob's metadata, is kept with its job
//! (`domain::trace`) and made the remote parent of the server's spans about that job:
//! `jobwire.enqueue` (the call, its group commit included), `jobwire.claim` (the statement that
//! leased the job to a worker: a claim, or the enqueue itself when a worker's slot was free) and
//! `jobwire.settle` (the statement that ended an attempt). The worker gets the same context with
//! its lease, so its handler's span (Rust SDK, feature `opentelemetry`) joins the trace too.
//!
//! The claim and settle spans are made once their statement has committed, beside the metrics,
//! and end at once: they mark when the job changed hands in the trace, not how long a batch
//! statement serving many traces took. They are made only while export is on, and only for jobs
//! that carry a context, so a server without `--otlp-endpoint` pays nothing per job.

use std::{
    str::FromStr,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    },
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, registry::LookupSpan};

use crate::domain::trace::TraceContext;

/// Whether spans are exported: set once at start-up, read on every batch.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The `tracing` layer that exports spans over OTLP/gRPC to `endpoint`, and the provider to shut
/// down (flushing what is left) on exit. Needs a Tokio runtime: the exporter's gRPC channel
/// runs on it.
pub fn otlp_layer<S>(
    endpoint: &str,
) -> Result<(impl Layer<S> + use<S>, SdkTracerProvider), opentelemetry_otlp::ExporterBuildError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("jobwire-server")
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("jobwire-server"));
    EXPORTING.store(true, Ordering::Relaxed);
    Ok((layer, provider))
}

/// Whether spans about jobs are worth making.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The OpenTelemetry context whose remote parent is `trace`.
pub fn parent(trace: &TraceContext) -> Option<Context> {
    let trace_id = TraceId::from_hex(trace.trace_id()).ok()?;
    let span_id = SpanId::from_hex(trace.span_id()).ok()?;
    let state = trace
        .tracestate
        .as_deref()
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let remote = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(trace.flags()),
        true,
        state,
    );
    Some(Context::new().with_remote_span_context(remote))
}

/// Makes `span` a child of `trace`, when there is one and spans are exported.
pub fn adopt(span: &Span, trace: Option<&TraceContext>) {
    if let Some(context) = trace.filter(|_| exporting()).and_then(parent) {
        // Fails only without the OpenTelemetry layer, which `exporting` rules out.
        let _ = span.set_parent(context);
    }
}

/// What a job's committed statement did, for its span.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Claim,
    Settle,
}

/// One job a statement changed, as its span describes it.
pub struct JobStep<'a> {
    pub trace: Option<TraceContext>,
    pub job_id: String,
    pub tenant: &'a str,
    pub queue: &'a str,
    pub job_type: &'a str,
    pub attempt: i32,
    /// The state the job is in after the statement.
    pub state: &'static str,
}

/// Records a span per job that carries a trace context, each a child of its job's context.
pub fn steps<'a>(step: Step, jobs: impl IntoIterator<Item = JobStep<'a>>) {
    if !exporting() {
        return;
    }
    for job in jobs {
        let Some(trace) = &job.trace else { continue };
        let span = match step {
            Step::Claim => tracing::info_span!(
                "jobwire.claim",
                job_id = %job.job_id,
                tenant = job.tenant,
                queue = job.queue,
                job_type = job.job_type,
                attempt = job.attempt,
                state = job.state,
            ),
            Step::Settle => tracing::info_span!(
                "jobwire.settle",
                job_id = %job.job_id,
                tenant = job.tenant,
                queue = job.queue,
                job_type = job.job_type,
                attempt = job.attempt,
                state = job.state,
            ),
        };
        adopt(&span, Some(trace));
    }
}
