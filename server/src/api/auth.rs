//! Who is calling: API keys, their tenant and roles, and what each role may call.
//!
//! A key is `jw_<id>_<secret>`: the id (a UUID, in hex) finds the key's row, and the secret
//! (256 random bits, URL-safe base64) is checked against the SHA-256 digest stored there, in
//! constant time. One layer in front of every service ([`AuthLayer`]) authenticates each call
//! and checks its method against [`access`], before any handler runs; the handler reads the
//! caller's [`Identity`] (its tenant) from the request. Health checks and reflection are public.
//!
//! With keys required, a call without one is UNAUTHENTICATED, and a key whose roles do not
//! allow the method is PERMISSION_DENIED, each saying what is missing. A server that runs open
//! (no key exists and it listens on a loopback address, or `--insecure-no-auth`) still
//! authenticates a call that presents a key.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use jobwire_proto::{limits::MAX_MESSAGE_BYTES, v1 as pb};
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, ReflectMessage, Value};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use super::{TENANT_HEADER, validate};
use crate::{
    domain::{Actor, TenantId},
    store::{ApiKeyRow, NewAuditEntry, Store},
};

/// The prefix of every key: says what the string is when it turns up in a log or a leak scan.
const KEY_PREFIX: &str = "jw_";
const SECRET_BYTES: usize = 32;
/// How long a replica trusts what it read of a key: a revocation on another replica takes
/// effect within this.
const CACHE_TTL: Duration = Duration::from_secs(5);
/// Keys remembered at most; beyond it the cache starts again, so unknown ids sent at random
/// cannot grow it.
const CACHE_MAX: usize = 10_000;

/// What a key may do; see `Role` in api_key_service.proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    Admin,
    Producer,
    Worker,
    Viewer,
    Approver,
}

impl Role {
    pub const ALL: [Self; 5] = [
        Self::Admin,
        Self::Producer,
        Self::Worker,
        Self::Viewer,
        Self::Approver,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Producer => "producer",
            Self::Worker => "worker",
            Self::Viewer => "viewer",
            Self::Approver => "approver",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.as_str() == name)
    }

    pub fn from_proto(role: pb::Role) -> Option<Self> {
        match role {
            pb::Role::Unspecified => None,
            pb::Role::Admin => Some(Self::Admin),
            pb::Role::Producer => Some(Self::Producer),
            pb::Role::Worker => Some(Self::Worker),
            pb::Role::Viewer => Some(Self::Viewer),
            pb::Role::Approver => Some(Self::Approver),
        }
    }

    pub fn to_proto(self) -> pb::Role {
        match self {
            Self::Admin => pb::Role::Admin,
            Self::Producer => pb::Role::Producer,
            Self::Worker => pb::Role::Worker,
            Self::Viewer => pb::Role::Viewer,
            Self::Approver => pb::Role::Approver,
        }
    }
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a key: health checks and reflection.
    Public,
    /// A key holding one of these roles (admin holds every right in its tenant).
    Roles(&'static [Role]),
}

use Role::{Admin, Approver, Producer, Viewer, Worker};

const READ_JOBS: &[Role] = &[Admin, Producer, Viewer, Approver];
/// Workers read the jobs a handler depends on, and a parent's children.
const READ_JOBS_AND_WORK: &[Role] = &[Admin, Producer, Viewer, Approver, Worker];
const WRITE_JOBS: &[Role] = &[Admin, Producer];
/// Workers enqueue the children of the jobs they run (and only those: see
/// [`Identity::enqueues_only_children`]).
const ENQUEUE: &[Role] = &[Admin, Producer, Worker];
const APPROVE: &[Role] = &[Admin, Approver];
const SIGNAL: &[Role] = &[Admin, Producer, Approver];
const READ: &[Role] = &[Admin, Producer, Viewer];
const READ_TYPES: &[Role] = &[Admin, Producer, Viewer, Worker, Approver];
const WORK: &[Role] = &[Admin, Worker];
const ADMIN: &[Role] = &[Admin];

/// The access of a gRPC method, by its path (`/package.Service/Method`). A jobwire method
/// missing from the table needs the admin role: a new RPC is closed until it is given its
/// roles here (and a test over the service descriptors says so).
pub fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return Access::Public;
    }
    let method = path.strip_prefix("/jobwire.v1.").unwrap_or(path);
    Access::Roles(match method {
        "JobService/EnqueueJob" | "JobService/EnqueueJobs" => ENQUEUE,
        "JobService/CancelJob"
        | "JobService/RetryJob"
        | "JobService/PauseJob"
        | "JobService/ResumeJob"
        | "JobService/ReplayJobs" => WRITE_JOBS,
        "JobService/GetJob" | "JobService/ListJobs" => READ_JOBS_AND_WORK,
        "JobService/WatchJob" | "JobService/WatchJobs" => READ_JOBS,
        "JobService/ApproveJob" | "JobService/RejectJob" => APPROVE,
        // A signal is an approval generalised: producers send them, and approvers.
        "JobService/SignalJob" => SIGNAL,
        "JobTypeService/GetJobType" | "JobTypeService/ListJobTypes" => READ_TYPES,
        "QueueService/ListQueues"
        | "QueueService/GetQueue"
        | "ScheduleService/GetSchedule"
        | "ScheduleService/ListSchedules"
        | "WorkerService/ListWorkers" => READ,
        "WorkerService/Connect" => WORK,
        // Named though it is the default: draining a worker is an operator's act.
        "WorkerService/DrainWorker" => ADMIN,
        _ => ADMIN,
    })
}

/// Whether a method is an administrative action, recorded in the audit log when it succeeds.
pub fn audited(path: &str) -> bool {
    let method = path.strip_prefix("/jobwire.v1.").unwrap_or(path);
    matches!(
        method,
        "JobService/CancelJob"
            | "JobService/RetryJob"
            | "JobService/PauseJob"
            | "JobService/ResumeJob"
            | "JobService/ReplayJobs"
            | "JobService/ApproveJob"
            | "JobService/RejectJob"
            | "JobService/SignalJob"
            | "JobTypeService/RegisterJobType"
            | "QueueService/UpdateQueue"
            | "QueueService/PauseQueue"
            | "QueueService/ResumeQueue"
            | "ScheduleService/CreateSchedule"
            | "ScheduleService/UpdateSchedule"
            | "ScheduleService/DeleteSchedule"
            | "ScheduleService/PauseSchedule"
            | "ScheduleService/ResumeSchedule"
            | "ScheduleService/TriggerSchedule"
            | "ApiKeyService/CreateApiKey"
            | "ApiKeyService/RevokeApiKey"
            | "WorkerService/DrainWorker"
    )
}

/// The caller, as its key says.
#[derive(Debug, Clone)]
pub struct Identity {
    pub tenant: TenantId,
    pub key_id: Uuid,
    pub key_name: String,
    pub roles: Vec<Role>,
    /// Calls per second and burst, when the key is limited.
    pub rate: Option<(f64, i32)>,
    /// Streams open at once on this replica, when the key sets its own limit.
    pub max_streams: Option<u32>,
}

impl Identity {
    /// Whether the key may enqueue only children of a running job: its one right to enqueue
    /// is the worker's.
    pub fn enqueues_only_children(&self) -> bool {
        !self.roles.iter().any(|r| matches!(r, Admin | Producer))
    }

    pub fn actor(&self) -> Actor {
        Actor {
            key_id: Some(self.key_id),
            key_name: self.key_name.clone(),
        }
    }
}

/// A key's token bucket on this replica.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a call's token, or says how long until one is there.
    fn take(&mut self, (rate, burst): (f64, i32), now: Instant) -> Result<(), Duration> {
        let burst = f64::from(burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// A new key: its row's id, the string to hand out once, and the digest to store.
pub struct MintedKey {
    pub id: Uuid,
    pub secret: String,
    pub secret_sha256: Vec<u8>,
}

/// Makes a key: a fresh id and 256 bits from the operating system's generator (through
/// `rand`'s thread generator, a CSPRNG seeded from it).
pub fn mint() -> MintedKey {
    let id = Uuid::now_v7();
    let mut secret = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut secret);
    MintedKey {
        id,
        secret: format!(
            "{KEY_PREFIX}{}_{}",
            id.simple(),
            URL_SAFE_NO_PAD.encode(secret)
        ),
        secret_sha256: Sha256::digest(secret).to_vec(),
    }
}

/// The id and secret of a key string; `None` for anything that is not one.
fn parse_key(key: &str) -> Option<(Uuid, Vec<u8>)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id = Uuid::try_parse(id).ok()?;
    let secret = URL_SAFE_NO_PAD.decode(secret).ok()?;
    (secret.len() == SECRET_BYTES).then_some((id, secret))
}

/// Whether calls without a key are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every call but the public ones needs a key.
    Required,
    /// Calls without a key act for the `jobwire-tenant` header's tenant, with every right.
    Open,
}

/// Checks keys, remembering each for [`CACHE_TTL`] so that a call costs no database read.
pub struct Authenticator {
    store: Store,
    /// The protocol's descriptors, to write audited requests down as JSON.
    pool: Option<DescriptorPool>,
    /// Set once keys are required: from the start, or from the first key made while this
    /// server ran open.
    required: AtomicBool,
    /// While open: when it last looked for a key.
    looked_for_keys: Mutex<Option<Instant>>,
    cache: Mutex<HashMap<Uuid, (Instant, Option<ApiKeyRow>)>>,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
    /// The paths of the streaming methods, which hold a slot of their key while open.
    streaming: HashSet<String>,
    /// Each key's stream slots on this replica.
    slots: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
    /// A key's slots unless it sets its own number.
    default_streams: u32,
}

impl Authenticator {
    pub fn new(store: Store, mode: Mode, default_streams: u32) -> Self {
        let pool = DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET).ok();
        let streaming = pool
            .iter()
            .flat_map(|pool| pool.services())
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .filter(|m| m.is_client_streaming() || m.is_server_streaming())
            .map(|m| format!("/{}/{}", m.parent_service().full_name(), m.name()))
            .collect();
        Self {
            store,
            pool,
            required: AtomicBool::new(mode == Mode::Required),
            looked_for_keys: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            streaming,
            slots: Mutex::new(HashMap::new()),
            default_streams,
        }
    }

    /// Takes a stream slot of the caller's key for a call to a streaming method, held until the
    /// stream ends; `None` for any other call, or one without a key.
    fn open_stream(
        &self,
        path: &str,
        identity: Option<&Identity>,
    ) -> Result<Option<OwnedSemaphorePermit>, Status> {
        let Some(identity) = identity.filter(|_| self.streaming.contains(path)) else {
            return Ok(None);
        };
        let limit = identity.max_streams.unwrap_or(self.default_streams);
        let slots = {
            let Ok(mut slots) = self.slots.lock() else {
                return Ok(None);
            };
            slots
                .entry(identity.key_id)
                .or_insert_with(|| Arc::new(Semaphore::new(limit as usize)))
                .clone()
        };
        slots.try_acquire_owned().map(Some).map_err(|_| {
            Status::resource_exhausted(format!(
                "API key {} ({:?}) holds {limit} streams open on this replica, its limit: close                  one first, or use a key with a higher max_streams",
                identity.key_id, identity.key_name
            ))
        })
    }

    /// Forgets what this replica remembers of a key, so that its revocation holds here at once.
    pub fn forget(&self, id: Uuid) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&id);
        }
    }

    /// The caller of a call to `path` with these headers: `None` for a public method, or an
    /// open server's call without a key.
    pub async fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Identity>, Status> {
        let access = access(path);
        let presented = headers.get(http::header::AUTHORIZATION);
        let roles = match access {
            Access::Public => return Ok(None),
            Access::Roles(roles) => roles,
        };
        let Some(value) = presented else {
            return if self.keys_required().await? {
                Err(Status::unauthenticated(
                    "this server requires an API key: send `authorization: Bearer <key>` \
                     (an admin makes keys with ApiKeyService or `jobwire-server keys create`)",
                ))
            } else {
                Ok(None)
            };
        };
        let identity = self.identify(value).await?;
        if identity.roles.iter().any(|role| roles.contains(role)) {
            self.take(&identity)?;
            Ok(Some(identity))
        } else {
            let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            let held: Vec<&str> = identity.roles.iter().map(|r| r.as_str()).collect();
            Err(Status::permission_denied(format!(
                "{} needs a key with one of the roles {}; key {} ({:?}) has {}",
                path.trim_start_matches('/'),
                needed.join(", "),
                identity.key_id,
                identity.key_name,
                held.join(", ")
            )))
        }
    }

    /// Whether calls need a key. A server that started open looks for keys again at most every
    /// [`CACHE_TTL`]: once the first key exists (made by `keys create` beside it, or through
    /// the API), it requires keys from then on, without a restart.
    async fn keys_required(&self) -> Result<bool, Status> {
        if self.required.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let due = self.looked_for_keys.lock().map_or(true, |mut at| {
            let due = at.is_none_or(|at| at.elapsed() >= CACHE_TTL);
            if due {
                *at = Some(Instant::now());
            }
            due
        });
        if due {
            let exists = self.store.any_api_keys().await.map_err(|error| {
                tracing::warn!(%error, "could not look for API keys");
                Status::unavailable("cannot check whether this server requires keys; retry later")
            })?;
            if exists && !self.required.swap(true, Ordering::Relaxed) {
                tracing::info!("an API key exists now: every call needs one from here on");
            }
        }
        Ok(self.required.load(Ordering::Relaxed))
    }

    /// Counts a call against its key's limit, if it has one.
    fn take(&self, identity: &Identity) -> Result<(), Status> {
        let Some(rate) = identity.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let bucket = buckets.entry(identity.key_id).or_insert(Bucket {
            tokens: f64::from(rate.1),
            at: now,
        });
        bucket.take(rate, now).map_err(|wait| {
            Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "API key {} is over its limit of {} calls a second (bursts of {}); retry in \
                     {} ms",
                    identity.key_id,
                    rate.0,
                    rate.1,
                    wait.as_millis().max(1)
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            )
        })
    }

    /// Writes an administrative call that succeeded to its tenant's audit log. `body` is the
    /// request's gRPC frame.
    async fn audit(
        &self,
        path: &str,
        identity: Option<&Identity>,
        headers: &http::HeaderMap,
        body: &[u8],
    ) {
        let tenant = match identity {
            Some(identity) => identity.tenant.clone(),
            None => match headers.get(TENANT_HEADER).map(|v| v.to_str()) {
                None => TenantId::default_tenant(),
                Some(Ok(name)) => match validate::tenant(name) {
                    Ok(tenant) => tenant,
                    Err(_) => return,
                },
                Some(Err(_)) => return,
            },
        };
        let actor = identity.map_or_else(Actor::open, Identity::actor);
        let entry = NewAuditEntry {
            tenant,
            key_id: actor.key_id,
            key_name: actor.key_name,
            method: path.trim_start_matches("/jobwire.v1.").to_owned(),
            request: self.summary(path, body),
        };
        if let Err(error) = self.store.record_audit(&entry).await {
            tracing::error!(%error, method = %entry.method, "could not write the audit log");
        }
    }

    /// The request of a call as JSON, without its binary fields (payloads, descriptor sets).
    fn summary(&self, path: &str, body: &[u8]) -> serde_json::Value {
        let undecodable = || serde_json::json!({"undecodable": true});
        let (Some(pool), Some(message)) = (&self.pool, body.get(5..)) else {
            return undecodable();
        };
        // A compressed frame is not read.
        if body.first() != Some(&0) {
            return undecodable();
        }
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return undecodable();
        };
        let Some(method) = pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method))
        else {
            return undecodable();
        };
        let Ok(mut request) = DynamicMessage::decode(method.input(), message) else {
            return undecodable();
        };
        redact(&mut request, 0);
        serde_json::to_value(&request).unwrap_or_else(|_| undecodable())
    }

    async fn identify(&self, value: &http::HeaderValue) -> Result<Identity, Status> {
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <key>`")
            })?;
        let (id, secret) = parse_key(key).ok_or_else(|| {
            Status::unauthenticated("the authorization header holds no jobwire API key (jw_...)")
        })?;
        let row = self.row(id).await?;
        let row = row
            .filter(|row| {
                let digest = Sha256::digest(&secret);
                bool::from(digest[..].ct_eq(&row.secret_sha256[..]))
            })
            .ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        if let Some(at) = row.revoked_at {
            return Err(Status::unauthenticated(format!(
                "API key {id} was revoked at {at}"
            )));
        }
        if let Some(at) = row.expires_at
            && at <= Utc::now()
        {
            return Err(Status::unauthenticated(format!(
                "API key {id} expired at {at}"
            )));
        }
        let tenant = TenantId::new_unchecked(&row.tenant_id);
        Ok(Identity {
            tenant,
            key_id: row.id,
            key_name: row.name,
            roles: row.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            rate: row.rate_per_second.zip(row.rate_burst),
            max_streams: row.max_streams.and_then(|n| u32::try_from(n).ok()),
        })
    }

    async fn row(&self, id: Uuid) -> Result<Option<ApiKeyRow>, Status> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, row)) = cache.get(&id)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(row.clone());
        }
        let row = self.store.api_key(id).await.map_err(|error| {
            tracing::warn!(%error, "could not read an API key");
            Status::unavailable("cannot check the API key now; retry later")
        })?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(id, (Instant::now(), row.clone()));
        }
        Ok(row)
    }
}

/// Leaves out what an audit entry should not hold: bytes (payloads, descriptor sets) and `Any`
/// values (their types may be unknown to JSON), at any depth up to a bound.
fn redact(message: &mut DynamicMessage, depth: usize) {
    let fields: Vec<_> = message.descriptor().fields().collect();
    for field in fields {
        match field.kind() {
            Kind::Bytes => message.clear_field(&field),
            Kind::Message(desc) if desc.full_name() == "google.protobuf.Any" => {
                message.clear_field(&field);
            }
            Kind::Message(_) if depth < 4 && !field.is_list() && !field.is_map() => {
                if message.has_field(&field)
                    && let Value::Message(inner) = message.get_field_mut(&field)
                {
                    redact(inner, depth + 1);
                }
            }
            _ => {}
        }
    }
}

/// Authenticates and authorizes every call before its service sees it.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for Auth<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ResBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let identity = match auth.check(&path, request.headers()).await {
                Ok(identity) => identity,
                Err(status) => return Ok(status.into_http()),
            };
            let slot = match auth.open_stream(&path, identity.as_ref()) {
                Ok(slot) => slot,
                Err(status) => return Ok(status.into_http()),
            };
            if let Some(identity) = &identity {
                request.extensions_mut().insert(identity.clone());
            }
            if !audited(&path) {
                let response = inner.call(request).await?;
                return Ok(response.map(|body| match slot {
                    None => tonic::body::Body::new(body),
                    // The slot lives in the body, so it is given back when the stream ends,
                    // however it ends (the body is dropped).
                    Some(slot) => tonic::body::Body::new(body.map_frame(move |frame| {
                        let _held = &slot;
                        frame
                    })),
                }));
            }
            // An administrative request is one message: read it whole, to write it down once the
            // call has succeeded, but never more than the message budget (with its frame).
            let (parts, body) = request.into_parts();
            let limited = http_body_util::Limited::new(body, MAX_MESSAGE_BYTES + 5);
            let body = match limited.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    return Ok(Status::resource_exhausted(format!(
                        "the message is over the limit of {MAX_MESSAGE_BYTES} bytes (4 MiB) \
                         per message"
                    ))
                    .into_http());
                }
                Err(_) => return Ok(Status::cancelled("the request ended early").into_http()),
            };
            let headers = parts.headers.clone();
            let request = http::Request::from_parts(
                parts,
                tonic::body::Body::new(http_body_util::Full::new(body.clone())),
            );
            let response = inner.call(request).await?;
            // A call that failed answers with its status in the headers (trailers only).
            let failed = response
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status != "0");
            if !failed {
                auth.audit(&path, identity.as_ref(), &headers, &body).await;
            }
            Ok(response.map(tonic::body::Body::new))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            tokens: 2.0,
            at: start,
        };
        let limit = (4.0, 2);
        assert!(bucket.take(limit, start).is_ok());
        assert!(bucket.take(limit, start).is_ok());
        let wait = bucket.take(limit, start).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_millis(250));
        let later = start + Duration::from_millis(250);
        assert!(
            bucket.take(limit, later).is_ok(),
            "a token a quarter second"
        );
        let much_later = start + Duration::from_secs(60);
        assert!(bucket.take(limit, much_later).is_ok());
        assert!(bucket.take(limit, much_later).is_ok());
        assert!(
            bucket.take(limit, much_later).is_err(),
            "never more than the burst"
        );
    }

    #[test]
    fn a_minted_key_parses_back_to_its_id_and_secret() {
        let key = mint();
        let (id, secret) = parse_key(&key.secret).expect("parses");
        assert_eq!(id, key.id);
        assert_eq!(Sha256::digest(&secret).to_vec(), key.secret_sha256);
        assert!(parse_key("jw_nothex_abc").is_none());
        assert!(parse_key(&key.secret.replace("jw_", "xx_")).is_none());
        assert_ne!(mint().secret, key.secret);
    }

    /// Every RPC of every jobwire service has its roles in the table: a new one would need the
    /// admin role only by accident of the default, so it must be named.
    #[test]
    fn every_rpc_is_in_the_table() {
        let pool = prost_reflect::DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptors");
        let mut named = 0;
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                let listed = match access(&path) {
                    Access::Public => false,
                    Access::Roles(roles) => roles != ADMIN || admin_only(&path),
                };
                assert!(listed, "{path} has no entry in auth::access");
                named += 1;
            }
        }
        assert!(named >= 31, "{named} methods");
    }

    /// The methods meant for admins alone.
    fn admin_only(path: &str) -> bool {
        [
            "/jobwire.v1.ApiKeyService/",
            "/jobwire.v1.AuditService/",
            "/jobwire.v1.QueueService/UpdateQueue",
            "/jobwire.v1.WorkerService/DrainWorker",
            "/jobwire.v1.QueueService/PauseQueue",
            "/jobwire.v1.QueueService/ResumeQueue",
            "/jobwire.v1.ScheduleService/CreateSchedule",
            "/jobwire.v1.ScheduleService/UpdateSchedule",
            "/jobwire.v1.ScheduleService/DeleteSchedule",
            "/jobwire.v1.ScheduleService/PauseSchedule",
            "/jobwire.v1.ScheduleService/ResumeSchedule",
            "/jobwire.v1.ScheduleService/TriggerSchedule",
            "/jobwire.v1.JobTypeService/RegisterJobType",
        ]
        .iter()
        .any(|p| path.starts_with(p))
    }
}
