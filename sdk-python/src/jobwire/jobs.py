"""The vocabulary producers and workers share: job types, states and retry policies.

A job type ties a name (``image.resize``) to its payload message and its output message. It is
declared either in protobuf, with the ``(jobwire.v1.job)`` option on the payload message (then
``JobType.of(Resize)`` reads name, output and defaults from the descriptor, and a worker
registers the schema with the server), or in Python, ``JobType("image.resize", Resize,
ResizeOutput)``, for messages declared without the option (as the Rust examples' are).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, TypeVar, overload

from google.protobuf import descriptor_pb2, empty_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from jobwire import _codec
from jobwire.errors import ConfigError
from jobwire.v1 import job_pb2, job_type_service_pb2, options_pb2

P = TypeVar("P", bound=Message)
O = TypeVar("O", bound=Message)  # noqa: E741


class JobState(enum.IntEnum):
    """A job's lifecycle state; values are the protocol's."""

    UNSPECIFIED = job_pb2.JOB_STATE_UNSPECIFIED
    AWAITING_APPROVAL = job_pb2.JOB_STATE_AWAITING_APPROVAL
    PENDING = job_pb2.JOB_STATE_PENDING
    SCHEDULED = job_pb2.JOB_STATE_SCHEDULED
    AVAILABLE = job_pb2.JOB_STATE_AVAILABLE
    RUNNING = job_pb2.JOB_STATE_RUNNING
    RETRYING = job_pb2.JOB_STATE_RETRYING
    PAUSED = job_pb2.JOB_STATE_PAUSED
    SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
    FAILED = job_pb2.JOB_STATE_FAILED
    CANCELLED = job_pb2.JOB_STATE_CANCELLED

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def parse(cls, value: int) -> JobState:
        """A state from the wire; one this SDK does not know (from a newer server) reads as
        UNSPECIFIED rather than failing the whole message."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried; unset fields take the server's defaults (3 attempts,
    5 s doubling to 1 h, 10 % jitter)."""

    max_attempts: int | None = None
    initial_backoff: timedelta | float | None = None
    max_backoff: timedelta | float | None = None
    backoff_multiplier: float | None = None
    jitter: float | None = None

    def to_proto(self) -> job_pb2.RetryPolicy:
        policy = job_pb2.RetryPolicy()
        if self.max_attempts is not None:
            policy.max_attempts = self.max_attempts
        if self.initial_backoff is not None:
            policy.initial_backoff.CopyFrom(_codec.to_duration(self.initial_backoff))
        if self.max_backoff is not None:
            policy.max_backoff.CopyFrom(_codec.to_duration(self.max_backoff))
        if self.backoff_multiplier is not None:
            policy.backoff_multiplier = self.backoff_multiplier
        if self.jitter is not None:
            policy.jitter = self.jitter
        return policy


@dataclass(frozen=True)
class Recipe:
    """A reusable enqueue profile: the settings a family of jobs shares (queue, priority,
    retry policy, labels, timeout, approval), named once and applied to any number of job
    types with ``client.enqueue(..., recipe=recipe)`` (or ``enqueue_many``, ``enqueue_json``).

    Each setting the recipe has applies unless the call gives its own; labels are merged, the
    call's value winning for a key both set; approval, asked by either, is asked. Plain data
    on the client's side: the server sees ordinary job specs.
    """

    queue: str | None = None
    priority: int | None = None
    retry: RetryPolicy | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout: timedelta | float | None = None
    needs_approval: bool = False


@dataclass(frozen=True)
class JobType(Generic[P, O]):
    """A job type: its name, payload message and output message.

    ``register_schema`` sends the type's schema (descriptors and ``defaults``) to the server
    when a worker serving it connects, so operators can list it, enqueue it as JSON and see its
    payloads as JSON. ``JobType.of`` turns it on; it is off by default for types declared in
    Python, as the Rust SDK registers only types declared in protobuf.
    """

    name: str
    payload: type[P]
    output: type[O]
    defaults: job_type_service_pb2.JobTypeDefaults | None = None
    register_schema: bool = False

    @overload
    @staticmethod
    def of(payload: type[P]) -> JobType[P, Message]: ...

    @overload
    @staticmethod
    def of(payload: type[P], output: type[O]) -> JobType[P, O]: ...

    @staticmethod
    def of(payload: type[P], output: type[Message] | None = None) -> JobType[P, Any]:
        """The job type declared on ``payload`` with the ``(jobwire.v1.job)`` option. Passing
        the ``output`` class the option names makes ``wait`` typed for static checkers; it must
        be the class the option names."""
        descriptor = payload.DESCRIPTOR
        options = descriptor.GetOptions()
        if not options.HasExtension(options_pb2.job):
            raise ConfigError(
                f"{descriptor.full_name} has no (jobwire.v1.job) option: declare the job type "
                "with JobType(name, payload, output)"
            )
        declared = options.Extensions[options_pb2.job]
        if not declared.name:
            raise ConfigError(f"the (jobwire.v1.job) option of {descriptor.full_name} names no job")
        declared_output = _output_class(descriptor, declared.output)
        if (
            output is not None
            and output.DESCRIPTOR.full_name != declared_output.DESCRIPTOR.full_name
        ):
            raise ConfigError(
                f"{descriptor.full_name} declares the output "
                f"{declared_output.DESCRIPTOR.full_name}, not {output.DESCRIPTOR.full_name}"
            )
        defaults = job_type_service_pb2.JobTypeDefaults(
            queue=declared.default_queue,
            idempotent_by_payload=declared.idempotent_by_payload,
            needs_approval=declared.needs_approval,
        )
        if declared.HasField("priority"):
            defaults.priority = declared.priority
        if declared.HasField("retry_policy"):
            defaults.retry_policy.CopyFrom(declared.retry_policy)
        if declared.HasField("timeout"):
            defaults.timeout.CopyFrom(declared.timeout)
        return JobType(
            declared.name, payload, output or declared_output, defaults, register_schema=True
        )

    def schema(self) -> job_type_service_pb2.JobType:
        """The registration a worker sends in its Hello."""
        files = _file_closure(self.payload.DESCRIPTOR.file, self.output.DESCRIPTOR.file)
        registration = job_type_service_pb2.JobType(
            name=self.name,
            payload_type=self.payload.DESCRIPTOR.full_name,
            output_type=self.output.DESCRIPTOR.full_name,
            descriptor_set=descriptor_pb2.FileDescriptorSet(file=files).SerializeToString(),
        )
        if self.defaults is not None:
            registration.defaults.CopyFrom(self.defaults)
        return registration


def _output_class(payload: Any, output: str) -> type[Message]:
    """The output message the option names: by full name, by name within the payload's
    package, or google.protobuf.Empty when it names none."""
    if not output:
        return empty_pb2.Empty
    pool = payload.file.pool
    package = payload.file.package
    for name in (f"{package}.{output}" if package else output, output):
        try:
            return GetMessageClass(pool.FindMessageTypeByName(name))
        except KeyError:
            continue
    raise ConfigError(f"the output {output!r} of {payload.full_name} is not a known message")


def _file_closure(*roots: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file the roots need, dependencies first, each once."""
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        ordered.append(proto)

    for root in roots:
        visit(root)
    return ordered
