//! OpenTelemetry: a producer's W3C trace context, sent as `traceparent` metadata on EnqueueJob,
//! reaches a real OTLP/gRPC receiver (a tonic server implementing the collector's
//! TraceService, inside the test) on the server's enqueue, claim and settle spans (exported with
//! `--otlp-endpoint`) and on the Rust SDK worker's handler span (exported by the worker's own
//! pipeline), each a child of the producer's span.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use jobwire::{JobContext, Worker};
use jobwire_proto::v1 as pb;
use jobwire_tests::{
    ServerProcess, eventually,
    jobs::{Sleep, run_sleep},
    test_db,
};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};

const WAIT: Duration = Duration::from_secs(60);
/// The producer's trace, and its span the job was enqueued under.
const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const PRODUCER_SPAN: &str = "eee19b7ec3c1b174";

/// A span as the receiver got it, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// The collector's trace service: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves the receiver on a free loopback port until `stop`.
async fn start_receiver(receiver: Receiver, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    addr
}

#[tokio::test]
async fn the_producers_trace_reaches_the_server_spans_and_the_worker_span() {
    let receiver = Receiver::default();
    let stop_receiver = CancellationToken::new();
    let otlp = start_receiver(receiver.clone(), stop_receiver.clone()).await;
    let endpoint = format!("http://{otlp}");

    // The worker's own pipeline, as an application would set it up.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&endpoint)
        .build()
        .expect("worker exporter");
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("test-worker").build())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test-worker")))
        .init();

    let db = test_db().await;
    let server = ServerProcess::start(&db, &["--otlp-endpoint", &endpoint]).await;
    let worker = Worker::builder(server.url())
        .worker_id("traced-worker")
        .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| {
            run_sleep(ctx, job, "traced-worker".into())
        })
        .build()
        .expect("worker");
    let stop_worker = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop_worker.clone().cancelled_owned()));

    // The producer: a raw EnqueueJob carrying its span as `traceparent`.
    let mut jobs = support::jobs(&server.url()).await;
    let mut request = Request::new(pb::EnqueueJobRequest {
        parent: Default::default(),
        job: Some(pb::JobSpec {
            job_type: "test.sleep".into(),
            payload: Some(support::any_bytes(
                "jobwire.tests.Sleep",
                Sleep::succeeding(1, 7).encode_to_vec(),
            )),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01")
            .parse()
            .expect("metadata"),
    );
    request
        .metadata_mut()
        .insert("tracestate", "producer=1".parse().expect("metadata"));
    let job = jobs
        .enqueue_job(request)
        .await
        .expect("enqueue")
        .into_inner()
        .job
        .expect("job");
    eventually("the job succeeds", WAIT, || {
        let url = server.url();
        let id = job.id.clone();
        async move {
            let mut jobs = support::jobs(&url).await;
            let job = support::get(&mut jobs, &id).await;
            (job.state == pb::JobState::Succeeded as i32).then_some(())
        }
    })
    .await;
    // The worker's spans go out at its next batch; flushing sends them now.
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .expect("flush")
        .expect("the worker's spans are exported");

    let spans = eventually(
        "the server's and the worker's spans reach the receiver",
        WAIT,
        || {
            let spans = receiver.spans.clone();
            async move {
                let spans = spans.lock().expect("spans").clone();
                let has = |service: &str, name: &str| {
                    spans
                        .iter()
                        .any(|s| s.service == service && s.name == name && s.trace_id == TRACE_ID)
                };
                (["jobwire.enqueue", "jobwire.claim", "jobwire.settle"]
                    .iter()
                    .all(|name| has("jobwire-server", name))
                    && has("test-worker", "job"))
                .then_some(spans)
            }
        },
    )
    .await;

    for name in ["jobwire.enqueue", "jobwire.claim", "jobwire.settle"] {
        let span = spans
            .iter()
            .find(|s| s.service == "jobwire-server" && s.name == name && s.trace_id == TRACE_ID)
            .expect("server span");
        assert_eq!(
            span.parent_span_id, PRODUCER_SPAN,
            "{name} is a child of the producer's span"
        );
    }
    let handler = spans
        .iter()
        .find(|s| s.service == "test-worker" && s.name == "job")
        .expect("worker span");
    assert_eq!(
        handler.trace_id, TRACE_ID,
        "the worker's span joins the trace"
    );
    assert_eq!(
        handler.parent_span_id, PRODUCER_SPAN,
        "the worker's span is a child of the producer's span"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .all(|s| s.span_id != PRODUCER_SPAN),
        "the producer's span itself is the test's, never exported by the others"
    );

    stop_worker.cancel();
    running
        .await
        .expect("worker task")
        .expect("the worker stops cleanly");
    stop_receiver.cancel();
}
