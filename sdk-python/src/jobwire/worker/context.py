"""What a handler knows about the attempt it runs, how it reports on it, and how it learns
that it must stop.

Stopping is cooperative first: when the server sends StopJob for the lease (the job was
cancelled or paused, its lease was lost, or it ran past its timeout), when the attempt's
deadline passes locally, or when a drain runs out of time, the context's cancellation fires
(``ctx.cancelled`` turns True, ``await ctx.wait_cancelled()`` returns, ``ctx.stop_reason`` says
why). A handler told to stop should return promptly, after a ``checkpoint`` when pausing. One
that has not returned ``stop_grace`` seconds later is cancelled like any asyncio task
(``CancelledError`` at its next await), since the server stops honouring its lease soon after.

Reporting never waits: ``progress`` keeps only the latest value and the worker sends it at most
once per progress interval, ``log`` lines are batched, and both go out before the attempt's
result. ``checkpoint`` waits until the server stored it; the next attempt (after a pause, a
crash or a retry) starts with it in ``last_checkpoint``.

A handler fans out through its context: ``enqueue_children`` stores jobs as its children, and
``raise ctx.wait_for_children()`` hands back its slot while they run. The job then waits on the
server, holding no worker, and runs again (an attempt that does not count against its retries)
once every child has ended, with ``children_ended`` set, to aggregate ``await ctx.children()``.
The handler runs from its start each time, so it tells the two apart by ``children_ended``.

A handler waits for a signal (``Client.signal_job``) the same way: ``ctx.wait_signal(name)``
returns at once a signal the job holds, and otherwise raises the wait; the job runs again once
the signal arrives, and the same call then returns it. A handler's n-th wait for a name is
answered by the n-th signal of that name, so a handler that runs from its start again finds
each of its earlier waits answered as before.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message

from jobwire import _codec
from jobwire.client import Client, JobHandle, specs
from jobwire.errors import (
    ChildrenWait,
    JobwireError,
    Retryable,
    SignalWait,
    Waiting,
)
from jobwire.events import LogLevel, Progress
from jobwire.jobs import JobType, Recipe, RetryPolicy
from jobwire.v1 import job_pb2, worker_service_pb2

if TYPE_CHECKING:
    from jobwire.worker._reports import LeaseReports
    from jobwire.worker._wire import Grant

P = TypeVar("P", bound=Message)
O = TypeVar("O", bound=Message)  # noqa: E741
M = TypeVar("M", bound=Message)

#: The most jobs one ListJobs page holds (proto/jobwire/v1/job_service.proto).
_MAX_PAGE_SIZE = 1000


class StopReason(enum.Enum):
    """Why a handler was asked to stop."""

    #: The job was cancelled; it will not run again.
    CANCELLED = "cancelled"
    #: The job was paused: save a checkpoint, then return; it resumes from it later.
    PAUSED = "paused"
    #: The attempt ran past the job's timeout; it counts as a retryable failure.
    TIMED_OUT = "timed out"
    #: The lease lapsed or moved on; nothing this attempt reports counts any more.
    LEASE_LOST = "lease lost"
    #: The worker is shutting down and its drain timeout passed; the job will be retried.
    SHUTDOWN = "worker shutting down"

    def __str__(self) -> str:
        return self.value


class Stopped(JobwireError):
    """Raised by ``JobContext.raise_if_cancelled``; the runtime reports the attempt by the
    stop's reason."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"stopped: {reason}")
        self.reason = reason


class StopSignal:
    """The cancellation of one attempt: fires once, and its first reason stands."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: StopReason | None = None

    def stop(self, reason: StopReason) -> bool:
        """Fires; False when it had fired before."""
        if self.reason is not None:
            return False
        self.reason = reason
        self.event.set()
        return True


@dataclass(frozen=True)
class Signal:
    """A signal the job received (``Client.signal_job``)."""

    name: str
    #: The payload as sent; None when the sender gave none.
    payload: any_pb2.Any | None
    #: When the server received it.
    received_at: datetime | None

    @classmethod
    def from_proto(cls, signal: job_pb2.JobSignal) -> Signal:
        return cls(
            name=signal.name,
            payload=signal.payload if signal.HasField("payload") else None,
            received_at=_codec.from_timestamp(signal.received_at)
            if signal.HasField("received_at")
            else None,
        )

    def payload_as(self, cls: type[M]) -> M | None:
        """The payload as a ``cls`` (None when the signal carries none); ``DecodeError`` when
        it carries another message."""
        if self.payload is None:
            return None
        return _codec.unpack(self.payload, cls, "signal payload")


class JobContext:
    """The attempt a handler runs: which job, which attempt, whether to stop, how to report,
    and what it composes: its children and the signals it waits for."""

    def __init__(
        self,
        grant: Grant,
        worker_id: str,
        stop: StopSignal,
        reports: LeaseReports,
        checkpoint: Callable[[LeaseReports, bytes], Awaitable[None]],
        deadline: float | None,
        client: Client,
    ) -> None:
        self.job_id: str = grant.key[0]
        #: This attempt's number, 1 for the first.
        self.attempt: int = grant.key[1]
        #: Attempts in all under the job's retry policy, the first included.
        self.max_attempts: int = grant.max_attempts
        self.job_type: str = grant.job_type
        self.queue: str = grant.queue
        self.priority: int = grant.priority
        self.labels: Mapping[str, str] = grant.labels
        self.created_at: datetime | None = grant.created_at
        #: The checkpoint a previous attempt saved, if any.
        self.last_checkpoint: bytes | None = grant.checkpoint
        self.worker_id = worker_id
        self._stop = stop
        self._reports = reports
        self._checkpoint = checkpoint
        self._deadline = deadline
        #: This attempt resumes the job after every child it waited for ended: time to
        #: aggregate ``await ctx.children()``.
        self.children_ended: bool = grant.children_ended
        #: Every signal the job received, oldest first.
        self.signals: tuple[Signal, ...] = tuple(Signal.from_proto(s) for s in grant.signals)
        self._signal_timed_out = grant.signal_timed_out
        #: Waits for signals made so far, by name: how many.
        self._signal_waits: dict[str, int] = {}
        #: The worker's connection, shared by its handlers.
        self._client = client
        #: Children this attempt enqueued so far: the next one's position, for its default
        #: key. Moved on only once the server stored them, so that a call that failed numbers
        #: its children the same when made again, and finds what it stored if it did.
        self._children_enqueued = 0
        #: Held across each enqueue, so that concurrent calls number their children one after
        #: the other.
        self._children_lock = asyncio.Lock()

    @property
    def is_last_attempt(self) -> bool:
        """Whether a retryable failure now would still be retried."""
        return self.attempt >= self.max_attempts

    @property
    def cancelled(self) -> bool:
        """Whether the handler has been asked to stop."""
        return self._stop.reason is not None

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop.reason

    async def wait_cancelled(self) -> StopReason:
        """Returns once the handler is asked to stop, with the reason; race it against the
        work (``asyncio.wait``) to stop promptly."""
        await self._stop.event.wait()
        assert self._stop.reason is not None
        return self._stop.reason

    def raise_if_cancelled(self) -> None:
        """Raises ``Stopped`` once the handler was asked to stop: a check for loops."""
        if self._stop.reason is not None:
            raise Stopped(self._stop.reason)

    def time_left(self) -> float | None:
        """Seconds until the attempt's timeout (by the worker's monotonic clock), if it has
        one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def progress(
        self,
        fraction: float | None = None,
        *,
        message: str = "",
        stage: str = "",
        items_done: int = 0,
        items_total: int = 0,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Reports how far the job has come; watchers see it as a progress event. Cheap enough
        for every item: only the latest value is sent, at most once per progress interval,
        and always before the attempt's result. Does nothing once the lease is lost."""
        self.report(
            Progress(
                fraction=fraction,
                message=message,
                stage=stage,
                items_done=items_done,
                items_total=items_total,
                data=data or {},
            )
        )

    def report(self, progress: Progress) -> None:
        """``progress`` with a ready ``Progress`` value."""
        self._reports.set_progress(progress)

    def log(self, level: LogLevel, message: str) -> None:
        """Logs a line to the job's own log. Never waits; at most 10,000 lines wait to be sent,
        beyond which the oldest are dropped and a warning line says how many."""
        self._reports.push_line(level, message)

    def debug(self, message: str) -> None:
        self.log(LogLevel.DEBUG, message)

    def info(self, message: str) -> None:
        self.log(LogLevel.INFO, message)

    def warn(self, message: str) -> None:
        self.log(LogLevel.WARN, message)

    def error(self, message: str) -> None:
        self.log(LogLevel.ERROR, message)

    async def checkpoint(self, data: bytes) -> None:
        """Stores state a later attempt can resume from, and waits until the server has it.
        Raises ``LeaseLost`` when the lease is gone, ``Disconnected`` when the stream broke
        first."""
        await self._checkpoint(self._reports, data)

    async def enqueue_children(
        self,
        payloads: Iterable[P],
        *,
        job_type: JobType[P, O],
        queue: str | None = None,
        priority: int | None = None,
        retry: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: timedelta | float | None = None,
        recipe: Recipe | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[JobHandle[O]]:
        """Enqueues jobs as children of this job, as ``Client.enqueue_many`` does (one
        transaction, all or none, handles in order). The server takes them only while this
        attempt holds its lease (``Aborted`` for a stale one), and cancels those not yet ended
        if this job ends CANCELLED or FAILED.

        A child without a key of its own in ``keys`` (one per payload, in order; empty for
        none) gets the idempotency key ``<job id>/child/<n>``, ``n`` its position among the
        children this attempt enqueued: a call that failed (the server unreachable, its answer
        lost) may be made again and finds what it stored, and a handler that runs again after a
        crash or a retry and enqueues the same children in the same order gets the existing
        ones back rather than twins. Keys of its own find them whatever the order.
        """
        batch = specs(payloads, job_type, queue, priority, retry, labels, timeout, recipe, keys)
        parent = worker_service_pb2.LeaseRef(job_id=self.job_id, attempt=self.attempt)
        async with self._children_lock:
            for n, spec in enumerate(batch, start=self._children_enqueued):
                if not spec.idempotency_key:
                    spec.idempotency_key = f"{self.job_id}/child/{n}"
            handles = await self._client._enqueue_specs(batch, job_type.output, parent)
            self._children_enqueued += len(batch)
        return handles

    def wait_for_children(self) -> Waiting:
        """What the handler raises to wait for its children rather than finish:
        ``raise ctx.wait_for_children()``. The attempt ends without counting against the
        job's retries, the job waits on the server without holding a slot, and it runs again
        once every child has ended, with ``children_ended`` set. A job with no unfinished
        child runs again at once."""
        return Waiting(ChildrenWait())

    async def children(self) -> list[job_pb2.Job]:
        """Every child of this job as the server has it now, oldest first, with their states
        and results (``child.result.Unpack(output)``): read once ``children_ended``, every one
        has ended."""
        listing = self._client.list_jobs(parent_id=self.job_id, page_size=_MAX_PAGE_SIZE)
        children = [job async for job in listing]
        # Ids are version 7 UUIDs: in creation order once sorted (listings are newest first).
        children.sort(key=lambda job: job.id)
        return children

    def wait_signal(self, name: str, timeout: timedelta | float | None = None) -> Signal:
        """The signal named ``name`` (sent with ``Client.signal_job``) this wait is answered
        by, waiting for it for at most ``timeout`` (None: no limit).

        When the job holds it, it is returned at once. Otherwise the wait is raised
        (``Waiting``; let it leave the handler): the job waits on the server, holding no
        worker, and runs again once the signal arrives or the timeout passes, an attempt that
        does not count against its retries; the same call then returns the signal, or raises
        ``Retryable`` of kind ``signal_timeout`` when the wait timed out (let it fail the
        attempt, or handle it).

        Each call for a name waits for the next signal of that name: the n-th call of an
        attempt for the n-th.
        """
        count = self._signal_waits.get(name, 0) + 1
        self._signal_waits[name] = count
        named = [signal for signal in self.signals if signal.name == name]
        if count <= len(named):
            return named[count - 1]
        if self._signal_timed_out == (name, count):
            raise Retryable(f"waiting for signal {name} timed out", kind="signal_timeout")
        if timeout is not None and not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=timeout)
        raise Waiting(SignalWait(name, count, timeout))
