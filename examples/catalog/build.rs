//! Compiles `proto/jobwire/catalog/v1/catalog.proto` with `jobwire-build` (protox, pure Rust: a
//! fresh machine needs no `protoc`), which also generates the `jobwire::JobType` impl of every
//! payload from its `(jobwire.v1.job)` option.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    jobwire_build::compile(&["proto/jobwire/catalog/v1/catalog.proto"], &["proto"])?;
    Ok(())
}
