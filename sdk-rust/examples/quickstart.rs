//! Enqueues one `image.resize` job, waits for its typed result and prints it.
//!
//! Run a server and the `worker` example first, then:
//! `JOBWIRE_URL=http://127.0.0.1:50051 cargo run -p jobwire --example quickstart`.
//! Exits 0 when the job succeeded, non-zero when it failed, was cancelled, or took longer than
//! `JOBWIRE_WAIT_SECS` (default 60).

mod common;

use std::time::Duration;

use anyhow::Context as _;
use common::Resize;
use jobwire::{Client, RetryPolicy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let url = common::server_url();
    let wait = std::env::var("JOBWIRE_WAIT_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);

    let mut client = Client::builder(url.clone());
    if let Some(key) = common::api_key() {
        client = client.api_key(key);
    }
    let client = client
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let handle = client
        .enqueue(Resize {
            url: "https://example.com/cat.png".to_owned(),
            width: 320,
        })
        .priority(75)
        .retry(RetryPolicy::new().max_attempts(3))
        .label("example", "quickstart")
        .await
        .context("enqueueing the job")?;
    println!("enqueued job {}", handle.id());

    let output = tokio::time::timeout(wait, handle.wait())
        .await
        .with_context(|| format!("job {} did not finish within {wait:?}", handle.id()))?
        .with_context(|| format!("job {}", handle.id()))?;
    println!(
        "resized to {}x{}: {}",
        output.width, output.height, output.url
    );
    Ok(())
}
