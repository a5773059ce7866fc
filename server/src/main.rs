//! The `jobwire-server` binary: parse flags, start logging and (when no DATABASE_URL is given)
//! the private PostgreSQL cluster, bind, and run until SIGTERM or SIGINT.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use clap::Parser;
use jobwire_server::{
    config::{Config, LogFormat},
    embedded_pg::EmbeddedPostgres,
    server,
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// glibc's allocator took about a fifth of the server's CPU in W4's waves (`perf record` on its
/// pid: `_int_malloc`, `malloc_consolidate`, `_int_free`), for the many small buffers of messages,
/// rows and events that are made on one thread and freed on another. With jemalloc, 19
/// alternating W4 pairs: p99 median 24.1 ms against 26.8; W1's drain 35,195 jobs/s against
/// 34,024 (5 pairs); peak RSS 4 MiB more. mimalloc did worse (6 pairs: p99 median 37.4 ms, peak
/// RSS 100 MiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    let embedded = match &config.database_url {
        Some(_) => None,
        None => {
            tracing::info!(data_dir = %config.data_dir.display(), "no DATABASE_URL: starting a private PostgreSQL");
            let pg = EmbeddedPostgres::start(&config.data_dir).await?;
            pg.ensure_database("jobwire").await?;
            Some(pg)
        }
    };
    let database_url = match (&config.database_url, &embedded) {
        (Some(url), _) => url.clone(),
        (None, Some(pg)) => pg.database_url("jobwire"),
        (None, None) => anyhow::bail!("no database configured"),
    };

    let served = serve(&config, &database_url).await;
    if let Some(pg) = embedded
        && let Err(error) = pg.stop().await
    {
        tracing::warn!(%error, "could not stop the private PostgreSQL");
    }
    served
}

async fn serve(config: &Config, database_url: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving gRPC");
    // The one line on stdout: scripts and tests wait for it to know the server is up.
    println!("jobwire-server listening on {addr}");
    std::io::stdout().flush()?;

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        signals.cancel();
    });
    server::run(config, database_url, listener, shutdown).await?;
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
