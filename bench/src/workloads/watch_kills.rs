//! WK: every watcher's delivered events against the event log, over more than 1,000,000 events,
//! while replicas are killed (SIGKILL) and restarted throughout.
//!
//! Three replicas on one database. The worker (20 slots) stays on the first; producers enqueue
//! [`JOBS`] no-op jobs in chunks spread over all three (3 events each: available, running,
//! succeeded); [`WATCHERS`] WatchJobs streams from sequence 0 are spread over the other two,
//! which are killed in turn every [`KILL_EVERY`] and restarted where they were. A watcher whose
//! replica dies resumes after the last sequence it received, on another replica (invariant 5).
//! At the end each watcher's sequences must be the log's, in order, once: `missing`,
//! `duplicated` and `out_of_order` must all be 0.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use jobwire_proto::v1::{self as pb, job_service_client::JobServiceClient};
use sqlx::Connection;
use tokio::time::Instant;

use super::Report;
use crate::{
    cluster::{Postgres, Server, WorkerProcess, channel},
    ledger::Ledger,
    worker::Handler,
};

const JOBS: usize = 340_000;
const CHUNK: usize = 1_000;
const WATCHERS: usize = 4;
const SLOTS: usize = 20;
const KILL_EVERY: Duration = Duration::from_secs(4);
/// How long the watchers have, once every job has settled, to reach the log's last event.
const CATCH_UP: Duration = Duration::from_secs(120);

/// What one watcher received, and how often it had to resume.
#[derive(Default)]
struct Received {
    sequences: Vec<i64>,
    resumes: usize,
}

pub async fn run(pg: &Postgres, prefetch: usize) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_wk").await?;
    let stable = Server::start(&url, &[])?;
    let mut victims = [Server::start(&url, &[])?, Server::start(&url, &[])?];
    let urls: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(victims.iter().map(|s| s.url.clone()).collect()));
    let mut worker = WorkerProcess::start(&stable, Handler::Noop, (SLOTS, prefetch), None)?;
    let done = Arc::new(AtomicBool::new(false));

    let received: Vec<Arc<Mutex<Received>>> = (0..WATCHERS)
        .map(|_| Arc::new(Mutex::new(Received::default())))
        .collect();
    let mut watchers = Vec::new();
    for (i, record) in received.iter().enumerate() {
        let (urls, done, record) = (urls.clone(), done.clone(), record.clone());
        watchers.push(tokio::spawn(watch(i, urls, done, record)));
    }

    let producer = {
        let all: Vec<String> = std::iter::once(stable.url.clone())
            .chain(victims.iter().map(|s| s.url.clone()))
            .collect();
        tokio::spawn(produce(all))
    };
    let started = Instant::now();
    let kills = AtomicUsize::new(0);
    let mut next = 0;
    while !producer.is_finished() {
        tokio::time::sleep(KILL_EVERY).await;
        let victim = &mut victims[next % 2];
        let addr = victim.url.trim_start_matches("http://").to_owned();
        victim.kill();
        kills.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        *victim = restart(&addr, &url).await?;
        next += 1;
    }
    producer.await.context("the producer")??;
    let mut ledger = Ledger::connect(&url).await?;
    worker.while_running(ledger.wait_until_settled()).await?;
    let elapsed = started.elapsed();
    let log = log_sequences(&url).await?;
    let last = log.last().copied().unwrap_or(0);
    let deadline = Instant::now() + CATCH_UP;
    while received.iter().any(|r| {
        r.lock()
            .map(|r| r.sequences.last().copied().unwrap_or(0) < last)
            .unwrap_or(false)
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "watchers did not reach the log's last event ({last}) within {CATCH_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Relaxed);
    for watcher in watchers {
        watcher.abort();
    }
    worker.stop().await?;

    let mut report = super::report("WK", JOBS);
    report.insert("events".into(), log.len().into());
    report.insert("replica_kills".into(), kills.load(Ordering::Relaxed).into());
    report.insert("elapsed_s".into(), elapsed.as_secs().into());
    let mut lost = 0;
    let mut per_watcher = Vec::new();
    for record in &received {
        let record = record.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let check = compare(&log, &record.sequences);
        lost += check.missing + check.duplicated + check.out_of_order;
        per_watcher.push(serde_json::json!({
            "received": record.sequences.len(),
            "resumes": record.resumes,
            "missing": check.missing,
            "duplicated": check.duplicated,
            "out_of_order": check.out_of_order,
        }));
    }
    report.insert("watchers".into(), per_watcher.into());
    report.insert(
        "events_missing_duplicated_or_out_of_order".into(),
        lost.into(),
    );
    drop(stable);
    anyhow::ensure!(
        lost == 0,
        "watchers missed, repeated or reordered events: {report:?}"
    );
    Ok(report)
}

/// A killed replica's port may stay taken for a moment.
async fn restart(addr: &str, url: &str) -> anyhow::Result<Server> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Server::start_at(addr, url, &[]) {
            Ok(server) => return Ok(server),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "restarting a replica");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Enqueues the jobs in chunks, each to the next replica; a chunk whose replica died is sent
/// to another (it may have committed too: the log is the truth either way).
async fn produce(urls: Vec<String>) -> anyhow::Result<()> {
    let spec = pb::JobSpec {
        job_type: "bench.noop".into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/jobwire.bench.Noop".into(),
            value: vec![],
        }),
        ..Default::default()
    };
    for chunk in 0..JOBS / CHUNK {
        let mut tries = 0;
        loop {
            let url = &urls[(chunk + tries) % urls.len()];
            let sent = async {
                let mut client = JobServiceClient::new(channel(url).await?);
                client
                    .enqueue_jobs(pb::EnqueueJobsRequest {
                        parent: Default::default(),
                        jobs: vec![spec.clone(); CHUNK],
                    })
                    .await?;
                anyhow::Ok(())
            }
            .await;
            match sent {
                Ok(()) => break,
                Err(error) => {
                    tries += 1;
                    anyhow::ensure!(tries < 50, "enqueue kept failing: {error:#}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    Ok(())
}

/// Watches every event from 0, resuming after the last one received on whichever replica
/// answers, until told to stop.
async fn watch(
    index: usize,
    urls: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    record: Arc<Mutex<Received>>,
) {
    let mut attempt = index;
    while !done.load(Ordering::Relaxed) {
        let url = match urls.lock() {
            Ok(urls) => urls[attempt % urls.len()].clone(),
            Err(_) => return,
        };
        attempt += 1;
        let after = record
            .lock()
            .map(|r| r.sequences.last().copied().unwrap_or(0))
            .unwrap_or(0);
        let stream = async {
            let mut client = JobServiceClient::new(channel(&url).await?);
            Ok::<_, anyhow::Error>(
                client
                    .watch_jobs(pb::WatchJobsRequest {
                        after_sequence: after,
                        ..Default::default()
                    })
                    .await?
                    .into_inner(),
            )
        }
        .await;
        let Ok(mut stream) = stream else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while let Ok(Some(message)) = stream.message().await {
            if let Some(event) = message.event
                && let Ok(mut record) = record.lock()
            {
                record.sequences.push(event.sequence);
            }
        }
        if let Ok(mut record) = record.lock() {
            record.resumes += 1;
        }
    }
}

async fn log_sequences(url: &str) -> anyhow::Result<Vec<i64>> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    Ok(
        sqlx::query_scalar("SELECT seq FROM job_events ORDER BY seq")
            .fetch_all(&mut conn)
            .await?,
    )
}

#[derive(Debug, Default, PartialEq)]
struct Check {
    missing: usize,
    duplicated: usize,
    out_of_order: usize,
}

/// How a watcher's sequences differ from the log's: events of the log it never got, events it
/// got more than once, and events that came after a later one.
fn compare(log: &[i64], received: &[i64]) -> Check {
    let mut check = Check::default();
    let mut highest = i64::MIN;
    let mut seen = std::collections::HashSet::with_capacity(received.len());
    for &seq in received {
        if !seen.insert(seq) {
            check.duplicated += 1;
        } else if seq < highest {
            check.out_of_order += 1;
        }
        highest = highest.max(seq);
    }
    check.missing = log.iter().filter(|seq| !seen.contains(seq)).count();
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watchers_events_are_checked_against_the_log() {
        assert_eq!(compare(&[1, 2, 3], &[1, 2, 3]), Check::default());
        assert_eq!(
            compare(&[1, 2, 3, 4], &[1, 3, 2, 3]),
            Check {
                missing: 1,
                duplicated: 1,
                out_of_order: 1
            }
        );
    }
}
