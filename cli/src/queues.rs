//! `jobwire queues`: a queue's figures, its pause and its limits, through the SDK's
//! [`QueueRef`](jobwire::QueueRef).
//!
//! `queues list` reads every page (a tenant has few queues) and prints them as one listing.
//! Both `list` and `get` show each queue's health: the wait of its oldest available job
//! against the thresholds `queues set --warn-after/--critical-after` sets.

use jobwire::{Client, RateLimit};
use jobwire_proto::v1 as pb;

use crate::args::{Limit, QueuesCommand, SetQueueArgs};
use crate::error::Failure;
use crate::render::{self, Pool, line};

/// Runs one `queues` subcommand.
pub async fn run(client: &Client, json: bool, command: QueuesCommand) -> Result<(), Failure> {
    let pool = Pool::new()?;
    let queue = match command {
        QueuesCommand::List => {
            let queues: Vec<pb::Queue> = client
                .list_queues()
                .await?
                .into_iter()
                .map(|queue| queue.into_proto())
                .collect();
            return list(&pool, json, queues);
        }
        QueuesCommand::Get { name } => client.queue(name).get().await?,
        QueuesCommand::Pause { name, reason } => client.queue(name).pause(reason).await?,
        QueuesCommand::Resume { name } => client.queue(name).resume().await?,
        QueuesCommand::Set(args) => set(client, args).await?,
    };
    let queue = queue.into_proto();
    if json {
        return pool.print(&queue);
    }
    line(&describe(&queue))
}

/// `queues set`: the limits named, set or removed.
async fn set(client: &Client, args: SetQueueArgs) -> Result<jobwire::QueueInfo, Failure> {
    let mut update = client.queue(args.name).update();
    if let Some(limit) = args.concurrency {
        update = update.concurrency_limit(match limit {
            Limit::Set(jobs) => Some(jobs),
            Limit::Remove => None,
        });
    }
    if let Some(limit) = args.rate {
        update = update.rate_limit(match limit {
            Limit::Set(per_second) => {
                let rate = RateLimit::per_second(per_second);
                Some(match args.burst {
                    Some(burst) => rate.burst(burst),
                    None => rate,
                })
            }
            Limit::Remove => None,
        });
    }
    if let Some(threshold) = args.warn_after {
        update = update.warn_after(match threshold {
            Limit::Set(wait) => Some(wait),
            Limit::Remove => None,
        });
    }
    if let Some(threshold) = args.critical_after {
        update = update.critical_after(match threshold {
            Limit::Set(wait) => Some(wait),
            Limit::Remove => None,
        });
    }
    if let Some(retention) = args.retention {
        update = update.retention(match retention {
            Limit::Set(kept) => Some(kept),
            Limit::Remove => None,
        });
    }
    if args.create {
        update = update.create_if_missing();
    }
    Ok(update.send().await?)
}

fn list(pool: &Pool, json: bool, queues: Vec<pb::Queue>) -> Result<(), Failure> {
    if json {
        return pool.print(&pb::ListQueuesResponse {
            queues,
            next_page_token: String::new(),
        });
    }
    let rows = queues
        .iter()
        .map(|queue| {
            let stats = queue.stats.clone().unwrap_or_default();
            [
                queue.name.clone(),
                health(&stats).to_owned(),
                if queue.paused { "paused" } else { "" }.to_owned(),
                concurrency(queue),
                rate(queue),
                stats.backlog.to_string(),
                count(&stats, pb::JobState::Running).to_string(),
                render::proto_duration(stats.oldest_available_age.as_ref()),
                format!("{:.2}/s", stats.throughput_per_second),
            ]
        })
        .collect();
    line(&render::table(
        [
            "NAME",
            "HEALTH",
            "PAUSED",
            "CONCURRENCY",
            "RATE",
            "BACKLOG",
            "RUNNING",
            "OLDEST WAITING",
            "THROUGHPUT",
        ],
        rows,
    ))
}

/// One queue for people: settings, then its jobs per state.
fn describe(queue: &pb::Queue) -> String {
    let stats = queue.stats.clone().unwrap_or_default();
    let paused = if queue.paused {
        let mut text = format!("yes, since {}", render::time(queue.paused_at.as_ref()));
        if !queue.pause_reason.is_empty() {
            text.push_str(&format!(" ({})", queue.pause_reason));
        }
        text
    } else {
        "no".into()
    };
    let mut text = render::fields(&[
        ("name", queue.name.clone()),
        ("health", health(&stats).to_owned()),
        ("paused", paused),
        ("concurrency", concurrency(queue)),
        ("rate", rate(queue)),
        ("backlog", stats.backlog.to_string()),
        ("warn after", threshold(queue.warn_after.as_ref())),
        ("critical after", threshold(queue.critical_after.as_ref())),
        (
            "retention",
            match &queue.retention {
                Some(kept) => render::proto_duration(Some(kept)),
                None => "the server's default".into(),
            },
        ),
        (
            "oldest waiting",
            render::proto_duration(stats.oldest_available_age.as_ref()),
        ),
        (
            "throughput",
            format!(
                "{:.2}/s ({} finished in the last minute)",
                stats.throughput_per_second, stats.finished_last_minute
            ),
        ),
        ("created", render::time(queue.created_at.as_ref())),
        ("updated", render::time(queue.updated_at.as_ref())),
    ]);
    if !stats.counts.is_empty() {
        let rows = stats
            .counts
            .iter()
            .map(|count| [render::state(count.state), count.count.to_string()])
            .collect();
        text.push_str("\n\njobs:\n");
        text.push_str(&render::table(["STATE", "COUNT"], rows));
    }
    text
}

/// The queue's health as a word; `-` when the server did not say.
fn health(stats: &pb::QueueStats) -> &'static str {
    match stats.health() {
        pb::QueueHealth::Ok => "ok",
        pb::QueueHealth::Warning => "WARNING",
        pb::QueueHealth::Critical => "CRITICAL",
        pb::QueueHealth::Unspecified => "-",
    }
}

/// A health threshold; `-` when none is set.
fn threshold(wait: Option<&prost_types::Duration>) -> String {
    match wait {
        Some(_) => render::proto_duration(wait),
        None => "-".into(),
    }
}

fn concurrency(queue: &pb::Queue) -> String {
    queue
        .concurrency_limit
        .map_or_else(|| "-".into(), |limit| limit.to_string())
}

fn rate(queue: &pb::Queue) -> String {
    queue.rate_limit.as_ref().map_or_else(
        || "-".into(),
        |rate| format!("{}/s (burst {})", rate.per_second, rate.burst),
    )
}

fn count(stats: &pb::QueueStats, state: pb::JobState) -> i64 {
    stats
        .counts
        .iter()
        .find(|count| count.state == state as i32)
        .map_or(0, |count| count.count)
}
