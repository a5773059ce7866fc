"""Errors, split by direction, as in the Rust SDK.

``JobwireError`` and its subclasses are what the SDK raises to its caller: a call the server
refused (one class per gRPC status code, so ``except jobwire.NotFound`` reads like the protocol),
a job waited on that ended FAILED or CANCELLED (``JobFailed``), or a worker that could not drain
in time. A refused call carries the server's ``google.rpc.BadRequest`` field violations, which
name the field at fault (``job.priority``), so a caller can point at its own input.

``HandlerError`` goes the other way: a handler raises ``Retryable`` or ``NonRetryable`` to say
how its attempt failed and whether another attempt can help. Any other exception a handler
raises fails the attempt as retryable, its class name as the kind. ``Waiting`` is the one
``HandlerError`` that is no failure: the handler's wait for its children or for a signal,
raised so that it leaves the handler from any depth, as the Rust SDK returns it as an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from jobwire.v1 import job_pb2

# The trailer in which gRPC servers send a google.rpc.Status with typed error details.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class JobwireError(Exception):
    """Anything the SDK raises about a call, a job or a worker."""


class ConfigError(JobwireError, ValueError):
    """A setting given to the client or worker is invalid; the message says which."""


class DecodeError(JobwireError):
    """A payload or result is not the message expected (another type URL, or bad bytes)."""


@dataclass(frozen=True)
class FieldViolation:
    """One field the server refused: its path in the request (``job.priority``) and why."""

    field: str
    description: str


class RpcError(JobwireError):
    """The server answered with a non-OK status; subclasses name the code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        violations: tuple[FieldViolation, ...] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations
        #: The whole google.rpc.Status when the server sent one, for details beyond BadRequest.
        self.status = status

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else "UNKNOWN"
        return f"{name}: {self.message}"


class Cancelled(RpcError):
    code = grpc.StatusCode.CANCELLED


class Unknown(RpcError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RpcError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(RpcError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RpcError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RpcError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(RpcError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RpcError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> RpcError:
    """The exception for a status code that came without a call, such as a worker's Ack."""
    return _BY_CODE.get(code, Unknown)(message)


def from_rpc_error(error: grpc.RpcError) -> RpcError:
    """The typed exception for a failed call, with the field violations of its status details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    status = _status_details(error)
    violations: list[FieldViolation] = []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    cls = _BY_CODE.get(code, Unknown)
    return cls(message or "", violations=tuple(violations), status=status)


def _status_details(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for item in cast("Iterable[Any]", trailers or ()):
        key, value = item[0], item[1]
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer must not hide the error it came with
                return None
    return None


class JobFailed(JobwireError):
    """A job that was waited on ended FAILED (attempts exhausted, or a non-retryable failure)
    or CANCELLED; ``job`` is the job as it ended."""

    def __init__(self, job: job_pb2.Job) -> None:
        from jobwire.jobs import JobState

        self.job = job
        self.state = JobState(job.state)
        self.last_error: job_pb2.JobError | None = (
            job.last_error if job.HasField("last_error") else None
        )
        self.cancel_reason = job.cancel_reason or None
        if self.state is JobState.CANCELLED:
            text = f"job {job.id} was cancelled"
            if self.cancel_reason:
                text += f": {self.cancel_reason}"
        else:
            text = f"job {job.id} failed after attempt {job.attempt}"
            if self.last_error is not None:
                kind = f" [{self.last_error.kind}]" if self.last_error.kind else ""
                text += f"{kind}: {self.last_error.message}"
        super().__init__(text)


class LeaseLost(JobwireError):
    """The attempt a handler runs no longer holds its lease: nothing it reports counts."""


class Disconnected(JobwireError):
    """The worker's stream broke before the server acknowledged a checkpoint; whether it was
    stored is unknown, and calling again once the worker reconnected may succeed."""


class DrainTimeout(JobwireError):
    """A worker's drain outlasted its timeout; what was left is abandoned and the server
    retries those jobs once their leases lapse."""


class HandlerError(Exception):
    """How a handler's attempt failed: raise ``Retryable`` or ``NonRetryable``.

    ``kind`` is a short machine-readable class of the failure, shown with the job's error;
    ``retry_after`` replaces the retry policy's backoff before the next attempt.
    """

    retryable: bool = True

    def __init__(
        self, message: str, *, kind: str | None = None, retry_after: timedelta | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retry_after = retry_after


class Retryable(HandlerError):
    """A failure another attempt may not meet (a timeout, a busy dependency)."""

    retryable = True


class NonRetryable(HandlerError):
    """A failure no attempt can get past (bad input): the job fails at once."""

    retryable = False


#: Another name for ``NonRetryable``, as the Rust SDK calls it.
Fatal = NonRetryable


@dataclass(frozen=True)
class ChildrenWait:
    """Wait until every child the job enqueued has ended."""


@dataclass(frozen=True)
class SignalWait:
    """Wait until the job holds ``count`` signals named ``name`` (the handler's ``count``-th
    wait for it), for at most ``timeout`` (None: no limit)."""

    name: str
    count: int
    timeout: timedelta | None


class Waiting(HandlerError):
    """Not a failure: the handler ends its attempt to wait, raised by
    ``raise ctx.wait_for_children()`` or by ``ctx.wait_signal(...)``. The worker completes the
    attempt without a result (it does not count against the job's retries), the job waits on
    the server holding no worker, and it runs again, from the handler's start, once what it
    waits for happened. Retry predicates never see it; catching it (or ``HandlerError``, or
    ``Exception``) in the handler swallows the wait, so let it propagate."""

    def __init__(self, wait: ChildrenWait | SignalWait) -> None:
        message = (
            "waiting for its children"
            if isinstance(wait, ChildrenWait)
            else f"waiting for signal {wait.name}"
        )
        super().__init__(message)
        self.wait = wait
