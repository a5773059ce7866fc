"""Python SDK for jobwire, a durable job queue served over gRPC.

A job type ties a protobuf payload message to a name and an output message (``JobType``).
Producers enqueue payloads through a ``Client`` and get a ``JobHandle`` back, which waits for
the typed result or streams the job's events; workers register handlers on a ``Worker``,
which leases jobs from the server, runs them with bounded concurrency, carries their progress,
logs and checkpoints to the server, and reports their results.

Layout: ``client`` (the producer's side: enqueue, inspect, watch, control), ``admin`` (queues
and schedules), ``worker`` (the worker runtime), ``jobs`` (job types, states, retry policies,
recipes), ``events`` (typed events and reports), ``errors`` (exceptions both ways), ``items``
(item-based jobs), ``retry`` (retry predicates), ``sync`` (a blocking client), ``v1`` (the
stubs generated from ``proto/jobwire/v1`` at build time).
"""

from importlib.resources import files
from pathlib import Path

from jobwire._transport import Tls
from jobwire._watch import JobEvents
from jobwire.admin import CatchUpPolicy, OverlapPolicy, RateLimit
from jobwire.client import Client, JobHandle
from jobwire.errors import (
    Aborted,
    AlreadyExists,
    ConfigError,
    DecodeError,
    Disconnected,
    DrainTimeout,
    FailedPrecondition,
    Fatal,
    FieldViolation,
    HandlerError,
    Internal,
    InvalidArgument,
    JobFailed,
    JobwireError,
    LeaseLost,
    NonRetryable,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Retryable,
    RpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Waiting,
)
from jobwire.events import (
    JobEvent,
    LogLevel,
    LogLine,
    Progress,
    SignalReceived,
    StateChanged,
    StopRequested,
)
from jobwire.items import (
    ITEM_RESULTS,
    ItemOptions,
    ItemOutcome,
    ItemResults,
    OnItemFailure,
    run_items,
)
from jobwire.jobs import JobState, JobType, Recipe, RetryPolicy
from jobwire.retry import RetryDecision, RetryIf
from jobwire.worker import JobContext, Signal, Stopped, StopReason, Worker


def proto_include() -> Path:
    """The directory holding ``jobwire/v1/*.proto``, to pass to protoc (``-I``) when compiling
    job types that use the ``(jobwire.v1.job)`` option."""
    return Path(str(files("jobwire") / "_protos"))


__all__ = [
    "ITEM_RESULTS",
    "Aborted",
    "AlreadyExists",
    "CatchUpPolicy",
    "Client",
    "ConfigError",
    "DecodeError",
    "Disconnected",
    "DrainTimeout",
    "FailedPrecondition",
    "Fatal",
    "FieldViolation",
    "HandlerError",
    "Internal",
    "InvalidArgument",
    "ItemOptions",
    "ItemOutcome",
    "ItemResults",
    "JobContext",
    "JobEvent",
    "JobEvents",
    "JobFailed",
    "JobHandle",
    "JobState",
    "JobType",
    "JobwireError",
    "LeaseLost",
    "LogLevel",
    "LogLine",
    "NonRetryable",
    "NotFound",
    "OnItemFailure",
    "OverlapPolicy",
    "PermissionDenied",
    "Progress",
    "RateLimit",
    "Recipe",
    "ResourceExhausted",
    "RetryDecision",
    "RetryIf",
    "Retryable",
    "RetryPolicy",
    "RpcError",
    "Signal",
    "SignalReceived",
    "StateChanged",
    "StopReason",
    "StopRequested",
    "Stopped",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Waiting",
    "Worker",
    "proto_include",
    "run_items",
]
