//! The README's quickstart, run as written: the example worker serves, the example producer
//! enqueues a job, waits for its typed result and exits 0.

use std::{path::PathBuf, process::Command, time::Duration};

use jobwire_tests::{ChildProcess, ServerProcess, test_db};

/// An example binary built by `cargo build --all-targets` (scripts/test builds them first).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` first (scripts/test does)",
        path.display()
    );
    path
}

#[tokio::test]
async fn quickstart_example_runs_against_the_example_worker() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let worker_path = example("worker");
    let _worker = ChildProcess::spawn(
        worker_path.to_str().expect("utf-8 path"),
        &[],
        &[("JOBWIRE_URL", url.as_str())],
    );
    let quickstart = example("quickstart");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(quickstart)
                .env("JOBWIRE_URL", &url)
                .output()
                .expect("run quickstart")
        }),
    )
    .await
    .expect("quickstart finishes in time")
    .expect("join");
    assert!(
        output.status.success(),
        "quickstart failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
