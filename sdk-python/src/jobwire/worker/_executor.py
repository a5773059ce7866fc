"""Runs handlers: one asyncio task per lease, never more than the worker's slots.

Leases that arrive while every slot is busy wait in the prefetch queue, up to its size, and
start the moment a slot frees, without the round trip a lease from the server would take. A
queued lease's attempt has already started on the server (its clocks run from its claim), so
the session hands back those that wait too long, and those stopped before they started.

The executor owns every handler task: none is detached, and tasks outlive any one stream, which
is why the executor belongs to the worker and not to a connection. A task's end is recorded in
its done callback, synchronously, so that the leases a new stream names in its Hello are
exactly those still running.

Starts: each handler the executor starts (a lease that just arrived, or a queued one when a
slot frees) is listed until the session takes the list (``take_started``) and tells the server,
which counts an attempt only once its handler started. A queued lease is not started: lost with
the worker, it burns none of its job's attempts.

What a stopped attempt reports: a handler stopped by a cancel or a pause that fails (or is
cancelled after ``stop_grace``) fails with the stop's kind, retryable, so the server settles the
job by the stop's reason; one stopped by its timeout (the lease's deadline, a timer on the event
loop's monotonic clock, or the server's TIMED_OUT, whichever comes first) fails retryable and
``timed_out``. One that returns a result completes as usual; after the deadline the server
refuses that result, and the attempt ends timed out when its lease lapses. One that raises
``Waiting`` completes without a result, waiting, unless a cancel, pause or timeout stopped it:
that stop settles the job, as it does after a failure.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from jobwire import _codec, retry
from jobwire.client import Client
from jobwire.errors import (
    ChildrenWait,
    DecodeError,
    HandlerError,
    NonRetryable,
    SignalWait,
    Waiting,
)
from jobwire.jobs import JobType
from jobwire.worker._reports import Final, LeaseReports, Reporter
from jobwire.worker._wire import Failure, Grant, LeaseKey
from jobwire.worker.context import JobContext, Stopped, StopReason, StopSignal

log = logging.getLogger("jobwire.worker")

Handler = Callable[[JobContext, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Registered:
    job_type: JobType[Any, Any]
    handler: Handler
    #: Decides the handler's failures; the worker's own when the type has none.
    retry_if: retry.RetryIf | None = None


class Stopping(enum.Enum):
    NOT_RUNNING = "not running"
    #: Taken off the prefetch queue unstarted: to be handed back.
    UNSTARTED = "unstarted"
    ASKED = "asked"
    #: Asked before; the first reason stands (the server repeats stops with heartbeats).
    ALREADY_ASKED = "already asked"


@dataclass
class Finished:
    key: LeaseKey
    job_type: str
    #: The result, the failure, or what the handler waits for.
    outcome: any_pb2.Any | Failure | ChildrenWait | SignalWait
    final: Final


@dataclass
class _Running:
    grant: Grant
    task: asyncio.Task[any_pb2.Any]
    stop: StopSignal
    reports: LeaseReports
    timers: list[asyncio.TimerHandle]
    lost: bool = False


@dataclass
class _Queued:
    grant: Grant
    #: When the lease was claimed, by the loop's clock.
    claimed: float


class Executor:
    def __init__(
        self,
        registry: dict[str, Registered],
        worker_id: str,
        slots: int,
        prefetch: int,
        stop_grace: float | None,
        reporter: Reporter,
        finished: Callable[[Finished], None],
        client: Client,
    ) -> None:
        self._registry = registry
        self._worker_id = worker_id
        self.slots = slots
        self.prefetch = prefetch
        self._stop_grace = stop_grace
        self._reporter = reporter
        self._finished = finished
        #: The worker's connection to JobService, for handlers' children and dependencies.
        self._client = client
        self._running: dict[LeaseKey, _Running] = {}
        self._queued: OrderedDict[LeaseKey, _Queued] = OrderedDict()
        #: Leases whose handlers started since the server was last told, in order.
        self._started: list[LeaseKey] = []

    def __len__(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queued)

    def is_empty(self) -> bool:
        return not self._running and not self._queued

    def start(self, grant: Grant) -> Failure | None:
        """Starts the lease's handler, or queues it while every slot is busy, or returns the
        failure to report for a lease that will not run here."""
        if grant.job_type not in self._registry:
            return Failure(
                f"no handler registered for type {grant.job_type} on this worker",
                "unknown_job_type",
                retryable=True,
            )
        if grant.key in self._running or grant.key in self._queued:
            # The same attempt again (never expected): a failure for the duplicate would end
            # the run in progress under its feet.
            log.warning("ignoring a lease for an attempt that already runs here: %s", grant.key)
            return None
        loop = asyncio.get_running_loop()
        claimed = loop.time() - grant.held
        if len(self._running) < self.slots:
            self._spawn(grant, claimed)
            return None
        if len(self._queued) < self.prefetch:
            self._queued[grant.key] = _Queued(grant, claimed)
            return None
        return Failure(
            f"worker {self._worker_id} has no free slot ({len(self._running)} of {self.slots} "
            f"busy, {len(self._queued)} queued); the lease was refused",
            "worker_full",
            retryable=True,
            retry_after=timedelta(0),
        )

    def _spawn(self, grant: Grant, claimed: float) -> None:
        loop = asyncio.get_running_loop()
        registered = self._registry[grant.job_type]
        stop = StopSignal()
        reports = self._reporter.attach(grant.key)
        deadline = claimed + grant.timeout if grant.timeout is not None else None
        ctx = JobContext(
            grant,
            self._worker_id,
            stop,
            reports,
            self._reporter.checkpoint,
            deadline,
            self._client,
        )
        task = loop.create_task(
            _run(registered, ctx, grant.payload), name=f"jobwire {grant.job_type} {grant.key[0]}"
        )
        running = _Running(grant, task, stop, reports, [])
        if deadline is not None:
            running.timers.append(
                loop.call_at(deadline, self.stop, grant.key, StopReason.TIMED_OUT)
            )
        self._running[grant.key] = running
        self._started.append(grant.key)
        task.add_done_callback(functools.partial(self._settle, grant.key))

    def take_started(self) -> list[LeaseKey]:
        """The leases whose handlers started since the last call, for the server to count
        their attempts (``Hello.reports_started``)."""
        started, self._started = self._started, []
        return started

    def restart_reports(self) -> None:
        """A new stream: every running handler is to be reported as started again. Those that
        started between streams were never reported, and a report written to a stream that
        broke may not have arrived; the server takes a repeat as a no-op."""
        self._started = sorted(key for key, r in self._running.items() if not r.lost)

    def _settle(self, key: LeaseKey, task: asyncio.Task[any_pb2.Any]) -> None:
        running = self._running.pop(key, None)
        if running is None or running.task is not task:
            return
        for timer in running.timers:
            timer.cancel()
        reason = running.stop.reason
        outcome: any_pb2.Any | Failure | ChildrenWait | SignalWait
        if task.cancelled():
            outcome = Failure(f"stopped: {reason or StopReason.SHUTDOWN}", None, retryable=True)
            outcome = outcome.after_stop(reason)
        elif (error := task.exception()) is None:
            outcome = task.result()
        else:
            failure = _failure(error)
            outcome = failure.after_stop(reason)
            if isinstance(error, Waiting) and outcome is failure:
                # No stop that settles the job (cancel, pause, timeout) came, which would win
                # over the wait as over a failure: the wait goes as it is.
                outcome = error.wait
        final = running.reports.finish()
        self._start_queued()
        self._finished(Finished(key, running.grant.job_type, outcome, final))

    def _start_queued(self) -> None:
        while len(self._running) < self.slots and self._queued:
            _, queued = self._queued.popitem(last=False)
            self._spawn(queued.grant, queued.claimed)

    def stop(self, key: LeaseKey, reason: StopReason) -> Stopping:
        """Asks the lease's handler to stop; a lost lease is no longer renewed and its reports
        are closed, since the server would refuse them."""
        running = self._running.get(key)
        if running is None:
            return Stopping.UNSTARTED if self._queued.pop(key, None) else Stopping.NOT_RUNNING
        if reason is StopReason.LEASE_LOST:
            running.lost = True
            running.reports.lose()
        if not running.stop.stop(reason):
            return Stopping.ALREADY_ASKED
        if self._stop_grace is not None:
            loop = asyncio.get_running_loop()
            running.timers.append(loop.call_later(self._stop_grace, running.task.cancel))
        return Stopping.ASKED

    def stop_all(self, reason: StopReason) -> None:
        for key in list(self._running):
            self.stop(key, reason)

    def cancel_all(self) -> None:
        """Cancels every task at once: the worker gives up on them."""
        for running in self._running.values():
            running.task.cancel()

    def live_leases(self) -> list[LeaseKey]:
        """The leases to renew: every queued one and every running one not lost. A handler
        asked to stop keeps its lease while it winds down (a pausing one still saves its
        checkpoint); the server bounds that with its own grace."""
        live = [key for key, running in self._running.items() if not running.lost]
        live.extend(self._queued)
        return sorted(live)

    def take_stale(self, now: float, max_wait: float) -> list[LeaseKey]:
        """Takes off the queue the leases claimed ``max_wait`` or longer ago."""
        stale = [key for key, q in self._queued.items() if q.claimed + max_wait <= now]
        for key in stale:
            del self._queued[key]
        return stale

    def stale_at(self, max_wait: float) -> float | None:
        if not self._queued:
            return None
        return min(q.claimed for q in self._queued.values()) + max_wait

    def take_queued(self, queue: str | None = None) -> list[LeaseKey]:
        """Takes every queued lease (of ``queue``) off the queue, to hand back."""
        taken = [k for k, q in self._queued.items() if queue is None or q.grant.queue == queue]
        for key in taken:
            del self._queued[key]
        return taken


async def _run(registered: Registered, ctx: JobContext, payload: any_pb2.Any) -> any_pb2.Any:
    job_type = registered.job_type
    try:
        job = _codec.unpack(payload, job_type.payload, "payload")
    except DecodeError as error:
        # A payload that does not decode will not decode on a retry either.
        raise NonRetryable(str(error), kind="payload_decode") from error
    try:
        output = await registered.handler(ctx, job)
    except Stopped:
        raise
    except Exception as error:
        decided = retry.decide(registered.retry_if, error)
        if decided is None:
            raise
        raise decided from error
    if output is None and job_type.output is empty_pb2.Empty:
        output = empty_pb2.Empty()
    if not isinstance(output, job_type.output):
        raise NonRetryable(
            f"the handler returned {type(output).__name__}, not a "
            f"{job_type.output.DESCRIPTOR.full_name}",
            kind="result_encode",
        )
    assert isinstance(output, Message)
    return _codec.pack(output)


def _failure(error: BaseException) -> Failure:
    if isinstance(error, HandlerError):
        return Failure(error.message, error.kind, error.retryable, error.retry_after)
    if isinstance(error, Stopped):
        return Failure(str(error), None, retryable=True)
    return Failure(f"{type(error).__name__}: {error}", type(error).__name__, retryable=True)
