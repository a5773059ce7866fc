//! Compiles `jobwire/v1/*.proto` with protox (pure Rust), so a fresh machine needs no `protoc`.
//! The encoded descriptor set is written next to the generated code for server reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let dir = root.join("jobwire/v1");
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

    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("jobwire_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Type names let the SDK pack payloads into `Any` without a hand-written type URL.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    // `build_transport(false)`: the worker RPC is named `Connect` (docs/architecture.md), which
    // would collide with the generated `connect` constructor; clients are built from a `Channel`
    // instead.
    // Every service and client decodes through `codec::Codec`: a malformed body is the
    // caller's INVALID_ARGUMENT, not the server's INTERNAL.
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::Codec")
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}
