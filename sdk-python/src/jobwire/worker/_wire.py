"""Every message of the worker protocol (``WorkerService.Connect``), built and read here only.

The rest of the runtime speaks in the plain values below (``LeaseKey``, ``Grant``, ``Failure``,
``Ack``, ``Stop``), so a change of the protocol is a change of this module.

Starts: the worker says ``Hello.reports_started`` and sends ``StartedJobs`` as its handlers
start, so that the server counts an attempt against ``max_attempts`` only once its handler
started: a lease lost unstarted (in the prefetch queue of a worker that died) does not count.

Timeouts are typed: a failure after the attempt ran past its deadline (the worker's own timer or
the server's ``STOP_REASON_TIMED_OUT``) carries ``FailJob.timed_out``; its ``kind`` is only a
label (the handler's, or ``timeout``). A result sent after the deadline is refused with ABORTED,
like one for a stale lease, and never sent again.

Waits: a handler that raised ``Waiting`` completes its attempt with no result and either
``wait_for_children`` or ``wait_signal``; the lease that resumes the job says
``children_ended``, or carries the job's signals, or the signal wait that timed out.

Timing without shared clocks: a lease's deadline is a time of the server's clock, and so is its
expiry. The attempt's timeout is their difference plus the lease duration of the welcome (both
are set from the same claim), and the worker counts it from when the lease arrived, less
``Lease.held`` (how long the server held the lease before sending it). So a worker whose clock
is off by minutes still stops the handler on time.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import metadata

import grpc
from google.protobuf import any_pb2, duration_pb2

from jobwire import _codec
from jobwire.errors import ChildrenWait, SignalWait
from jobwire.v1 import job_pb2, job_type_service_pb2, worker_service_pb2
from jobwire.worker.context import StopReason

Request = worker_service_pb2.ConnectRequest

#: A lease: its job and attempt (the fencing token).
LeaseKey = tuple[str, int]

#: The protocol's limits (proto/jobwire/v1/worker_service.proto): lines and text bytes in one
#: ReportLogs, the longest line or failure message, the longest failure kind, in UTF-8 bytes.
MAX_LINES_PER_MESSAGE = 1000
MAX_LOG_BYTES_PER_MESSAGE = 1 << 20
MAX_TEXT_BYTES = 8192
MAX_KIND_BYTES = 128
#: The most leases one ReleaseLeases carries.
MAX_RELEASES_PER_MESSAGE = 10_000

_STOP_REASONS = {
    worker_service_pb2.STOP_REASON_CANCELLED: StopReason.CANCELLED,
    worker_service_pb2.STOP_REASON_PAUSED: StopReason.PAUSED,
    worker_service_pb2.STOP_REASON_TIMED_OUT: StopReason.TIMED_OUT,
    worker_service_pb2.STOP_REASON_LEASE_LOST: StopReason.LEASE_LOST,
}

#: The failure kind of an attempt that failed after a stop, for the stops that decide how the
#: server settles the job; after a timeout, only when the handler gave none of its own.
_STOP_KINDS = {
    StopReason.CANCELLED: "cancelled",
    StopReason.PAUSED: "paused",
    StopReason.TIMED_OUT: "timeout",
}


@dataclass(frozen=True)
class Grant:
    """A lease to run, as the runtime needs it."""

    key: LeaseKey
    job_type: str
    queue: str
    payload: any_pb2.Any
    priority: int
    max_attempts: int
    labels: dict[str, str]
    created_at: datetime | None
    checkpoint: bytes | None
    #: How long the attempt may run from its claim; None: no limit.
    timeout: float | None
    #: How long ago, when it arrived, the lease was claimed.
    held: float
    #: The attempt resumes the job after every child it waited for ended.
    children_ended: bool = False
    #: Every signal the job received, oldest first.
    signals: tuple[job_pb2.JobSignal, ...] = ()
    #: The signal wait (name, count) this attempt resumes from, which timed out.
    signal_timed_out: tuple[str, int] | None = None


@dataclass(frozen=True)
class Welcome:
    session_id: str
    heartbeat_interval: float | None
    lease_duration: float | None
    rejected: list[LeaseKey]


@dataclass(frozen=True)
class Ack:
    request_id: int
    code: grpc.StatusCode
    message: str

    @property
    def refused_late(self) -> bool:
        """A result refused because it came after the attempt's deadline (the attempt timed
        out), rather than for a lease that moved on: both are ABORTED, told apart by the
        message."""
        return self.code is grpc.StatusCode.ABORTED and "timeout" in self.message


@dataclass(frozen=True)
class Stop:
    key: LeaseKey
    reason: StopReason
    message: str


@dataclass(frozen=True)
class ReleaseQueued:
    queue: str


@dataclass(frozen=True)
class DrainAsked:
    """An operator asked this worker to drain (DrainWorker): as on SIGTERM."""


@dataclass(frozen=True)
class Failure:
    """How an attempt failed, as reported in FailJob."""

    message: str
    #: The handler's class of the failure; None when it gave none (a ``Stopped``, a task
    #: cancelled after the stop grace, a ``HandlerError`` without one).
    kind: str | None
    retryable: bool
    retry_after: timedelta | None = None
    #: The worker stopped the handler because the attempt ran past its deadline.
    timed_out: bool = False

    def after_stop(self, reason: StopReason | None) -> Failure:
        """The failure to report once the stop's reason is known. After a cancel or a pause it
        is named for the stop and retryable, so the server settles the job by the stop's reason
        rather than by the handler's view of the error. After a timeout it is retryable and
        ``timed_out``, which is what the server records the attempt by; its kind stays the
        handler's, or is ``timeout`` when the handler gave none."""
        kind = _STOP_KINDS.get(reason) if reason is not None else None
        if kind is None:
            return self
        message = self.message or f"stopped: {reason}"
        if reason is StopReason.TIMED_OUT:
            return Failure(
                message,
                self.kind or kind,
                retryable=True,
                retry_after=self.retry_after,
                timed_out=True,
            )
        return Failure(message, kind, retryable=True, retry_after=self.retry_after)


Inbound = Welcome | Grant | Ack | Stop | ReleaseQueued | DrainAsked


def _status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def read(
    response: worker_service_pb2.ConnectResponse, lease_duration: float | None
) -> Inbound | None:
    """The message from the server, or None for one this SDK does not know."""
    which = response.WhichOneof("message")
    if which == "lease":
        return _grant(response.lease, lease_duration)
    if which == "ack":
        ack = response.ack
        return Ack(ack.request_id, _status_code(ack.code), ack.message)
    if which == "stop_job":
        stop = response.stop_job
        # An unspecified or unknown reason (a newer server's) is taken as a lost lease: the one
        # reason under which nothing the handler does can still count.
        reason = _STOP_REASONS.get(stop.reason, StopReason.LEASE_LOST)
        return Stop(_key(stop.lease), reason, stop.message)
    if which == "release_queued":
        return ReleaseQueued(response.release_queued.queue)
    if which == "drain":
        return DrainAsked()
    if which == "welcome":
        welcome = response.welcome
        return Welcome(
            session_id=welcome.session_id,
            heartbeat_interval=_seconds(welcome.heartbeat_interval)
            if welcome.HasField("heartbeat_interval")
            else None,
            lease_duration=_seconds(welcome.lease_duration)
            if welcome.HasField("lease_duration")
            else None,
            rejected=[_key(lease) for lease in welcome.rejected],
        )
    return None


def _grant(lease: worker_service_pb2.Lease, lease_duration: float | None) -> Grant:
    timeout = None
    if lease.HasField("deadline"):
        deadline = _codec.from_timestamp(lease.deadline)
        if lease.HasField("expires_at") and lease_duration is not None:
            expires = _codec.from_timestamp(lease.expires_at)
            timeout = (deadline - expires).total_seconds() + lease_duration
        else:
            # No claim time to count from: the worker's clock against the server's.
            timeout = (deadline - datetime.now(timezone.utc)).total_seconds() + _held(lease)
    return Grant(
        key=(lease.job_id, lease.attempt),
        job_type=lease.job_type,
        queue=lease.queue,
        payload=lease.payload,
        priority=lease.priority,
        max_attempts=lease.max_attempts,
        labels=dict(lease.labels),
        created_at=_codec.from_timestamp(lease.created_at)
        if lease.HasField("created_at")
        else None,
        checkpoint=lease.checkpoint or None,
        timeout=max(timeout, 0.0) if timeout is not None else None,
        held=_held(lease),
        children_ended=lease.children_ended,
        signals=tuple(lease.signals),
        signal_timed_out=(lease.signal_timed_out.name, lease.signal_timed_out.count)
        if lease.HasField("signal_timed_out")
        else None,
    )


def _held(lease: worker_service_pb2.Lease) -> float:
    return _codec.from_duration(lease.held).total_seconds() if lease.HasField("held") else 0.0


def _seconds(duration: duration_pb2.Duration) -> float | None:
    """A positive duration in seconds; None for zero, which the protocol uses for "not said"."""
    seconds = _codec.from_duration(duration).total_seconds()
    return seconds if seconds > 0 else None


def _key(lease: worker_service_pb2.LeaseRef) -> LeaseKey:
    return (lease.job_id, lease.attempt)


def _ref(key: LeaseKey) -> worker_service_pb2.LeaseRef:
    return worker_service_pb2.LeaseRef(job_id=key[0], attempt=key[1])


def _sdk_version() -> str:
    try:
        return f"jobwire-python/{metadata.version('jobwire')}"
    except metadata.PackageNotFoundError:
        return "jobwire-python"


#: What the hello says the worker runs.
_SDK_VERSION = _sdk_version()


def hello(
    *,
    worker_id: str,
    job_types: Sequence[str],
    queues: Sequence[str],
    slots: int,
    prefetch: int,
    running: Iterable[LeaseKey],
    schemas: Sequence[job_type_service_pb2.JobType],
) -> Request:
    return Request(
        hello=worker_service_pb2.Hello(
            worker_id=worker_id,
            job_types=job_types,
            queues=queues,
            slots=slots,
            prefetch=prefetch,
            running=[_ref(key) for key in running],
            schemas=schemas,
            # Leases lost before their handler started then do not count as attempts.
            reports_started=True,
            # For the server's ListWorkers; within the limits the proto documents.
            version=_SDK_VERSION,
            host=socket.gethostname().replace("\0", "")[:255],
        )
    )


def heartbeat(running: Iterable[LeaseKey]) -> Request:
    return Request(heartbeat=worker_service_pb2.Heartbeat(running=[_ref(k) for k in running]))


def started(keys: Iterable[LeaseKey]) -> Request:
    """The leases whose handlers have just started; not acknowledged."""
    return Request(started=worker_service_pb2.StartedJobs(leases=[_ref(k) for k in keys]))


def drain() -> Request:
    return Request(drain=worker_service_pb2.Drain())


def complete(request_id: int, key: LeaseKey, result: any_pb2.Any) -> Request:
    return Request(
        complete=worker_service_pb2.CompleteJob(
            request_id=request_id, lease=_ref(key), result=result
        )
    )


def wait(request_id: int, key: LeaseKey, waiting: ChildrenWait | SignalWait) -> Request:
    """The completion of an attempt whose handler waits: no result, and what it waits for."""
    message = worker_service_pb2.CompleteJob(request_id=request_id, lease=_ref(key))
    if isinstance(waiting, ChildrenWait):
        message.wait_for_children = True
    else:
        message.wait_signal.name = waiting.name
        message.wait_signal.count = waiting.count
        if waiting.timeout is not None:
            message.wait_signal.timeout.CopyFrom(_codec.to_duration(waiting.timeout))
    return Request(complete=message)


def fail(request_id: int, key: LeaseKey, failure: Failure) -> Request:
    message = worker_service_pb2.FailJob(
        request_id=request_id,
        lease=_ref(key),
        message=_cut(failure.message, MAX_TEXT_BYTES) or "failed",
        kind=_cut(failure.kind or "", MAX_KIND_BYTES),
        non_retryable=not failure.retryable,
        timed_out=failure.timed_out,
    )
    if failure.retry_after is not None:
        message.retry_after.CopyFrom(_codec.to_duration(failure.retry_after))
    return Request(fail=message)


def progress(request_id: int, key: LeaseKey, report: job_pb2.Progress) -> Request:
    return Request(
        progress=worker_service_pb2.ReportProgress(
            request_id=request_id, lease=_ref(key), progress=report
        )
    )


def logs(request_id: int, key: LeaseKey, lines: Sequence[job_pb2.LogLine]) -> Request:
    return Request(
        logs=worker_service_pb2.ReportLogs(request_id=request_id, lease=_ref(key), lines=lines)
    )


def checkpoint(request_id: int, key: LeaseKey, data: bytes) -> Request:
    return Request(
        checkpoint=worker_service_pb2.SaveCheckpoint(
            request_id=request_id, lease=_ref(key), data=data
        )
    )


def release(request_id: int, keys: Sequence[LeaseKey]) -> Request:
    return Request(
        release=worker_service_pb2.ReleaseLeases(
            request_id=request_id, leases=[_ref(k) for k in keys]
        )
    )


def log_line(level: int, message: str, now: datetime) -> job_pb2.LogLine:
    line = job_pb2.LogLine(
        level=job_pb2.LogLevel.ValueType(level), message=_cut(message, MAX_TEXT_BYTES)
    )
    line.time.CopyFrom(_codec.to_timestamp(now))
    return line


def log_batches(lines: Sequence[job_pb2.LogLine]) -> Iterator[list[job_pb2.LogLine]]:
    """``lines`` in order, in batches one ReportLogs may carry."""
    batch: list[job_pb2.LogLine] = []
    size = 0
    for line in lines:
        length = len(line.message.encode())
        if batch and (
            len(batch) == MAX_LINES_PER_MESSAGE or size + length > MAX_LOG_BYTES_PER_MESSAGE
        ):
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += length
    if batch:
        yield batch


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes, cut on a character boundary and marked as cut,
    rather than refused for one long line."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"
