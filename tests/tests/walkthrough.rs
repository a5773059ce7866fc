//! The README's grpcurl walkthroughs, run verbatim with bash against a real server, so the
//! documentation cannot go stale: list, describe, register from a .proto (built by buf),
//! enqueue with JSON, a refused misspelling, an example by slug, cancel, watch; then the queue
//! and schedule commands, the schedule's JSON template checked against the catalog's type; and
//! the composition walkthrough: dependencies, replay, approval and a signal.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use jobwire_tests::{ServerProcess, test_db};

/// The shell code between the `<!-- {name}:begin -->` and `<!-- {name}:end -->` markers of
/// README.md.
fn block(readme: &str, name: &str) -> String {
    let start = readme
        .find(&format!("<!-- {name}:begin -->"))
        .unwrap_or_else(|| panic!("{name}: begin marker"));
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("{name}: end marker"));
    let block = &readme[start..end];
    let code_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").expect("block end") + code_start;
    block[code_start..code_end].to_owned()
}

/// Runs `script` with bash, strict, against the server at `addr`, with `.tools/bin` on PATH.
fn run(root: &Path, scratch: &Path, addr: &str, script: &str) -> (Output, String, String) {
    let tools = root.join(".tools/bin");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env("ADDR", addr)
        .env("TMPDIR", scratch)
        .env("PATH", path)
        .current_dir(root)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// What the catalog worker does as it connects, for the one type the schedule example uses:
/// registers `discovery.scan.registry` from the descriptor set the walkthrough built.
const REGISTER_SCAN: &str = r#"
grpcurl -plaintext -d @ "$ADDR" jobwire.v1.JobTypeService/RegisterJobType <<JSON
{"job_type": {"name": "discovery.scan.registry",
  "payload_type": "jobwire.catalog.v1.DiscoveryScanRegistry",
  "output_type": "jobwire.catalog.v1.DiscoveryScanRegistryOutput",
  "descriptor_set": "$(base64 -w0 "$TMPDIR/catalog.binpb")"}}
JSON
"#;

#[tokio::test]
async fn the_readme_walkthroughs_run_verbatim() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");

    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let addr = server.addr().to_string();

    let (output, stdout, stderr) =
        run(&root, scratch.path(), &addr, &block(&readme, "walkthrough"));
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

    let script = format!("{REGISTER_SCAN}\n{}", block(&readme, "operations"));
    let (output, stdout, stderr) = run(&root, scratch.path(), &addr, &script);
    assert!(
        output.status.success(),
        "the queue and schedule commands failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "\"concurrencyLimit\": 4",
        "\"paused\": true",
        "\"name\": \"daily_registry_scan\"",
        "\"jobType\": \"discovery.scan.registry\"",
        "type.googleapis.com/jobwire.catalog.v1.DiscoveryScanRegistry",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from the queue and schedule commands' output:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn the_readme_composition_walkthrough_runs_verbatim() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let db = test_db().await;
    let server = ServerProcess::start(&db, &[]).await;
    let addr = server.addr().to_string();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let (output, stdout, stderr) =
        run(&root, scratch.path(), &addr, &block(&readme, "composition"));
    assert!(
        output.status.success(),
        "the composition walkthrough failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        // the verify waits for the fetch
        "\"state\": \"JOB_STATE_PENDING\"",
        // and is cancelled with it, naming it
        "ended CANCELLED: mirror down",
        // the dry run and the replay count the same two, the repeat replays nothing more
        "\"count\": \"2\"",
        "\"repeated\": true",
        // held for approval with a deadline, then approved
        "\"state\": \"JOB_STATE_AWAITING_APPROVAL\"",
        "\"approvalDeadline\"",
        "\"state\": \"JOB_STATE_AVAILABLE\"",
        // the first signal of its name; its repeat
        "\"number\": 1",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from the composition walkthrough's output:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("job.depends_on[0]"),
        "the unknown dependency is refused, naming the field:\n{stderr}"
    );
    // the replay's repeat and the signal's
    assert_eq!(
        stdout.matches("\"repeated\": true").count(),
        2,
        "the signal's repeat:\n{stdout}"
    );
    assert!(
        stderr.contains("a finished job takes no signal"),
        "the cancelled job refuses the signal:\n{stderr}"
    );
}
