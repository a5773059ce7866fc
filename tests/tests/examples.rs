//! The README's quickstart, run as written: the example worker serves, the example producer
//! enqueues a job, waits for its typed result and exits 0; and the progress example with its
//! output redirected prints plain lines, with no bar and no escape codes.

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

/// The progress example with its output redirected, as in CI or `> log.txt`: every event is a
/// plain line, and neither it nor the example worker writes a bar or an escape code.
#[tokio::test]
async fn progress_example_prints_plain_lines_without_a_terminal() {
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let url = server.url();
    let worker_path = example("worker");
    let worker = ChildProcess::spawn(
        worker_path.to_str().expect("utf-8 path"),
        &[],
        &[("JOBWIRE_URL", url.as_str())],
    );
    let progress = example("progress");
    // Output goes to pipes, so neither stdout nor stderr is a terminal.
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(progress)
                .env("JOBWIRE_URL", &url)
                .env("COUNTDOWN_STEPS", "5")
                .env("COUNTDOWN_STEP_MILLIS", "20")
                .output()
                .expect("run progress")
        }),
    )
    .await
    .expect("progress finishes in time")
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "progress failed:\n{stdout}\n{stderr}"
    );

    for (name, text) in [
        ("the example's stdout", &*stdout),
        ("the example's stderr", &*stderr),
        ("the worker's log", &worker.stderr()),
    ] {
        assert!(
            !text.contains('\u{1b}'),
            "{name} holds an escape code:\n{text:?}"
        );
        assert!(
            !text.contains('\r'),
            "{name} redraws a line (a bar):\n{text:?}"
        );
    }
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("enqueued job "),
        "the first line names the job:\n{stdout}"
    );
    for expected in ["  job RUNNING", "  job SUCCEEDED", "lift-off"] {
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "no line with {expected:?}:\n{stdout}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("progress 5/5") && line.contains("lift-off")),
        "the last progress report is a line of its own:\n{stdout}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|line| line.starts_with("counted 5 steps")),
        "the result comes last:\n{stdout}"
    );
}
