//! The `jobwire-server` binary: parse flags, start logging and (when no DATABASE_URL is given)
//! the private PostgreSQL cluster, bind, and run until SIGTERM or SIGINT.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    process::ExitCode,
};

use clap::Parser;
use jobwire_server::{
    config::{Command, Config, LogFormat},
    embedded_pg::{DataDirClaim, EmbeddedPostgres},
    server, telemetry,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("jobwire-server: {error}");
        return ExitCode::from(2);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("jobwire-server: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the OTLP exporter's gRPC channel runs on it.
    let traces = match runtime.block_on(async { init_tracing(&config) }) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("jobwire-server: --otlp-endpoint: {error}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "async runtime started"
    );
    let code = match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("jobwire-server: {error:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = traces {
        // Sends the spans still batched; the exporter's channel needs the runtime.
        let _enter = runtime.enter();
        if let Err(error) = provider.shutdown() {
            eprintln!("jobwire-server: could not flush the last spans: {error}");
        }
    }
    code
}

/// Logs to stderr and, with `--otlp-endpoint`, exports spans; returns the span exporter's
/// provider, to be shut down on exit.
fn init_tracing(
    config: &Config,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    // PostgreSQL's notices (a migration renaming an index, say) are the database talking to
    // whoever runs the statement, not news for an operator; RUST_LOG brings them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otlp, provider) = match &config.otlp_endpoint {
        // Spans are exported at info whatever RUST_LOG says of the logs.
        Some(endpoint) => {
            let (layer, provider) = telemetry::otlp_layer(endpoint)?;
            (Some(layer.with_filter(LevelFilter::INFO)), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otlp)
        .init();
    Ok(provider)
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    // `DATABASE_URL=` (set but empty) means the same as unset.
    config.database_url = config.database_url.filter(|url| !url.is_empty());
    config.direct_database_url = config.direct_database_url.filter(|url| !url.is_empty());
    if let Some(Command::Keys(command)) = config.command.take() {
        let database = Database::open(&config).await?;
        let done = keys::run(&database.store_database(&config), command).await;
        database.close().await;
        return done;
    }
    // Bound first: a port already taken stops the server before it touches any cluster.
    let listener = bind(config.listen, "listen").await?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(bind(addr, "metrics-listen").await?),
        None => None,
    };
    let database = Database::open(&config).await?;
    let served = serve(&config, &database.url, listener, metrics).await;
    database.close().await;
    served
}

/// The database the server uses: DATABASE_URL's, or the private cluster in --data-dir, which
/// this process then starts, holds (one data directory, one server) and stops.
struct Database {
    url: String,
    embedded: Option<(EmbeddedPostgres, DataDirClaim)>,
}

impl Database {
    async fn open(config: &Config) -> anyhow::Result<Self> {
        if let Some(url) = &config.database_url {
            return Ok(Self {
                url: url.clone(),
                embedded: None,
            });
        }
        let claim = DataDirClaim::take(&config.data_dir)?;
        tracing::info!(data_dir = %config.data_dir.display(), "no DATABASE_URL: starting a private PostgreSQL");
        let pg = EmbeddedPostgres::start(&config.data_dir).await?;
        pg.ensure_database("jobwire").await?;
        Ok(Self {
            url: pg.database_url("jobwire"),
            embedded: Some((pg, claim)),
        })
    }

    /// Where the store connects, and how.
    fn store_database(&self, config: &Config) -> jobwire_server::store::Database {
        jobwire_server::store::Database {
            url: self.url.clone(),
            pooling: config.database_pooling,
            direct_url: config.direct_database_url.clone(),
        }
    }

    async fn close(self) {
        if let Some((pg, _claim)) = self.embedded
            && let Err(error) = pg.stop().await
        {
            tracing::warn!(%error, "could not stop the private PostgreSQL");
        }
    }
}

/// `jobwire-server keys`: API keys made, listed and revoked in the database directly.
mod keys {
    use jobwire_server::{
        api::{api_key_service, auth},
        config::KeysCommand,
        store::{Database, NewApiKey, Store},
    };

    pub async fn run(database: &Database, command: KeysCommand) -> anyhow::Result<()> {
        let store = Store::connect_to(database, 2).await?;
        let done = act(&store, command).await;
        store.close().await;
        done
    }

    fn tenant(name: &str) -> anyhow::Result<jobwire_server::domain::TenantId> {
        jobwire_server::api::validate::tenant(name).map_err(|e| anyhow::anyhow!("--tenant: {e}"))
    }

    async fn act(store: &Store, command: KeysCommand) -> anyhow::Result<()> {
        match command {
            KeysCommand::Create {
                tenant: name,
                roles,
                name: key_name,
                ttl,
                rate,
                burst,
                max_streams,
            } => {
                let tenant = tenant(&name)?;
                let (key_name, roles) = api_key_service::key_spec(&key_name, &roles)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let expires_at = ttl
                    .map(chrono::Duration::from_std)
                    .transpose()?
                    .map(|ttl| chrono::Utc::now() + ttl);
                let rate = api_key_service::rate_limit(
                    rate.map(|per_second| jobwire_proto::v1::KeyRateLimit {
                        per_second,
                        burst: burst.unwrap_or(0),
                    })
                    .as_ref(),
                )
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
                let max_streams = api_key_service::max_streams(max_streams.unwrap_or(0))
                    .map_err(|e| anyhow::anyhow!("--{e}"))?;
                let minted = auth::mint();
                let row = store
                    .create_api_key(&NewApiKey {
                        id: minted.id,
                        tenant,
                        name: key_name,
                        roles,
                        secret_sha256: minted.secret_sha256,
                        expires_at,
                        rate,
                        max_streams,
                    })
                    .await?;
                eprintln!(
                    "API key {} for tenant {}, roles {}, expires {}; the key follows, shown \
                     this once:",
                    row.id,
                    row.tenant_id,
                    row.roles.join(", "),
                    row.expires_at
                        .map_or("never".to_owned(), |at| at.to_rfc3339())
                );
                println!("{}", minted.secret);
            }
            KeysCommand::List { tenant: name } => {
                let tenant = tenant(&name)?;
                for row in store.list_api_keys(&tenant, None, i64::MAX).await? {
                    let state = match (row.revoked_at, row.expires_at) {
                        (Some(at), _) => format!("revoked {}", at.to_rfc3339()),
                        (None, Some(at)) => format!("expires {}", at.to_rfc3339()),
                        (None, None) => "active".to_owned(),
                    };
                    println!(
                        "{}\t{}\t{}\t{}",
                        row.id,
                        row.roles.join(","),
                        state,
                        row.name
                    );
                }
            }
            KeysCommand::Revoke { tenant: name, id } => {
                let tenant = tenant(&name)?;
                let row = store
                    .revoke_api_key(&tenant, id)
                    .await
                    .map_err(|e| match e {
                        jobwire_server::store::Error::NotFound => {
                            anyhow::anyhow!("tenant {name} has no API key {id}")
                        }
                        other => other.into(),
                    })?;
                eprintln!(
                    "API key {} revoked; replicas refuse it within seconds",
                    row.id
                );
            }
        }
        Ok(())
    }
}

/// Binds the address of `--{flag}`, saying what to do when it is taken.
async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: the address is in use (by another jobwire-server or \
                 another program); choose another with --{flag} (JOBWIRE_{}), or stop what \
                 holds it",
                flag.to_uppercase().replace('-', "_")
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr} (--{flag}): {error}")
        }
    })
}

async fn serve(
    config: &Config,
    database_url: &str,
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let transport = if config.tls_cert.is_some() {
        "-cacert <the CA's certificate>"
    } else {
        "-plaintext"
    };
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signals.cancel();
    });
    let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
    let (ready, serving) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if serving.await.is_ok() {
            tracing::info!(%addr, "serving gRPC");
            if let Some(metrics_addr) = metrics_addr {
                // Before the ready line, so whoever waits for that one finds this one too.
                println!("jobwire-server metrics on http://{metrics_addr}/metrics");
            }
            // The one line on stdout, once health answers SERVING: scripts and tests wait for
            // it to know the server is up.
            println!("jobwire-server listening on {addr}");
            let _ = std::io::stdout().flush();
            tracing::info!(
                "next: `grpcurl {transport} {addr} list`, or a worker and a job: \
                 `cargo run --release -p jobwire --example worker`, then `--example quickstart` \
                 (README, Quickstart)"
            );
        }
    });
    server::run(config, database_url, (listener, metrics), shutdown, ready).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
