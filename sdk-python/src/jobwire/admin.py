"""Administration of queues (``QueueService``) and cron schedules (``ScheduleService``),
reached as ``client.queues`` and ``client.schedules``.

Updates follow AIP-134: only the fields passed are named in the update mask, and passing
``None`` for a limit removes it, so "leave alone" and "remove" stay distinct.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from jobwire import _codec
from jobwire.errors import from_rpc_error
from jobwire.jobs import JobType, RetryPolicy
from jobwire.v1 import (
    job_pb2,
    queue_service_pb2,
    queue_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Metadata = tuple[tuple[str, str], ...]


class _Unset(enum.Enum):
    UNSET = "unset"


#: The default of an update's fields: leave the field as it is.
UNSET: Final = _Unset.UNSET


class OverlapPolicy(enum.IntEnum):
    """What a tick does while the previous tick's job is unfinished."""

    ALLOW = schedule_service_pb2.OVERLAP_POLICY_ALLOW
    SKIP = schedule_service_pb2.OVERLAP_POLICY_SKIP
    CANCEL_PREVIOUS = schedule_service_pb2.OVERLAP_POLICY_CANCEL_PREVIOUS


class CatchUpPolicy(enum.IntEnum):
    """What happens to ticks missed while no replica ran the schedules."""

    ONCE = schedule_service_pb2.CATCH_UP_POLICY_ONCE
    SKIP = schedule_service_pb2.CATCH_UP_POLICY_SKIP
    ALL = schedule_service_pb2.CATCH_UP_POLICY_ALL


@dataclass(frozen=True)
class RateLimit:
    """A token bucket over every replica: ``per_second`` starts a second, bursts of ``burst``
    (default: one second's worth)."""

    per_second: float
    burst: int | None = None

    def to_proto(self) -> queue_service_pb2.RateLimit:
        return queue_service_pb2.RateLimit(per_second=self.per_second, burst=self.burst or 0)


async def _call(
    method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, metadata: Metadata
) -> Resp:
    try:
        return await method(request, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None


class Queues:
    """The tenant's queues: figures, pause and resume, concurrency and rate limits."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata) -> None:
        self._stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        self._metadata = metadata

    async def list(self, *, page_size: int = 100) -> AsyncIterator[queue_service_pb2.Queue]:
        request = queue_service_pb2.ListQueuesRequest(page_size=page_size)
        while True:
            page = await _call(self._stub.ListQueues, request, self._metadata)
            for queue in page.queues:
                yield queue
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def get(self, name: str) -> queue_service_pb2.Queue:
        """The queue with its statistics; ``NotFound`` when it was never used."""
        request = queue_service_pb2.GetQueueRequest(name=name)
        return (await _call(self._stub.GetQueue, request, self._metadata)).queue

    async def update(
        self,
        name: str,
        *,
        concurrency_limit: int | _Unset | None = UNSET,
        rate_limit: RateLimit | _Unset | None = UNSET,
        create_if_missing: bool = False,
    ) -> queue_service_pb2.Queue:
        """Sets (a value) or removes (None) the limits passed; others stay as they are."""
        queue = queue_service_pb2.Queue(name=name)
        paths = []
        if concurrency_limit is not UNSET:
            paths.append("concurrency_limit")
            if concurrency_limit is not None:
                queue.concurrency_limit = concurrency_limit
        if rate_limit is not UNSET:
            paths.append("rate_limit")
            if rate_limit is not None:
                queue.rate_limit.CopyFrom(rate_limit.to_proto())
        request = queue_service_pb2.UpdateQueueRequest(
            queue=queue,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            allow_missing=create_if_missing,
        )
        return (await _call(self._stub.UpdateQueue, request, self._metadata)).queue

    async def pause(self, name: str, reason: str = "") -> queue_service_pb2.Queue:
        """Stops the queue's jobs from starting on every replica; running ones carry on."""
        request = queue_service_pb2.PauseQueueRequest(name=name, reason=reason)
        return (await _call(self._stub.PauseQueue, request, self._metadata)).queue

    async def resume(self, name: str) -> queue_service_pb2.Queue:
        request = queue_service_pb2.ResumeQueueRequest(name=name)
        return (await _call(self._stub.ResumeQueue, request, self._metadata)).queue


class Schedules:
    """The tenant's cron schedules: each tick creates one job from a template."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata) -> None:
        self._stub = schedule_service_pb2_grpc.ScheduleServiceStub(channel)
        self._metadata = metadata

    async def create(
        self,
        name: str,
        cron: str,
        payload: Message,
        *,
        job_type: JobType[Any, Any] | str | None = None,
        time_zone: str = "",
        description: str = "",
        queue: str = "",
        priority: int | None = None,
        retry: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: timedelta | float | None = None,
        overlap: OverlapPolicy | None = None,
        catch_up: CatchUpPolicy | None = None,
        max_catch_up: int = 0,
        misfire_grace: timedelta | float | None = None,
        paused: bool = False,
    ) -> schedule_service_pb2.Schedule:
        """A schedule whose ticks (``cron``: 5 fields, or 6 with seconds first, read in
        ``time_zone``) each enqueue ``payload``. ``AlreadyExists`` when the name is taken."""
        schedule = schedule_service_pb2.Schedule(
            name=name,
            cron=cron,
            time_zone=time_zone,
            description=description,
            job=_template(payload, job_type, queue, priority, retry, labels, timeout),
            max_catch_up=max_catch_up,
        )
        if overlap is not None:
            schedule.overlap_policy = schedule_service_pb2.OverlapPolicy.ValueType(overlap)
        if catch_up is not None:
            schedule.catch_up_policy = schedule_service_pb2.CatchUpPolicy.ValueType(catch_up)
        if misfire_grace is not None:
            schedule.misfire_grace.CopyFrom(_codec.to_duration(misfire_grace))
        request = schedule_service_pb2.CreateScheduleRequest(schedule=schedule, paused=paused)
        return (await _call(self._stub.CreateSchedule, request, self._metadata)).schedule

    async def get(self, name: str) -> schedule_service_pb2.Schedule:
        request = schedule_service_pb2.GetScheduleRequest(name=name)
        return (await _call(self._stub.GetSchedule, request, self._metadata)).schedule

    async def list(self, *, page_size: int = 100) -> AsyncIterator[schedule_service_pb2.Schedule]:
        request = schedule_service_pb2.ListSchedulesRequest(page_size=page_size)
        while True:
            page = await _call(self._stub.ListSchedules, request, self._metadata)
            for schedule in page.schedules:
                yield schedule
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def update(
        self,
        name: str,
        *,
        cron: str | _Unset = UNSET,
        time_zone: str | _Unset = UNSET,
        description: str | _Unset = UNSET,
        overlap: OverlapPolicy | _Unset = UNSET,
        catch_up: CatchUpPolicy | _Unset = UNSET,
        max_catch_up: int | _Unset = UNSET,
        misfire_grace: timedelta | float | _Unset = UNSET,
    ) -> schedule_service_pb2.Schedule:
        """Changes the fields passed; a new cron expression or time zone applies from now."""
        schedule = schedule_service_pb2.Schedule(name=name)
        paths = []
        if not isinstance(cron, _Unset):
            schedule.cron = cron
            paths.append("cron")
        if not isinstance(time_zone, _Unset):
            schedule.time_zone = time_zone
            paths.append("time_zone")
        if not isinstance(description, _Unset):
            schedule.description = description
            paths.append("description")
        if not isinstance(overlap, _Unset):
            schedule.overlap_policy = schedule_service_pb2.OverlapPolicy.ValueType(overlap)
            paths.append("overlap_policy")
        if not isinstance(catch_up, _Unset):
            schedule.catch_up_policy = schedule_service_pb2.CatchUpPolicy.ValueType(catch_up)
            paths.append("catch_up_policy")
        if not isinstance(max_catch_up, _Unset):
            schedule.max_catch_up = max_catch_up
            paths.append("max_catch_up")
        if not isinstance(misfire_grace, _Unset):
            schedule.misfire_grace.CopyFrom(_codec.to_duration(misfire_grace))
            paths.append("misfire_grace")
        request = schedule_service_pb2.UpdateScheduleRequest(
            schedule=schedule, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return (await _call(self._stub.UpdateSchedule, request, self._metadata)).schedule

    async def delete(self, name: str) -> None:
        """Deletes the schedule; the jobs it created are kept."""
        request = schedule_service_pb2.DeleteScheduleRequest(name=name)
        await _call(self._stub.DeleteSchedule, request, self._metadata)

    async def pause(self, name: str) -> schedule_service_pb2.Schedule:
        request = schedule_service_pb2.PauseScheduleRequest(name=name)
        return (await _call(self._stub.PauseSchedule, request, self._metadata)).schedule

    async def resume(self, name: str) -> schedule_service_pb2.Schedule:
        request = schedule_service_pb2.ResumeScheduleRequest(name=name)
        return (await _call(self._stub.ResumeSchedule, request, self._metadata)).schedule

    async def trigger(self, name: str) -> job_pb2.Job:
        """Creates a job from the template now, outside the ticks; returns it."""
        request = schedule_service_pb2.TriggerScheduleRequest(name=name)
        return (await _call(self._stub.TriggerSchedule, request, self._metadata)).job


def _template(
    payload: Message,
    job_type: JobType[Any, Any] | str | None,
    queue: str,
    priority: int | None,
    retry: RetryPolicy | None,
    labels: Mapping[str, str] | None,
    timeout: timedelta | float | None,
) -> schedule_service_pb2.JobTemplate:
    if job_type is None:
        job_type = JobType.of(type(payload))
    template = schedule_service_pb2.JobTemplate(
        job_type=job_type if isinstance(job_type, str) else job_type.name,
        payload=_codec.pack(payload),
        queue=queue,
        labels=dict(labels or {}),
    )
    if priority is not None:
        template.priority = priority
    if retry is not None:
        template.retry_policy.CopyFrom(retry.to_proto())
    if timeout is not None:
        template.timeout.CopyFrom(_codec.to_duration(timeout))
    return template
