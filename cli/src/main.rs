//! `jobwire`: the command-line tool for operators of a jobwire server.
//!
//! It does what an operator did with grpcurl and hand-typed JSON, in the server's own terms:
//! list, inspect, enqueue, watch and control jobs; pause queues, set their limits and health
//! thresholds; manage cron schedules; read the registered job types; list the connected workers
//! and drain one. It is built on the Rust SDK, which owns the connection (address, API key,
//! tenant, TLS) and the resuming watch; services and shapes the SDK's typed API does not cover
//! (JSON payloads, the job type registry, the worker fleet, pages as the server sent them) are called through the generated clients of `jobwire_proto` on the SDK's channel.
//!
//! Output is for people by default (tables, `name: value` blocks, a progress bar) and for
//! scripts with `--json`: the RPC's response message as one JSON object in the proto3 JSON
//! mapping (lists that read every page print one response with all items), and for
//! `jobs watch` one `JobEvent` object per line. Errors go to stderr; the exit code says what
//! happened (the table is in [`error`] and in `jobwire --help`).
//!
//! # Layout
//!
//! - [`args`]: the command line (clap): global options, commands, help texts with examples.
//! - [`connect`]: the SDK client from the global options.
//! - [`error`]: what can fail, and the exit code for each.
//! - [`render`]: proto JSON through prost-reflect, tables and fields for people.
//! - [`jobs`], [`watch`], [`queues`], [`schedules`], [`types`], [`workers`]: one file per
//!   command group.

mod args;
mod connect;
mod error;
mod jobs;
mod queues;
mod render;
mod schedules;
mod types;
mod watch;
mod workers;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::args::{Cli, Command};
use crate::error::Failure;

fn main() -> ExitCode {
    // Usage errors exit 2 here (clap's code, which the exit code table shares), `--help` 0.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) if failure.is_broken_pipe() => ExitCode::SUCCESS,
        Err(failure) => {
            // A watched job's end is already on stdout; only its exit code is left to say.
            if !matches!(failure, Failure::JobEnded { .. }) {
                eprintln!("error: {}", failure.report());
            }
            failure.exit_code().into()
        }
    }
}

/// Connects (except for `completions`) and runs the command.
async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.global.json;
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "jobwire",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let client = connect::connect(&cli.global).await?;
    match cli.command {
        Command::Jobs(command) => jobs::run(&client, json, command).await,
        Command::Queues(command) => queues::run(&client, json, command).await,
        Command::Schedules(command) => schedules::run(&client, json, command).await,
        Command::Types(command) => types::run(&client, json, command).await,
        Command::Workers(command) => workers::run(&client, json, command).await,
        Command::Completions { .. } => Ok(()),
    }
}
