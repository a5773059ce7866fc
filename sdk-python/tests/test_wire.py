"""The protocol's edges that need no server: a lease's timeout derived without comparing the
two clocks, failures after a stop, and the field violations of a refused call."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import jobwire
from jobwire import _codec
from jobwire.errors import from_rpc_error
from jobwire.v1 import worker_service_pb2
from jobwire.worker import _wire


def lease(**fields: object) -> worker_service_pb2.ConnectResponse:
    return worker_service_pb2.ConnectResponse(
        lease=worker_service_pb2.Lease(job_id="j1", attempt=3, job_type="t", **fields)  # type: ignore[arg-type]
    )


def test_a_leases_timeout_comes_from_server_times_only() -> None:
    # The server's clock is an hour behind the worker's: comparing its deadline with the local
    # clock would think the attempt long over.
    claimed = datetime.now(timezone.utc) - timedelta(hours=1)
    grant = _wire.read(
        lease(
            expires_at=_codec.to_timestamp(claimed + timedelta(seconds=30)),
            deadline=_codec.to_timestamp(claimed + timedelta(seconds=5)),
            held=_codec.to_duration(0.2),
        ),
        lease_duration=30.0,
    )
    assert isinstance(grant, _wire.Grant)
    assert grant.key == ("j1", 3)
    assert grant.timeout == 5.0
    assert grant.held == 0.2
    untimed = _wire.read(lease(), lease_duration=30.0)
    assert isinstance(untimed, _wire.Grant) and untimed.timeout is None


def test_an_unknown_stop_reason_reads_as_a_lost_lease() -> None:
    stop = worker_service_pb2.ConnectResponse(
        stop_job=worker_service_pb2.StopJob(
            lease=worker_service_pb2.LeaseRef(job_id="j1", attempt=1),
            reason=42,  # type: ignore[arg-type]
        )
    )
    read = _wire.read(stop, None)
    assert isinstance(read, _wire.Stop) and read.reason is jobwire.StopReason.LEASE_LOST


def test_a_failure_after_a_cancel_or_pause_is_named_for_it() -> None:
    failure = _wire.Failure("disk full", "io", retryable=False, retry_after=timedelta(seconds=4))
    assert failure.after_stop(jobwire.StopReason.LEASE_LOST) == failure
    assert failure.after_stop(None) == failure
    message = _wire.fail(7, ("j1", 1), failure.after_stop(jobwire.StopReason.CANCELLED)).fail
    assert (message.kind, message.non_retryable, message.timed_out) == ("cancelled", False, False)
    paused = failure.after_stop(jobwire.StopReason.PAUSED)
    assert (paused.kind, paused.retryable, paused.timed_out) == ("paused", True, False)


def test_a_failure_after_a_timeout_is_typed_and_keeps_the_handlers_kind() -> None:
    failure = _wire.Failure("disk full", "io", retryable=False, retry_after=timedelta(seconds=4))
    timed_out = failure.after_stop(jobwire.StopReason.TIMED_OUT)
    assert (timed_out.kind, timed_out.retryable, timed_out.message, timed_out.timed_out) == (
        "io",
        True,
        "disk full",
        True,
    )
    assert timed_out.retry_after == timedelta(seconds=4)
    message = _wire.fail(7, ("j1", 1), timed_out).fail
    assert (message.timed_out, message.kind, message.non_retryable) == (True, "io", False)
    assert message.retry_after.seconds == 4
    # No kind of the handler's (a Stopped, a task cancelled after the grace): the SDK's own.
    stopped = _wire.Failure("", None, retryable=True).after_stop(jobwire.StopReason.TIMED_OUT)
    assert (stopped.kind, stopped.message, stopped.timed_out) == (
        "timeout",
        "stopped: timed out",
        True,
    )
    assert not _wire.fail(8, ("j1", 1), failure).fail.timed_out


def test_the_worker_reports_its_handlers_starts() -> None:
    hello = _wire.hello(
        worker_id="w",
        job_types=["t"],
        queues=["q"],
        slots=2,
        prefetch=0,
        running=[("j1", 2)],
        schemas=[],
    ).hello
    assert hello.reports_started
    started = _wire.started([("j1", 2), ("j2", 1)]).started
    assert [(ref.job_id, ref.attempt) for ref in started.leases] == [("j1", 2), ("j2", 1)]


def test_a_result_refused_for_its_deadline_is_told_from_a_stale_lease() -> None:
    def ack(code: int, message: str) -> _wire.Ack:
        read = _wire.read(
            worker_service_pb2.ConnectResponse(
                ack=worker_service_pb2.Ack(request_id=1, code=code, message=message)
            ),
            None,
        )
        assert isinstance(read, _wire.Ack)
        return read

    late = ack(10, "lease j/1 ran past its timeout: its result is refused")
    assert late.code is grpc.StatusCode.ABORTED and late.refused_late
    assert not ack(10, "lease j/1 is no longer held: the job has moved on").refused_late
    assert not ack(0, "").refused_late


class _Refused(grpc.RpcError):
    def __init__(self, status: status_pb2.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return str(self._status.message)

    def trailing_metadata(self) -> Any:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def test_a_refused_call_carries_its_field_violations() -> None:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="job.priority", description="0 to 100"
                )
            ]
        )
    )
    status = status_pb2.Status(code=3, message="job.priority must be 0 to 100", details=[detail])
    error = from_rpc_error(_Refused(status))
    assert isinstance(error, jobwire.InvalidArgument)
    assert error.violations == (jobwire.FieldViolation("job.priority", "0 to 100"),)
    assert str(error) == "INVALID_ARGUMENT: job.priority must be 0 to 100"


def test_long_text_is_cut_to_the_protocols_byte_limits() -> None:
    failure = _wire.Failure("é" * 5000, "k" * 200, retryable=True)
    message = _wire.fail(1, ("j1", 1), failure).fail
    assert len(message.message.encode()) <= 8192
    assert message.message.endswith("…")
    assert len(message.kind.encode()) <= 128
    lines = [_wire.log_line(2, "x" * 9000, datetime.now(timezone.utc)) for _ in range(300)]
    batches = list(_wire.log_batches(lines))
    assert sum(len(b) for b in batches) == 300
    assert all(sum(len(line.message.encode()) for line in b) <= 1 << 20 for b in batches)
    many = [_wire.log_line(2, "short", datetime.now(timezone.utc)) for _ in range(2500)]
    assert [len(b) for b in _wire.log_batches(many)] == [1000, 1000, 500]
