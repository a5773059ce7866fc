//! [`ClientBuilder`]: where a [`Client`] connects and how: tenant, API key, TLS.
//!
//! Every setting is checked by [`connect`](ClientBuilder::connect) before any connection is
//! made, so a bad tenant, key or certificate is an [`Error::Config`] and never a failed call
//! later.

use std::fmt;

use crate::Error;
use crate::client::Client;
use crate::transport::{self, Headers, Tls};

/// Configures a [`Client`]: made by [`Client::builder`], finished by
/// [`connect`](Self::connect).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use jobwire::{Client, Tls};
///
/// let client = Client::builder("https://127.0.0.1:50051")
///     .tenant("acme")
///     .api_key(std::env::var("JOBWIRE_API_KEY")?)
///     .tls(Tls::new().root_certificates(std::fs::read("ca.pem")?))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until it connects"]
pub struct ClientBuilder {
    url: String,
    tenant: Option<String>,
    api_key: Option<String>,
    tls: Option<Tls>,
}

impl ClientBuilder {
    pub(super) fn new(url: String) -> Self {
        Self {
            url,
            tenant: None,
            api_key: None,
            tls: None,
        }
    }

    /// The tenant every call acts within (sent as the `jobwire-tenant` header; default: the
    /// server's `default` tenant).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// The API key sent on every call, as `authorization: Bearer <key>` (default: none).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// TLS settings: root certificates to trust, a client certificate; the address must start
    /// with `https://` (which without them trusts the system's roots).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks the settings and connects. The first connection is made now, so a wrong address
    /// or a certificate the server refuses fails here rather than on the first call; later the
    /// channel reconnects by itself after the server restarts.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the address, tenant, key or TLS settings are invalid (TLS
    /// settings for an `http://` address included), [`Error::Transport`] when the server
    /// cannot be reached or the TLS handshake fails.
    pub async fn connect(self) -> Result<Client, Error> {
        let mut headers = Headers::default();
        if let Some(tenant) = &self.tenant {
            headers = headers.with_tenant(tenant)?;
        }
        if let Some(key) = &self.api_key {
            headers = headers.with_api_key(key)?;
        }
        let endpoint = transport::endpoint(self.url, self.tls.as_ref())?;
        let channel = endpoint.connect().await?;
        Ok(Client::with_headers(channel, headers))
    }
}

impl fmt::Debug for ClientBuilder {
    /// Shows every setting but the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("tenant", &self.tenant)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn config_error(builder: ClientBuilder) -> String {
        match builder.connect().await {
            Err(Error::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn settings_are_checked_before_connecting() {
        // Port 1 refuses connections: a config error proves nothing was tried.
        let builder = || Client::builder("http://127.0.0.1:1");
        assert!(config_error(builder().tenant("")).await.contains("tenant"));
        assert!(
            config_error(builder().api_key("a b"))
                .await
                .contains("API key")
        );
        assert!(
            config_error(builder().tls(Tls::new()))
                .await
                .contains("https://")
        );
    }

    #[test]
    fn the_key_is_never_shown() {
        let builder = Client::builder("http://127.0.0.1:1").api_key("jw_secret");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("jw_secret"), "{shown}");
    }
}
