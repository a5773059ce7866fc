//! The README's grpcurl walkthrough of job types, run verbatim with bash against a real server,
//! so the documentation cannot go stale: list, describe, register from a .proto (built by buf),
//! enqueue with JSON, a refused misspelling, an example by slug, cancel, watch.

use std::{path::PathBuf, process::Command};

use jobwire_tests::{ServerProcess, test_db};

/// The shell code between the walkthrough markers of README.md.
fn walkthrough(readme: &str) -> String {
    let start = readme
        .find("<!-- walkthrough:begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- walkthrough:end -->").expect("end marker");
    let block = &readme[start..end];
    let code_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").expect("block end") + code_start;
    block[code_start..code_end].to_owned()
}

#[tokio::test]
async fn the_readme_walkthrough_runs_verbatim() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let script = walkthrough(&readme);

    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let tools = root.join(".tools/bin");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("ADDR", server.addr().to_string())
        .env("TMPDIR", scratch.path())
        .env("PATH", path)
        .current_dir(&root)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walkthrough failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "jobwire.v1.JobTypeService",
        "rpc RegisterJobType",
        "\"payloadType\": \"jobwire.catalog.v1.DownloadFetch\"",
        "\"jobTypeVersion\": 1",
        "\"queue\": \"walkthrough\"",
        "refused, as it should be",
        "\"sourceUrl\": \"http://127.0.0.1:9/tool.tar.gz\"",
        "JOB_STATE_CANCELLED",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from the walkthrough's output:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("job.payload_json.sourceUrll"),
        "the refusal names the field:\n{stderr}"
    );
}
