"""Results and hand-backs on their way to the server, kept until acknowledged.

A result (CompleteJob, with an output or a wait, or FailJob) stays in the ``Outbox`` until an
Ack with its request id arrives, so a stream that breaks in between loses nothing: each new
stream rewinds the outbox and sends every pending result again, after what was left of its
lease's reports. Re-sending is safe because each result carries its lease's fencing token; the
server refuses (ABORTED) one whose attempt is no longer current, or which came after the
attempt's deadline. Any ack settles a result for good: one refused is never sent again, since
the same message would be refused the same way. The outbox is bounded by the worker's slots:
each result frees the slot of the handler that produced it.

``Releases`` does the same for leases handed back unstarted (ReleaseLeases): a hand-back lost
with its stream, or refused as UNAVAILABLE, goes again; a repeat changes nothing on the server.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2

from jobwire.errors import ChildrenWait, SignalWait
from jobwire.v1 import job_pb2
from jobwire.worker import _wire
from jobwire.worker._reports import Final
from jobwire.worker._wire import Failure, LeaseKey, Request

log = logging.getLogger("jobwire.worker")


@dataclass
class _Pending:
    key: LeaseKey
    job_type: str
    message: Request
    final: Final
    #: Streams it was sent on.
    sends: int = 0


@dataclass
class Unsent:
    key: LeaseKey
    lines: list[job_pb2.LogLine]
    progress: job_pb2.Progress | None
    message: Request


class Outbox:
    def __init__(self) -> None:
        #: By request id, in the order recorded, so a reconnect re-sends in that order.
        self._pending: dict[int, _Pending] = {}
        self._unsent: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def complete(
        self, request_id: int, key: LeaseKey, job_type: str, result: any_pb2.Any, final: Final
    ) -> None:
        self._push(
            request_id, _Pending(key, job_type, _wire.complete(request_id, key, result), final)
        )

    def wait(
        self,
        request_id: int,
        key: LeaseKey,
        job_type: str,
        waiting: ChildrenWait | SignalWait,
        final: Final,
    ) -> None:
        """An attempt whose handler waits: a completion without a result, kept and re-sent
        like any other."""
        self._push(request_id, _Pending(key, job_type, _wire.wait(request_id, key, waiting), final))

    def fail(
        self, request_id: int, key: LeaseKey, job_type: str, failure: Failure, final: Final
    ) -> None:
        self._push(request_id, _Pending(key, job_type, _wire.fail(request_id, key, failure), final))

    def _push(self, request_id: int, pending: _Pending) -> None:
        self._pending[request_id] = pending
        self._unsent.append(request_id)

    def acknowledge(self, ack: _wire.Ack) -> None:
        pending = self._pending.pop(ack.request_id, None)
        if pending is None:
            log.debug("ignoring an ack for no pending result (%d)", ack.request_id)
            return
        job_id, attempt = pending.key
        if ack.code is grpc.StatusCode.OK:
            log.debug("job %s attempt %d: result acknowledged", job_id, attempt)
        elif ack.refused_late:
            log.warning(
                "job %s attempt %d: result refused, the attempt ran past its timeout: %s",
                job_id,
                attempt,
                ack.message,
            )
        elif ack.code is grpc.StatusCode.ABORTED:
            log.warning(
                "job %s attempt %d: result refused, the lease was stale: %s",
                job_id,
                attempt,
                ack.message,
            )
        else:
            log.error(
                "job %s attempt %d: result refused by the server: %s %s",
                job_id,
                attempt,
                ack.code.name,
                ack.message,
            )

    def unsent(self) -> list[Unsent]:
        """The results not sent on this stream yet; they count as sent from now on."""
        out = []
        while self._unsent:
            pending = self._pending.get(self._unsent.popleft())
            if pending is None:
                continue
            progress = pending.final.progress_to_send(pending.sends > 0)
            pending.sends += 1
            lines, pending.final.lines = pending.final.lines, []
            out.append(Unsent(pending.key, lines, progress, pending.message))
        return out

    def rewind(self) -> None:
        """A new stream: every pending result is to be sent again."""
        self._unsent = deque(self._pending)


class RequestIds:
    """Request ids for every message the server acknowledges, unique per worker across
    streams: an ack is routed by its id alone, so a late one can never settle the wrong
    message."""

    def __init__(self) -> None:
        self._next = 1

    def __call__(self) -> int:
        request_id = self._next
        self._next += 1
        return request_id


class Releases:
    def __init__(self, next_id: Callable[[], int]) -> None:
        self._next_id = next_id
        self._unsent: list[LeaseKey] = []
        self._sent: dict[int, list[LeaseKey]] = {}

    def __bool__(self) -> bool:
        return bool(self._unsent or self._sent)

    def add(self, keys: list[LeaseKey]) -> None:
        self._unsent.extend(keys)

    def outgoing(self) -> list[Request]:
        out = []
        while self._unsent:
            keys = self._unsent[: _wire.MAX_RELEASES_PER_MESSAGE]
            del self._unsent[: _wire.MAX_RELEASES_PER_MESSAGE]
            request_id = self._next_id()
            out.append(_wire.release(request_id, keys))
            self._sent[request_id] = keys
        return out

    def acknowledge(self, ack: _wire.Ack) -> bool:
        """Takes an ack that answers a hand-back; False when it answers something else."""
        keys = self._sent.pop(ack.request_id, None)
        if keys is None:
            return False
        if ack.code is grpc.StatusCode.UNAVAILABLE:
            log.warning("the server could not take %d lease(s) back yet; sending again", len(keys))
            self._unsent.extend(keys)
        elif ack.code is not grpc.StatusCode.OK:
            log.warning(
                "the server refused %d lease(s) handed back (%s); they will lapse",
                len(keys),
                ack.code.name,
            )
        return True

    def rewind(self) -> None:
        for keys in self._sent.values():
            self._unsent.extend(keys)
        self._sent.clear()
