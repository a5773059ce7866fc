//! `download.cleanup`: removes regular files from the cache directory that were last modified
//! at least the payload's age ago, keeping those the payload says are still referenced.
//!
//! It looks at the cache directory only, never below it, and never follows a symbolic link:
//! whatever else lies there is left alone. A file removed meanwhile by someone else is simply
//! not counted. It stops between two files when told to.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jobwire::{HandlerError, JobContext, Progress};

use super::{Downloads, io_failure};
use crate::{invalid_payload, pb, stopped};

/// The age used when the payload leaves `older_than_days` at 0: the seed's sample value. A
/// bare payload must not mean "remove everything".
const DEFAULT_MAX_AGE_DAYS: u64 = 30;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Runs one attempt of a `download.cleanup` job.
///
/// # Errors
///
/// Fatal for a negative age; retryable for I/O failures and stops (what was removed before
/// stays removed, and the next attempt carries on).
pub async fn run(
    ctx: JobContext,
    job: pb::DownloadCleanup,
    downloads: Arc<Downloads>,
) -> Result<pb::DownloadCleanupOutput, HandlerError> {
    let days = match u64::try_from(job.older_than_days) {
        Ok(0) => DEFAULT_MAX_AGE_DAYS,
        Ok(days) => days,
        Err(_) => {
            return Err(invalid_payload(format!(
                "older_than_days {} is negative",
                job.older_than_days
            )));
        }
    };
    let max_age = DAY * u32::try_from(days).unwrap_or(u32::MAX);
    // Names, not paths: a referenced path counts by its file name, as the cache is flat.
    let referenced: HashSet<String> = job
        .referenced_filenames
        .iter()
        .filter_map(|r| Path::new(r).file_name()?.to_str().map(str::to_owned))
        .collect();

    let dir = downloads.ensure_dir().await?;
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(&dir)
        .await
        .map_err(|e| io_failure("listing", &dir, &e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| io_failure("listing", &dir, &e))?
    {
        // `DirEntry::metadata` does not follow links, so a link is not a file here.
        let metadata = entry
            .metadata()
            .await
            .map_err(|e| io_failure("inspecting", &entry.path(), &e))?;
        if !metadata.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            ctx.warn(format!("skipping {}: not UTF-8", entry.path().display()));
            continue;
        };
        files.push((name, metadata));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    ctx.info(format!(
        "cleaning {}: {} files, removing those older than {days} days{}",
        dir.display(),
        files.len(),
        if job.only_unreferenced {
            format!(" unless referenced ({} names)", referenced.len())
        } else {
            String::new()
        }
    ));

    let now = SystemTime::now();
    let total = files.len() as u64;
    let mut output = pb::DownloadCleanupOutput::default();
    for (done, (name, metadata)) in (0u64..).zip(files) {
        if ctx.is_cancelled() {
            return Err(stopped(&ctx));
        }
        ctx.progress(Progress::items(done, total).stage("cleanup"));
        // A file without a modification time, or one from the future, counts as new.
        let age = metadata
            .modified()
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .unwrap_or_default();
        if age < max_age {
            output.kept.push(name);
            continue;
        }
        if job.only_unreferenced && referenced.contains(&name) {
            ctx.info(format!("keeping {name}: referenced"));
            output.kept.push(name);
            continue;
        }
        let path = dir.join(&name);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                ctx.info(format!(
                    "removed {name} ({} bytes, {} days old)",
                    metadata.len(),
                    age.as_secs() / DAY.as_secs()
                ));
                output.bytes_freed += metadata.len();
                output.removed.push(name);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure("removing", &path, &e)),
        }
    }
    ctx.progress(Progress::items(total, total).stage("cleanup"));
    ctx.info(format!(
        "removed {} files ({} bytes), kept {}",
        output.removed.len(),
        output.bytes_freed,
        output.kept.len()
    ));
    Ok(output)
}
