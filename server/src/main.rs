//! The `jobwire-server` binary: parse flags, start logging and (when no DATABASE_URL is given)
//! the private PostgreSQL cluster, bind, and run until SIGTERM or SIGINT.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    process::ExitCode,
};

use clap::Parser;
use jobwire_server::{
    config::{Config, LogFormat},
    embedded_pg::{DataDirClaim, EmbeddedPostgres},
    server,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(error) = config.validate() {
        eprintln!("jobwire-server: {error}");
        return ExitCode::from(2);
    }
    init_tracing(config.log_format);
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
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "async runtime started"
    );
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("jobwire-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    // PostgreSQL's notices (a migration renaming an index, say) are the database talking to
    // whoever runs the statement, not news for an operator; RUST_LOG brings them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    // `DATABASE_URL=` (set but empty) means the same as unset.
    config.database_url = config.database_url.filter(|url| !url.is_empty());
    // Bound first: a port already taken stops the server before it touches any cluster.
    let listener = bind(config.listen).await?;
    let (embedded, _claim) = match &config.database_url {
        Some(_) => (None, None),
        None => {
            // Held until the server exits: one data directory, one server.
            let claim = DataDirClaim::take(&config.data_dir)?;
            tracing::info!(data_dir = %config.data_dir.display(), "no DATABASE_URL: starting a private PostgreSQL");
            let pg = EmbeddedPostgres::start(&config.data_dir).await?;
            pg.ensure_database("jobwire").await?;
            (Some(pg), Some(claim))
        }
    };
    let database_url = match (&config.database_url, &embedded) {
        (Some(url), _) => url.clone(),
        (None, Some(pg)) => pg.database_url("jobwire"),
        (None, None) => anyhow::bail!("no database configured"),
    };

    let served = serve(&config, &database_url, listener).await;
    if let Some(pg) = embedded
        && let Err(error) = pg.stop().await
    {
        tracing::warn!(%error, "could not stop the private PostgreSQL");
    }
    served
}

/// Binds the gRPC address, saying what to do when it is taken.
async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: the address is in use (by another jobwire-server or \
                 another program); choose another with --listen (JOBWIRE_LISTEN), or stop what \
                 holds it"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr} (--listen): {error}")
        }
    })
}

async fn serve(
    config: &Config,
    database_url: &str,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signals.cancel();
    });
    let (ready, serving) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if serving.await.is_ok() {
            tracing::info!(%addr, "serving gRPC");
            // The one line on stdout, once health answers SERVING: scripts and tests wait for
            // it to know the server is up.
            println!("jobwire-server listening on {addr}");
            let _ = std::io::stdout().flush();
            tracing::info!(
                "next: `grpcurl -plaintext {addr} list`, or a worker and a job: \
                 `cargo run --release -p jobwire --example worker`, then `--example quickstart` \
                 (README, Quickstart)"
            );
        }
    });
    server::run(config, database_url, listener, shutdown, ready).await?;
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
