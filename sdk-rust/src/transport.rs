//! How the SDK reaches the server: the endpoint settings, TLS, and the headers every call
//! carries (tenant and API key), in one place so that the client and the worker connect the
//! same way.
//!
//! HTTP/2 keep-alive pings are on because a worker's stream can sit idle for long stretches and
//! must still notice a server that vanished without closing its socket; otherwise its leases
//! would lapse while it believes it is connected.
//!
//! TLS is rustls (with the ring provider) inside tonic. An `https://` address uses TLS, with the
//! root certificates of a [`Tls`] or, without any, the system's; an `http://` address is
//! plaintext, and TLS settings given for one are refused rather than silently unused.
//!
//! Authentication: an API key goes in `authorization: Bearer <key>` on every call and on the
//! worker's stream, as plain metadata (as the Python SDK sends it), so it works over plaintext
//! and TLS alike. The key is marked sensitive (HTTP/2 never indexes it) and never shown by
//! `Debug` or in an error.

use std::fmt;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// The request header naming the tenant every call acts within (see `JobService`).
pub(crate) const TENANT_HEADER: &str = "jobwire-tenant";
/// The request header carrying the API key, as `Bearer <key>`.
pub(crate) const AUTHORIZATION_HEADER: &str = "authorization";

/// How long to wait for a TCP connection before giving up on one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take, once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often to ping the server on a connection.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings for a [`Client`](crate::Client) or [`Worker`](crate::Worker) whose address
/// starts with `https://`.
///
/// With none of them set, an `https://` address trusts the system's root certificates. For a
/// server whose certificate a private CA issued, give that CA with
/// [`root_certificates`](Self::root_certificates); for a server that requires client
/// certificates (`--tls-client-ca`), give one with [`client_identity`](Self::client_identity).
/// The same settings as the Python SDK's `jobwire.Tls`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use jobwire::{Client, Tls};
///
/// let tls = Tls::new()
///     .root_certificates(std::fs::read("ca.pem")?)
///     .client_identity(std::fs::read("client.pem")?, std::fs::read("client-key.pem")?);
/// let client = Client::builder("https://jobs.example.com:50051")
///     .tls(tls)
///     .api_key(std::env::var("JOBWIRE_API_KEY")?)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Tls {
    root_certificates: Option<Vec<u8>>,
    /// Certificate chain and private key, both PEM.
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
}

impl Tls {
    /// No settings: the system's root certificates, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts these certificates (PEM, one or more) for the server's certificate, instead of
    /// the system's roots; replaces any given before.
    pub fn root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates = Some(pem.into());
        self
    }

    /// Presents this client certificate (PEM, the certificate first, then any intermediates)
    /// with its private key (PEM) to a server that requires one: mutual TLS.
    pub fn client_identity(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_identity = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Checks the server's certificate for this name instead of the address's host (for a
    /// certificate issued to a name the address does not use).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The settings as tonic takes them, every PEM checked.
    fn to_client_config(&self) -> Result<ClientTlsConfig, Error> {
        let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
        config = match &self.root_certificates {
            Some(pem) => {
                check_certificates(pem, "the TLS root certificates")?;
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        if let Some((certificate, key)) = &self.client_identity {
            check_certificates(certificate, "the TLS client certificate")?;
            if PrivateKeyDer::from_pem_slice(key).is_err() {
                return Err(Error::Config(
                    "the TLS client key: no private key in it (PEM: PKCS#8, PKCS#1 or SEC1)".into(),
                ));
            }
            config = config.identity(Identity::from_pem(certificate, key));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

impl fmt::Debug for Tls {
    /// Shows which settings are given, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("root_certificates", &self.root_certificates.is_some())
            .field("client_identity", &self.client_identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Fails unless `pem` holds at least one certificate and nothing malformed.
fn check_certificates(pem: &[u8], what: &str) -> Result<(), Error> {
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|err| Error::Config(format!("{what}: not valid PEM ({err})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Config(format!(
            "{what}: no certificate in it (a PEM `BEGIN CERTIFICATE` block)"
        )));
    }
    Ok(())
}

/// The endpoint for `url` (such as `http://127.0.0.1:50051` or `https://jobs.example.com`)
/// with the SDK's settings, TLS for `https://`.
pub(crate) fn endpoint(url: String, tls: Option<&Tls>) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|err| Error::Config(format!("invalid server address {url:?}: {err}")))?;
    let endpoint = match (endpoint.uri().scheme_str(), tls) {
        (Some("https"), tls) => {
            let config = tls.cloned().unwrap_or_default().to_client_config()?;
            endpoint
                .tls_config(config)
                .map_err(|err| Error::Config(format!("the TLS settings cannot be used: {err}")))?
        }
        (_, Some(_)) => {
            return Err(Error::Config(format!(
                "TLS settings are given but the server address {url:?} is not https://"
            )));
        }
        (_, None) => endpoint,
    };
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// The headers every call of a client or worker carries: the tenant it acts for and its API
/// key. `Default` sends neither: the server's `default` tenant, no key.
#[derive(Clone, Default)]
pub(crate) struct Headers {
    tenant: Option<AsciiMetadataValue>,
    /// `Bearer <key>`, marked sensitive.
    authorization: Option<AsciiMetadataValue>,
}

impl Headers {
    /// These headers acting for `tenant`, checked once, at configuration time, so that no call
    /// fails later on a bad header.
    pub(crate) fn with_tenant(mut self, name: &str) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::Config("the tenant must not be empty".into()));
        }
        let value = MetadataValue::try_from(name).map_err(|_| {
            Error::Config(format!(
                "the tenant {name:?} is not a valid header value (visible ASCII only)"
            ))
        })?;
        self.tenant = Some(value);
        Ok(self)
    }

    /// These headers with the API key `key`, checked once; the key never appears in an error.
    pub(crate) fn with_api_key(mut self, key: &str) -> Result<Self, Error> {
        if key.is_empty() || !key.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(Error::Config(
                "the API key must be non-empty visible ASCII, without spaces".into(),
            ));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| Error::Config("the API key is not a valid header value".into()))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// The tenant's name, if one was set.
    pub(crate) fn tenant(&self) -> Option<&str> {
        self.tenant.as_ref().and_then(|value| value.to_str().ok())
    }

    /// Wraps `message` in a request that carries the headers.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        if let Some(value) = &self.tenant {
            metadata.insert(TENANT_HEADER, value.clone());
        }
        if let Some(value) = &self.authorization {
            metadata.insert(AUTHORIZATION_HEADER, value.clone());
        }
        request
    }
}

impl fmt::Debug for Headers {
    /// Shows the tenant and whether a key is set, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Headers")
            .field("tenant", &self.tenant())
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<T>(request: &tonic::Request<T>, name: &str) -> Option<String> {
        request
            .metadata()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
    }

    #[test]
    fn headers_are_set_only_when_named() {
        let request = Headers::default().request(());
        assert_eq!(header(&request, TENANT_HEADER), None);
        assert_eq!(header(&request, AUTHORIZATION_HEADER), None);

        let headers = Headers::default()
            .with_tenant("acme")
            .expect("valid tenant")
            .with_api_key("jw_secret")
            .expect("valid key");
        assert_eq!(headers.tenant(), Some("acme"));
        let request = headers.request(());
        assert_eq!(header(&request, TENANT_HEADER).as_deref(), Some("acme"));
        assert_eq!(
            header(&request, AUTHORIZATION_HEADER).as_deref(),
            Some("Bearer jw_secret")
        );
        assert!(
            request
                .metadata()
                .get(AUTHORIZATION_HEADER)
                .is_some_and(|v| v.is_sensitive())
        );
    }

    #[test]
    fn the_key_is_never_shown() {
        let headers = Headers::default()
            .with_api_key("jw_secret")
            .expect("valid key");
        let shown = format!("{headers:?}");
        assert!(!shown.contains("jw_secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        let tls = Tls::new().client_identity("CERT", "KEY-SECRET");
        assert!(!format!("{tls:?}").contains("KEY-SECRET"));
    }

    #[test]
    fn bad_tenants_and_keys_are_refused_up_front() {
        let config = |result: Result<Headers, Error>| match result {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert!(config(Headers::default().with_tenant("")).contains("tenant"));
        assert!(config(Headers::default().with_tenant("a\nb")).contains("tenant"));
        for key in ["", "two words", "line\nbreak", "ünïcode"] {
            let message = config(Headers::default().with_api_key(key));
            assert!(message.contains("API key"), "{message}");
            if !key.is_empty() {
                assert!(!message.contains(key), "{message}");
            }
        }
    }

    #[test]
    fn bad_addresses_are_config_errors() {
        assert!(matches!(
            endpoint("not a uri".into(), None),
            Err(Error::Config(_))
        ));
        assert!(endpoint("http://127.0.0.1:50051".into(), None).is_ok());
    }

    #[test]
    fn tls_settings_need_an_https_address_and_real_pem() {
        let error = |url: &str, tls: &Tls| match endpoint(url.into(), Some(tls)) {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        };
        let message = error("http://127.0.0.1:50051", &Tls::new());
        assert!(message.contains("https://"), "{message}");

        let junk = Tls::new().root_certificates("not a certificate");
        let message = error("https://127.0.0.1:50051", &junk);
        assert!(message.contains("root certificates"), "{message}");

        let no_key = Tls::new().client_identity("-----BEGIN CERTIFICATE-----\n", "junk");
        let message = error("https://127.0.0.1:50051", &no_key);
        assert!(message.contains("client certificate"), "{message}");
    }
}
