//! The connection every command but `completions` makes: the SDK's [`Client`] built from the
//! global options (address, API key, tenant, TLS files).
//!
//! The SDK checks every setting before it connects and connects at once, so a bad key or
//! certificate is invalid input (exit 2) and an unreachable server is unavailable (exit 4),
//! both before the command's first call.

use std::path::Path;

use jobwire::{Client, Tls};

use crate::args::Global;
use crate::error::Failure;

/// Connects as the global options say.
pub async fn connect(global: &Global) -> Result<Client, Failure> {
    let mut builder = Client::builder(global.url.clone());
    if let Some(key) = &global.api_key {
        builder = builder.api_key(key);
    }
    if let Some(tenant) = &global.tenant {
        builder = builder.tenant(tenant);
    }
    if global.ca_cert.is_some() || global.client_cert.is_some() {
        let mut tls = Tls::new();
        if let Some(path) = &global.ca_cert {
            tls = tls.root_certificates(read(path, "--ca-cert")?);
        }
        if let (Some(cert), Some(key)) = (&global.client_cert, &global.client_key) {
            tls = tls.client_identity(read(cert, "--client-cert")?, read(key, "--client-key")?);
        }
        builder = builder.tls(tls);
    }
    Ok(builder.connect().await?)
}

/// The contents of a PEM file named by `option`.
fn read(path: &Path, option: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|err| Failure::Input(format!("{option}: reading {}: {err}", path.display())))
}
