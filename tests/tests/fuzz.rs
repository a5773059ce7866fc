//! Fuzzing every RPC of a real server: random and mutated requests built from the service
//! descriptors themselves, so an RPC added to the proto is covered without anyone remembering
//! it. Afterwards: no INTERNAL or UNKNOWN answer, no panic in the server's log, and the database
//! consistent (every integrity query finds nothing).
//!
//! A bounded run is part of the suite (`JOBWIRE_FUZZ_SECONDS`, default 45). A longer one:
//!
//! ```sh
//! JOBWIRE_FUZZ_SECONDS=1800 cargo test -p jobwire-tests --test fuzz -- --nocapture
//! ```
//!
//! `JOBWIRE_FUZZ_SEED` replays a run (the seed is printed).

mod support;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use jobwire_proto::v1 as pb;
use jobwire_tests::{ServerProcess, raw::RawClient, test_db};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, MethodDescriptor, Value,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use support::{RawWorker, channel};
use tonic::Code;

const DEFAULT_SECONDS: u64 = 45;
/// How deep generated messages nest (a Struct value may go deeper on purpose).
const MAX_DEPTH: usize = 5;
const TENANTS: &[&str] = &["default", "fuzz-a", "fuzz-b"];
const JOB_TYPES: &[&str] = &["fuzz.job", "fuzz.other", "fuzz.logline"];

/// Strings worth trying in any string field.
const STRINGS: &[&str] = &[
    "",
    "default",
    "fuzz",
    "fuzz.job",
    "fuzz.other",
    "fuzz.logline",
    "fuzz-queue",
    "\u{0}",
    "bad\u{0}value",
    "é💥",
    "0 3 * * *",
    "*/5 * * * * *",
    "0 0 31 2 *",
    "Europe/Berlin",
    "Not/AZone",
    "latest",
    "1",
    "type.googleapis.com/google.protobuf.Empty",
    "type.googleapis.com/jobwire.v1.LogLine",
    "type.googleapis.com/",
    "*",
    "job_type",
    "concurrency_limit",
    "rate_limit",
    "YWZ0ZXI6eA",
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
];

struct Gen {
    rng: StdRng,
    pool: DescriptorPool,
    /// Ids of jobs the fuzzer enqueued, so that calls naming a job sometimes find one.
    job_ids: Vec<String>,
}

impl Gen {
    fn string(&mut self) -> String {
        match self.rng.random_range(0..10) {
            0 if !self.job_ids.is_empty() => self
                .job_ids
                .choose(&mut self.rng)
                .cloned()
                .unwrap_or_default(),
            1 => "a".repeat(self.rng.random_range(100..3000)),
            2 => uuid::Uuid::now_v7().to_string(),
            _ => STRINGS
                .choose(&mut self.rng)
                .map(|s| (*s).to_owned())
                .unwrap_or_default(),
        }
    }

    fn int(&mut self) -> i64 {
        *[
            0,
            1,
            -1,
            2,
            3,
            50,
            100,
            101,
            1000,
            5000,
            10_001,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
            i64::MAX,
            i64::MIN,
            self.rng.random_range(-100..100_000),
        ]
        .choose(&mut self.rng)
        .unwrap_or(&0)
    }

    fn double(&mut self) -> f64 {
        *[
            0.0,
            0.5,
            1.0,
            2.0,
            -1.0,
            1e-300,
            1e-6,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            self.rng.random_range(0.0..100.0),
        ]
        .choose(&mut self.rng)
        .unwrap_or(&0.0)
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..20) {
            0 => 1024 * 1024 + 1,
            1..=4 => 0,
            _ => self.rng.random_range(1..64),
        };
        (0..len).map(|_| self.rng.random()).collect()
    }

    fn message(&mut self, desc: &MessageDescriptor, depth: usize) -> DynamicMessage {
        match desc.full_name() {
            "google.protobuf.Any" => return self.any(desc),
            "google.protobuf.Struct" => {
                let depth = self.rng.random_range(1..40);
                return self.structure(desc, depth);
            }
            "google.protobuf.Timestamp" | "google.protobuf.Duration" => {
                let mut m = DynamicMessage::new(desc.clone());
                let seconds = *[
                    0,
                    1,
                    -1,
                    1_700_000_000,
                    -62_135_596_801,
                    253_402_300_800,
                    i64::MAX,
                    i64::MIN,
                ]
                .choose(&mut self.rng)
                .unwrap_or(&0);
                let nanos = *[0, 1, -1, 999_999_999, 1_000_000_000]
                    .choose(&mut self.rng)
                    .unwrap_or(&0);
                m.set_field_by_name("seconds", Value::I64(seconds));
                m.set_field_by_name("nanos", Value::I32(nanos));
                return m;
            }
            _ => {}
        }
        let mut m = DynamicMessage::new(desc.clone());
        let mut oneofs_set = Vec::new();
        for field in desc.fields() {
            if !self.rng.random_bool(0.6) {
                continue;
            }
            if let Some(oneof) = field.containing_oneof()
                && !field.field_descriptor_proto().proto3_optional()
            {
                if oneofs_set.contains(&oneof.name().to_owned()) {
                    continue;
                }
                oneofs_set.push(oneof.name().to_owned());
            }
            let value = if field.is_map() {
                let Kind::Message(entry) = field.kind() else {
                    continue;
                };
                let (key, value) = (entry.map_entry_key_field(), entry.map_entry_value_field());
                let mut map = HashMap::new();
                for _ in 0..self.rng.random_range(0..4) {
                    let k = match key.kind() {
                        Kind::String => MapKey::String(self.string()),
                        _ => MapKey::I64(self.int()),
                    };
                    map.insert(k, self.value(&value.kind(), depth + 1));
                }
                Value::Map(map)
            } else if field.is_list() {
                let n = self.rng.random_range(0..4);
                Value::List(
                    (0..n)
                        .map(|_| self.value(&field.kind(), depth + 1))
                        .collect(),
                )
            } else {
                self.value(&field.kind(), depth + 1)
            };
            if let Err(error) = m.try_set_field(&field, value) {
                panic!("generating {}: {error}", field.full_name());
            }
        }
        m
    }

    fn value(&mut self, kind: &Kind, depth: usize) -> Value {
        match kind {
            Kind::Double => Value::F64(self.double()),
            Kind::Float => Value::F32(self.double() as f32),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(self.int() as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(self.int()),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(self.int() as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(self.int() as u64),
            Kind::Bool => Value::Bool(self.rng.random()),
            Kind::String => Value::String(self.string()),
            Kind::Bytes => Value::Bytes(self.bytes().into()),
            Kind::Enum(e) => {
                let known: Vec<i32> = e.values().map(|v| v.number()).collect();
                if self.rng.random_bool(0.85) {
                    Value::EnumNumber(*known.choose(&mut self.rng).unwrap_or(&0))
                } else {
                    Value::EnumNumber(*[-1, 99, i32::MAX].choose(&mut self.rng).unwrap_or(&99))
                }
            }
            Kind::Message(desc) if depth < MAX_DEPTH => Value::Message(self.message(desc, depth)),
            Kind::Message(desc) => Value::Message(DynamicMessage::new(desc.clone())),
        }
    }

    /// An `Any`: of a jobwire message (well formed or not), of an unknown type, or garbage.
    fn any(&mut self, desc: &MessageDescriptor) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        let (type_url, value) = match self.rng.random_range(0..4) {
            0 => {
                let line = self.pool.get_message_by_name("jobwire.v1.LogLine");
                let value = line
                    .map(|d| self.message(&d, MAX_DEPTH - 1).encode_to_vec())
                    .unwrap_or_default();
                ("type.googleapis.com/jobwire.v1.LogLine".to_owned(), value)
            }
            1 => (
                "type.googleapis.com/jobwire.v1.LogLine".to_owned(),
                self.bytes(),
            ),
            _ => (self.string(), self.bytes()),
        };
        m.set_field_by_name("type_url", Value::String(type_url));
        m.set_field_by_name("value", Value::Bytes(value.into()));
        m
    }

    /// A Struct nested `depth` levels, with strings from the palette.
    fn structure(&mut self, desc: &MessageDescriptor, depth: usize) -> DynamicMessage {
        let json = self.json(depth);
        DynamicMessage::deserialize(desc.clone(), json)
            .unwrap_or_else(|_| DynamicMessage::new(desc.clone()))
    }

    fn json(&mut self, depth: usize) -> serde_json::Value {
        let leaf = match self.rng.random_range(0..4) {
            0 => serde_json::Value::String(self.string()),
            1 => serde_json::json!(self.int() as f64),
            2 => serde_json::json!(self.rng.random::<bool>()),
            _ => serde_json::Value::Null,
        };
        let mut value = leaf;
        for _ in 1..depth {
            value = serde_json::json!({ self.string().replace('\0', "").chars().take(8).collect::<String>(): value, "time": self.string() });
        }
        serde_json::json!({ "data": value })
    }

    /// A valid encoding of a random request, or one mutated at the byte level.
    fn body(&mut self, input: &MessageDescriptor) -> Vec<u8> {
        let mut bytes = self.message(input, 0).encode_to_vec();
        if self.rng.random_bool(0.15) && !bytes.is_empty() {
            for _ in 0..self.rng.random_range(1..4) {
                let i = self.rng.random_range(0..bytes.len());
                match self.rng.random_range(0..3) {
                    0 => bytes[i] ^= 1 << self.rng.random_range(0..8),
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, self.rng.random()),
                }
                if bytes.is_empty() {
                    break;
                }
            }
        }
        bytes
    }
}

/// A status jobwire's own code must never answer.
fn is_server_fault(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Internal | Code::Unknown)
}

struct Finding {
    method: String,
    status: tonic::Status,
    request: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_random_requests_without_a_server_fault() {
    let seconds = std::env::var("JOBWIRE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    let seed = std::env::var("JOBWIRE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("fuzzing for {seconds} s with JOBWIRE_FUZZ_SEED={seed}");
    let db = test_db().await;
    let server = ServerProcess::start(
        &db,
        &[
            "--lease-duration",
            "1s",
            "--heartbeat-interval",
            "300ms",
            "--reap-interval",
            "100ms",
            "--poll-interval",
            "100ms",
            "--stop-grace",
            "1s",
        ],
    )
    .await;
    let url = server.url();
    let pool = DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let methods: Vec<MethodDescriptor> = pool
        .services()
        .filter(|s| s.package_name() == "jobwire.v1")
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .collect();
    assert!(methods.len() >= 29, "found only {} methods", methods.len());

    // A worker that takes leases and answers them with random reports, so that the completer
    // and the lease statements see hostile input too.
    let worker = tokio::spawn(hostile_worker(url.clone(), seed, seconds));

    let mut fuzzer = Gen {
        rng: StdRng::seed_from_u64(seed),
        pool: pool.clone(),
        job_ids: Vec::new(),
    };
    let mut client = RawClient::new(channel(&url).await);
    let mut findings = Vec::new();
    let mut calls: HashMap<String, usize> = HashMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let method = methods.choose(&mut fuzzer.rng).expect("methods").clone();
        let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
        let tenant = TENANTS
            .choose(&mut fuzzer.rng)
            .copied()
            .unwrap_or("default");
        let metadata = [("jobwire-tenant", tenant.to_owned())];
        let body = fuzzer.body(&method.input());
        *calls.entry(path.clone()).or_default() += 1;
        let outcome = match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => {
                let answer = client.unary(&path, body.clone(), &metadata).await;
                if let Ok(response) = &answer {
                    remember_job(&mut fuzzer, &method, response);
                }
                answer.map(|_| ())
            }
            (false, true) => tokio::time::timeout(
                Duration::from_millis(100),
                client.server_streaming(&path, body.clone(), &metadata, 5),
            )
            .await
            .unwrap_or(Ok(Vec::new()))
            .map(|_| ()),
            _ => {
                let mut bodies = vec![body.clone()];
                for _ in 0..fuzzer.rng.random_range(0..6) {
                    bodies.push(fuzzer.body(&method.input()));
                }
                client
                    .streaming(&path, bodies, &metadata, Duration::from_millis(150))
                    .await
                    .map(|_| ())
            }
        };
        if let Err(status) = outcome
            && is_server_fault(&status)
        {
            let request = DynamicMessage::decode(method.input(), body.as_slice())
                .ok()
                .and_then(|m| serde_json::to_string(&m).ok())
                .unwrap_or_else(|| format!("{} undecodable bytes", body.len()));
            findings.push(Finding {
                method: path,
                status,
                request: request.chars().take(2000).collect(),
            });
        }
    }
    let worker_findings = worker.await.expect("the hostile worker");
    let total: usize = calls.values().sum();
    eprintln!("{total} calls over {} methods", calls.len());
    let untried: Vec<String> = methods
        .iter()
        .map(|m| format!("/{}/{}", m.parent_service().full_name(), m.name()))
        .filter(|p| !calls.contains_key(p))
        .collect();
    assert!(
        untried.is_empty() || seconds < 10,
        "methods never called: {untried:?}"
    );
    for f in findings.iter().take(10) {
        eprintln!(
            "{} answered {:?}: {}\n  request: {}",
            f.method,
            f.status.code(),
            f.status.message(),
            f.request
        );
    }
    for line in server
        .stderr_tail(100_000)
        .lines()
        .filter(|l| l.contains("internal error"))
        .take(10)
    {
        eprintln!("server: {line}");
    }
    assert!(
        findings.is_empty(),
        "{} calls were answered INTERNAL or UNKNOWN (seed {seed}); the first: {} {:?}",
        findings.len(),
        findings[0].method,
        findings[0].status
    );
    assert!(
        worker_findings.is_empty(),
        "the hostile worker's reports were answered INTERNAL (seed {seed}): {worker_findings:?}"
    );
    let log = server.stderr_tail(100_000);
    assert!(
        !log.contains("panicked"),
        "the server panicked (seed {seed}):\n{}",
        server.stderr_tail(60)
    );
    assert_integrity(&db.pool().await).await;
}

/// Keeps the id of a job an EnqueueJob created, for later calls to name.
fn remember_job(fuzzer: &mut Gen, method: &MethodDescriptor, response: &[u8]) {
    if method.name() != "EnqueueJob" {
        return;
    }
    if let Ok(response) = pb::EnqueueJobResponse::decode(response)
        && let Some(job) = response.job
    {
        fuzzer.job_ids.push(job.id);
    }
}

/// Takes leases of the fuzzer's job types and answers each with random reports carrying its
/// real lease; returns the reports answered INTERNAL.
async fn hostile_worker(url: String, seed: u64, seconds: u64) -> Vec<String> {
    let pool = DescriptorPool::decode(jobwire_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let request = pool
        .get_message_by_name("jobwire.v1.ConnectRequest")
        .expect("ConnectRequest");
    let mut fuzzer = Gen {
        rng: StdRng::seed_from_u64(seed.wrapping_add(1)),
        pool: pool.clone(),
        job_ids: Vec::new(),
    };
    let mut jobs = support::jobs(&url).await;
    let mut findings = Vec::new();
    let started = Instant::now();
    'worker: while started.elapsed() < Duration::from_secs(seconds) {
        let Ok(mut worker) =
            RawWorker::try_connect(&url, support::hello("hostile", JOB_TYPES, 4, vec![])).await
        else {
            continue;
        };
        for _ in 0..20 {
            let _ = jobs
                .enqueue_job(pb::EnqueueJobRequest {
                    parent: Default::default(),
                    job: Some(support::spec(JOB_TYPES[0], "default")),
                })
                .await;
            let Some(lease) = worker.lease_within(Duration::from_millis(500)).await else {
                continue;
            };
            for _ in 0..fuzzer.rng.random_range(1..6) {
                // Every report names the real lease, so that it reaches the statements.
                let message = fuzzer.message(&request, 0);
                let Ok(mut typed) = message.transcode_to::<pb::ConnectRequest>() else {
                    continue;
                };
                let request_id = worker.request_id();
                let lease_ref = Some(pb::LeaseRef {
                    job_id: lease.job_id.clone(),
                    attempt: lease.attempt,
                });
                use pb::connect_request::Message as In;
                match &mut typed.message {
                    Some(In::Complete(m)) => (m.request_id, m.lease) = (request_id, lease_ref),
                    Some(In::Fail(m)) => (m.request_id, m.lease) = (request_id, lease_ref),
                    Some(In::Progress(m)) => (m.request_id, m.lease) = (request_id, lease_ref),
                    Some(In::Logs(m)) => (m.request_id, m.lease) = (request_id, lease_ref),
                    Some(In::Checkpoint(m)) => (m.request_id, m.lease) = (request_id, lease_ref),
                    _ => continue,
                }
                let what = format!("{:?}", typed.message)
                    .chars()
                    .take(300)
                    .collect::<String>();
                let Some(message) = typed.message else {
                    continue;
                };
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    worker.request(request_id, message),
                )
                .await;
                match answer {
                    Ok(ack)
                        if ack.code == Code::Internal as i32
                            || ack.code == Code::Unknown as i32 =>
                    {
                        findings.push(format!("{what} -> {ack:?}"));
                    }
                    Ok(_) => {}
                    // The stream ended (a report the server refused whole): start another.
                    Err(_) => continue 'worker,
                }
            }
        }
    }
    findings
}

/// The database's own consistency: each query counts rows that must not exist.
async fn assert_integrity(pool: &sqlx::PgPool) {
    let checks = [
        (
            "jobs without a state event",
            "SELECT count(*) FROM jobs j WHERE NOT EXISTS \
             (SELECT 1 FROM job_events e WHERE e.job_id = j.id AND e.kind = 'state')",
        ),
        (
            "events without their job",
            "SELECT count(*) FROM job_events e WHERE NOT EXISTS \
             (SELECT 1 FROM jobs j WHERE j.id = e.job_id AND j.tenant_id = e.tenant_id)",
        ),
        (
            "attempts without their job",
            "SELECT count(*) FROM job_attempts a WHERE NOT EXISTS \
             (SELECT 1 FROM jobs j WHERE j.id = a.job_id AND j.tenant_id = a.tenant_id)",
        ),
        (
            "jobs whose state is not their last state event's",
            "SELECT count(*) FROM jobs j WHERE j.state IS DISTINCT FROM ( \
                 SELECT e.state FROM job_events e WHERE e.job_id = j.id AND e.kind = 'state' \
                 ORDER BY e.seq DESC LIMIT 1)",
        ),
        (
            "running jobs without a lease",
            "SELECT count(*) FROM jobs \
             WHERE state = 'running' AND (lease_owner IS NULL OR lease_expires_at IS NULL)",
        ),
        // RetryJob makes a finished job available without a new attempt number (the next
        // lease takes one), so a job cancelled, retried and cancelled again before it ran ends
        // twice under one number: once per RetryJob is allowed, no more.
        (
            "attempts with more than one terminal event",
            "SELECT count(*) FROM (SELECT job_id, attempt FROM job_events WHERE kind = 'state' \
             GROUP BY job_id, attempt \
             HAVING count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled')) \
                  > 1 + count(*) FILTER (WHERE state = 'available' \
                                          AND data->>'reason' = 'retried')) t",
        ),
    ];
    let mut broken = Vec::new();
    for (what, sql) in checks {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if n > 0 {
            broken.push(format!("{what}: {n}"));
        }
    }
    assert!(broken.is_empty(), "integrity: {broken:?}");
}
