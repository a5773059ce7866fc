//! `jobwire.v1.ApiKeyService`: an admin's keys of its tenant (the auth layer lets only admins
//! in; see [`auth::access`]).

use std::{sync::Arc, time::Duration};

use jobwire_proto::v1::{self as pb, api_key_service_server::ApiKeyService};
use tonic::{Request, Response, Status};

use super::{
    ApiError,
    auth::{self, Authenticator, Role},
    convert,
    paging::PageRequest,
    tenant_of, validate,
};
use crate::store::{ApiKeyRow, NewApiKey, Store};

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;
const MAX_NAME: usize = 128;
const MIN_TTL: Duration = Duration::from_secs(1);
const MIN_RATE: f64 = 0.01;
const MAX_RATE: f64 = 100_000.0;
const MAX_BURST: i32 = 100_000;
const MAX_STREAMS: i32 = 100_000;

pub struct ApiKeyApi {
    store: Store,
    auth: Arc<Authenticator>,
}

impl ApiKeyApi {
    pub fn new(store: Store, auth: Arc<Authenticator>) -> Self {
        Self { store, auth }
    }
}

/// A key's name and roles, checked; shared with `jobwire-server keys create`.
pub fn key_spec(name: &str, roles: &[Role]) -> Result<(String, Vec<String>), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid("name", "is required"));
    }
    validate::text("name", name, MAX_NAME)?;
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "must not hold control characters",
        ));
    }
    if roles.is_empty() {
        return Err(ApiError::invalid("roles", "must name at least one role"));
    }
    let mut names: Vec<String> = Vec::with_capacity(roles.len());
    for role in roles {
        if names.iter().any(|n| n == role.as_str()) {
            return Err(ApiError::invalid(
                "roles",
                format!("names {} twice", role.as_str()),
            ));
        }
        names.push(role.as_str().to_owned());
    }
    Ok((name.to_owned(), names))
}

/// A key's stream limit, checked: `None` (0) for the server's default.
pub fn max_streams(value: i32) -> Result<Option<i32>, ApiError> {
    match value {
        0 => Ok(None),
        1..=MAX_STREAMS => Ok(Some(value)),
        _ => Err(ApiError::invalid(
            "max_streams",
            format!("must be between 0 and {MAX_STREAMS}, got {value}"),
        )),
    }
}

/// A key's request limit, checked: calls per second and burst (default: the rate rounded up).
pub fn rate_limit(limit: Option<&pb::KeyRateLimit>) -> Result<Option<(f64, i32)>, ApiError> {
    let Some(limit) = limit else { return Ok(None) };
    let rate = limit.per_second;
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(ApiError::invalid(
            "rate_limit.per_second",
            format!("must be between {MIN_RATE} and {MAX_RATE}, got {rate}"),
        ));
    }
    let burst = match limit.burst {
        // At most MAX_RATE rounded up, so within i32.
        0 => (rate.ceil() as i32).max(1),
        n if (1..=MAX_BURST).contains(&n) => n,
        n => {
            return Err(ApiError::invalid(
                "rate_limit.burst",
                format!("must be between 1 and {MAX_BURST}, got {n}"),
            ));
        }
    };
    Ok(Some((rate, burst)))
}

pub fn api_key(row: ApiKeyRow) -> pb::ApiKey {
    pb::ApiKey {
        id: row.id.to_string(),
        name: row.name,
        roles: row
            .roles
            .iter()
            .filter_map(|r| Role::parse(r))
            .map(|r| r.to_proto() as i32)
            .collect(),
        create_time: Some(convert::timestamp(row.created_at)),
        expire_time: row.expires_at.map(convert::timestamp),
        revoke_time: row.revoked_at.map(convert::timestamp),
        rate_limit: row
            .rate_per_second
            .zip(row.rate_burst)
            .map(|(per_second, burst)| pb::KeyRateLimit { per_second, burst }),
        max_streams: row.max_streams.unwrap_or(0),
    }
}

fn key_id(value: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::try_parse(value)
        .map_err(|_| ApiError::invalid("id", format!("{value:?} is not a key id (a UUID)")))
}

#[tonic::async_trait]
impl ApiKeyService for ApiKeyApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let roles = req
            .roles
            .iter()
            .enumerate()
            .map(|(i, r)| {
                pb::Role::try_from(*r)
                    .ok()
                    .and_then(Role::from_proto)
                    .ok_or_else(|| ApiError::invalid(format!("roles[{i}]"), "is not a role"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (name, roles) = key_spec(&req.name, &roles)?;
        let expires_at = match &req.ttl {
            None => None,
            Some(ttl) => {
                let ttl = validate::duration("ttl", ttl)?;
                if ttl < MIN_TTL {
                    return Err(ApiError::invalid("ttl", "must be at least 1 s").into());
                }
                let ttl = chrono::Duration::from_std(ttl)
                    .map_err(|_| ApiError::invalid("ttl", "is too long"))?;
                Some(chrono::Utc::now() + ttl)
            }
        };
        let rate = rate_limit(req.rate_limit.as_ref())?;
        let max_streams = max_streams(req.max_streams)?;
        let minted = auth::mint();
        let row = self
            .store
            .create_api_key(&NewApiKey {
                id: minted.id,
                tenant,
                name,
                roles,
                secret_sha256: minted.secret_sha256,
                expires_at,
                rate,
                max_streams,
            })
            .await
            .map_err(ApiError::from)?;
        tracing::info!(key = %row.id, name = %row.name, tenant = %row.tenant_id, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(api_key(row)),
            secret: minted.secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<uuid::Uuid, ()>::parse(
            req.page_size,
            &req.page_token,
            (),
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        let rows = self
            .store
            .list_api_keys(&tenant, paging.after, paging.limit())
            .await
            .map_err(ApiError::from)?;
        let candidates = rows.into_iter().map(api_key).collect();
        let (api_keys, next_page_token) = paging.page(candidates, false, |key| {
            uuid::Uuid::try_parse(&key.id).map_err(|e| ApiError::Internal(e.to_string()))
        })?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys,
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let id = key_id(&request.get_ref().id)?;
        let row = self
            .store
            .revoke_api_key(&tenant, id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("API key {id} not found")))?;
        self.auth.forget(id);
        tracing::info!(key = %row.id, name = %row.name, tenant = %row.tenant_id, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(api_key(row)),
        }))
    }
}
