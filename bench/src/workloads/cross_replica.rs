//! CR: progress reported to replica A, watched on replica B. Measures the delay from the
//! worker's ReportProgress to the event's arrival at the watcher (same clock: one machine), and
//! counts events the watcher missed against the events stored.
//!
//! The worker speaks the wire protocol directly, so no SDK-side coalescing is measured; reports
//! are spaced so the server writes each one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jobwire_proto::v1::{
    self as pb, connect_request::Message as In, connect_response::Message as Out, job_event::Event,
    job_service_client::JobServiceClient, worker_service_client::WorkerServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Report;
use crate::{
    cluster::{Postgres, Server, channel},
    stats::Percentiles,
};

const REPORTS: i64 = 500;
const SPACING: Duration = Duration::from_millis(10);
const JOB_TYPE: &str = "bench.cross_replica";

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or_default()
}

pub async fn run(pg: &Postgres) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_cr").await?;
    let a = Server::start(&url, &[])?;
    let b = Server::start(&url, &[])?;

    let mut jobs_a = JobServiceClient::new(channel(&a.url).await?);
    let job = jobs_a
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(pb::JobSpec {
                job_type: JOB_TYPE.into(),
                payload: Some(prost_types::Any {
                    type_url: "type.googleapis.com/bench.Empty".into(),
                    value: vec![],
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .job
        .context("job")?;

    let mut jobs_b = JobServiceClient::new(channel(&b.url).await?);
    let mut watch = jobs_b
        .watch_job(pb::WatchJobRequest {
            include_children: Default::default(),
            id: job.id.clone(),
            after_sequence: 0,
        })
        .await?
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut delays = Vec::new();
        while let Some(response) = watch.message().await? {
            let arrived = now_ms();
            let Some(event) = response.event else {
                continue;
            };
            if let Some(Event::Progress(p)) = event.event {
                let sent = p
                    .data
                    .as_ref()
                    .and_then(|d| d.fields.get("sent_ms"))
                    .and_then(|v| match v.kind {
                        Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                        _ => None,
                    })
                    .context("progress without its send time")?;
                delays.push(Duration::from_secs_f64(
                    ((arrived - sent) / 1000.0).max(0.0),
                ));
            }
        }
        anyhow::Ok(delays)
    });

    let (tx, rx) = mpsc::channel(64);
    let send = |message| pb::ConnectRequest {
        message: Some(message),
    };
    tx.send(send(In::Hello(pb::Hello {
        worker_id: "bench-raw".into(),
        job_types: vec![JOB_TYPE.into()],
        queues: vec![],
        slots: 1,
        running: vec![],
        schemas: vec![],
        prefetch: 0,
        reports_started: false,
        ..Default::default()
    })))
    .await?;
    let mut stream = WorkerServiceClient::new(channel(&a.url).await?)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let lease = loop {
        match stream.message().await?.and_then(|m| m.message) {
            Some(Out::Lease(lease)) => break lease,
            Some(_) => continue,
            None => anyhow::bail!("worker stream closed"),
        }
    };
    let lease_ref = pb::LeaseRef {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
    };
    // Acks are read (and dropped) so the stream never backs up.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    for done in 1..=REPORTS {
        let mut data = prost_types::Struct::default();
        data.fields.insert(
            "sent_ms".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(now_ms())),
            },
        );
        tx.send(send(In::Progress(pb::ReportProgress {
            request_id: u64::try_from(done)?,
            lease: Some(lease_ref.clone()),
            progress: Some(pb::Progress {
                items_done: done,
                items_total: REPORTS,
                data: Some(data),
                ..Default::default()
            }),
        })))
        .await?;
        tokio::time::sleep(SPACING).await;
    }
    tx.send(send(In::Complete(pb::CompleteJob {
        wait_signal: Default::default(),
        wait_for_children: Default::default(),
        request_id: 0,
        lease: Some(lease_ref),
        result: None,
    })))
    .await?;

    let mut delays = watcher.await??;
    drop(tx);
    drain.abort();
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_events WHERE job_id = $1::uuid AND kind = 'progress'",
    )
    .bind(&job.id)
    .fetch_one(&mut db)
    .await?;
    let received = i64::try_from(delays.len())?;
    let mut report = super::report("CR", 1);
    report.insert("progress_reports".into(), REPORTS.into());
    report.insert("events".into(), received.into());
    report.insert("events_lost".into(), (stored - received).into());
    if let Some(p) = Percentiles::of(&mut delays) {
        p.write_to(&mut report);
    }
    super::insert_peak_rss(&mut report, [&a, &b]);
    Ok(report)
}
