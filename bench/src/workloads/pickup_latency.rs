//! W2: pick-up latency. With a worker subprocess idle and connected (20 slots, proven by a
//! warm-up job that ran), one producer connection enqueues 2,000 single jobs with `EnqueueJob`
//! on an open-loop schedule of 200/s: job i is issued at start + i × 5 ms whatever the earlier
//! calls are doing, each call on its own task, so a slow reply never delays the schedule.
//!
//! Each payload carries the wall-clock time its call was issued; the handler prints it with
//! the time it started (`start <seq> <enqueued> <started>` on the worker's stdout, see
//! `crate::worker`), and the latency is the difference, as the Graphile peer measures it. A job
//! run twice counts once, at its first start. The database must then hold the 2,000 jobs and
//! the warm-up, all succeeded. `rate_actual` is the achieved arrival rate (jobs over the time
//! from the first call to the last reply).

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, bail};
use jobwire::Client;
use tokio::{
    io::{AsyncBufRead, Lines},
    task::JoinSet,
    time::Instant,
};

use super::Report;
use crate::{
    clock,
    cluster::{Postgres, Server, WorkerProcess},
    jobs::Stamp,
    ledger::Ledger,
    stats::Percentiles,
    worker::Handler,
};

const JOBS: u64 = 2_000;
/// 200 jobs/s.
const SPACING: Duration = Duration::from_millis(5);
const SLOTS: usize = 20;

pub async fn run(pg: &Postgres) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_w2").await?;
    let server = Server::start(&url, &[])?;
    let mut ledger = Ledger::connect(&url).await?;
    let mut worker = WorkerProcess::start(&server, Handler::Stamp, (SLOTS, 0), None)?;
    let lines = worker.lines()?;
    let client = server.client().await?;

    worker
        .while_running(async {
            let warm_up = Stamp {
                seq: 0,
                enqueued_unix_nanos: clock::unix_nanos(),
            };
            client.enqueue(warm_up).await?.wait().await?;
            Ok(())
        })
        .await?;
    let (rate_actual, mut latencies) = worker
        .while_running(async { tokio::try_join!(produce(&client), collect_starts(lines)) })
        .await?;
    worker.while_running(ledger.wait_until_settled()).await?;
    let jobs = usize::try_from(JOBS)?;
    ledger.ensure_succeeded(jobs + 1).await?;
    worker.stop().await?;

    let mut report = super::report("W2", jobs);
    report.insert("rate_actual".into(), rate_actual.into());
    Percentiles::of(&mut latencies)
        .context("no latencies")?
        .write_to(&mut report);
    super::insert_peak_rss(&mut report, [&server]);
    Ok(report)
}

/// Issues the enqueues on schedule and returns the achieved rate.
async fn produce(client: &Client) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut calls = JoinSet::new();
    for seq in 1..=JOBS {
        tokio::time::sleep_until(start + SPACING * u32::try_from(seq - 1)?).await;
        let job = Stamp {
            seq,
            enqueued_unix_nanos: clock::unix_nanos(),
        };
        calls.spawn(client.enqueue(job).send());
        while let Some(done) = calls.try_join_next() {
            done??;
        }
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    Ok(super::per_second(usize::try_from(JOBS)?, start.elapsed()))
}

/// Reads the worker's start lines until every measured job has started once.
async fn collect_starts(
    mut lines: Lines<impl AsyncBufRead + Unpin>,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = HashMap::new();
    while latencies.len() < usize::try_from(JOBS)? {
        let line = lines
            .next_line()
            .await?
            .context("the worker's stdout ended")?;
        let (seq, latency) = parse_start(&line)?;
        if (1..=JOBS).contains(&seq) {
            latencies.entry(seq).or_insert(latency);
        }
    }
    Ok(latencies.into_values().collect())
}

/// `start <seq> <enqueued_unix_nanos> <started_unix_nanos>` → the job and its latency.
pub(super) fn parse_start(line: &str) -> anyhow::Result<(u64, Duration)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let ["start", seq, enqueued, started] = fields[..] else {
        bail!("unexpected line from the worker: {line:?}");
    };
    Ok((
        seq.parse()?,
        clock::between(enqueued.parse()?, started.parse()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_lines_parse() {
        let (seq, latency) = parse_start("start 7 1000 4500").expect("a start line");
        assert_eq!((seq, latency), (7, Duration::from_nanos(3500)));
        assert!(parse_start("start 7 1000").is_err());
        assert!(parse_start("begin 7 1000 4500").is_err());
    }
}
