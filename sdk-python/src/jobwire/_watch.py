"""Event streams that survive the connection: ``WatchJob`` and ``WatchJobs``, reopened after
the last sequence seen whenever they break.

The server promises that a watch resumed after sequence N delivers every later event, in
order, once (docs/architecture.md, invariant 5). ``JobEvents`` keeps that promise across
reconnects by remembering the sequence of the last event it took and reopening after it; it
also drops any event at or below it, so a server that repeats itself cannot make the consumer
see an event twice.

Reopens wait 50 ms, doubling to 2 s, jittered. A stream gives up, raising the server's error,
when the server answers NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED or
UNIMPLEMENTED (a retry cannot change those), or when it has failed without a break for longer
than its outage limit (60 s by default). A watcher the server disconnects for being slow
(RESOURCE_EXHAUSTED) simply resumes. A job's stream ends after the job's terminal state change
(not a child's, when it carries its children's events too); a job stream the server ended
without one, and that brought nothing, reads the job so that a job finished beyond the resume
point ends the stream instead of reopening it forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from jobwire.errors import from_rpc_error
from jobwire.events import JobEvent
from jobwire.v1 import job_pb2, job_service_pb2

log = logging.getLogger("jobwire.watch")

_REOPEN_MIN = 0.05
_REOPEN_MAX = 2.0
_FATAL = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

#: What either watch RPC streams: one event per message.
Response = job_service_pb2.WatchJobResponse | job_service_pb2.WatchJobsResponse
#: A watch call opened after a sequence.
Call = grpc.aio.UnaryStreamCall[Any, Response]
#: Reads whether the watched job has finished (always False for a filter).
FinishedCheck = Callable[[], Awaitable[bool]]


class Backoff:
    """Exponential delays with jitter, so that many clients of a restarted server spread out."""

    def __init__(self, first: float, most: float, jitter: float = 0.5) -> None:
        self._first, self._most, self._jitter = first, most, jitter
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._most)
        return delay * (1 - self._jitter / 2 + random.random() * self._jitter)

    def reset(self) -> None:
        self._next = self._first


class JobEvents:
    """An async iterator of ``JobEvent`` that reconnects by itself and resumes where it left
    off; ``last_sequence`` is where to resume a later stream from. Close it with ``aclose()``
    (or ``async with``) when leaving it before its end."""

    def __init__(
        self,
        open_stream: Callable[[int], Call],
        after_sequence: int,
        *,
        ends_with: str | None,
        job_finished: FinishedCheck,
        give_up_after: float = 60.0,
    ) -> None:
        self._open = open_stream
        #: The job whose terminal state change ends the stream; None for a filter's.
        self._ends_with = ends_with
        self._job_finished = job_finished
        self.give_up_after = give_up_after
        self.last_sequence = after_sequence
        self._call: Call | None = None
        self._fruitful = False
        self._delay: float | None = None
        self._backoff = Backoff(_REOPEN_MIN, _REOPEN_MAX)
        self._failing_since: float | None = None
        self._finished = False

    def __aiter__(self) -> JobEvents:
        return self

    async def __aenter__(self) -> JobEvents:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._finished = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __anext__(self) -> JobEvent:
        while True:
            if self._finished:
                raise StopAsyncIteration
            if self._call is None:
                if self._delay is not None:
                    await asyncio.sleep(self._delay)
                    self._delay = None
                self._call = self._open(self.last_sequence)
                self._fruitful = False
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as error:
                self._call = None
                self._failed(error)
                continue
            if not isinstance(
                message, (job_service_pb2.WatchJobResponse, job_service_pb2.WatchJobsResponse)
            ):
                self._call = None
                await self._closed()
                continue
            self._failing_since = None
            self._backoff.reset()
            self._fruitful = True
            if not message.HasField("event"):
                continue
            event = self._take(message.event)
            if event is not None:
                return event

    def _take(self, message: job_pb2.JobEvent) -> JobEvent | None:
        if message.sequence <= self.last_sequence:
            log.debug("ignoring event %d, at or before %d", message.sequence, self.last_sequence)
            return None
        self.last_sequence = message.sequence
        event = JobEvent.from_proto(message)
        if event is None:
            log.warning("skipping event %d of a kind this SDK cannot read", message.sequence)
            return None
        if event.job_id == self._ends_with and event.is_terminal:
            self._finished = True
            if self._call is not None:
                self._call.cancel()
                self._call = None
        return event

    def _failed(self, error: grpc.aio.AioRpcError) -> None:
        """Raises the error when the stream should give up; else plans a reopen."""
        now = time.monotonic()
        since = self._failing_since = self._failing_since or now
        if error.code() in _FATAL or now - since > self.give_up_after:
            self._finished = True
            raise from_rpc_error(error) from None
        self._delay = self._backoff.next_delay()
        log.debug("watch interrupted (%s); resuming in %.2fs", error.code().name, self._delay)

    async def _closed(self) -> None:
        if self._fruitful:
            return
        try:
            finished = await self._job_finished()
        except grpc.aio.AioRpcError as error:
            self._failed(error)
            return
        if finished:
            self._finished = True
        else:
            self._delay = self._backoff.next_delay()
