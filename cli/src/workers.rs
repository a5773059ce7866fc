//! `jobwire workers`: the connected workers, through `WorkerService.ListWorkers` and
//! `DrainWorker` (the SDK's client has no call for them: its worker side is the stream), on the
//! SDK's channel.
//!
//! `workers list` reads every page and prints one listing: each worker's queues and types, its
//! slots against the leases it holds, its heartbeat and the replica it is connected to.
//! `workers drain ID` exits 3 when no worker of that id is connected.

use jobwire::Client;
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::worker_service_client::WorkerServiceClient;

use crate::args::WorkersCommand;
use crate::error::Failure;
use crate::render::{self, Pool, line};

/// The largest page ListWorkers allows: the fewest round trips for a whole listing.
const PAGE_SIZE: i32 = 1000;

/// Runs one `workers` subcommand.
pub async fn run(client: &Client, json: bool, command: WorkersCommand) -> Result<(), Failure> {
    let pool = Pool::new()?;
    let mut service = WorkerServiceClient::new(client.channel());
    match command {
        WorkersCommand::List => {
            let mut workers = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = pb::ListWorkersRequest {
                    page_size: PAGE_SIZE,
                    page_token,
                };
                let page = service
                    .list_workers(client.request(request))
                    .await?
                    .into_inner();
                workers.extend(page.workers);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json {
                return pool.print(&pb::ListWorkersResponse {
                    workers,
                    next_page_token: String::new(),
                });
            }
            line(&list(&workers))
        }
        WorkersCommand::Drain { id } => {
            let request = pb::DrainWorkerRequest { worker_id: id };
            let response = service
                .drain_worker(client.request(request))
                .await?
                .into_inner();
            if json {
                return pool.print(&response);
            }
            let replicas: Vec<&str> = response
                .workers
                .iter()
                .map(|worker| worker.replica.as_str())
                .collect();
            line(&format!(
                "draining {} stream(s) of the worker (on {}): it finishes its running jobs, \
                 takes no new one, then disconnects",
                response.workers.len(),
                replicas.join(", ")
            ))
        }
    }
}

/// The workers as a table for people.
fn list(workers: &[pb::Worker]) -> String {
    if workers.is_empty() {
        return "no worker is connected".into();
    }
    let rows = workers
        .iter()
        .map(|worker| {
            [
                worker.worker_id.clone(),
                if worker.draining {
                    "draining"
                } else {
                    "serving"
                }
                .to_owned(),
                worker.queues.join(","),
                worker.job_types.join(","),
                format!("{}/{}", worker.free_slots, worker.slots),
                worker.leases_held.to_string(),
                render::time(worker.last_heartbeat_at.as_ref()),
                render::time(worker.connected_at.as_ref()),
                worker.host.clone(),
                worker.version.clone(),
                worker.replica.clone(),
            ]
        })
        .collect();
    render::table(
        [
            "WORKER ID",
            "STATE",
            "QUEUES",
            "TYPES",
            "FREE/SLOTS",
            "LEASES",
            "LAST HEARTBEAT",
            "CONNECTED",
            "HOST",
            "VERSION",
            "REPLICA",
        ],
        rows,
    )
}
