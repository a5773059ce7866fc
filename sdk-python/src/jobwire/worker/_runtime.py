"""The worker: one ``Connect`` stream at a time, reconnecting, and a graceful drain.

While it runs, the worker keeps one stream open, reconnecting with jittered exponential backoff
(100 ms up to 5 s, forever) whenever the stream or the connection fails. Handlers keep running
across a reconnect: the next Hello names the leases they hold (``Hello.running``) so the server
keeps them, and results the server has not acknowledged are sent again on the new stream.

The session is the stream's only owner: one loop over an inbox (the server's messages, read by
a reader task; wake-ups from handlers finishing or reporting; the shutdown request) and the
timers it computes itself (heartbeat, report flush, stale prefetched leases, the drain's
deadline). Each turn of the loop takes every event waiting in the inbox, then sends what they
call for, ending with the started notices, hand-backs and results they produced: the handlers
started for a burst of leases are reported in one ``started`` message, right after they
start, as are queued leases started when a slot frees. It holds no state of its own that must
survive: leases live in the executor, reports in their buffers, results in the outbox, so a
broken stream is simply followed by another session, which reports every running handler as
started again (those started between streams were never reported).

Shutdown is an input: ``stop()`` (or SIGTERM, or the ``shutdown`` awaitable) starts a drain.
The worker sends Drain, hands back its prefetched leases, lets running handlers finish and
waits for their results to be acknowledged, reconnecting if needed to deliver them. A drain
that outlasts ``drain_timeout`` stops the handlers (``StopReason.SHUTDOWN``), waits a short
grace, cancels what is left and raises ``DrainTimeout``; those jobs' leases lapse and the
server retries them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from jobwire import items as _items
from jobwire._transport import Connection, Tls
from jobwire._watch import Backoff
from jobwire.client import Client
from jobwire.errors import ChildrenWait, ConfigError, DrainTimeout, SignalWait
from jobwire.jobs import JobType
from jobwire.retry import RetryIf
from jobwire.v1 import worker_service_pb2, worker_service_pb2_grpc
from jobwire.worker import _wire
from jobwire.worker._executor import Executor, Finished, Registered, Stopping
from jobwire.worker._outbox import Outbox, Releases, RequestIds
from jobwire.worker._reports import Final, Reporter
from jobwire.worker.context import JobContext, StopReason

log = logging.getLogger("jobwire.worker")

P = TypeVar("P", bound=Message)
O = TypeVar("O", bound=Message)  # noqa: E741
T = TypeVar("T")

MAX_SLOTS = 10_000
#: How long a prefetched lease may wait from its claim before it is handed back.
MAX_QUEUED_WAIT = 0.25
_HANDSHAKE_TIMEOUT = 10.0
_DEFAULT_HEARTBEAT = 5.0
_CLOSE_TIMEOUT = 2.0
_ABORT_GRACE = 2.0
#: The most inbox events one turn of the session's loop takes before it sends.
_MAX_EVENTS_PER_TURN = 256


class _Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    ABORTING = "aborting"
    FINISHED = "finished"


@dataclass(frozen=True)
class _Inbound:
    session: int
    message: worker_service_pb2.ConnectResponse


@dataclass(frozen=True)
class _Ended:
    session: int
    error: BaseException | None


class _Signal(enum.Enum):
    WAKE = "wake"
    SHUTDOWN = "shutdown"


_Event = _Inbound | _Ended | _Signal


class _Broken(Exception):
    """The stream broke; ``welcomed`` shows the server was up, so the backoff starts over."""

    def __init__(self, reason: str, *, welcomed: bool) -> None:
        super().__init__(reason)
        self.welcomed = welcomed


class Worker:
    """Serves registered job types with bounded concurrency.

    ``concurrency`` handlers run at once (1 to 10000); ``prefetch`` more leases may wait
    locally to start the moment a slot frees (worth it for jobs shorter than a round trip).
    ``stop_grace`` is how long a handler told to stop may take before its task is cancelled
    (None: never); ``progress_interval`` the shortest time between two progress reports of a
    lease, also how long log lines may wait to go in a batch.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:50051",
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int = 10,
        prefetch: int = 0,
        worker_id: str | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
        tls: Tls | None = None,
        drain_timeout: float = 30.0,
        stop_grace: float | None = 5.0,
        progress_interval: float = 0.1,
        retry_if: RetryIf | None = None,
    ) -> None:
        if not 1 <= concurrency <= MAX_SLOTS:
            raise ConfigError(f"concurrency must be 1 to {MAX_SLOTS}, not {concurrency}")
        if not 0 <= prefetch <= MAX_SLOTS:
            raise ConfigError(f"prefetch must be 0 to {MAX_SLOTS}, not {prefetch}")
        if progress_interval <= 0:
            raise ConfigError("the progress interval must be positive")
        self.worker_id = worker_id if worker_id is not None else _default_worker_id()
        if not 1 <= len(self.worker_id.encode()) <= 128:
            raise ConfigError("the worker id must be 1 to 128 bytes of UTF-8")
        self._connection = Connection.parse(url, tenant=tenant, api_key=api_key, tls=tls)
        self._queues = list(queues) or ["default"]
        self._slots = concurrency
        self._prefetch = prefetch
        self._drain_timeout = drain_timeout
        self._stop_grace = stop_grace
        self._progress_interval = progress_interval
        self._registry: dict[str, Registered] = {}
        self._retry_if = retry_if
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[_Event] | None = None

    def register(
        self,
        job_type: JobType[P, O] | type[P],
        handler: Callable[[JobContext, P], Awaitable[O | None]],
        *,
        retry_if: RetryIf | None = None,
    ) -> None:
        """Serves ``job_type`` (a ``JobType``, or a payload message declaring one with the
        ``(jobwire.v1.job)`` option) with ``handler``, called once per attempt on its own task.

        A handler returns the output (None for ``google.protobuf.Empty``) or raises:
        ``NonRetryable`` fails the job at once, ``Retryable`` or any other exception fails
        the attempt, to be retried under the job's policy. ``retry_if`` (default: the
        worker's) decides from the exception whether it is retryable and its kind; see
        ``jobwire.retry``.
        """
        kind = job_type if isinstance(job_type, JobType) else JobType.of(job_type)
        if kind.name in self._registry:
            raise ConfigError(f"job type {kind.name} is registered twice")
        self._registry[kind.name] = Registered(
            kind, handler, retry_if if retry_if is not None else self._retry_if
        )

    def register_items(
        self,
        job_type: JobType[P, Message],
        items: Callable[[P], Sequence[T]],
        handler: _items.ItemHandler[T],
        *,
        options: _items.ItemOptions = _items.ItemOptions(),  # noqa: B008 - frozen
        retry_if: RetryIf | None = None,
    ) -> None:
        """Serves the item-based ``job_type`` (its output ``jobwire.items.ITEM_RESULTS``):
        ``items(payload)`` lists the job's items (the same list on every attempt), and
        ``handler(ctx, item)`` runs one, returning its output (a message, bytes or None) or
        raising. The items run in order from the first unfinished one, as
        ``jobwire.items.run_items`` describes; the job's result is every item's outcome.
        ``retry_if`` decides the failures of items under ``OnItemFailure.FAIL_JOB``."""
        if job_type.output is not _items.ITEM_RESULTS:
            raise ConfigError(
                f"job type {job_type.name} must have jobwire.items.ITEM_RESULTS as its output"
            )

        async def run(ctx: JobContext, payload: P) -> Message:
            results = await _items.run_items(ctx, items(payload), handler, options)
            return results.to_message()

        self.register(job_type, run, retry_if=retry_if)

    def handler(
        self, job_type: JobType[P, O] | type[P]
    ) -> Callable[
        [Callable[[JobContext, P], Awaitable[O | None]]],
        Callable[[JobContext, P], Awaitable[O | None]],
    ]:
        """``register`` as a decorator."""

        def decorate(
            handler: Callable[[JobContext, P], Awaitable[O | None]],
        ) -> Callable[[JobContext, P], Awaitable[O | None]]:
            self.register(job_type, handler)
            return handler

        return decorate

    def stop(self) -> None:
        """Starts a graceful drain; safe from any thread, and more than once."""
        loop, inbox = self._loop, self._inbox
        if loop is None or inbox is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            inbox.put_nowait(_Signal.SHUTDOWN)
        else:
            loop.call_soon_threadsafe(inbox.put_nowait, _Signal.SHUTDOWN)

    async def run(
        self, shutdown: Awaitable[Any] | None = None, *, handle_signals: bool = True
    ) -> None:
        """Serves jobs until ``stop()``, SIGTERM or SIGINT (with ``handle_signals``), or
        ``shutdown`` completing; then drains and returns. The server need not be up: the
        worker connects when it can and keeps retrying. Raises ``DrainTimeout`` when the drain
        did not finish within ``drain_timeout``."""
        if not self._registry:
            raise ConfigError("no job type is registered")
        loop = asyncio.get_running_loop()
        self._loop, self._inbox = loop, asyncio.Queue()
        run = _Run(self, loop, self._inbox)
        watcher = asyncio.ensure_future(_after(shutdown, self.stop)) if shutdown else None
        signals = []
        if handle_signals:
            for number in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(number, self.stop)
                    signals.append(number)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            await run.serve()
        finally:
            for number in signals:
                loop.remove_signal_handler(number)
            if watcher is not None:
                watcher.cancel()
            await run.close()
            self._loop = self._inbox = None


async def _after(awaitable: Awaitable[Any], then: Callable[[], None]) -> None:
    await awaitable
    then()


class _Run:
    """One run of a worker: the state that outlives any one stream."""

    def __init__(
        self, worker: Worker, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[_Event]
    ) -> None:
        self.worker = worker
        self.loop = loop
        self.inbox = inbox
        self.ids = RequestIds()
        self.wake_pending = False
        self.reporter = Reporter(worker._progress_interval, self.wake, self.ids)
        self.outbox = Outbox()
        self.releases = Releases(self.ids)
        self.channel = worker._connection.channel()
        self.executor = Executor(
            worker._registry,
            worker.worker_id,
            worker._slots,
            worker._prefetch,
            worker._stop_grace,
            self.reporter,
            self.finished,
            # Handlers' JobService calls share the stream's channel: one connection a worker.
            Client(self.channel, worker._connection),
        )
        self.stub = worker_service_pb2_grpc.WorkerServiceStub(self.channel)
        self.phase = _Phase.SERVING
        self.phase_deadline: float | None = None
        self.session = 0
        self.lease_duration: float | None = None

    # Shared state.

    def wake(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            self.inbox.put_nowait(_Signal.WAKE)

    def finished(self, finished: Finished) -> None:
        request_id = self.ids()
        if isinstance(finished.outcome, _wire.Failure):
            self.outbox.fail(
                request_id, finished.key, finished.job_type, finished.outcome, finished.final
            )
        elif isinstance(finished.outcome, (ChildrenWait, SignalWait)):
            log.info("job %s attempt %d: waits (%s)", *finished.key, finished.outcome)
            self.outbox.wait(
                request_id, finished.key, finished.job_type, finished.outcome, finished.final
            )
        else:
            self.outbox.complete(
                request_id, finished.key, finished.job_type, finished.outcome, finished.final
            )
        self.wake()

    def is_idle(self) -> bool:
        return self.executor.is_empty() and not len(self.outbox) and not self.releases

    @property
    def stopping(self) -> bool:
        return self.phase is not _Phase.SERVING

    def outgoing(self) -> list[_wire.Request]:
        """The handlers started since the last call, hand-backs, then results not sent on this
        stream, each after what was left of its lease's reports."""
        messages: list[_wire.Request] = []
        started = self.executor.take_started()
        if started:
            messages.append(_wire.started(started))
        messages.extend(self.releases.outgoing())
        for unsent in self.outbox.unsent():
            messages.extend(self.reporter.final_reports(unsent.key, unsent.lines, unsent.progress))
            messages.append(unsent.message)
        return messages

    def stream_ended(self) -> None:
        self.reporter.disconnected()
        self.outbox.rewind()
        self.releases.rewind()

    def advance(self, now: float) -> None:
        """Moves the lifecycle on a shutdown request or a passed deadline. It builds no
        messages, since it also runs between streams: a session that sees the drain begin
        sends Drain and the hand-backs itself."""
        if self.phase is _Phase.SERVING:
            self.phase, self.phase_deadline = _Phase.DRAINING, now + self.worker._drain_timeout
            log.info(
                "shutdown requested; draining (%d running, %d queued, %d unacknowledged)",
                len(self.executor),
                self.executor.queued,
                len(self.outbox),
            )
            # Queued leases go back to run elsewhere rather than delay the drain.
            self.releases.add(self.executor.take_queued())
            return
        if self.phase_deadline is None or now < self.phase_deadline:
            return
        if self.phase is _Phase.DRAINING:
            log.warning("drain timeout reached; asking %d handler(s) to stop", len(self.executor))
            self.phase, self.phase_deadline = _Phase.ABORTING, now + _ABORT_GRACE
            self.executor.stop_all(StopReason.SHUTDOWN)
        elif self.phase is _Phase.ABORTING:
            self.phase, self.phase_deadline = _Phase.FINISHED, None

    # The run.

    async def serve(self) -> None:
        worker = self.worker
        log.info(
            "worker %s starting: job types %s, queues %s, %d slot(s), prefetch %d",
            worker.worker_id,
            sorted(worker._registry),
            worker._queues,
            worker._slots,
            worker._prefetch,
        )
        backoff = Backoff(0.1, 5.0)
        while True:
            if self.stopping and self.is_idle():
                log.info("worker %s stopped", worker.worker_id)
                return
            if self.phase is _Phase.FINISHED:
                raise DrainTimeout(
                    f"drain did not finish within {worker._drain_timeout}s: "
                    f"{len(self.executor)} handler(s) running, {len(self.outbox)} result(s) "
                    "not acknowledged"
                )
            try:
                await self.run_session()
            except _Broken as broken:
                self.stream_ended()
                if broken.welcomed:
                    backoff.reset()
                delay = backoff.next_delay()
                log.warning(
                    "stream to the server failed (%s); reconnecting in %.2fs", broken, delay
                )
                await self.wait_out(delay)
                continue
            self.stream_ended()

    async def close(self) -> None:
        self.executor.cancel_all()
        await self.channel.close()

    async def next_event(self, until: float | None) -> _Event | None:
        if not self.inbox.empty():
            return self.inbox.get_nowait()
        timeout = None if until is None else until - self.loop.time()
        if timeout is not None and timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def wait_out(self, delay: float) -> None:
        """Waits before a reconnect while handlers keep finishing and the lifecycle moves."""
        until = self.loop.time() + delay
        while self.loop.time() < until and self.phase is not _Phase.FINISHED:
            deadline = until if self.phase_deadline is None else min(until, self.phase_deadline)
            event = await self.next_event(deadline)
            if event is _Signal.WAKE:
                self.wake_pending = False
            if event is _Signal.SHUTDOWN and self.stopping:
                continue
            if event is _Signal.SHUTDOWN or self.stopping:
                self.advance(self.loop.time())
            if self.stopping and self.is_idle():
                return

    async def run_session(self) -> None:
        """One stream, until the drain completes, the lifecycle finishes, or it breaks."""
        self.session += 1
        session = self.session
        worker = self.worker
        call = self.stub.Connect(metadata=worker._connection.metadata)
        reader: asyncio.Task[None] | None = None
        try:
            await _write(
                call,
                _wire.hello(
                    worker_id=worker.worker_id,
                    job_types=sorted(worker._registry),
                    queues=worker._queues,
                    slots=worker._slots,
                    prefetch=worker._prefetch,
                    running=self.executor.live_leases(),
                    schemas=[
                        r.job_type.schema()
                        for r in worker._registry.values()
                        if r.job_type.register_schema
                    ],
                ),
                welcomed=False,
            )
            if self.stopping:
                # Back only to deliver results: no leases from the start.
                await _write(call, _wire.drain(), welcomed=False)
            welcome = await self.handshake(call)
            period = welcome.heartbeat_interval or _DEFAULT_HEARTBEAT
            self.lease_duration = welcome.lease_duration
            log.info(
                "connected (session %s): heartbeat %.2fs, %d running, %d unacknowledged",
                welcome.session_id,
                period,
                len(self.executor),
                len(self.outbox),
            )
            for key in welcome.rejected:
                if self.executor.stop(key, StopReason.LEASE_LOST) is Stopping.UNSTARTED:
                    self.releases.add([key])
            self.executor.restart_reports()
            reader = self.loop.create_task(self.read(call, session))
            now = self.loop.time()
            # What waited for a stream: checkpoints asked for meanwhile, batches of lines, the
            # handlers running, and results; a wake-up taken between streams is not repeated.
            await _send(call, [*self.reporter.woken(now), *self.outgoing()])
            next_heartbeat = now + period
            while True:
                if self.stopping and self.is_idle():
                    await self.close_stream(call, reader)
                    return
                if self.phase is _Phase.FINISHED:
                    return
                timers = [
                    next_heartbeat,
                    self.reporter.flush_at,
                    self.executor.stale_at(MAX_QUEUED_WAIT),
                    self.phase_deadline,
                ]
                event = await self.next_event(min(t for t in timers if t is not None))
                out: list[_wire.Request] = []
                ended: _Ended | None = None
                handled = 0
                while event is not None:
                    if isinstance(event, _Ended):
                        if event.session == session:
                            ended = event
                            break
                    else:
                        out.extend(self.handle(event, session))
                    handled += 1
                    if handled >= _MAX_EVENTS_PER_TURN or self.inbox.empty():
                        break
                    event = self.inbox.get_nowait()
                now = self.loop.time()
                if now >= next_heartbeat:
                    out.append(_wire.heartbeat(self.executor.live_leases()))
                    next_heartbeat = now + period
                if self.reporter.flush_at is not None and now >= self.reporter.flush_at:
                    out.extend(self.reporter.flush(now))
                stale_at = self.executor.stale_at(MAX_QUEUED_WAIT)
                if stale_at is not None and now >= stale_at:
                    stale = self.executor.take_stale(now, MAX_QUEUED_WAIT)
                    log.debug("handing back %d queued lease(s) that waited too long", len(stale))
                    self.releases.add(stale)
                if self.stopping:
                    self.advance(now)
                # What the turn's events produced: handlers started (for leases that arrived,
                # or queued ones on the slots freed), hand-backs, results.
                out.extend(self.outgoing())
                await _send(call, out)
                if ended is not None:
                    raise _Broken(_describe(ended.error), welcomed=True)
        finally:
            if reader is not None:
                reader.cancel()
            call.cancel()

    async def handshake(
        self,
        call: grpc.aio.StreamStreamCall[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
    ) -> _wire.Welcome:
        try:
            first = await asyncio.wait_for(call.read(), _HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            raise _Broken(
                f"the server did not answer the hello within {_HANDSHAKE_TIMEOUT}s", welcomed=False
            ) from None
        except Exception as error:
            raise _Broken(_describe(error), welcomed=False) from None
        if first is grpc.aio.EOF:
            raise _Broken("the server closed the stream", welcomed=False)
        assert isinstance(first, worker_service_pb2.ConnectResponse)
        welcome = _wire.read(first, None)
        if not isinstance(welcome, _wire.Welcome):
            raise _Broken("the server's first message was not a welcome", welcomed=False)
        return welcome

    async def read(
        self,
        call: grpc.aio.StreamStreamCall[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
        session: int,
    ) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    self.inbox.put_nowait(_Ended(session, None))
                    return
                assert isinstance(message, worker_service_pb2.ConnectResponse)
                self.inbox.put_nowait(_Inbound(session, message))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.inbox.put_nowait(_Ended(session, error))

    def handle(self, event: _Event, session: int) -> list[_wire.Request]:
        """Acts on one event of the inbox (not a stream's end); returns what must go out
        before the turn's started notices, hand-backs and results."""
        if isinstance(event, _Inbound):
            if event.session == session:
                self.receive(event.message)
        elif event is _Signal.WAKE:
            self.wake_pending = False
            return self.reporter.woken(self.loop.time())
        elif event is _Signal.SHUTDOWN and not self.stopping:
            # Drain first, so that the server sends no lease into the room the hand-backs of
            # the queued leases free.
            self.advance(self.loop.time())
            return [_wire.drain()]
        return []

    def receive(self, response: worker_service_pb2.ConnectResponse) -> None:
        """Acts on a message from the server; what it calls for goes out with the turn's
        ``outgoing``."""
        message = _wire.read(response, self.lease_duration)
        if isinstance(message, _wire.Grant):
            if self.stopping:
                # Sent before the server read our drain: straight back, to run elsewhere.
                self.releases.add([message.key])
                return
            refused = self.executor.start(message)
            if refused is not None:
                self.outbox.fail(self.ids(), message.key, message.job_type, refused, Final())
        elif isinstance(message, _wire.Stop):
            stopping = self.executor.stop(message.key, message.reason)
            if stopping is Stopping.ASKED:
                log.info(
                    "job %s attempt %d: asked to stop (%s) %s",
                    *message.key,
                    message.reason,
                    message.message,
                )
            elif stopping is Stopping.UNSTARTED:
                self.releases.add([message.key])
        elif isinstance(message, _wire.Ack):
            if self.releases.acknowledge(message):
                return
            answered, stale = self.reporter.acknowledge(message)
            if stale is not None:
                self.executor.stop(stale, StopReason.LEASE_LOST)
            elif not answered:
                self.outbox.acknowledge(message)
        elif isinstance(message, _wire.ReleaseQueued):
            taken = self.executor.take_queued(message.queue)
            log.info(
                "queue %s was paused or limited; handing back %d queued lease(s)",
                message.queue,
                len(taken),
            )
            self.releases.add(taken)
        elif isinstance(message, _wire.DrainAsked):
            log.info("the server asked this worker to drain")
            self.worker.stop()
        elif isinstance(message, _wire.Welcome):
            log.warning("ignoring a second welcome on the same stream")

    async def close_stream(
        self,
        call: grpc.aio.StreamStreamCall[
            worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
        ],
        reader: asyncio.Task[None],
    ) -> None:
        """Half-closes and waits briefly for the server to end the stream, so that it sees a
        clean close rather than a reset."""
        try:
            await call.done_writing()
            await asyncio.wait_for(asyncio.shield(reader), _CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            log.debug("the server did not end the stream; dropping it")
        log.info("drained; stream closed")


async def _write(
    call: grpc.aio.StreamStreamCall[
        worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
    ],
    message: _wire.Request,
    *,
    welcomed: bool,
) -> None:
    try:
        await call.write(message)
    except Exception as error:
        # Whatever the call raises (a status, a closed or cancelled call), the stream is gone.
        raise _Broken(_describe(error), welcomed=welcomed) from None


async def _send(
    call: grpc.aio.StreamStreamCall[
        worker_service_pb2.ConnectRequest, worker_service_pb2.ConnectResponse
    ],
    messages: list[_wire.Request],
) -> None:
    for message in messages:
        await _write(call, message, welcomed=True)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "the server closed the stream"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _default_worker_id() -> str:
    """``<hostname>-<pid>-<random>``: readable as a lease owner, unique per worker even within
    one process."""
    host = (socket.gethostname() or "worker")[:96]
    return f"{host}-{os.getpid()}-{random.getrandbits(32):08x}"
