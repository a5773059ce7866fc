//! Generates the job types of `proto/jobwire/tests/v1/codegen.proto` with `jobwire-build`, as a
//! producer's crate would.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    jobwire_build::compile(&["proto/jobwire/tests/v1/codegen.proto"], &["proto"])?;
    Ok(())
}
