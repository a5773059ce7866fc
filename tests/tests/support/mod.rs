//! Raw-protocol helpers shared by the end-to-end tests: a gRPC client and a hand-driven worker
//! stream, for checking the wire contract itself (fencing tokens, acks, bad input) without the
//! SDK's retries and reconnects in the way.

#![allow(dead_code)]

use std::time::Duration;

use jobwire_proto::v1::{
    self as pb, connect_request::Message as In, connect_response::Message as Out,
    job_service_client::JobServiceClient, worker_service_client::WorkerServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

/// How long any single expected message may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("valid url")
        .connect()
        .await
        .expect("connect to server")
}

pub async fn jobs(url: &str) -> JobServiceClient<Channel> {
    JobServiceClient::new(channel(url).await)
}

pub fn any_bytes(type_name: &str, value: Vec<u8>) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value,
    }
}

/// A job spec with a small opaque payload.
pub fn spec(job_type: &str, queue: &str) -> pb::JobSpec {
    pb::JobSpec {
        job_type: job_type.into(),
        queue: queue.into(),
        payload: Some(any_bytes("test.Payload", b"payload".to_vec())),
        ..Default::default()
    }
}

pub async fn enqueue(client: &mut JobServiceClient<Channel>, spec: pb::JobSpec) -> pb::Job {
    client
        .enqueue_job(pb::EnqueueJobRequest {
            parent: Default::default(),
            job: Some(spec),
        })
        .await
        .expect("enqueue")
        .into_inner()
        .job
        .expect("job in response")
}

pub async fn get(client: &mut JobServiceClient<Channel>, id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest {
            id: id.into(),
            view: pb::JobView::Full.into(),
        })
        .await
        .expect("get job")
        .into_inner()
        .job
        .expect("job in response")
}

/// Asserts a status code and that the message names `field`.
#[track_caller]
pub fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, field: &str) {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} should name {field:?}",
        status.message()
    );
}

/// A worker stream driven by hand.
pub struct RawWorker {
    tx: mpsc::Sender<pb::ConnectRequest>,
    rx: Streaming<pb::ConnectResponse>,
    pub welcome: pb::Welcome,
    next_request: u64,
    /// Messages read while looking for another kind.
    pub backlog: Vec<Out>,
}

impl RawWorker {
    pub async fn connect(url: &str, worker_id: &str, job_types: &[&str], slots: i32) -> Self {
        Self::connect_with(url, worker_id, job_types, slots, Vec::new()).await
    }

    pub async fn connect_with(
        url: &str,
        worker_id: &str,
        job_types: &[&str],
        slots: i32,
        running: Vec<pb::LeaseRef>,
    ) -> Self {
        Self::try_connect(url, hello(worker_id, job_types, slots, running))
            .await
            .expect("the server welcomes the worker")
    }

    /// A worker that holds up to `prefetch` leases beyond its slots.
    pub async fn connect_prefetching(
        url: &str,
        worker_id: &str,
        job_types: &[&str],
        slots: i32,
        prefetch: i32,
    ) -> Self {
        let hello = pb::Hello {
            prefetch,
            ..hello(worker_id, job_types, slots, Vec::new())
        };
        Self::try_connect(url, hello)
            .await
            .expect("the server welcomes the worker")
    }

    /// Opens a stream with `hello`; the server's refusal comes back as its status.
    pub async fn try_connect(url: &str, hello: pb::Hello) -> Result<Self, Status> {
        Self::try_connect_as(url, "default", hello).await
    }

    /// Opens a stream for `tenant` with `hello`.
    pub async fn try_connect_as(url: &str, tenant: &str, hello: pb::Hello) -> Result<Self, Status> {
        let (tx, out_rx) = mpsc::channel(64);
        tx.send(pb::ConnectRequest {
            message: Some(In::Hello(hello)),
        })
        .await
        .expect("queue hello");
        let mut client = WorkerServiceClient::new(channel(url).await);
        let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
        request.metadata_mut().insert(
            "jobwire-tenant",
            tenant
                .parse()
                .map_err(|_| Status::invalid_argument("tenant"))?,
        );
        let mut rx = client.connect(request).await?.into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("welcome in time")?
            .expect("a message");
        let Some(Out::Welcome(welcome)) = first.message else {
            panic!("expected welcome, got {first:?}");
        };
        Ok(Self {
            tx,
            rx,
            welcome,
            next_request: 1,
            backlog: Vec::new(),
        })
    }

    async fn send(&self, message: In) {
        self.tx
            .send(pb::ConnectRequest {
                message: Some(message),
            })
            .await
            .expect("stream open");
    }

    async fn recv(&mut self) -> Out {
        let message = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a server message in time")
            .expect("stream ok")
            .expect("stream not closed");
        message.message.expect("message set")
    }

    /// The next lease if one comes within `wait`, those already read past first.
    pub async fn lease_within(&mut self, wait: Duration) -> Option<pb::Lease> {
        if let Some(i) = self.backlog.iter().position(|m| matches!(m, Out::Lease(_)))
            && let Out::Lease(lease) = self.backlog.remove(i)
        {
            return Some(lease);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .ok()?
                .expect("stream ok")
                .expect("stream not closed");
            match message.message.expect("message set") {
                Out::Lease(lease) => return Some(lease),
                other => self.backlog.push(other),
            }
        }
    }

    /// Hands back leases unstarted, and waits for the answer.
    pub async fn release(&mut self, leases: &[&pb::Lease]) -> pb::Ack {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Release(pb::ReleaseLeases {
            request_id,
            leases: leases
                .iter()
                .map(|l| pb::LeaseRef {
                    job_id: l.job_id.clone(),
                    attempt: l.attempt,
                })
                .collect(),
        }))
        .await;
        self.ack(request_id).await
    }

    /// Sends a hand-back as given, and waits for the answer.
    pub async fn release_refs(&mut self, leases: Vec<pb::LeaseRef>) -> pb::Ack {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Release(pb::ReleaseLeases { request_id, leases }))
            .await;
        self.ack(request_id).await
    }

    pub async fn next_lease(&mut self) -> pb::Lease {
        if let Some(i) = self.backlog.iter().position(|m| matches!(m, Out::Lease(_)))
            && let Out::Lease(lease) = self.backlog.remove(i)
        {
            return lease;
        }
        loop {
            match self.recv().await {
                Out::Lease(lease) => return lease,
                other => self.backlog.push(other),
            }
        }
    }

    /// A request id no earlier message of this stream used.
    pub fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// Sends a message as given, and waits for the ack of `request_id`.
    pub async fn request(&mut self, request_id: u64, message: In) -> pb::Ack {
        self.send(message).await;
        self.ack(request_id).await
    }

    pub async fn ack(&mut self, request_id: u64) -> pb::Ack {
        loop {
            match self.recv().await {
                Out::Ack(ack) if ack.request_id == request_id => return ack,
                other => self.backlog.push(other),
            }
        }
    }

    pub async fn complete(&mut self, job_id: &str, attempt: i32, result: &[u8]) -> pb::Ack {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Complete(pb::CompleteJob {
            wait_signal: Default::default(),
            wait_for_children: Default::default(),
            request_id,
            lease: Some(pb::LeaseRef {
                job_id: job_id.into(),
                attempt,
            }),
            result: Some(any_bytes("test.Result", result.to_vec())),
        }))
        .await;
        self.ack(request_id).await
    }

    /// Completes without waiting for the ack (acks pile up in the backlog).
    pub async fn complete_nowait(&mut self, job_id: &str, attempt: i32) {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Complete(pb::CompleteJob {
            wait_signal: Default::default(),
            wait_for_children: Default::default(),
            request_id,
            lease: Some(pb::LeaseRef {
                job_id: job_id.into(),
                attempt,
            }),
            result: None,
        }))
        .await;
    }

    pub async fn fail(
        &mut self,
        job_id: &str,
        attempt: i32,
        message: &str,
        non_retryable: bool,
    ) -> pb::Ack {
        self.fail_after(job_id, attempt, message, non_retryable, Duration::ZERO)
            .await
    }

    /// Fails with the worker's own retry delay instead of the policy's backoff.
    pub async fn fail_after(
        &mut self,
        job_id: &str,
        attempt: i32,
        message: &str,
        non_retryable: bool,
        retry_after: Duration,
    ) -> pb::Ack {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Fail(pb::FailJob {
            request_id,
            lease: Some(pb::LeaseRef {
                job_id: job_id.into(),
                attempt,
            }),
            message: message.into(),
            kind: "test".into(),
            non_retryable,
            timed_out: false,
            retry_after: Some(prost_types::Duration {
                seconds: i64::try_from(retry_after.as_secs()).expect("small"),
                nanos: i32::try_from(retry_after.subsec_nanos()).expect("small"),
            }),
        }))
        .await;
        self.ack(request_id).await
    }

    /// Reports progress without waiting for the ack (acks pile up in the backlog); returns the
    /// request id its ack will carry.
    pub async fn progress(&mut self, job_id: &str, attempt: i32, done: i64, total: i64) -> u64 {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(In::Progress(pb::ReportProgress {
            request_id,
            lease: Some(pb::LeaseRef {
                job_id: job_id.into(),
                attempt,
            }),
            progress: Some(pb::Progress {
                items_done: done,
                items_total: total,
                message: format!("{done} of {total}"),
                ..Default::default()
            }),
        }))
        .await;
        request_id
    }

    /// The next `n` acks, those already read past first.
    pub async fn acks(&mut self, n: usize) -> Vec<pb::Ack> {
        let mut acks = Vec::with_capacity(n);
        let mut rest = Vec::new();
        for message in self.backlog.drain(..) {
            match message {
                Out::Ack(ack) if acks.len() < n => acks.push(ack),
                other => rest.push(other),
            }
        }
        self.backlog = rest;
        while acks.len() < n {
            match self.recv().await {
                Out::Ack(ack) => acks.push(ack),
                other => self.backlog.push(other),
            }
        }
        acks
    }

    /// Says the worker drains, closes its side of the stream, and reads the server's side to
    /// its end, as a drained worker does.
    pub async fn drain_and_close(self) {
        self.send(In::Drain(pb::Drain {})).await;
        let Self { tx, mut rx, .. } = self;
        drop(tx);
        while let Ok(Ok(Some(_))) = tokio::time::timeout(WAIT, rx.message()).await {}
    }

    /// Says that the handlers of `leases` started (not acknowledged).
    pub async fn started(&self, leases: Vec<pb::LeaseRef>) {
        self.send(In::Started(pb::StartedJobs { leases })).await;
    }

    pub async fn heartbeat(&self, running: Vec<pb::LeaseRef>) {
        self.send(In::Heartbeat(pb::Heartbeat { running })).await;
    }

    /// The next ReleaseQueued, reading past anything else.
    pub async fn next_release_queued(&mut self) -> pb::ReleaseQueued {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| matches!(m, Out::ReleaseQueued(_)))
            && let Out::ReleaseQueued(release) = self.backlog.remove(i)
        {
            return release;
        }
        loop {
            match self.recv().await {
                Out::ReleaseQueued(release) => return release,
                other => self.backlog.push(other),
            }
        }
    }

    /// The next StopJob, reading past anything else.
    pub async fn next_stop(&mut self) -> pb::StopJob {
        loop {
            match self.recv().await {
                Out::StopJob(stop) => return stop,
                other => self.backlog.push(other),
            }
        }
    }
}

/// A hello with no prefetch and no schemas.
pub fn hello(
    worker_id: &str,
    job_types: &[&str],
    slots: i32,
    running: Vec<pb::LeaseRef>,
) -> pb::Hello {
    pb::Hello {
        worker_id: worker_id.into(),
        job_types: job_types.iter().map(|s| s.to_string()).collect(),
        queues: vec![],
        slots,
        running,
        schemas: vec![],
        prefetch: 0,
        reports_started: false,
        ..Default::default()
    }
}

/// A WatchJob stream from `after`.
pub async fn watch_job(url: &str, id: &str, after: i64) -> Streaming<pb::WatchJobResponse> {
    jobs(url)
        .await
        .watch_job(pb::WatchJobRequest {
            include_children: Default::default(),
            id: id.into(),
            after_sequence: after,
        })
        .await
        .expect("watch job")
        .into_inner()
}

/// The next event of a watch stream, or None when it ended.
pub async fn next_event<T>(stream: &mut Streaming<T>) -> Option<T> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event in time")
        .expect("stream ok")
}

/// Whether an event is a state change into a terminal state.
pub fn is_terminal(event: &pb::JobEvent) -> bool {
    matches!(
        &event.event,
        Some(pb::job_event::Event::StateChanged(s))
            if [pb::JobState::Succeeded, pb::JobState::Failed, pb::JobState::Cancelled]
                .iter()
                .any(|t| *t as i32 == s.state)
    )
}

/// Every event of a WatchJob stream until it ends.
pub async fn collect_job_events(url: &str, id: &str, after: i64) -> Vec<pb::JobEvent> {
    let mut stream = watch_job(url, id, after).await;
    let mut events = Vec::new();
    while let Some(response) = next_event(&mut stream).await {
        events.push(response.event.expect("event"));
    }
    events
}
