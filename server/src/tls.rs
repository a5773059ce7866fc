//! TLS for the gRPC listener: the PEM files named by `--tls-cert`, `--tls-key` and
//! `--tls-client-ca`, read once at start-up and turned into tonic's [`ServerTlsConfig`].
//!
//! Every file is read and parsed here, and each error names its flag and path, so that a wrong
//! file stops the server before it serves anything rather than failing each handshake later.
//! The handshakes themselves are rustls's (with the ring provider) inside tonic; nothing here
//! does cryptography, it only reads PEM.
//!
//! With TLS on, every connection is TLS: a plaintext client fails the handshake and gets no
//! response. With `--tls-client-ca` the handshake also requires a client certificate issued by
//! that CA (mutual TLS). The ready line and the health service do not depend on any of it:
//! health is fed from inside the process (see `server::report_health`), never by a probe over
//! the network.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::Config;

/// How long a client may take to finish its TLS handshake. Handshakes run beside the accept
/// loop, but each one holds a socket: a peer that opens connections and never speaks must not
/// hold them for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS file that cannot be used, named by its flag and path.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("--{flag} {}: cannot read it: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file holds no usable PEM of the kind the flag needs.
    #[error("--{flag} {}: {problem}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// The files parse, but rustls refuses them together (say, a key that is not the
    /// certificate's).
    #[error(
        "--tls-cert {} with --tls-key {}: not a usable identity: {source}",
        cert.display(),
        key.display()
    )]
    Refused {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The TLS settings that `config` asks for, checked; `None` when it asks for none (plaintext).
///
/// [`Config::validate`] has made sure that `--tls-cert` and `--tls-key` come together and that
/// `--tls-client-ca` comes with them; a lone key or CA is ignored here.
pub fn load(config: &Config) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let cert = read_certificates("tls-cert", cert_path)?;
    let key = read_private_key("tls-key", key_path)?;
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca_path) = &config.tls_client_ca {
        let ca = read_certificates("tls-client-ca", ca_path)?;
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    // Builds the acceptor once now, so that what rustls refuses is refused at start-up.
    Server::builder()
        .tls_config(tls.clone())
        .map_err(|source| TlsError::Refused {
            cert: cert_path.clone(),
            key: key_path.clone(),
            source,
        })?;
    Ok(Some(tls))
}

/// `builder` serving TLS when `tls` is set, plaintext otherwise.
pub fn apply<L>(
    builder: Server<L>,
    tls: Option<ServerTlsConfig>,
) -> Result<Server<L>, tonic::transport::Error> {
    match tls {
        Some(tls) => builder.tls_config(tls),
        None => Ok(builder),
    }
}

/// The PEM file at `path`, holding at least one certificate and nothing unreadable.
fn read_certificates(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    let invalid = |problem: String| TlsError::Invalid {
        flag,
        path: path.to_owned(),
        problem,
    };
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|error| invalid(format!("not valid PEM: {error}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid(
            "holds no certificate (a PEM `BEGIN CERTIFICATE` block)".into(),
        ));
    }
    Ok(pem)
}

/// The PEM file at `path`, holding a private key.
fn read_private_key(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| TlsError::Invalid {
        flag,
        path: path.to_owned(),
        problem: format!("holds no private key (PEM: PKCS#8, PKCS#1 or SEC1): {error}"),
    })?;
    Ok(pem)
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["jobwire-server"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("flags parse")
    }

    fn error(args: &[&str]) -> String {
        match load(&config(args)) {
            Err(error) => error.to_string(),
            Ok(tls) => panic!("expected an error, got {tls:?}"),
        }
    }

    #[test]
    fn no_flags_mean_plaintext() {
        assert!(load(&config(&[])).expect("no TLS").is_none());
    }

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().expect("UTF-8 path");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let junk = junk.to_str().expect("UTF-8 path");

        let message = error(&["--tls-cert", missing, "--tls-key", junk]);
        assert!(message.starts_with("--tls-cert "), "{message}");
        assert!(message.contains("missing.pem"), "{message}");
        assert!(message.contains("cannot read"), "{message}");

        let message = error(&["--tls-cert", junk, "--tls-key", missing]);
        assert!(message.starts_with("--tls-cert "), "{message}");
        assert!(message.contains("junk.pem"), "{message}");
        assert!(message.contains("no certificate"), "{message}");
    }
}
