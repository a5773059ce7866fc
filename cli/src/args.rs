//! The command line, as clap reads it: the global options that say where and as whom to
//! connect, one subcommand group per service, and the help texts with their examples.
//!
//! Values are parsed into the types the commands need here (states, durations, labels, rates),
//! so a malformed value is a usage error (exit 2) before any connection is made.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use jobwire_proto::v1 as pb;

use crate::error::EXIT_CODES_HELP;

const EXAMPLES: &str = "\
Examples:
  jobwire jobs list --state failed --queue media
  jobwire jobs enqueue media.thumbnail --json-payload '{\"url\": \"https://example.com/a.png\", \"width\": 64}'
  jobwire jobs watch 0190d4c2-7a4e-7c3b-9f0e-3c1d2b4a5e6f
  jobwire queues set media --concurrency 4 --rate 10/s
  jobwire schedules create nightly --cron '0 3 * * *' --type media.ping --json-payload '{}'
  jobwire types get media.thumbnail
  JOBWIRE_URL=https://jobs.example.com:50051 JOBWIRE_API_KEY=jw_... jobwire --ca-cert ca.pem queues list";

/// Inspect and steer a jobwire server: jobs, queues, schedules and job types.
#[derive(Debug, Parser)]
#[command(
    name = "jobwire",
    version,
    after_help = EXAMPLES,
    after_long_help = format!("{EXAMPLES}\n\n{EXIT_CODES_HELP}"),
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Where to connect, as whom, and how to print.
#[derive(Debug, Args)]
pub struct Global {
    /// The server: `http://host:port` for plaintext, `https://host:port` for TLS.
    #[arg(
        long,
        env = "JOBWIRE_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub url: String,

    /// The API key, sent as `authorization: Bearer <key>`; it decides the tenant.
    #[arg(long, env = "JOBWIRE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// The tenant to act within (the `jobwire-tenant` header), for a server without API keys.
    #[arg(long, env = "JOBWIRE_TENANT", global = true)]
    pub tenant: Option<String>,

    /// PEM file of the CA that issued the server's certificate (default: the system's roots).
    #[arg(long, env = "JOBWIRE_CA_CERT", value_name = "PEM", global = true)]
    pub ca_cert: Option<PathBuf>,

    /// PEM file of a client certificate, for a server that requires one (mutual TLS).
    #[arg(
        long,
        env = "JOBWIRE_CLIENT_CERT",
        value_name = "PEM",
        requires = "client_key",
        global = true
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key.
    #[arg(
        long,
        env = "JOBWIRE_CLIENT_KEY",
        value_name = "PEM",
        requires = "client_cert",
        global = true
    )]
    pub client_key: Option<PathBuf>,

    /// Print JSON for scripts: the RPC's response message as one object, in the proto3 JSON
    /// mapping (`jobs watch`: one JobEvent object per line).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enqueue, inspect, watch and control jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Read queues' figures, pause them, set their limits.
    #[command(subcommand)]
    Queues(QueuesCommand),
    /// Recurring jobs on cron schedules.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// The registered job types: payload schemas, defaults, examples.
    #[command(subcommand)]
    Types(TypesCommand),
    /// The connected workers, on every replica: list them, drain one.
    #[command(subcommand)]
    Workers(WorkersCommand),
    /// Prints a completion script for a shell, such as `jobwire completions bash >
    /// /etc/bash_completion.d/jobwire`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  jobwire workers list
  jobwire workers list --json | jq '.workers[].workerId'
  jobwire workers drain thumbnailer-1   # finishes its jobs, takes no new one, disconnects")]
pub enum WorkersCommand {
    /// Lists the connected workers: what they serve, their slots and leases, their replica.
    List,
    /// Tells a worker to drain: it finishes the jobs it runs, takes no new one, and
    /// disconnects (its process's `run` returns). Exits 3 when no such worker is connected.
    Drain {
        /// The worker's id (WORKER ID in `workers list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  jobwire jobs list --state failed --state cancelled --type media.thumbnail
  jobwire jobs get ID
  jobwire jobs watch ID            # a progress bar on a terminal, plain lines otherwise
  jobwire jobs enqueue media.ping --example hello
  jobwire jobs cancel ID --reason 'wrong input'
  jobwire jobs approve ID --comment 'checked by ops'")]
pub enum JobsCommand {
    /// Lists jobs, newest first, one page at a time.
    List(ListJobsArgs),
    /// Shows one job: state, progress, attempts with their errors, payload and result.
    Get {
        /// The job's id.
        id: String,
    },
    /// Follows a job until it ends: a live progress bar on a terminal, one line per event
    /// otherwise. Exits 0 when it SUCCEEDED, 6 when it FAILED, 7 when it was CANCELLED.
    Watch {
        /// The job's id.
        id: String,
    },
    /// Enqueues a job of a registered type, its payload given as JSON or by example.
    Enqueue(EnqueueArgs),
    /// Cancels a job that has not finished.
    Cancel {
        id: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Makes a FAILED or CANCELLED job available again with fresh attempts.
    Retry { id: String },
    /// Holds a job; a running one checkpoints and stops first.
    Pause {
        id: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Makes a PAUSED job available again.
    Resume { id: String },
    /// Lets a job awaiting approval run.
    Approve {
        id: String,
        /// Who approved and why, for the record.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Refuses a job awaiting approval: it ends CANCELLED.
    Reject {
        id: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct ListJobsArgs {
    /// Only jobs in this state; repeat for several.
    #[arg(long = "state", value_enum)]
    pub states: Vec<StateArg>,
    /// Only jobs of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only jobs of this type.
    #[arg(long = "type")]
    pub job_type: Option<String>,
    /// Only jobs carrying this label (KEY=VALUE); repeat for several (a job must carry all).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only jobs whose last error has this kind (with `--state failed`: dead letters).
    #[arg(long)]
    pub error_kind: Option<String>,
    /// Only jobs whose last error's message contains this text, ignoring case.
    #[arg(long)]
    pub error_text: Option<String>,
    /// Jobs per page, 1 to 1000 (the server's default: 50).
    #[arg(long)]
    pub page_size: Option<u32>,
    /// The token printed under the previous page; the filters must stay the same.
    #[arg(long)]
    pub page_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The job type, such as `media.thumbnail`.
    pub job_type: String,
    #[command(flatten)]
    pub payload: PayloadSource,
    /// The queue (default: the type's).
    #[arg(long)]
    pub queue: Option<String>,
    /// 0 to 100, higher first (default: the type's, or 50).
    #[arg(long)]
    pub priority: Option<i32>,
    /// Run after this delay, such as `30s`, `5m`, `2h`.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Enqueueing again with the same key returns the first job instead of a new one.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A label (KEY=VALUE); repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Attempts in all, the first included (default: the type's, or 3).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// How long one attempt may run, such as `10m`.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Hold the job until `jobs approve`.
    #[arg(long)]
    pub needs_approval: bool,
    /// The registered version of the type to check the payload against (default: the latest).
    #[arg(long)]
    pub type_version: Option<i32>,
}

/// A job's payload, for a registered type: JSON, or the slug of a registered example.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PayloadSource {
    /// The payload as JSON (the proto3 JSON mapping of the type's payload message); `@FILE`
    /// reads it from a file, `-` from standard input.
    #[arg(long, value_name = "JSON")]
    pub json_payload: Option<String>,
    /// The slug of one of the type's registered examples (see `jobwire types get`).
    #[arg(long, value_name = "SLUG")]
    pub example: Option<String>,
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  jobwire queues list
  jobwire queues pause media --reason 'renderer upgrade'
  jobwire queues set media --concurrency 4 --rate 10/s --burst 20
  jobwire queues set media --concurrency none --rate none   # removes both limits
  jobwire queues set media --warn-after 5m --critical-after 30m   # health thresholds
  jobwire queues set media --retention 7d   # finished jobs kept a week (none: the server's)")]
pub enum QueuesCommand {
    /// Lists the queues with their figures.
    List,
    /// Shows one queue: pause, limits, jobs per state, oldest waiting job, throughput.
    Get { name: String },
    /// Stops the queue's jobs from starting, on every replica, until `queues resume`.
    Pause {
        name: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lets a paused queue's jobs start again.
    Resume { name: String },
    /// Sets or removes the queue's limits, health thresholds and retention.
    Set(SetQueueArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("limits").required(true).multiple(true))]
pub struct SetQueueArgs {
    pub name: String,
    /// At most this many of the queue's jobs run at once, anywhere; `none` removes the limit.
    #[arg(long, group = "limits", value_parser = parse_concurrency)]
    pub concurrency: Option<Limit<u32>>,
    /// How fast jobs may start: `R/s`, `R/m` or `R/h` (R may be a fraction); `none` removes
    /// the limit.
    #[arg(long, group = "limits", value_parser = parse_rate)]
    pub rate: Option<Limit<f64>>,
    /// With --rate: how many jobs may start at once after a quiet spell (default: one
    /// second's worth).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// The queue's health turns WARNING once its oldest waiting job has waited this long
    /// (such as 5m; 1s to 365d); `none` removes the threshold.
    #[arg(long, group = "limits", value_parser = parse_threshold)]
    pub warn_after: Option<Limit<Duration>>,
    /// The queue's health turns CRITICAL once its oldest waiting job has waited this long;
    /// `none` removes the threshold.
    #[arg(long, group = "limits", value_parser = parse_threshold)]
    pub critical_after: Option<Limit<Duration>>,
    /// How long the queue's finished jobs are kept before they are pruned (such as 7d; 1s to
    /// 3650d); `none` returns to the server's default (--retention, 30 days unless set).
    #[arg(long, group = "limits", value_parser = parse_threshold)]
    pub retention: Option<Limit<Duration>>,
    /// Create the queue if no job used it yet.
    #[arg(long)]
    pub create: bool,
}

/// A limit to set, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit<T> {
    Set(T),
    Remove,
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  jobwire schedules create nightly-report --cron '0 3 * * *' --time-zone Europe/Berlin \\
      --type report.build --json-payload '{\"scope\": \"daily\"}'
  jobwire schedules update nightly-report --cron '30 3 * * *'
  jobwire schedules trigger nightly-report     # one job now, outside the ticks
  jobwire schedules pause nightly-report")]
pub enum SchedulesCommand {
    /// Lists the schedules.
    List,
    /// Shows one schedule with its job template.
    Get { name: String },
    /// Creates a schedule.
    Create(CreateScheduleArgs),
    /// Changes the settings given; the others stay.
    Update(UpdateScheduleArgs),
    /// Stops a schedule from creating jobs.
    Pause { name: String },
    /// Lets a paused schedule create jobs again, from its next tick.
    Resume { name: String },
    /// Creates the schedule's job now, outside its ticks.
    Trigger { name: String },
    /// Deletes a schedule; the jobs it created are kept.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CreateScheduleArgs {
    /// Unique within the tenant.
    pub name: String,
    /// 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first).
    #[arg(long)]
    pub cron: String,
    /// The job type each tick enqueues (registered, so the JSON payload can be checked).
    #[arg(long = "type")]
    pub job_type: String,
    /// The payload every job gets, as JSON; `@FILE` reads a file, `-` standard input.
    #[arg(long, value_name = "JSON")]
    pub json_payload: String,
    /// The IANA time zone the expression is read in (default UTC).
    #[arg(long)]
    pub time_zone: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub policies: PolicyArgs,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
}

#[derive(Debug, Args)]
pub struct UpdateScheduleArgs {
    pub name: String,
    #[arg(long)]
    pub cron: Option<String>,
    #[arg(long)]
    pub time_zone: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// A new job type for the template (give --json-payload with it).
    #[arg(long = "type")]
    pub job_type: Option<String>,
    /// A new payload for the template, as JSON; `@FILE` reads a file, `-` standard input.
    #[arg(long, value_name = "JSON")]
    pub json_payload: Option<String>,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub policies: PolicyArgs,
}

/// The options of a schedule's job template besides its type and payload.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// The queue of each job (default: `default`).
    #[arg(long)]
    pub queue: Option<String>,
    /// 0 to 100, higher first.
    #[arg(long)]
    pub priority: Option<i32>,
    /// A label for each job (KEY=VALUE); repeat for several. On update, replaces the labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// How long one attempt may run, such as `10m`.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

impl TemplateArgs {
    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
            && self.priority.is_none()
            && self.labels.is_empty()
            && self.timeout.is_none()
    }
}

/// What a schedule does with overlapping runs and missed ticks.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// What a tick does while the previous tick's job runs.
    #[arg(long, value_enum)]
    pub overlap: Option<OverlapArg>,
    /// What happens to ticks missed while no server ran the schedules.
    #[arg(long, value_enum)]
    pub catch_up: Option<CatchUpArg>,
    /// With `--catch-up all`: at most this many missed ticks run.
    #[arg(long)]
    pub max_catch_up: Option<i32>,
    /// How late a tick may be found and still count as on time, such as `60s`.
    #[arg(long, value_parser = parse_duration)]
    pub misfire_grace: Option<Duration>,
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  jobwire types list
  jobwire types get media.thumbnail
  jobwire types get media.thumbnail --version 1")]
pub enum TypesCommand {
    /// Lists the latest version of every registered job type.
    List,
    /// Shows a job type: payload and output fields, defaults, examples.
    Get {
        name: String,
        /// A version number (default: the latest).
        #[arg(long)]
        version: Option<u32>,
    },
}

/// A job state, as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    AwaitingApproval,
    Pending,
    Scheduled,
    Available,
    Running,
    Retrying,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl StateArg {
    pub fn to_proto(self) -> pb::JobState {
        match self {
            Self::AwaitingApproval => pb::JobState::AwaitingApproval,
            Self::Pending => pb::JobState::Pending,
            Self::Scheduled => pb::JobState::Scheduled,
            Self::Available => pb::JobState::Available,
            Self::Running => pb::JobState::Running,
            Self::Retrying => pb::JobState::Retrying,
            Self::Paused => pb::JobState::Paused,
            Self::Succeeded => pb::JobState::Succeeded,
            Self::Failed => pb::JobState::Failed,
            Self::Cancelled => pb::JobState::Cancelled,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OverlapArg {
    /// Create the job anyway; runs may overlap.
    Allow,
    /// Create no job for this tick.
    Skip,
    /// Cancel the previous job, then create this tick's.
    CancelPrevious,
}

impl OverlapArg {
    pub fn to_proto(self) -> pb::OverlapPolicy {
        match self {
            Self::Allow => pb::OverlapPolicy::Allow,
            Self::Skip => pb::OverlapPolicy::Skip,
            Self::CancelPrevious => pb::OverlapPolicy::CancelPrevious,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CatchUpArg {
    /// One job, for the latest missed tick.
    Once,
    /// No job for a missed tick.
    Skip,
    /// One job for each missed tick (at most --max-catch-up).
    All,
}

impl CatchUpArg {
    pub fn to_proto(self) -> pb::CatchUpPolicy {
        match self {
            Self::Once => pb::CatchUpPolicy::Once,
            Self::Skip => pb::CatchUpPolicy::Skip,
            Self::All => pb::CatchUpPolicy::All,
        }
    }
}

/// `KEY=VALUE`, the key not empty.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// A duration such as `500ms`, `30s`, `5m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 5m or 2h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

/// A health threshold: a duration, or `none` to remove it.
fn parse_threshold(text: &str) -> Result<Limit<Duration>, String> {
    if text == "none" {
        return Ok(Limit::Remove);
    }
    parse_duration(text).map(Limit::Set)
}

/// A concurrency limit, or `none`.
fn parse_concurrency(text: &str) -> Result<Limit<u32>, String> {
    if text == "none" {
        return Ok(Limit::Remove);
    }
    text.parse()
        .map(Limit::Set)
        .map_err(|_| format!("{text:?} is not a whole number of jobs or `none`"))
}

/// A rate, `R/s`, `R/m` or `R/h` (bare: per second), as jobs per second; or `none`.
fn parse_rate(text: &str) -> Result<Limit<f64>, String> {
    if text == "none" {
        return Ok(Limit::Remove);
    }
    let (number, per) = text.split_once('/').unwrap_or((text, "s"));
    let divisor = match per {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?}: the rate is R/s, R/m or R/h")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 10/s or 600/m"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("{text:?}: the rate must be positive"));
    }
    Ok(Limit::Set(value / divisor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn values_parse() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_rate("600/m"), Ok(Limit::Set(10.0)));
        assert_eq!(parse_rate("2"), Ok(Limit::Set(2.0)));
        assert_eq!(parse_rate("none"), Ok(Limit::Remove));
        assert!(parse_rate("0/s").is_err());
        assert_eq!(parse_concurrency("none"), Ok(Limit::Remove));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("=b").is_err());
    }
}
