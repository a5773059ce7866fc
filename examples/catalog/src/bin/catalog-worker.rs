//! Serves the whole seed catalog, from the queues its types default to (`default` and
//! `downloads`), until SIGINT (Ctrl-C) or SIGTERM, then drains and exits.
//!
//! `JOBWIRE_URL` (default `http://127.0.0.1:50051`) names the server; `CATALOG_CACHE_DIR`
//! (default `./.catalog-cache`) is where downloads go; `RUST_LOG` filters the worker's own log.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use jobwire::Worker;

const DEFAULT_URL: &str = "http://127.0.0.1:50051";
const DEFAULT_CACHE_DIR: &str = "./.catalog-cache";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log redirected to a file or a pipe carries no escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let url = std::env::var("JOBWIRE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let cache_dir = std::env::var_os("CATALOG_CACHE_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR), PathBuf::from);

    let mut builder = Worker::builder(&url);
    // Needed once the server has keys: one with the worker role.
    if let Some(key) = std::env::var("JOBWIRE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
    {
        builder = builder.api_key(key);
    }
    let worker = jobwire_catalog::register_all(builder, cache_dir.clone()).build()?;
    tracing::info!(
        worker = worker.worker_id(),
        %url,
        cache = %cache_dir.display(),
        job_types = jobwire_catalog::CATALOG.len(),
        queues = ?jobwire_catalog::QUEUES,
        "serving the seed catalog"
    );
    worker.run(shutdown_signal()).await?;
    tracing::info!("drained");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM; the worker then drains its running jobs.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received; draining"),
        () = terminate => tracing::info!("SIGTERM received; draining"),
    }
}
