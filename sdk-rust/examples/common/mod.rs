//! The job types shared by the producer examples (`quickstart`, `progress`) and the `worker`
//! example, so both sides agree on names and messages the way two real services would through
//! a shared crate.
//!
//! The messages are written by hand with prost's derive; generated code from a `.proto` file
//! works the same way as long as it implements `prost::Name`.

// Each producer example is its own crate and uses only its own job type from here.
#![allow(dead_code, reason = "each example uses only part of this module")]

use jobwire::JobType;

/// Resize the image at `url` to `width` pixels wide.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resize {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(uint32, tag = "2")]
    pub width: u32,
}

impl prost::Name for Resize {
    const NAME: &'static str = "Resize";
    const PACKAGE: &'static str = "jobwire.examples";
}

/// Where the resized image went, and its size.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResizeOutput {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(uint32, tag = "2")]
    pub width: u32,
    #[prost(uint32, tag = "3")]
    pub height: u32,
}

impl prost::Name for ResizeOutput {
    const NAME: &'static str = "ResizeOutput";
    const PACKAGE: &'static str = "jobwire.examples";
}

impl JobType for Resize {
    const JOB_TYPE: &'static str = "image.resize";
    type Output = ResizeOutput;
}

/// Count `steps` steps of `step_millis` each, reporting progress, logging, and saving a
/// checkpoint now and then, so that a paused or interrupted countdown resumes where it was.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Countdown {
    #[prost(uint32, tag = "1")]
    pub steps: u32,
    #[prost(uint32, tag = "2")]
    pub step_millis: u32,
}

impl prost::Name for Countdown {
    const NAME: &'static str = "Countdown";
    const PACKAGE: &'static str = "jobwire.examples";
}

/// How a countdown went: the steps counted, and the step the last attempt started from.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountdownOutput {
    #[prost(uint32, tag = "1")]
    pub steps: u32,
    #[prost(uint32, tag = "2")]
    pub resumed_from: u32,
    #[prost(uint32, tag = "3")]
    pub attempt: u32,
}

impl prost::Name for CountdownOutput {
    const NAME: &'static str = "CountdownOutput";
    const PACKAGE: &'static str = "jobwire.examples";
}

impl JobType for Countdown {
    const JOB_TYPE: &'static str = "demo.countdown";
    type Output = CountdownOutput;
}

/// A countdown's checkpoint: the steps done so far.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountdownCheckpoint {
    #[prost(uint32, tag = "1")]
    pub done: u32,
}

/// The server address: `JOBWIRE_URL`, or a local server on the default port.
pub fn server_url() -> String {
    std::env::var("JOBWIRE_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned())
}

/// The API key to send, from `JOBWIRE_API_KEY`: needed once the server has keys.
pub fn api_key() -> Option<String> {
    std::env::var("JOBWIRE_API_KEY")
        .ok()
        .filter(|key| !key.is_empty())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in colour only when stderr is a
/// terminal: redirected to a file or a pipe, the lines carry no escape codes.
pub fn init_tracing() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
