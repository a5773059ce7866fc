//! Wires the store, the engine and the gRPC services together and runs them until shutdown.
//!
//! Shutdown order: stop accepting calls and end every worker stream (they watch the same token),
//! let the engine loops stop, then wait for the completer to flush what the streams handed it.
//! Health reports NOT_SERVING from the first moment of shutdown, and whenever PostgreSQL stops
//! answering, so load balancers route around this replica.

use std::{sync::Arc, time::Duration};

use jobwire_proto::v1::{
    api_key_service_server::ApiKeyServiceServer, audit_service_server::AuditServiceServer,
    job_service_server::JobServiceServer, job_type_service_server::JobTypeServiceServer,
    queue_service_server::QueueServiceServer, schedule_service_server::ScheduleServiceServer,
    worker_service_server::WorkerServiceServer,
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use jobwire_proto::limits::MAX_MESSAGE_BYTES;

use crate::{
    api::{
        api_key_service::ApiKeyApi,
        audit_service::AuditApi,
        auth::{AuthLayer, Authenticator, Mode},
        budget::OversizeLayer,
        job_service::JobApi,
        job_type_service::JobTypeApi,
        queue_service::QueueApi,
        schedule_service::ScheduleApi,
        watch::Watches,
        worker_service::WorkerApi,
    },
    config::{Config, MAX_STREAMS_PER_CONNECTION},
    engine::{Engine, sampler::Sampler, session::SessionConfig},
    memory::Trimmer,
    registry::Registry,
    store::{Database, Store},
};

/// The most of a replica's name shown with its workers.
const MAX_REPLICA_NAME: usize = 255;

/// This replica's name for ListWorkers: `--replica-name`, or `<hostname>:<port>`, which tells
/// replicas apart on one host as well as across hosts.
fn replica_name(config: &Config, listener: &TcpListener) -> String {
    let name = config.replica_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "jobwire".to_owned());
        match listener.local_addr() {
            Ok(addr) => format!("{host}:{}", addr.port()),
            Err(_) => host,
        }
    });
    // Stored as text: a NUL cannot be, and a name this long says nothing more.
    let mut name = name.replace('\0', "");
    while name.len() > MAX_REPLICA_NAME {
        name.pop();
    }
    name
}

/// How often health is re-checked against PostgreSQL.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the database: {0}")]
    Store(#[from] crate::store::Error),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot serve metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot serve TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(
        "no API key exists and --listen {0} is not a loopback address: make an admin key with \
         `jobwire-server keys create --tenant <tenant> --role admin` (then send it as \
         `authorization: Bearer <key>`), or run without authentication with --insecure-no-auth"
    )]
    NoAuth(std::net::SocketAddr),
}

/// Serves on `listener` until `shutdown` fires, then stops in order. `ready` is told when
/// health first answers SERVING: the database is reachable and migrated, and calls are served.
pub async fn run(
    config: &Config,
    database_url: &str,
    (listener, metrics): (TcpListener, Option<TcpListener>),
    shutdown: CancellationToken,
    ready: oneshot::Sender<()>,
) -> Result<(), ServeError> {
    // Read before anything starts: a wrong certificate file stops the server at once.
    let tls = crate::tls::load(config)?;
    let store = Store::connect_to(
        &Database {
            url: database_url.to_owned(),
            pooling: config.database_pooling,
            direct_url: config.direct_database_url.clone(),
        },
        config.db_max_connections,
    )
    .await?;
    // The event log's partitions for the next while, before any event is written: after a
    // long stop the leader's would come only once it is elected.
    let pruner = config.pruner();
    if let Err(error) = store
        .ensure_event_partitions(pruner.partition_interval, pruner.partitions_ahead())
        .await
    {
        tracing::warn!(%error, "making the event log's partitions failed; the leader tries again");
    }
    let mode = auth_mode(config, &store).await?;
    let auth = Arc::new(Authenticator::new(
        store.clone(),
        mode,
        config.max_streams_per_key,
    ));
    let tasks = TaskTracker::new();
    let engine = Engine::start(&store, config, &tasks, &shutdown);
    if let Some(metrics) = metrics {
        let handle = crate::metrics::install()?;
        tasks.spawn(
            Sampler::new(store.clone(), config.db_max_connections, handle.clone())
                .run(shutdown.clone()),
        );
        tasks.spawn(crate::metrics::serve(metrics, handle, shutdown.clone()));
    }
    let (trimmer, ended) = Trimmer::new();
    tasks.spawn(trimmer.run(shutdown.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tasks.spawn(report_health(
        store.clone(),
        health_reporter,
        shutdown.clone(),
        ready,
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jobwire_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jobwire_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // One budget for every message either way (see `jobwire_proto::limits`): the per-field
    // limits keep what the server sends within it, and a request over it is refused whole.
    let max_message = MAX_MESSAGE_BYTES;
    let registry = Registry::new(store.clone());
    let watches = Watches::new(
        store.clone(),
        registry.clone(),
        engine.fanout.clone(),
        (shutdown.clone(), tasks.clone()),
        config.db_max_connections,
        (config.max_watches_per_connection, ended),
    );
    let jobs = JobServiceServer::new(JobApi::new(
        store.clone(),
        registry.clone(),
        engine.enqueuer.clone(),
        config.max_payload_bytes,
        watches,
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let workers = WorkerServiceServer::new(WorkerApi::new(
        store.clone(),
        registry.clone(),
        engine.clone(),
        (
            SessionConfig {
                lease_duration: config.lease_duration,
                heartbeat_interval: config.heartbeat_interval,
                stop_grace: config.stop_grace,
                replica: replica_name(config, &listener),
            },
            config.max_payload_bytes,
        ),
        shutdown.clone(),
        tasks.clone(),
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    drop(engine);
    let queues = QueueServiceServer::new(QueueApi::new(store.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let job_types = JobTypeServiceServer::new(JobTypeApi::new(store.clone(), registry.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let audit = AuditServiceServer::new(AuditApi::new(store.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let api_keys = ApiKeyServiceServer::new(ApiKeyApi::new(store.clone(), auth.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let schedules = ScheduleServiceServer::new(ScheduleApi::new(
        store.clone(),
        registry.clone(),
        config.max_payload_bytes,
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);

    let served = crate::tls::apply(tonic::transport::Server::builder(), tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(u32::try_from(MAX_STREAMS_PER_CONNECTION).unwrap_or(u32::MAX))
        .layer(OversizeLayer)
        .layer(AuthLayer::new(auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs)
        .add_service(workers)
        .add_service(queues)
        .add_service(schedules)
        .add_service(job_types)
        .add_service(api_keys)
        .add_service(audit)
        .serve_with_incoming_shutdown(
            // Leases, acks and events are small messages: Nagle's algorithm would hold them
            // back for tens of milliseconds.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    // Also reached when serving failed on its own: stop the loops either way.
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(config.shutdown_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within the shutdown timeout");
    }
    store.close().await;
    served?;
    Ok(())
}

/// Whether calls need a key: once any key exists, always; before, a loopback address (or
/// `--insecure-no-auth`) serves open, with a warning, and any other address refuses to start.
async fn auth_mode(config: &Config, store: &Store) -> Result<Mode, ServeError> {
    if store.any_api_keys().await? {
        tracing::info!("API keys required");
        return Ok(Mode::Required);
    }
    if config.listen.ip().is_loopback() || config.insecure_no_auth {
        tracing::warn!(
            listen = %config.listen,
            "no API key exists: serving without authentication (every caller has every right \
             in the tenant it names); make one with `jobwire-server keys create`"
        );
        return Ok(Mode::Open);
    }
    Err(ServeError::NoAuth(config.listen))
}

/// Keeps the health service in step with PostgreSQL until shutdown; tells `ready` the first
/// time it answers SERVING.
async fn report_health(
    store: Store,
    reporter: HealthReporter,
    shutdown: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut last = None;
    loop {
        let status = match tokio::time::timeout(HEALTH_INTERVAL, store.ping()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        };
        if last != Some(status) {
            tracing::info!(?status, "health changed");
            set_all(&reporter, status).await;
            last = Some(status);
        }
        if status == ServingStatus::Serving
            && let Some(ready) = ready.take()
        {
            let _ = ready.send(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
    set_all(&reporter, ServingStatus::NotServing).await;
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        "jobwire.v1.JobService",
        "jobwire.v1.WorkerService",
        "jobwire.v1.QueueService",
        "jobwire.v1.ScheduleService",
        "jobwire.v1.JobTypeService",
    ] {
        reporter.set_service_status(service, status).await;
    }
}
