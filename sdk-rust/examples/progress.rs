//! Enqueues one `demo.countdown` job and renders it live from the job's event stream: a
//! progress bar, the job's log lines and state changes printed above it, then the result.
//! When stdout is not a terminal (a pipe, a file, CI), every event is a plain line instead,
//! with no bar and no escape codes.
//!
//! Run a server and the `worker` example first, then:
//! `JOBWIRE_URL=http://127.0.0.1:50051 cargo run -p jobwire --example progress`.
//! Optional: `COUNTDOWN_STEPS` (default 20) and `COUNTDOWN_STEP_MILLIS` (default 250). Ctrl-C
//! cancels the job, and the bar shows it stop. Exits 0 when the job succeeded, non-zero when it
//! failed or was cancelled.

mod common;

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use common::Countdown;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jobwire::{Client, JobEvent, JobEventKind, JobState, ProgressInfo};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let url = common::server_url();
    let steps = env_u32("COUNTDOWN_STEPS", 20);
    let step_millis = env_u32("COUNTDOWN_STEP_MILLIS", 250);
    // Room for a retry or two; an attempt that takes far longer than planned is stopped.
    let expected = Duration::from_millis(u64::from(steps) * u64::from(step_millis));

    let mut client = Client::builder(url.clone());
    if let Some(key) = common::api_key() {
        client = client.api_key(key);
    }
    let client = client
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let handle = client
        .enqueue(Countdown { steps, step_millis })
        .timeout(expected * 2 + Duration::from_secs(10))
        .label("example", "progress")
        .await
        .context("enqueueing the countdown")?;

    let bar = Display::new(u64::from(steps))?;
    bar.println(format!("enqueued job {}", handle.id()));
    bar.set_message("waiting for a worker");

    let mut events = handle.watch();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut cancelling = false;
    let last = loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    render(&bar, &event);
                    if event.is_terminal() {
                        break event;
                    }
                }
                Some(Err(error)) => {
                    bar.abandon(None);
                    return Err(error).with_context(|| format!("watching job {}", handle.id()));
                }
                None => {
                    bar.abandon(None);
                    bail!("the watch of job {} ended before the job did", handle.id());
                }
            },
            _ = &mut interrupted, if !cancelling => {
                cancelling = true;
                bar.println("interrupted: cancelling the job");
                handle.cancel("interrupted from the progress example").await?;
            }
        }
    };

    let JobEventKind::StateChanged {
        state,
        reason,
        error,
        job,
        ..
    } = last.kind()
    else {
        bail!(
            "the last event of job {} is not a state change",
            handle.id()
        );
    };
    if *state != JobState::Succeeded {
        bar.abandon(Some(state.to_string()));
        let why = error
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| reason.clone())
            .unwrap_or_default();
        bail!("job {} ended {state}: {why}", handle.id());
    }
    bar.finish("done");

    // The event carries the finished job; read it once more only if it came without a result.
    let info = match job.as_deref() {
        Some(info) if info.result::<Countdown>().is_ok_and(|r| r.is_some()) => info.clone(),
        _ => handle.get().await?,
    };
    let output = info
        .result::<Countdown>()?
        .context("the job succeeded without a result")?;
    // The attempt number is the lease's fencing token: a paused attempt took one too, but only
    // attempts that ran to a failure or a result count against max_attempts.
    println!(
        "counted {} steps in attempt {} (resumed from step {}; {} counted against max_attempts)",
        output.steps,
        output.attempt,
        output.resumed_from,
        info.attempts_counted()
    );
    Ok(())
}

/// Where the job is shown: a live bar when stdout is a terminal, plain lines otherwise, so that
/// output sent to a file or a pipe holds each event once, with no escape codes.
enum Display {
    /// A bar drawn on stdout, with lines printed above it.
    Bar(ProgressBar),
    /// One line per event on stdout.
    Lines,
}

impl Display {
    fn new(steps: u64) -> anyhow::Result<Self> {
        if !std::io::stdout().is_terminal() {
            return Ok(Self::Lines);
        }
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} {prefix:.bold} {wide_msg}",
            )?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Ok(Self::Bar(bar))
    }

    /// A line of its own: above the bar, or on stdout.
    fn println(&self, line: impl AsRef<str>) {
        match self {
            Self::Bar(bar) => bar.println(line),
            Self::Lines => println!("{}", line.as_ref()),
        }
    }

    /// What the job is doing: the bar's message, or a line.
    fn set_message(&self, message: &str) {
        match self {
            Self::Bar(bar) => bar.set_message(message.to_owned()),
            Self::Lines => println!("  {message}"),
        }
    }

    fn progress(&self, progress: &ProgressInfo) {
        match self {
            Self::Bar(bar) => show_progress(bar, progress),
            Self::Lines => println!("{}", progress_line(progress)),
        }
    }

    fn finish(&self, message: &'static str) {
        match self {
            Self::Bar(bar) => bar.finish_with_message(message),
            Self::Lines => println!("  {message}"),
        }
    }

    /// Leaves the bar where it stopped; plain lines have already said why.
    fn abandon(&self, message: Option<String>) {
        if let Self::Bar(bar) = self {
            match message {
                Some(message) => bar.abandon_with_message(message),
                None => bar.abandon(),
            }
        }
    }
}

/// Shows one event: progress moves the bar, everything else is printed above it.
fn render(bar: &Display, event: &JobEvent) {
    match event.kind() {
        JobEventKind::Progress(progress) => bar.progress(progress),
        // `LogLevel`'s Display writes its name whole; padding applies to the string.
        JobEventKind::Log { level, message, .. } => {
            bar.println(format!("{:>5} {message}", level.to_string()));
        }
        JobEventKind::StateChanged {
            state,
            reason,
            worker_id,
            error,
            ..
        } => {
            let mut line = format!("  job {state}");
            if let Some(worker) = worker_id {
                line.push_str(&format!(" on {worker}"));
            }
            if let Some(error) = error {
                line.push_str(&format!(": {error}"));
            } else if let Some(reason) = reason {
                line.push_str(&format!(": {reason}"));
            }
            bar.println(line);
            match state {
                // A line of their own already said so.
                JobState::Running | JobState::Retrying | JobState::Paused | JobState::Available
                    if matches!(bar, Display::Lines) => {}
                JobState::Running => bar.set_message("running"),
                JobState::Retrying | JobState::Paused | JobState::Available => {
                    bar.set_message(&state.to_string());
                }
                _ => {}
            }
        }
        JobEventKind::StopRequested { target, reason, .. } => bar.println(format!(
            "  stop requested ({target}){}",
            reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        // Kinds added to the protocol later.
        _ => {}
    }
}

fn show_progress(bar: &ProgressBar, progress: &ProgressInfo) {
    if let Some(total) = progress.items_total() {
        bar.set_length(total);
        bar.set_position(progress.items_done());
    } else if let (Some(fraction), Some(length)) = (progress.fraction(), bar.length()) {
        // Only the fraction is known: place it on the bar's scale.
        bar.set_position((fraction * length as f64).round() as u64);
    }
    bar.set_prefix(progress.stage().unwrap_or_default().to_owned());
    bar.set_message(progress.message().unwrap_or_default().to_owned());
}

/// A progress report as one line: `progress 3/20 (15%) counting: 17 to go`.
fn progress_line(progress: &ProgressInfo) -> String {
    let mut line = String::from("progress");
    if let Some(total) = progress.items_total() {
        line.push_str(&format!(" {}/{total}", progress.items_done()));
    }
    if let Some(fraction) = progress.fraction() {
        line.push_str(&format!(" ({:.0}%)", fraction * 100.0));
    }
    match (progress.stage(), progress.message()) {
        (Some(stage), Some(message)) => line.push_str(&format!(" {stage}: {message}")),
        (Some(text), None) | (None, Some(text)) => line.push_str(&format!(" {text}")),
        (None, None) => {}
    }
    line
}

/// A number from the environment, or `default` when unset or not a number.
fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}
