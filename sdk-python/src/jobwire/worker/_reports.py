"""What handlers report while they run (progress, log lines, checkpoints), from the handler's
call to the server's acknowledgement.

A handler's ``progress`` and ``log`` calls only touch its lease's buffer (``LeaseReports``):
progress coalesces to the latest value, lines queue up to ``MAX_PENDING_LINES`` (beyond that the
oldest are dropped, counted, and the count reported as a warning line, so nothing disappears
silently). A buffer with something to send lists itself once with the ``Reporter`` and wakes
the session, which decides when to send.

Timing: a flush sends every dirty lease's latest progress and unsent lines, at most once per
progress interval, so no lease sends more than one ReportProgress per interval however often its
handler reports; a lease with ``LOG_BATCH`` lines sends them at once. When a handler returns,
what is left goes just before its result (``final_reports``), so the stored progress ends at
the handler's last value.

Bounds: a lease with ``WINDOW`` reports awaiting acknowledgement sends nothing more until some
are answered (its progress keeps coalescing, its lines queue), so a server that stops answering
cannot make the worker's memory grow. An ABORTED acknowledgement means the lease is stale: the
caller stops the handler, which closes the buffer. Nothing here outlives a stream: when one
breaks, checkpoints in flight fail with ``Disconnected``, unsent lines wait for the next stream,
lines in flight are not sent again, and each lease's latest progress is sent again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc

from jobwire.errors import Disconnected, LeaseLost, error_for_code
from jobwire.events import LogLevel, Progress
from jobwire.v1 import job_pb2
from jobwire.worker import _wire
from jobwire.worker._wire import LeaseKey, Request

log = logging.getLogger("jobwire.worker")

MAX_PENDING_LINES = 10_000
LOG_BATCH = 100
WINDOW = 16


class _Status(enum.Enum):
    OPEN = "open"
    LOST = "lost"
    FINISHED = "finished"


@dataclass
class Final:
    """What was left of a lease's reports when its handler returned."""

    lines: list[job_pb2.LogLine] = field(default_factory=list)
    latest: job_pb2.Progress | None = None
    latest_unsent: bool = False

    def progress_to_send(self, resent: bool) -> job_pb2.Progress | None:
        """The latest progress when it was never sent, or again on a later stream, when what
        was sent on a broken one may not have arrived."""
        return self.latest if (self.latest_unsent or resent) else None


class LeaseReports:
    """One lease's unsent reports."""

    def __init__(self, key: LeaseKey, reporter: Reporter) -> None:
        self.key = key
        self._reporter = reporter
        self.progress: job_pb2.Progress | None = None
        self.last_sent: job_pb2.Progress | None = None
        self.lines: deque[job_pb2.LogLine] = deque()
        self.dropped = 0
        self.unacked = 0
        self.status = _Status.OPEN

    @property
    def is_open(self) -> bool:
        return self.status is _Status.OPEN

    def set_progress(self, progress: Progress) -> None:
        if self.status is not _Status.OPEN:
            return
        self.progress = progress.to_proto(datetime.now(timezone.utc))
        self._reporter.dirty(self)

    def push_line(self, level: LogLevel, message: str) -> None:
        if self.status is not _Status.OPEN:
            return
        if len(self.lines) >= MAX_PENDING_LINES:
            self.lines.popleft()
            self.dropped += 1
        self.lines.append(_wire.log_line(level, message, datetime.now(timezone.utc)))
        self._reporter.dirty(self, batch=len(self.lines) >= LOG_BATCH)

    def take_lines(self) -> list[job_pb2.LogLine]:
        lines = list(self.lines)
        self.lines.clear()
        if self.dropped:
            warning = (
                f"{self.dropped} log line(s) dropped: the handler logged faster than the "
                "worker could send"
            )
            log.warning("job %s attempt %d: %s", self.key[0], self.key[1], warning)
            lines.insert(0, _wire.log_line(LogLevel.WARN, warning, datetime.now(timezone.utc)))
            self.dropped = 0
        return lines

    def finish(self) -> Final:
        """Closes the buffer for the attempt's result and returns what was left."""
        self.status = _Status.FINISHED
        latest = self.progress or self.last_sent
        final = Final(self.take_lines(), latest, latest_unsent=self.progress is not None)
        self.progress = None
        return final

    def lose(self) -> None:
        self.status = _Status.LOST
        self.progress = None
        self.lines.clear()


@dataclass
class _InFlight:
    key: LeaseKey
    kind: str
    #: The buffer whose window the report counts against; None for a result's last reports.
    buffer: LeaseReports | None
    reply: asyncio.Future[None] | None = None


@dataclass
class _CheckpointRequest:
    buffer: LeaseReports
    data: bytes
    reply: asyncio.Future[None]


class Reporter:
    """Sends what handlers report and settles the acknowledgements."""

    def __init__(
        self, interval: float, wake: Callable[[], None], next_id: Callable[[], int]
    ) -> None:
        self._interval = interval
        self._wake = wake
        self._next_id = next_id
        self._dirty: dict[LeaseKey, LeaseReports] = {}
        self._batches = False
        self._checkpoints: deque[_CheckpointRequest] = deque()
        self._last_flush: float | None = None
        self.flush_at: float | None = None
        self._in_flight: dict[int, _InFlight] = {}

    def attach(self, key: LeaseKey) -> LeaseReports:
        return LeaseReports(key, self)

    def dirty(self, buffer: LeaseReports, *, batch: bool = False) -> None:
        if buffer.key not in self._dirty:
            self._dirty[buffer.key] = buffer
            self._wake()
        elif batch and not self._batches:
            self._wake()
        self._batches = self._batches or batch

    async def checkpoint(self, buffer: LeaseReports, data: bytes) -> None:
        if not buffer.is_open:
            raise _lease_lost(buffer.key)
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._checkpoints.append(_CheckpointRequest(buffer, data, reply))
        self._wake()
        await reply

    def woken(self, now: float) -> list[Request]:
        """Sends full batches of lines and checkpoints now, and plans a flush for the rest."""
        out: list[Request] = []
        if self._batches:
            self._batches = False
            for buffer in self._dirty.values():
                if len(buffer.lines) >= LOG_BATCH and buffer.unacked < WINDOW:
                    self._push_lines(buffer, buffer.take_lines(), out)
        while self._checkpoints:
            request = self._checkpoints.popleft()
            if not request.buffer.is_open:
                if not request.reply.done():
                    request.reply.set_exception(_lease_lost(request.buffer.key))
                continue
            request_id = self._next_id()
            self._in_flight[request_id] = _InFlight(
                request.buffer.key, "checkpoint", None, request.reply
            )
            out.append(_wire.checkpoint(request_id, request.buffer.key, request.data))
        self._schedule(now)
        return out

    def flush(self, now: float) -> list[Request]:
        """Every dirty lease's latest progress and unsent lines."""
        self.flush_at = None
        self._last_flush = now
        out: list[Request] = []
        dirty, self._dirty = self._dirty, {}
        for key, buffer in dirty.items():
            if not buffer.is_open:
                continue
            if buffer.unacked >= WINDOW:
                self._dirty[key] = buffer
                continue
            self._push_lines(buffer, buffer.take_lines(), out)
            if buffer.progress is not None:
                request_id = self._next_id()
                out.append(_wire.progress(request_id, key, buffer.progress))
                buffer.last_sent, buffer.progress = buffer.progress, None
                self._track(request_id, key, "progress", buffer)
        if self._dirty:
            self._schedule(now)
        return out

    def final_reports(
        self, key: LeaseKey, lines: list[job_pb2.LogLine], progress: job_pb2.Progress | None
    ) -> list[Request]:
        """What to send before a result; it counts against no window: the result must not
        wait."""
        out: list[Request] = []
        for batch in _wire.log_batches(lines):
            request_id = self._next_id()
            out.append(_wire.logs(request_id, key, batch))
            self._track(request_id, key, "logs", None)
        if progress is not None:
            request_id = self._next_id()
            out.append(_wire.progress(request_id, key, progress))
            self._track(request_id, key, "progress", None)
        return out

    def acknowledge(self, ack: _wire.Ack) -> tuple[bool, LeaseKey | None]:
        """Settles the report ``ack`` answers: whether it answered a report (rather than a
        result), and the lease's key when the lease is stale (its handler must stop)."""
        in_flight = self._in_flight.pop(ack.request_id, None)
        if in_flight is None:
            return False, None
        if in_flight.buffer is not None:
            in_flight.buffer.unacked -= 1
        stale = ack.code is grpc.StatusCode.ABORTED
        if in_flight.reply is not None and not in_flight.reply.done():
            if ack.code is grpc.StatusCode.OK:
                in_flight.reply.set_result(None)
            elif stale:
                in_flight.reply.set_exception(_lease_lost(in_flight.key))
            else:
                in_flight.reply.set_exception(error_for_code(ack.code, ack.message))
        if stale:
            return True, in_flight.key
        if ack.code is not grpc.StatusCode.OK:
            log.warning(
                "job %s attempt %d: the server refused %s: %s %s",
                *in_flight.key,
                in_flight.kind,
                ack.code.name,
                ack.message,
            )
        return True, None

    def disconnected(self) -> None:
        for in_flight in self._in_flight.values():
            buffer = in_flight.buffer
            if buffer is not None:
                buffer.unacked -= 1
                if in_flight.kind == "progress" and buffer.is_open and buffer.progress is None:
                    buffer.progress = buffer.last_sent
                    self._dirty.setdefault(buffer.key, buffer)
            if in_flight.reply is not None and not in_flight.reply.done():
                in_flight.reply.set_exception(
                    Disconnected(f"the stream ended before the {in_flight.kind} was acknowledged")
                )
        self._in_flight.clear()
        self.flush_at = None

    def _schedule(self, now: float) -> None:
        if self.flush_at is not None or not self._dirty:
            return
        earliest = now if self._last_flush is None else self._last_flush + self._interval
        self.flush_at = max(earliest, now)

    def _push_lines(
        self, buffer: LeaseReports, lines: list[job_pb2.LogLine], out: list[Request]
    ) -> None:
        for batch in _wire.log_batches(lines):
            request_id = self._next_id()
            out.append(_wire.logs(request_id, buffer.key, batch))
            self._track(request_id, buffer.key, "logs", buffer)

    def _track(
        self, request_id: int, key: LeaseKey, kind: str, buffer: LeaseReports | None
    ) -> None:
        if buffer is not None:
            buffer.unacked += 1
        self._in_flight[request_id] = _InFlight(key, kind, buffer)


def _lease_lost(key: LeaseKey) -> LeaseLost:
    return LeaseLost(f"the lease of job {key[0]} attempt {key[1]} is no longer held")
