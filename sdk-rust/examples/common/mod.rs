//! The job type shared by the `quickstart` (producer) and `worker` examples, so both sides
//! agree on its name and messages the way two real services would through a shared crate.
//!
//! The messages are written by hand with prost's derive; generated code from a `.proto` file
//! works the same way as long as it implements `prost::Name`.

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

/// The server address: `JOBWIRE_URL`, or a local server on the default port.
pub fn server_url() -> String {
    std::env::var("JOBWIRE_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
