//! Compiles `proto/jobwire/catalog/v1/*.proto` with protox (pure Rust), so a fresh machine needs
//! no `protoc`. Messages only: the catalog defines payloads, not services.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let dir = root.join("jobwire/catalog/v1");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(files.iter().map(|f| f.strip_prefix(&root).unwrap_or(f)))?;

    // Type names give every message a `prost::Name`, which `jobwire::JobType` requires: the
    // payload travels as a `google.protobuf.Any` named by it.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    config.compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
