//! The three download jobs and the cache directory they share.
//!
//! - [`fetch`]: `download.fetch`, an HTTP GET streamed into the cache, with progress.
//! - [`verify`]: `download.verify`, a SHA-256 check of an artifact in the cache.
//! - [`cleanup`]: `download.cleanup`, removal of stale, unreferenced artifacts.
//!
//! Every file these handlers touch lies in the cache directory: a payload naming a path outside
//! it is refused, so a job cannot make the worker read or delete anything else. A fetch writes
//! to a hidden `.part` file of its own and renames it into place, so a reader never sees half a
//! file and two fetches of one name do not mix their bytes.

pub mod cleanup;
pub mod fetch;
pub mod verify;

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use jobwire::HandlerError;
use sha2::{Digest, Sha256};

use crate::invalid_payload;

/// The HTTP client of the fetches: plain HTTP/1, bodiless requests.
type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// What the download handlers share: the cache directory and one HTTP client, whose connection
/// pool then serves every fetch of the worker.
#[derive(Debug, Clone)]
pub struct Downloads {
    /// Where artifacts live, as configured; created on first use.
    dir: PathBuf,
    http: HttpClient,
}

impl Downloads {
    /// Handlers keeping their files in `dir`. Nothing is created until a job runs.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The cache directory as configured.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the cache directory if needed and returns its canonical path, against which
    /// payload paths are checked.
    async fn ensure_dir(&self) -> Result<PathBuf, HandlerError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| io_failure("creating the cache directory", &self.dir, &e))?;
        tokio::fs::canonicalize(&self.dir)
            .await
            .map_err(|e| io_failure("resolving the cache directory", &self.dir, &e))
    }

    /// The canonical path of `artifact` (absolute, or relative to the cache directory), which
    /// must exist and lie inside the cache directory.
    async fn resolve(&self, artifact: &str) -> Result<PathBuf, HandlerError> {
        if artifact.is_empty() {
            return Err(invalid_payload("artifact_path is empty"));
        }
        let dir = self.ensure_dir().await?;
        let path = tokio::fs::canonicalize(dir.join(artifact))
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    HandlerError::fatal(format!("artifact {artifact} does not exist"))
                        .with_kind("artifact_missing")
                }
                _ => io_failure("resolving", Path::new(artifact), &e),
            })?;
        if !path.starts_with(&dir) {
            return Err(invalid_payload(format!(
                "artifact {artifact} lies outside the cache directory {}",
                dir.display()
            )));
        }
        Ok(path)
    }
}

/// A file name for the cache: one plain path component, not hidden (hidden names are the
/// fetches' `.part` files), at most 255 bytes.
fn plain_file_name(name: &str) -> Result<&str, HandlerError> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0']);
    if plain {
        Ok(name)
    } else {
        Err(invalid_payload(format!(
            "target_filename {name:?} must be a plain file name (no separators, not hidden)"
        )))
    }
}

/// An I/O failure: retryable (a full disk or a permission may be fixed), naming what failed.
fn io_failure(what: &str, path: &Path, error: &io::Error) -> HandlerError {
    HandlerError::retryable(format!("{what} {}: {error}", path.display())).with_kind("io")
}

/// The size and lowercase-hex SHA-256 of a file, read on the blocking pool.
async fn sha256_file(path: PathBuf) -> io::Result<(u64, String)> {
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let size = io::copy(&mut file, &mut hasher)?;
        Ok((size, format!("{:x}", hasher.finalize())))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_accepted() {
        assert!(plain_file_name("git.exe").is_ok());
        for bad in ["", ".hidden", "../x", "a/b", "a\\b", ".."] {
            assert!(plain_file_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn paths_outside_the_cache_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = root.path().join("cache");
        std::fs::create_dir(&cache).expect("cache");
        std::fs::write(cache.join("in.bin"), b"x").expect("inside");
        std::fs::write(root.path().join("out.bin"), b"x").expect("outside");
        let downloads = Downloads::new(cache.clone());

        let inside = downloads.resolve("in.bin").await.expect("resolves");
        assert!(inside.ends_with("cache/in.bin"));
        let escape = downloads.resolve("../out.bin").await.expect_err("refused");
        assert_eq!(escape.kind(), Some("invalid_payload"));
        let absolute = root.path().join("out.bin");
        let escape = downloads
            .resolve(absolute.to_str().expect("utf-8"))
            .await
            .expect_err("refused");
        assert_eq!(escape.kind(), Some("invalid_payload"));
        let missing = downloads.resolve("nope.bin").await.expect_err("missing");
        assert_eq!(missing.kind(), Some("artifact_missing"));
        assert!(!missing.is_retryable());
    }

    #[tokio::test]
    async fn a_file_hashes_to_its_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").expect("write");
        let (size, digest) = sha256_file(path).await.expect("hashed");
        assert_eq!(size, 3);
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
