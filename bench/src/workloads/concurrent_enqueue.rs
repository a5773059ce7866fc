//! W3: 8 producers, each on its own connection, enqueue 2,500 single jobs apiece with
//! `EnqueueJob`, back to back, while a worker subprocess (20 slots, connected: a warm-up job
//! ran) works them off.
//!
//! As the Graphile peer measures it: `jobs_per_s` spans the first enqueue (this process's clock,
//! taken once every producer is connected) to the first poll (every 10 ms, after the last
//! enqueue returned) that finds no job waiting or running in the database; `enqueue_per_s`
//! spans the first enqueue to the last reply. The database must then hold the 20,000 jobs and
//! the warm-up, all succeeded. The same span is a [`Window`] of the cores' time: W3's rounds
//! are a chain of hops between processes, each waiting for a core on a busy machine.

use tokio::{task::JoinSet, time::Instant};

use super::Report;
use crate::{
    cluster::{Postgres, Server, WorkerProcess},
    cores::Window,
    jobs::Noop,
    ledger::Ledger,
    worker::Handler,
};

const JOBS: usize = 20_000;
const PRODUCERS: usize = 8;
const SLOTS: usize = 20;

pub async fn run(pg: &Postgres, prefetch: usize) -> anyhow::Result<Report> {
    let url = pg.fresh_database("jobwire_bench_w3").await?;
    let server = Server::start(&url, &[])?;
    let mut ledger = Ledger::connect(&url).await?;
    let mut worker = WorkerProcess::start(&server, Handler::Noop, (SLOTS, prefetch), None)?;
    let warm_up = server.client().await?;
    worker
        .while_running(async {
            warm_up.enqueue(Noop {}).await?.wait().await?;
            Ok(())
        })
        .await?;
    let mut producers = Vec::with_capacity(PRODUCERS);
    for _ in 0..PRODUCERS {
        producers.push(server.client().await?);
    }

    let cores = Window::open(&server, &worker);
    let start = Instant::now();
    let enqueued = worker
        .while_running(async {
            let mut tasks = JoinSet::new();
            for client in producers {
                tasks.spawn(async move {
                    for _ in 0..JOBS / PRODUCERS {
                        client.enqueue(Noop {}).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            Ok(start.elapsed())
        })
        .await?;
    let finished = worker.while_running(ledger.wait_until_settled()).await? - start;
    let mut report = super::report("W3", JOBS);
    cores.close(&mut report);
    let pruned = ledger.ensure_succeeded(JOBS + 1).await?;
    worker.stop().await?;

    report.insert(
        "enqueue_per_s".into(),
        super::per_second(JOBS, enqueued).into(),
    );
    report.insert(
        "jobs_per_s".into(),
        super::per_second(JOBS, finished).into(),
    );
    // Finished jobs the pruner took while the workload ran (`--prune-after`).
    report.insert("jobs_pruned".into(), pruned.into());
    super::insert_peak_rss(&mut report, [&server]);
    Ok(report)
}
