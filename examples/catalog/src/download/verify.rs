//! `download.verify`: the SHA-256 of an artifact in the cache against the digest its payload
//! expects. The seed makes this the gate of every download (nothing unverified may go on to
//! be installed), so a mismatch is final: another attempt would hash the same bytes.

use std::io;
use std::sync::Arc;

use jobwire::{HandlerError, JobContext};

use super::{Downloads, io_failure, sha256_file};
use crate::{invalid_payload, pb, stopped};

/// Runs one attempt of a `download.verify` job.
///
/// # Errors
///
/// Fatal with kind `digest_mismatch` when the digests differ, `artifact_missing` when the file
/// is gone, `invalid_payload` for a malformed digest or a path outside the cache; retryable for
/// I/O failures and stops.
pub async fn run(
    ctx: JobContext,
    job: pb::DownloadVerify,
    downloads: Arc<Downloads>,
) -> Result<pb::DownloadVerifyOutput, HandlerError> {
    let expected = expected_digest(&job.checksum_sha256)?;
    let path = downloads.resolve(&job.artifact_path).await?;
    ctx.info(format!(
        "verifying {} (from download task {:?})",
        path.display(),
        job.download_task_id
    ));
    let hashed = tokio::select! {
        () = ctx.cancelled() => return Err(stopped(&ctx)),
        hashed = sha256_file(path.clone()) => hashed,
    };
    let (size, actual) = hashed.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            HandlerError::fatal(format!("artifact {} vanished", path.display()))
                .with_kind("artifact_missing")
        }
        _ => io_failure("hashing", &path, &e),
    })?;
    if actual != expected {
        let message = format!(
            "digest mismatch for {}: expected sha256 {expected}, found {actual}",
            path.display()
        );
        ctx.error(message.clone());
        return Err(HandlerError::fatal(message).with_kind("digest_mismatch"));
    }
    ctx.info(format!("verified: {size} bytes, sha256 {actual}"));
    Ok(pb::DownloadVerifyOutput {
        verified: true,
        sha256: actual,
        artifact_path: path.display().to_string(),
        size_bytes: size,
        domain: job.domain,
    })
}

/// The payload's digest in lowercase hex, once it is checked to be a SHA-256 at all: a typo
/// there is the payload's fault, not the artifact's.
fn expected_digest(digest: &str) -> Result<String, HandlerError> {
    let digest = digest.trim().to_ascii_lowercase();
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest)
    } else {
        Err(invalid_payload(format!(
            "checksum_sha256 {digest:?} is not 64 hex digits"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_and_lowercased() {
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(
            expected_digest(upper).ok().as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        for bad in ["", "abc", &"z".repeat(64)] {
            let error = expected_digest(bad).expect_err("refused");
            assert_eq!(error.kind(), Some("invalid_payload"));
        }
    }
}
