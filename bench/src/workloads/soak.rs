//! SOAK: a long run at a fixed load with retention short enough that the pruner works
//! throughout, to show that latency and the tables' sizes stay flat (issue 30): the bloat that
//! grows under PostgreSQL-backed queues shows only over time.
//!
//! One server runs with `--retention` (a minute by default), `--event-partition-interval` as
//! long, and a pruner pass every ten seconds; a worker subprocess (20 slots) runs [`Stamp`] jobs.
//! First W3's rate is measured briefly on it (8 producers enqueue 10,000 jobs back to back, from
//! the first enqueue to the first poll finding nothing waiting or running); then one producer
//! offers half that rate, open loop (job i issued at start + i / rate, each call on its own
//! task, as W2 does), for the soak's duration.
//!
//! Each window (a minute) prints a line on stderr and adds an entry to the report: jobs
//! started per second, pick-up latency p50 and p99 of the jobs started in it (from the enqueue
//! call to the handler's start, as W2), the sizes of `jobs`, `job_events` and `job_attempts`
//! (`pg_relation_size` and `pg_indexes_size`, summed over the event log's partitions), their
//! dead tuples and the autovacuum runs so far (`pg_stat_user_tables`). At the end it compares
//! the p99 of the last five windows with the first five (fewer in a short run: half the windows
//! each; target at most 1.5 times) and the tables' total size in the last window with the first
//! window once the retention is reached (events are kept up to a partition longer; target: no
//! more than a quarter larger), and checks that every job issued started.

use std::{collections::HashSet, time::Duration};

use anyhow::{Context, bail};
use jobwire::Client;
use tokio::{
    io::{AsyncBufRead, Lines},
    sync::mpsc,
    task::JoinSet,
    time::Instant,
};

use super::Report;
use crate::{
    clock,
    cluster::{Postgres, Server, WorkerProcess},
    jobs::Stamp,
    ledger::{Ledger, Sizes},
    stats::Percentiles,
    worker::Handler,
};

const SLOTS: usize = 20;
const PRODUCERS: u64 = 8;
/// Jobs of the brief W3 that measures the rate.
const MEASURE_JOBS: u64 = 10_000;
/// The target: the last windows' p99 within this factor of the first windows'.
const P99_TARGET: f64 = 1.5;
/// The target: the last window's total size within this factor of the first steady window's.
const SIZE_TARGET: f64 = 1.25;
/// Windows compared at each end, at most.
const COMPARED: usize = 5;

/// How a soak runs (the bench's `--soak-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct SoakConfig {
    pub duration: Duration,
    pub window: Duration,
    pub retention: Duration,
}

/// One window's figures.
struct Window {
    index: usize,
    started: usize,
    latencies: Percentiles,
    sizes: Sizes,
}

impl Window {
    fn to_json(&self, window: Duration) -> serde_json::Value {
        let mut object = Report::new();
        object.insert("window".into(), (self.index + 1).into());
        object.insert(
            "jobs_per_s".into(),
            super::per_second(self.started, window).into(),
        );
        self.latencies.write_as("pickup_", &mut object);
        self.sizes.write_to(&mut object);
        serde_json::Value::Object(object)
    }

    fn line(&self, window: Duration) -> String {
        let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
        let s = &self.sizes;
        format!(
            "soak window {:>3}: {:>7.1} jobs/s  pickup p50 {:>7.2} ms  p99 {:>8.2} ms  \
             jobs {:.1}+{:.1} MiB  events {:.1}+{:.1} MiB ({} partitions)  attempts {:.1}+{:.1} \
             MiB  dead tuples {}/{}/{}  autovacuums {}/{}/{}",
            self.index + 1,
            super::per_second(self.started, window),
            self.latencies.p50,
            self.latencies.p99,
            mib(s.jobs.table),
            mib(s.jobs.indexes),
            mib(s.events.table),
            mib(s.events.indexes),
            s.event_partitions,
            mib(s.attempts.table),
            mib(s.attempts.indexes),
            s.jobs.dead_tuples,
            s.events.dead_tuples,
            s.attempts.dead_tuples,
            s.jobs.autovacuums,
            s.events.autovacuums,
            s.attempts.autovacuums,
        )
    }
}

pub async fn run(pg: &Postgres, prefetch: usize, config: SoakConfig) -> anyhow::Result<Report> {
    if config.window.is_zero() || config.duration < config.window {
        bail!("--soak-duration must hold at least one --soak-window");
    }
    let url = pg.fresh_database("jobwire_bench_soak").await?;
    let retention = format!("{}ms", config.retention.as_millis());
    let server = Server::start(
        &url,
        &[
            "--retention",
            &retention,
            "--event-partition-interval",
            &retention,
            "--prune-interval",
            "10s",
        ],
    )?;
    let mut ledger = Ledger::connect(&url).await?;
    let mut worker = WorkerProcess::start(&server, Handler::Stamp, (SLOTS, prefetch), None)?;
    let (starts_tx, mut starts) = mpsc::unbounded_channel();
    let reader = tokio::spawn(forward_starts(worker.lines()?, starts_tx));
    let client = server.client().await?;
    worker
        .while_running(async {
            client.enqueue(stamp(0)).await?.wait().await?;
            Ok(())
        })
        .await?;

    // W3, briefly: its rate, of which the soak offers half.
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        producers.push(server.client().await?);
    }
    let start = Instant::now();
    worker
        .while_running(async {
            let mut tasks = JoinSet::new();
            for (n, client) in (0..).zip(producers) {
                tasks.spawn(async move {
                    for i in 0..MEASURE_JOBS / PRODUCERS {
                        client.enqueue(stamp(1 + n * MEASURE_JOBS + i)).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            Ok(())
        })
        .await?;
    let settled = worker.while_running(ledger.wait_until_settled()).await?;
    let w3_rate = MEASURE_JOBS as f64 / (settled - start).as_secs_f64();
    let rate = w3_rate / 2.0;
    eprintln!("soak: W3 ran {w3_rate:.1} jobs/s; offering {rate:.1} jobs/s");
    // The measurement's starts are not the soak's.
    while starts.try_recv().is_ok() {}

    let first_seq = 1 + PRODUCERS * MEASURE_JOBS;
    let soak_start = Instant::now();
    let producer = tokio::spawn(offer(client.clone(), rate, first_seq, config.duration));
    let mut windows = Vec::new();
    let mut seen = HashSet::new();
    let mut current = Vec::new();
    let mut started_in_window = 0;
    let mut ticks = tokio::time::interval_at(soak_start + config.window, config.window);
    let window_count = usize::try_from(config.duration.as_nanos() / config.window.as_nanos())?;
    while windows.len() < window_count {
        tokio::select! {
            _ = ticks.tick() => {
                let latencies = Percentiles::of(&mut current)
                    .context("no job started in a window")?;
                let window = Window {
                    index: windows.len(),
                    started: started_in_window,
                    latencies,
                    sizes: ledger.sizes().await?,
                };
                eprintln!("{}", window.line(config.window));
                windows.push(window);
                current.clear();
                started_in_window = 0;
            }
            start = starts.recv() => {
                let (seq, latency) = start.context("the worker's stdout ended")?;
                if seq >= first_seq && seen.insert(seq) {
                    current.push(latency);
                    started_in_window += 1;
                }
            }
        }
    }
    let issued = producer.await??;
    // Every job issued starts: the pruner took none before it ran.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (seen.len() as u64) < issued {
        let start = tokio::time::timeout_at(deadline, starts.recv())
            .await
            .with_context(|| format!("{} of {issued} jobs started", seen.len()))?;
        let (seq, _) = start.context("the worker's stdout ended")?;
        if seq >= first_seq {
            seen.insert(seq);
        }
    }
    worker.stop().await?;
    reader.abort();

    let mut report = super::report("SOAK", usize::try_from(issued)?);
    report.insert("w3_jobs_per_s".into(), round(w3_rate).into());
    report.insert("offered_per_s".into(), round(rate).into());
    report.insert(
        "duration_s".into(),
        round(soak_start.elapsed().as_secs_f64()).into(),
    );
    report.insert(
        "retention_s".into(),
        round(config.retention.as_secs_f64()).into(),
    );
    let compared = COMPARED.min(windows.len() / 2).max(1);
    let p99 = |ws: &[Window]| ws.iter().map(|w| w.latencies.p99).fold(0.0, f64::max);
    let first_p99 = p99(&windows[..compared]);
    let last_p99 = p99(&windows[windows.len() - compared..]);
    report.insert("windows_compared".into(), compared.into());
    report.insert("first_p99_ms".into(), round(first_p99).into());
    report.insert("last_p99_ms".into(), round(last_p99).into());
    let p99_ratio = last_p99 / first_p99.max(1e-9);
    report.insert("p99_ratio".into(), round(p99_ratio).into());
    report.insert("p99_within_target".into(), (p99_ratio <= P99_TARGET).into());
    // Sizes settle once a job's whole life (retention) and then its events' partition have
    // passed: the first window that starts after both.
    let steady_from = usize::try_from(
        (config.retention * 2)
            .as_nanos()
            .div_ceil(config.window.as_nanos()),
    )?;
    match windows.get(steady_from) {
        Some(first) if windows.len() > steady_from + 1 => {
            let last = &windows[windows.len() - 1];
            let growth = last.sizes.total() as f64 / first.sizes.total().max(1) as f64;
            report.insert("steady_from_window".into(), (steady_from + 1).into());
            report.insert("size_growth".into(), round(growth).into());
            report.insert("sizes_flat".into(), (growth <= SIZE_TARGET).into());
        }
        _ => {
            report.insert("sizes_flat".into(), serde_json::Value::Null);
        }
    }
    report.insert(
        "windows".into(),
        windows
            .iter()
            .map(|w| w.to_json(config.window))
            .collect::<Vec<_>>()
            .into(),
    );
    super::insert_peak_rss(&mut report, [&server]);
    Ok(report)
}

fn stamp(seq: u64) -> Stamp {
    Stamp {
        seq,
        enqueued_unix_nanos: clock::unix_nanos(),
    }
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Issues jobs at `rate` a second from `first_seq` on, open loop, for `duration`; returns how
/// many.
async fn offer(
    client: Client,
    rate: f64,
    first_seq: u64,
    duration: Duration,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut calls = JoinSet::new();
    let mut issued = 0_u64;
    loop {
        let at = start + spacing.mul_f64(issued as f64);
        if at >= start + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        calls.spawn(client.enqueue(stamp(first_seq + issued)).send());
        issued += 1;
        while let Some(done) = calls.try_join_next() {
            done??;
        }
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    Ok(issued)
}

/// Passes the worker's start lines on as (job, pick-up latency) until its stdout ends.
async fn forward_starts(
    mut lines: Lines<impl AsyncBufRead + Unpin>,
    starts: mpsc::UnboundedSender<(u64, Duration)>,
) -> anyhow::Result<()> {
    while let Some(line) = lines.next_line().await? {
        if starts
            .send(super::pickup_latency::parse_start(&line)?)
            .is_err()
        {
            break;
        }
    }
    Ok(())
}
