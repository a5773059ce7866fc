//! `download.fetch`: an HTTP GET whose body is streamed into the cache directory, hashed on the
//! way, with a progress report per chunk.
//!
//! The body never sits in memory whole: each frame is hashed, written and dropped. Progress is
//! reported for every frame, which is cheap (the worker sends only the latest value per
//! progress interval). A stop request ends the transfer between two frames and removes the
//! partial file. Only plain HTTP is spoken, which cannot authenticate its source, so a fetch
//! needs `allow_untrusted_source`.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper::header::USER_AGENT;
use hyper::{Request, StatusCode, Uri};
use jobwire::{HandlerError, JobContext, Progress};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{Downloads, io_failure, plain_file_name};
use crate::{invalid_payload, pb, stopped};

/// Sent with every request, so a server's logs can tell these fetches apart.
const AGENT: &str = concat!("jobwire-catalog/", env!("CARGO_PKG_VERSION"));

/// Runs one attempt of a `download.fetch` job.
///
/// # Errors
///
/// Fatal for a payload that cannot work (a bad URL or name, HTTPS, an untrusted source without
/// leave) and for 4xx answers; retryable for connection failures, 5xx (and 408, 429), a body
/// cut short, I/O failures and stops.
pub async fn run(
    ctx: JobContext,
    job: pb::DownloadFetch,
    downloads: Arc<Downloads>,
) -> Result<pb::DownloadFetchOutput, HandlerError> {
    let url = job.source_url.as_str();
    let uri: Uri = url
        .parse()
        .map_err(|e| invalid_payload(format!("source_url {url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(HandlerError::fatal(format!(
                "{url}: this example worker speaks plain HTTP only"
            ))
            .with_kind("unsupported_scheme"));
        }
        _ => {
            return Err(invalid_payload(format!(
                "source_url {url:?} is not an http URL"
            )));
        }
    }
    if !job.allow_untrusted_source {
        return Err(HandlerError::fatal(format!(
            "{url}: plain HTTP cannot authenticate its source; \
             set allow_untrusted_source to fetch it anyway"
        ))
        .with_kind("untrusted_source"));
    }
    let name = match job.target_filename.as_str() {
        "" => format!("url-{:x}", Sha256::digest(url.as_bytes())),
        name => plain_file_name(name)?.to_owned(),
    };

    let dir = downloads.ensure_dir().await?;
    let path = dir.join(&name);
    // Per job, so that two fetches of one name never write into the same file.
    let part = dir.join(format!(".{name}.{}.part", ctx.job_id()));
    ctx.info(format!("fetching {url} into {}", path.display()));

    let request = Request::get(uri)
        .header(USER_AGENT, AGENT)
        .body(Empty::new())
        .map_err(|e| invalid_payload(format!("source_url {url:?}: {e}")))?;
    let response = tokio::select! {
        () = ctx.cancelled() => return Err(stopped(&ctx)),
        response = downloads.http.request(request) => response.map_err(|e| {
            let cause = HandlerError::from(e);
            HandlerError::retryable(format!("GET {url}: {}", cause.message())).with_kind("http_request")
        })?,
    };
    let status = response.status();
    if !status.is_success() {
        ctx.warn(format!("GET {url}: HTTP {status}"));
        return Err(status_failure(url, status));
    }

    let body = response.into_body();
    let total = body.size_hint().exact();
    let (size, sha256) = match stream_into(&ctx, body, &part, total).await {
        Ok(done) => done,
        Err(error) => {
            // Best effort: a leftover `.part` file is only litter, which a cleanup removes.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(error);
        }
    };
    tokio::fs::rename(&part, &path)
        .await
        .map_err(|e| io_failure("moving into place", &path, &e))?;
    ctx.info(format!("fetched {size} bytes, sha256 {sha256}"));
    if !job.checksum_sha256.is_empty() {
        ctx.info("an expected checksum was given: a download.verify must check it");
    }
    Ok(pb::DownloadFetchOutput {
        path: path.display().to_string(),
        size_bytes: size,
        sha256,
        software_id: job.software_id,
    })
}

/// The failure an unsuccessful status means: the server's own trouble and "too many" or "too
/// slow" may pass, so they are retryable; anything else (a 4xx, or a redirect, which is not
/// followed) will not change on a retry.
fn status_failure(url: &str, status: StatusCode) -> HandlerError {
    let message = format!("GET {url}: HTTP {status}");
    let passing = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    let error = if passing {
        HandlerError::retryable(message)
    } else {
        HandlerError::fatal(message)
    };
    error.with_kind("http_status")
}

/// Writes `body` into `part`, hashing it and reporting progress per frame; returns the size
/// and the lowercase-hex SHA-256.
async fn stream_into(
    ctx: &JobContext,
    mut body: Incoming,
    part: &Path,
    total: Option<u64>,
) -> Result<(u64, String), HandlerError> {
    let mut file = tokio::fs::File::create(part)
        .await
        .map_err(|e| io_failure("creating", part, &e))?;
    let mut hasher = Sha256::new();
    let mut done: u64 = 0;
    ctx.progress(progress(done, total));
    loop {
        let frame = tokio::select! {
            () = ctx.cancelled() => return Err(stopped(ctx)),
            frame = body.frame() => frame,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            HandlerError::retryable(format!("reading the body after {done} bytes: {e}"))
                .with_kind("http_body")
        })?;
        // Trailers carry no bytes of the file.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        hasher.update(&data);
        file.write_all(&data)
            .await
            .map_err(|e| io_failure("writing", part, &e))?;
        done += data.len() as u64;
        ctx.progress(progress(done, total));
    }
    file.sync_all()
        .await
        .map_err(|e| io_failure("syncing", part, &e))?;
    if let Some(total) = total
        && done != total
    {
        return Err(HandlerError::retryable(format!(
            "the body ended after {done} of {total} bytes"
        ))
        .with_kind("http_body"));
    }
    Ok((done, format!("{:x}", hasher.finalize())))
}

/// The progress of a transfer: bytes as items when the length is known (which gives the
/// fraction too), else only the count so far.
fn progress(done: u64, total: Option<u64>) -> Progress {
    match total {
        Some(total) => Progress::items(done, total)
            .stage("download")
            .message(format!("{done} of {total} bytes")),
        None => Progress::indeterminate()
            .stage("download")
            .message(format!("{done} bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_trouble_is_retried_and_client_errors_are_not() {
        for (code, retryable) in [(500, true), (503, true), (429, true), (408, true)] {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(
                status_failure("u", status).is_retryable(),
                retryable,
                "{code}"
            );
        }
        for code in [404, 403, 400, 301] {
            let status = StatusCode::from_u16(code).expect("status");
            assert!(!status_failure("u", status).is_retryable(), "{code}");
        }
        let error = status_failure("http://x/y", StatusCode::NOT_FOUND);
        assert_eq!(error.kind(), Some("http_status"));
        assert!(error.message().contains("404"));
    }

    #[test]
    fn known_lengths_give_a_fraction() {
        assert_eq!(progress(512, Some(2048)).to_fraction(), Some(0.25));
        assert_eq!(progress(512, None).to_fraction(), None);
    }
}
