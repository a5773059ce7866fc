//! `jobwire jobs watch ID`: follows one job's events until it ends, and exits with its outcome.
//!
//! The events come from the SDK's [`Client::watch_job`], which resumes after the last event
//! it took whenever the stream breaks, so a server restart mid-watch neither loses nor repeats
//! a line. Three ways to show them, chosen once:
//! - stdout a terminal: a live progress bar (indicatif) with the stage, items or percent, the
//!   handler's message and the server's ETA; state changes and log lines print above it, and
//!   the last line is the outcome;
//! - otherwise: one plain line per event, the last one the outcome;
//! - `--json`: one `JobEvent` per line in the proto3 JSON mapping.
//!
//! The exit code is the outcome: 0 for SUCCEEDED, 6 for FAILED, 7 for CANCELLED (see
//! [`crate::error`]). The job is read first, so an unknown id exits 3 before any stream opens.

use std::io::IsTerminal as _;
use std::time::Duration;

use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jobwire::{Client, JobState};
use jobwire_proto::v1 as pb;
use jobwire_proto::v1::job_event::Event;

use crate::error::Failure;
use crate::jobs::{self, error_text};
use crate::render::{self, Pool, line};

/// How often the bar redraws by itself: its spinner turns, and a draw the rate limit skipped
/// still reaches the screen.
const TICK: Duration = Duration::from_millis(100);
/// How often the ETA shown is counted down between progress reports.
const ETA_REFRESH: Duration = Duration::from_secs(1);

/// Watches job `id` to its end.
pub async fn run(client: &Client, pool: Pool, json: bool, id: &str) -> Result<(), Failure> {
    let job = client.get_job(id).await?.into_proto();
    let pool = jobs::with_types(pool, client, [&job]).await;
    let mut view = if json {
        View::Json
    } else if std::io::stdout().is_terminal() {
        View::Bar(Box::new(Bar::new(&job)?))
    } else {
        View::Plain
    };
    let mut events = client.watch_job(id, 0);
    let mut refresh = tokio::time::interval(ETA_REFRESH);
    let mut last_state = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = refresh.tick() => {
                if let View::Bar(bar) = &view {
                    bar.refresh_eta();
                }
                continue;
            }
        };
        let event = match event {
            None => break,
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                view.abandon();
                return Err(error.into());
            }
        };
        if let Some(state) = event.state() {
            last_state = Some(state);
        }
        view.show(&pool, event.as_proto(), event.is_terminal())?;
    }
    match last_state {
        Some(JobState::Succeeded) => Ok(()),
        Some(state @ (JobState::Failed | JobState::Cancelled)) => Err(Failure::JobEnded {
            id: id.to_owned(),
            state,
        }),
        _ => Err(Failure::Internal(format!(
            "the watch of job {id} ended before the job did"
        ))),
    }
}

/// Where the events go.
enum View {
    Json,
    Plain,
    /// Boxed: the bar and its styles dwarf the other views.
    Bar(Box<Bar>),
}

impl View {
    fn show(&mut self, pool: &Pool, event: &pb::JobEvent, terminal: bool) -> Result<(), Failure> {
        match self {
            Self::Json => pool.print(event),
            Self::Plain => line(&event_line(pool, event)),
            Self::Bar(bar) => bar.show(pool, event, terminal),
        }
    }

    /// Leaves the bar where it is, for an error message below it.
    fn abandon(&self) {
        if let Self::Bar(bar) = self {
            bar.bar.abandon();
        }
    }
}

/// The live progress bar, and what it last showed.
struct Bar {
    bar: ProgressBar,
    /// Before any progress, or while the handler does not know how much is left.
    spinner: ProgressStyle,
    /// Progress counted in items: `done/total`.
    items: ProgressStyle,
    /// Progress as a fraction only.
    fraction: ProgressStyle,
    /// The last progress, for counting its ETA down.
    last: Option<pb::Progress>,
}

/// Fractions are shown on a scale of this many steps.
const FRACTION_SCALE: u64 = 1000;

impl Bar {
    fn new(job: &pb::Job) -> Result<Self, Failure> {
        let style = |template: &str| {
            ProgressStyle::with_template(template)
                .map(|style| style.progress_chars("=> "))
                .map_err(|err| Failure::Internal(format!("the progress bar's template: {err}")))
        };
        let spinner = style("{spinner} {prefix}{msg}")?;
        let items = style("{spinner} {prefix}[{bar:30}] {pos}/{len} {percent}% {msg}")?;
        let fraction = style("{spinner} {prefix}[{bar:30}] {percent}% {msg}")?;
        line(&format!(
            "watching job {} ({}, queue {})",
            job.id, job.job_type, job.queue
        ))?;
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        bar.set_style(spinner.clone());
        bar.set_message(render::state(job.state));
        bar.enable_steady_tick(TICK);
        Ok(Self {
            bar,
            spinner,
            items,
            fraction,
            last: None,
        })
    }

    fn show(&mut self, pool: &Pool, event: &pb::JobEvent, terminal: bool) -> Result<(), Failure> {
        match &event.event {
            Some(Event::Progress(progress)) => self.progress(progress),
            Some(Event::Log(log)) => {
                self.bar
                    .println(format!("{} {}", log_level(log.level), log.message))
            }
            Some(Event::StateChanged(change)) => {
                let text = event_line(pool, event);
                if terminal {
                    if change.state == pb::JobState::Succeeded as i32 {
                        self.bar.finish();
                    } else {
                        self.bar.abandon();
                    }
                    return line(&text);
                }
                self.bar.println(text);
                if self.last.is_none() {
                    self.bar.set_message(render::state(change.state));
                }
            }
            Some(Event::StopRequested(_) | Event::SignalReceived(_)) | None => {
                self.bar.println(event_line(pool, event))
            }
        }
        Ok(())
    }

    fn progress(&mut self, progress: &pb::Progress) {
        let (style, length, position) = if progress.items_total > 0 {
            let total = u64::try_from(progress.items_total).unwrap_or(0);
            let done = u64::try_from(progress.items_done).unwrap_or(0);
            (&self.items, total, done)
        } else if let Some(fraction) = progress.fraction {
            let position = (fraction.clamp(0.0, 1.0) * FRACTION_SCALE as f64).round() as u64;
            (&self.fraction, FRACTION_SCALE, position)
        } else {
            (&self.spinner, 0, 0)
        };
        self.bar.set_style(style.clone());
        self.bar.set_length(length);
        self.bar.set_position(position);
        self.bar.set_prefix(if progress.stage.is_empty() {
            String::new()
        } else {
            format!("[{}] ", progress.stage)
        });
        self.last = Some(progress.clone());
        self.refresh_eta();
    }

    /// Shows the handler's message and the time left until the server's ETA, as of now.
    fn refresh_eta(&self) {
        let Some(progress) = &self.last else {
            return;
        };
        let mut message = progress.message.clone();
        if let Some(eta) = render::eta(progress) {
            if !message.is_empty() {
                message.push_str(" · ");
            }
            message.push_str(&format!("eta {eta}"));
        }
        self.bar.set_message(message);
    }
}

/// One event as a line of text, the time first.
fn event_line(pool: &Pool, event: &pb::JobEvent) -> String {
    let time = render::time(event.time.as_ref());
    let text = match &event.event {
        Some(Event::StateChanged(change)) => state_line(pool, event.attempt, change),
        Some(Event::Progress(progress)) => format!("progress {}", render::progress(progress)),
        Some(Event::Log(log)) => format!("log {} {}", log_level(log.level), log.message),
        Some(Event::StopRequested(stop)) => {
            let mut text = format!("stop requested: {}", render::state(stop.target_state));
            if !stop.reason.is_empty() {
                text.push_str(&format!(" ({})", stop.reason));
            }
            text.push_str(&actor_text(stop.actor.as_ref()));
            text
        }
        Some(Event::SignalReceived(signal)) => {
            format!(
                "signal {}{}",
                signal.name,
                actor_text(signal.actor.as_ref())
            )
        }
        None => "an event this tool does not know".into(),
    };
    format!("{time} {text}")
}

/// A state change: the state, the attempt and worker, why, and for an end its outcome.
fn state_line(pool: &Pool, attempt: i32, change: &pb::StateChanged) -> String {
    let mut text = render::state(change.state);
    if attempt > 0 {
        text.push_str(&format!(" attempt {attempt}"));
    }
    if !change.worker_id.is_empty() {
        text.push_str(&format!(" on {}", change.worker_id));
    }
    if !change.reason.is_empty() {
        text.push_str(&format!(": {}", change.reason));
    }
    if let Some(error) = &change.error {
        text.push_str(&format!(": {}", error_text(error)));
    }
    text.push_str(&actor_text(change.actor.as_ref()));
    if change.state == pb::JobState::Succeeded as i32
        && let Some(job) = &change.job
    {
        let result = match (&job.result_json, &job.result) {
            (Some(json), _) => pool.struct_text(json),
            (None, Some(any)) => pool.any_text(any),
            (None, None) => String::new(),
        };
        if !result.is_empty() {
            text.push_str(&format!(", result {result}"));
        }
    }
    text
}

/// Who made a change through the API, as ` by <key name> (<key id>)`; empty for the server's
/// own transitions.
fn actor_text(actor: Option<&pb::Actor>) -> String {
    match actor {
        None => String::new(),
        Some(actor) if actor.key_id.is_empty() => format!(" by {}", actor.key_name),
        Some(actor) => format!(" by {} ({})", actor.key_name, actor.key_id),
    }
}

fn log_level(level: i32) -> String {
    pb::LogLevel::try_from(level)
        .map(|level| render::enum_name(level.as_str_name(), "LOG_LEVEL_"))
        .unwrap_or_else(|_| "LOG".into())
}
