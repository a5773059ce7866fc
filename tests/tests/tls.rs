//! TLS end to end: the real server binary with `--tls-cert`/`--tls-key` (and `--tls-client-ca`
//! for mutual TLS), the Rust SDK's `Tls` settings, grpcurl with `-cacert`, and certificates
//! made at test time by rcgen (a CA, a server certificate for 127.0.0.1 and localhost, client
//! certificates). The harness waits for the server's ready line, which the server prints once
//! its internal health says SERVING, so nothing here needs a plaintext probe.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use jobwire::{Client, JobContext, Tls, Worker};
use jobwire_tests::{
    ServerProcess, grpcurl,
    jobs::{self, Sleep},
    test_db,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How long a call that must be refused may take to fail: a refusal is a failed handshake, not
/// a timeout.
const REFUSAL: Duration = Duration::from_secs(20);

/// A certificate and its key, as PEM files and text.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
}

impl Issued {
    fn cert(&self) -> &str {
        self.cert.to_str().expect("UTF-8 path")
    }

    fn key(&self) -> &str {
        self.key.to_str().expect("UTF-8 path")
    }

    /// SDK settings presenting this certificate, trusting `ca`.
    fn identity(&self, ca: &Issued) -> Tls {
        Tls::new()
            .root_certificates(ca.cert_pem.clone())
            .client_identity(self.cert_pem.clone(), self.key_pem.clone())
    }
}

/// A test CA and what it issued, in a temporary directory.
struct Pki {
    _dir: TempDir,
    ca: Issued,
    server: Issued,
    client: Issued,
    /// Another CA, which neither side trusts.
    other_ca: Issued,
    /// A client certificate from `other_ca`, which a server trusting `ca` must refuse.
    stranger: Issued,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, issuer) = make_ca(dir.path(), "ca", "jobwire test CA");
        let server = issue(
            dir.path(),
            "server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let client = issue(
            dir.path(),
            "client",
            &["worker-1"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let (other_ca, other) = make_ca(dir.path(), "other-ca", "some other CA");
        let stranger = issue(
            dir.path(),
            "stranger",
            &["worker-1"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        );
        Self {
            _dir: dir,
            ca,
            server,
            client,
            other_ca,
            stranger,
        }
    }

    /// The server's TLS flags.
    fn server_args(&self) -> Vec<&str> {
        vec![
            "--tls-cert",
            self.server.cert(),
            "--tls-key",
            self.server.key(),
        ]
    }

    /// SDK settings trusting the CA, with no client certificate.
    fn trust(&self) -> Tls {
        Tls::new().root_certificates(self.ca.cert_pem.clone())
    }
}

fn make_ca(dir: &Path, name: &str, common_name: &str) -> (Issued, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-signed CA");
    let issued = write(dir, name, cert.pem(), key.serialize_pem());
    (issued, Issuer::new(params, key))
}

fn issue(
    dir: &Path,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> Issued {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("signed");
    write(dir, name, cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, cert_pem: String, key_pem: String) -> Issued {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &cert_pem).expect("write certificate");
    std::fs::write(&key, &key_pem).expect("write key");
    Issued {
        cert,
        key,
        cert_pem,
        key_pem,
    }
}

fn https(server: &ServerProcess) -> String {
    format!("https://{}", server.addr())
}

/// A worker serving [`Sleep`] with `tls`, stopped by cancelling the returned token.
fn spawn_worker(
    url: String,
    id: &str,
    tls: Tls,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), jobwire::Error>>,
) {
    let name = id.to_owned();
    let worker = Worker::builder(url)
        .worker_id(id)
        .tls(tls)
        .drain_timeout(Duration::from_secs(5))
        .register::<Sleep, _, _>(move |ctx: JobContext, job: Sleep| {
            jobs::run_sleep(ctx, job, name.clone())
        })
        .build()
        .expect("worker builds");
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    (stop, task)
}

/// Enqueues a job through `client` and waits for the worker named `worker` to run it.
async fn runs_a_job(client: &Client, worker: &str, seq: u64) {
    let handle = client
        .enqueue(Sleep::succeeding(0, seq))
        .await
        .expect("enqueue over TLS");
    let output = tokio::time::timeout(Duration::from_secs(60), handle.wait())
        .await
        .expect("the job finishes")
        .expect("the job succeeds");
    assert_eq!((output.seq, output.worker.as_str()), (seq, worker));
}

/// Connects with `tls` (or plaintext when `None`) and makes one call; returns how it failed.
/// A refusal may come at connect or at the first call (TLS 1.3 checks a client certificate
/// after the client thinks the handshake is done), but it must come, and with no response.
async fn refused(url: String, tls: Option<Tls>) -> jobwire::Error {
    let attempt = async {
        let mut builder = Client::builder(url);
        if let Some(tls) = tls {
            builder = builder.tls(tls);
        }
        let client = builder.connect().await?;
        client.list_queues().await
    };
    match tokio::time::timeout(REFUSAL, attempt).await {
        Ok(Err(error)) => error,
        Ok(Ok(queues)) => panic!("the server answered: {queues:?}"),
        Err(_) => panic!("no refusal within {REFUSAL:?}"),
    }
}

#[tokio::test]
async fn sdk_and_grpcurl_over_tls_and_plaintext_is_refused() {
    let pki = Pki::new();
    let db = test_db().await;
    let server = ServerProcess::start(&db, &pki.server_args()).await;

    // (a) The SDK over TLS, trusting the CA: a worker runs an enqueued job.
    let (stop, worker) = spawn_worker(https(&server), "tls-worker", pki.trust());
    let client = Client::builder(https(&server))
        .tls(pki.trust())
        .connect()
        .await
        .expect("client connects over TLS");
    runs_a_job(&client, "tls-worker", 1).await;

    // (b) grpcurl, trusting the CA, lists the services and sees health SERVING.
    let addr = server.addr().to_string();
    let ca = pki.ca.cert();
    let services = grpcurl::run(&["-cacert", ca, &addr, "list"]);
    assert!(
        services
            .lines()
            .any(|l| l.trim() == "jobwire.v1.JobService"),
        "{services}"
    );
    let health = grpcurl::run(&["-cacert", ca, &addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");
    // grpcurl checks the name too: the certificate is for 127.0.0.1 and localhost only.
    let wrong_name = grpcurl::try_run(&["-cacert", ca, "-authority", "elsewhere", &addr, "list"]);
    assert!(wrong_name.is_err(), "a wrong server name was accepted");

    // (c) Plaintext is refused: grpcurl, a raw gRPC channel and the SDK get no response.
    let plain = grpcurl::try_run(&["-plaintext", &addr, "list"]);
    assert!(
        plain.is_err(),
        "grpcurl -plaintext got an answer: {plain:?}"
    );
    let raw = tokio::time::timeout(REFUSAL, async {
        let channel = Channel::from_shared(server.url())
            .expect("url")
            .connect()
            .await?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(Into::into)
    })
    .await
    .expect("a refusal, not a hang");
    let raw: Result<_, Box<dyn std::error::Error + Send + Sync>> = raw;
    assert!(
        raw.is_err(),
        "a plaintext health check was answered: {raw:?}"
    );
    let error = refused(server.url(), None).await;
    assert!(
        matches!(
            error.code(),
            None | Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
        ),
        "{error:?}"
    );

    // A client that does not trust the server's CA is refused by its own side.
    let other = Tls::new().root_certificates(pki.other_ca.cert_pem.clone());
    refused(https(&server), Some(other)).await;

    stop.cancel();
    worker.await.expect("worker task").expect("worker drains");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let db = test_db().await;
    let mut args = pki.server_args();
    args.extend(["--tls-client-ca", pki.ca.cert()]);
    let server = ServerProcess::start(&db, &args).await;

    // (d) A worker and a client presenting certificates the CA issued: the job runs. The
    // worker names the server by its certificate's other name, `localhost`.
    let worker_tls = pki.client.identity(&pki.ca).server_name("localhost");
    let (stop, worker) = spawn_worker(https(&server), "mtls-worker", worker_tls);
    let client = Client::builder(https(&server))
        .tls(pki.client.identity(&pki.ca))
        .connect()
        .await
        .expect("client with a certificate connects");
    runs_a_job(&client, "mtls-worker", 2).await;

    // grpcurl with the client certificate is served too.
    let addr = server.addr().to_string();
    let (ca, cert, key) = (pki.ca.cert(), pki.client.cert(), pki.client.key());
    let services = grpcurl::run(&["-cacert", ca, "-cert", cert, "-key", key, &addr, "list"]);
    assert!(services.contains("jobwire.v1.JobService"), "{services}");

    // Without a client certificate, or with one from another CA: refused.
    refused(https(&server), Some(pki.trust())).await;
    refused(https(&server), Some(pki.stranger.identity(&pki.ca))).await;
    let bare = grpcurl::try_run(&["-cacert", ca, &addr, "list"]);
    assert!(
        bare.is_err(),
        "grpcurl without a certificate got an answer: {bare:?}"
    );

    stop.cancel();
    worker.await.expect("worker task").expect("worker drains");
}

#[tokio::test]
async fn unusable_tls_files_stop_the_server_naming_the_flag() {
    let pki = Pki::new();
    let db = test_db().await;

    let stderr = ServerProcess::start_refused(&db, &["--tls-cert", pki.server.cert()]).await;
    assert!(stderr.contains("--tls-cert: needs --tls-key"), "{stderr}");

    // The client's key is not the server certificate's.
    let mismatched = [
        "--tls-cert",
        pki.server.cert(),
        "--tls-key",
        pki.client.key(),
    ];
    let stderr = ServerProcess::start_refused(&db, &mismatched).await;
    assert!(stderr.contains("not a usable identity"), "{stderr}");
    assert!(stderr.contains(pki.client.key()), "{stderr}");

    // A key where the certificate belongs.
    let swapped = [
        "--tls-cert",
        pki.server.key(),
        "--tls-key",
        pki.server.key(),
    ];
    let stderr = ServerProcess::start_refused(&db, &swapped).await;
    assert!(stderr.contains("--tls-cert "), "{stderr}");
    assert!(stderr.contains("no certificate"), "{stderr}");
}

/// What an in-process server saw in the `authorization` header of each call.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

#[tokio::test]
async fn the_api_key_goes_on_every_call_and_on_the_worker_stream() {
    use tonic::transport::{Identity, Server, ServerTlsConfig};

    // An in-process TLS server that records each call's path and `authorization` header and
    // serves only health: the SDK's calls get UNIMPLEMENTED, after the header was seen.
    let pki = Pki::new();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    let layer = tower::layer::layer_fn(move |inner| Recorder {
        inner,
        seen: Arc::clone(&record),
    });
    let (_, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(
        &pki.server.cert_pem,
        &pki.server.key_pem,
    ));
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .expect("server TLS")
            .layer(layer)
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let url = format!("https://{addr}");

    let client = Client::builder(&url)
        .tls(pki.trust())
        .tenant("acme")
        .api_key("jw_client_key")
        .connect()
        .await
        .expect("client connects");
    let error = client
        .list_queues()
        .await
        .expect_err("no queue service here");
    assert_eq!(error.code(), Some(tonic::Code::Unimplemented), "{error:?}");
    client.get_job("0").await.expect_err("no job service here");

    let (worker_stop, worker) = {
        let worker = Worker::builder(&url)
            .tls(pki.trust())
            .api_key("jw_worker_key")
            .register::<Sleep, _, _>(|ctx: JobContext, job: Sleep| {
                jobs::run_sleep(ctx, job, "w".into())
            })
            .build()
            .expect("worker builds");
        let stop = CancellationToken::new();
        (
            stop.clone(),
            tokio::spawn(worker.run(stop.cancelled_owned())),
        )
    };
    let stream_seen =
        jobwire_tests::eventually("the worker's stream", Duration::from_secs(20), || {
            let seen = Arc::clone(&seen);
            async move {
                let seen = seen.lock().expect("lock");
                seen.iter()
                    .find(|(path, _)| path.ends_with("/Connect"))
                    .cloned()
            }
        })
        .await;
    worker_stop.cancel();
    worker.await.expect("worker task").expect("worker stops");
    stop.cancel();
    server.await.expect("server task").expect("server stops");

    assert_eq!(stream_seen.1.as_deref(), Some("Bearer jw_worker_key"));
    let seen = seen.lock().expect("lock");
    let client_calls: Vec<_> = seen
        .iter()
        .filter(|(path, _)| {
            path.starts_with("/jobwire.v1.JobService/")
                || path.starts_with("/jobwire.v1.QueueService/")
        })
        .collect();
    assert_eq!(client_calls.len(), 2, "{seen:?}");
    for (path, authorization) in client_calls {
        assert_eq!(
            authorization.as_deref(),
            Some("Bearer jw_client_key"),
            "{path}"
        );
    }
}

/// A tower service recording each request's path and `authorization` header.
#[derive(Clone)]
struct Recorder<S> {
    inner: S,
    seen: Seen,
}

impl<S, B> tower::Service<http::Request<B>> for Recorder<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        self.seen
            .lock()
            .expect("lock")
            .push((request.uri().path().to_owned(), authorization));
        self.inner.call(request)
    }
}
