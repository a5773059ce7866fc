//! W4: 500 `WatchJob` streams on running jobs. 500 jobs are enqueued, a stream is opened on each
//! (spread over a few connections, under HTTP/2's usual 200-stream limit per connection) and
//! has delivered its first event before a worker subprocess with 500 slots starts; each handler
//! then reports progress 10 times, 50 ms apart, and succeeds.
//!
//! The worker's progress interval is 1 ms (the SDK's default, 100 ms, would coalesce reports
//! this close), so every report travels. Each report carries the wall-clock time the handler
//! made it; its delivery latency runs from there to the watcher's receipt. `events_lost` is,
//! summed over jobs, the progress events stored in the database that the job's watcher did not
//! receive; a stream the server ends as too slow (`RESOURCE_EXHAUSTED`) is resumed after its
//! last sequence, as the SDK does, and counted in `watch_resumes`. `streams_unterminated`
//! counts streams that did not end right after their job's terminal state change.
//!
//! Every handler makes its first report as it starts, so the first wave meets the start of 500
//! jobs (their claim, their leases, 500 RUNNING events to the watchers) and, with 500 of the
//! 5,000 events, sets the p99 on its own: `first_wave_p50_ms` .. and `later_waves_p50_ms` ..
//! give the two apart. The span from the worker's start to the last stream's end is a
//! [`Window`] of the cores' time.
//!
//! `to_statement_p50_ms` .. `to_statement_max_ms` split the latency: from each report to the
//! start of the statement that stored it (the stored event's `created_at`), so the rest is the
//! statement, its commit and the delivery. Its percentiles are of all stored reports, not of the
//! delivered events' own first stages, so the two sets do not subtract.

use std::time::Duration;

use anyhow::{Context, bail};
use jobwire_proto::v1::{self as pb, job_event::Event, job_service_client::JobServiceClient};
use tokio::{sync::mpsc, task::JoinSet};
use tonic::transport::Channel;

use super::Report;
use crate::{
    clock,
    cluster::{Postgres, Server, WorkerProcess, channel},
    cores::Window,
    jobs::{Beat, SENT_KEY},
    ledger::Ledger,
    stats::Percentiles,
    worker::Handler,
};

const JOBS: usize = 500;
const REPORTS: u32 = 10;
const SPACING_MS: u32 = 50;
/// Client connections the streams share.
const CONNECTIONS: usize = 4;
const PROGRESS_INTERVAL: Duration = Duration::from_millis(1);
/// How long a stream may stay open after its terminal event before it counts as unterminated.
const END_GRACE: Duration = Duration::from_secs(5);

/// What one stream delivered.
#[derive(Debug, Default)]
struct Watched {
    job_id: String,
    /// The delay of the job's first report, which its handler makes as it starts.
    first: Option<Duration>,
    /// The delays of the rest.
    later: Vec<Duration>,
    duplicates: usize,
    resumes: usize,
    ended_on_terminal: bool,
}

pub async fn run(pg: &Postgres) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_w4").await?;
    let server = Server::start(&url, &[])?;
    let mut ledger = Ledger::connect(&url).await?;
    let client = server.client().await?;
    let beat = Beat {
        reports: REPORTS,
        spacing_ms: SPACING_MS,
    };
    let enqueued = client.enqueue_many((0..JOBS).map(|_| beat.clone())).await?;

    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(channel(&server.url).await?);
    }
    let (opened, mut open_signals) = mpsc::channel(JOBS);
    let mut watchers = JoinSet::new();
    for (i, job) in enqueued.iter().enumerate() {
        let jobs = JobServiceClient::new(channels[i % CONNECTIONS].clone());
        watchers.spawn(watch(jobs, job.handle().id().to_string(), opened.clone()));
    }
    drop(opened);
    let mut open = 0;
    while open < JOBS {
        tokio::select! {
            signal = open_signals.recv() => match signal {
                Some(()) => open += 1,
                None => bail!("the watchers stopped before all were open"),
            },
            Some(done) = watchers.join_next() => {
                done??;
                bail!("a watch ended before its job ran");
            }
        }
    }

    let mut worker =
        WorkerProcess::start(&server, Handler::Beat, (JOBS, 0), Some(PROGRESS_INTERVAL))?;
    let cores = Window::open(&server, &worker);
    let watched = worker
        .while_running(async {
            let mut watched = Vec::with_capacity(JOBS);
            while let Some(done) = watchers.join_next().await {
                watched.push(done??);
            }
            Ok(watched)
        })
        .await?;
    let mut report = super::report("W4", JOBS);
    cores.close(&mut report);
    ledger.ensure_succeeded(JOBS).await?;
    let stored = ledger.progress_events().await?;
    let mut to_statement = ledger.progress_to_statement(SENT_KEY).await?;
    worker.stop().await?;

    let mut first = Vec::with_capacity(JOBS);
    let mut later = Vec::with_capacity(JOBS * (REPORTS as usize - 1));
    let (mut lost, mut duplicated, mut resumes, mut unterminated) = (0, 0, 0, 0);
    for mut one in watched {
        let stored = usize::try_from(stored.get(&one.job_id).copied().unwrap_or_default())?;
        let delivered = usize::from(one.first.is_some()) + one.later.len();
        lost += stored.saturating_sub(delivered);
        duplicated += one.duplicates;
        resumes += one.resumes;
        unterminated += usize::from(!one.ended_on_terminal);
        first.extend(one.first);
        later.append(&mut one.later);
    }
    report.insert("watchers".into(), JOBS.into());
    report.insert("progress_reports".into(), (JOBS * REPORTS as usize).into());
    report.insert(
        "progress_stored".into(),
        stored.values().sum::<i64>().into(),
    );
    let mut delays = [first.as_slice(), later.as_slice()].concat();
    report.insert("events".into(), delays.len().into());
    report.insert("events_lost".into(), lost.into());
    report.insert("events_duplicated".into(), duplicated.into());
    report.insert("watch_resumes".into(), resumes.into());
    report.insert("streams_unterminated".into(), unterminated.into());
    Percentiles::of(&mut delays)
        .context("no progress events arrived")?
        .write_to(&mut report);
    for (prefix, samples) in [("first_wave_", &mut first), ("later_waves_", &mut later)] {
        if let Some(percentiles) = Percentiles::of(samples) {
            percentiles.write_as(prefix, &mut report);
        }
    }
    Percentiles::of(&mut to_statement)
        .context("no progress events were stored")?
        .write_as("to_statement_", &mut report);
    super::insert_peak_rss(&mut report, [&server]);
    Ok(report)
}

/// Follows one job's events to its terminal state change; signals `opened` at the first event.
async fn watch(
    mut jobs: JobServiceClient<Channel>,
    job_id: String,
    opened: mpsc::Sender<()>,
) -> anyhow::Result<Watched> {
    let mut opened = Some(opened);
    let mut watched = Watched {
        job_id,
        ..Watched::default()
    };
    let mut after = 0;
    loop {
        let request = pb::WatchJobRequest {
            include_children: Default::default(),
            id: watched.job_id.clone(),
            after_sequence: after,
        };
        let mut stream = jobs.watch_job(request).await?.into_inner();
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(watched),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    watched.resumes += 1;
                    break;
                }
                Err(status) => return Err(status.into()),
            };
            let arrived = clock::unix_nanos();
            let event = message.event.context("a watch response without an event")?;
            if event.sequence <= after {
                watched.duplicates += 1;
                continue;
            }
            after = event.sequence;
            if let Some(opened) = opened.take() {
                // Room for every watcher's signal: this never waits, and fails only once the
                // workload has stopped listening.
                let _ = opened.try_send(());
            }
            match event.event {
                Some(Event::Progress(progress)) => {
                    let delay = clock::between(sent_at(&progress)?, arrived);
                    if progress.items_done == 1 {
                        watched.first = Some(delay);
                    } else {
                        watched.later.push(delay);
                    }
                }
                Some(Event::StateChanged(change)) if is_terminal(change.state) => {
                    watched.ended_on_terminal = matches!(
                        tokio::time::timeout(END_GRACE, stream.message()).await,
                        Ok(Ok(None))
                    );
                    return Ok(watched);
                }
                _ => {}
            }
        }
    }
}

/// The handler's `unix_nanos` when it made the report.
fn sent_at(progress: &pb::Progress) -> anyhow::Result<i64> {
    match progress
        .data
        .as_ref()
        .and_then(|data| data.fields.get(SENT_KEY))
        .and_then(|value| value.kind.as_ref())
    {
        Some(prost_types::value::Kind::NumberValue(nanos)) => Ok(*nanos as i64),
        _ => bail!("a progress event without its send time"),
    }
}

fn is_terminal(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}
