//! How the SDK reaches the server: the endpoint settings and the tenant header, in one place so
//! that the client and the worker connect the same way.
//!
//! HTTP/2 keep-alive pings are on because a worker's stream can sit idle for long stretches and
//! must still notice a server that vanished without closing its socket; otherwise its leases
//! would lapse while it believes it is connected.

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Endpoint;

use crate::Error;

/// The request header naming the tenant every call acts within (see `JobService`).
pub(crate) const TENANT_HEADER: &str = "jobwire-tenant";

/// How long to wait for a TCP connection before giving up on one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to ping the server on a connection.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint for `url` (such as `http://127.0.0.1:50051`) with the SDK's settings.
pub(crate) fn endpoint(url: String) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|err| Error::Config(format!("invalid server address {url:?}: {err}")))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// The tenant a client or worker acts for; `None` leaves the header out, which the server reads
/// as the tenant `default`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tenant(Option<AsciiMetadataValue>);

impl Tenant {
    /// Checks `name` once, at configuration time, so that no call fails later on a bad header.
    pub(crate) fn parse(name: &str) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::Config("the tenant must not be empty".into()));
        }
        MetadataValue::try_from(name)
            .map(|value| Self(Some(value)))
            .map_err(|_| {
                Error::Config(format!(
                    "the tenant {name:?} is not a valid header value (visible ASCII only)"
                ))
            })
    }

    /// The tenant's name, if one was set.
    pub(crate) fn name(&self) -> Option<&str> {
        self.0.as_ref().and_then(|value| value.to_str().ok())
    }

    /// Wraps `message` in a request that carries the tenant header.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(TENANT_HEADER, value.clone());
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_header_is_set_only_when_named() {
        let request = Tenant::default().request(());
        assert!(request.metadata().get(TENANT_HEADER).is_none());

        let tenant = Tenant::parse("acme").expect("valid tenant");
        assert_eq!(tenant.name(), Some("acme"));
        let request = tenant.request(());
        assert_eq!(
            request
                .metadata()
                .get(TENANT_HEADER)
                .map(|v| v.to_str().ok()),
            Some(Some("acme"))
        );
    }

    #[test]
    fn bad_tenants_are_refused_up_front() {
        assert!(matches!(Tenant::parse(""), Err(Error::Config(_))));
        assert!(matches!(Tenant::parse("a\nb"), Err(Error::Config(_))));
    }

    #[test]
    fn bad_addresses_are_config_errors() {
        assert!(matches!(
            endpoint("not a uri".into()),
            Err(Error::Config(_))
        ));
        assert!(endpoint("http://127.0.0.1:50051".into()).is_ok());
    }
}
