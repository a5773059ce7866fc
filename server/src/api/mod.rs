//! The gRPC API: one file per service, plus the pieces they share.
//!
//! Handlers stay thin: read the tenant, validate the request into domain types ([`validate`]),
//! call one store or engine function, convert the result ([`convert`]). Every failure becomes an
//! [`ApiError`], which maps to a `tonic::Status` in exactly one place ([`error`]).

pub mod api_key_service;
pub mod audit_service;
pub mod auth;
pub mod budget;
pub mod convert;
pub mod error;
pub mod job_service;
pub mod job_type_service;
pub mod paging;
pub mod payloads;
pub mod queue_service;
pub mod schedule_service;
pub mod validate;
pub mod watch;
pub mod worker_messages;
pub mod worker_service;

pub use error::ApiError;

use crate::domain::{Actor, TenantId};

/// The request header naming the tenant a call acts for.
pub const TENANT_HEADER: &str = "jobwire-tenant";

/// Who is making a request, for the job events it writes: its API key, or nobody named on a
/// server running open.
pub fn actor_of<T>(request: &tonic::Request<T>) -> Actor {
    request
        .extensions()
        .get::<auth::Identity>()
        .map_or_else(Actor::open, auth::Identity::actor)
}

/// The tenant of a request: its API key's ([`auth`]), whatever the headers say; without a key
/// (a server running open), its `jobwire-tenant` header, or the default tenant.
pub fn tenant_of<T>(request: &tonic::Request<T>) -> Result<TenantId, ApiError> {
    if let Some(identity) = request.extensions().get::<auth::Identity>() {
        return Ok(identity.tenant.clone());
    }
    match request.metadata().get(TENANT_HEADER) {
        None => Ok(TenantId::default_tenant()),
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| ApiError::invalid(TENANT_HEADER, "must be printable ASCII"))?;
            validate::tenant(value)
        }
    }
}
