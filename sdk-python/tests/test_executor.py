"""The executor without a server: which handler starts it reports (``Hello.reports_started``),
how an attempt stopped by its timeout fails, and what a handler's wait reports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import handlers
import harness
import pytests_pb2 as pb
from google.protobuf import any_pb2

import jobwire
from jobwire._transport import Connection
from jobwire.errors import ChildrenWait
from jobwire.worker import _wire
from jobwire.worker._executor import Executor, Finished, Registered, Stopping
from jobwire.worker._outbox import RequestIds
from jobwire.worker._reports import Reporter


def grant(job_id: str, timeout: float | None = None) -> _wire.Grant:
    payload = any_pb2.Any()
    payload.Pack(pb.Block(note=job_id))
    return _wire.Grant(
        key=(job_id, 1),
        job_type=handlers.BLOCK.name,
        queue="py",
        payload=payload,
        priority=50,
        max_attempts=3,
        labels={},
        created_at=None,
        checkpoint=None,
        timeout=timeout,
        held=0.0,
    )


def executor(
    observed: handlers.Observed,
    finished: list[Finished],
    *,
    slots: int,
    prefetch: int,
    handler: Callable[[jobwire.JobContext, pb.Block], Awaitable[None]] | None = None,
) -> Executor:
    # Handlers' JobService calls would go to nothing: a channel connects only when used.
    connection = Connection.parse("127.0.0.1:1", tenant=None, api_key=None, tls=None)
    return Executor(
        {handlers.BLOCK.name: Registered(handlers.BLOCK, handler or handlers.blocker(observed))},
        "py-executor",
        slots,
        prefetch,
        None,
        Reporter(0.1, lambda: None, RequestIds()),
        finished.append,
        jobwire.Client(connection.channel(), connection),
    )


async def test_a_handler_is_reported_started_when_it_starts_and_a_queued_lease_is_not() -> None:
    observed = handlers.Observed()
    finished: list[Finished] = []
    run = executor(observed, finished, slots=1, prefetch=2)
    assert run.start(grant("j1")) is None
    assert run.start(grant("j2")) is None
    assert run.start(grant("j3")) is None
    assert run.take_started() == [("j1", 1)], "queued leases have not started"
    assert run.take_started() == []
    await asyncio.wait_for(observed.start_of("j1").wait(), 5)

    # A queued lease stopped before it started is handed back, never reported.
    assert run.stop(("j3", 1), jobwire.StopReason.CANCELLED) is Stopping.UNSTARTED
    # The slot j1 frees goes to j2, which is reported once it starts.
    assert run.stop(("j1", 1), jobwire.StopReason.CANCELLED) is Stopping.ASKED
    await asyncio.wait_for(observed.start_of("j2").wait(), 5)
    assert run.take_started() == [("j2", 1)]
    assert [f.key for f in finished] == [("j1", 1)]

    # A new stream: the running handlers again, whatever was reported on the last one.
    run.restart_reports()
    assert run.take_started() == [("j2", 1)]
    run.cancel_all()
    await harness.eventually(lambda: _at_least(finished, 2), timeout=5)


async def test_a_handler_stopped_by_its_timeout_fails_timed_out() -> None:
    observed = handlers.Observed()
    finished: list[Finished] = []
    run = executor(observed, finished, slots=2, prefetch=0)
    # The local deadline, and the server's TIMED_OUT, stop the handler the same way.
    assert run.start(grant("local", timeout=0.05)) is None
    assert run.start(grant("server")) is None
    await asyncio.wait_for(observed.start_of("server").wait(), 5)
    assert run.stop(("server", 1), jobwire.StopReason.TIMED_OUT) is Stopping.ASKED
    await harness.eventually(lambda: _at_least(finished, 2), timeout=5)
    assert observed.stopped == {
        "local": jobwire.StopReason.TIMED_OUT,
        "server": jobwire.StopReason.TIMED_OUT,
    }
    for done in finished:
        assert isinstance(done.outcome, _wire.Failure)
        assert (done.outcome.timed_out, done.outcome.retryable) == (True, True)
        # blocker raises Retryable without a kind: the SDK's own.
        assert done.outcome.kind == "timeout"
        assert _wire.fail(1, done.key, done.outcome).fail.timed_out


async def _at_least(finished: list[Finished], count: int) -> bool | None:
    return True if len(finished) >= count else None


async def test_a_wait_completes_waiting_unless_a_cancel_settles_the_job() -> None:
    async def waits(ctx: jobwire.JobContext, job: pb.Block) -> None:
        if job.note == "cancelled":
            await ctx.wait_cancelled()
        raise ctx.wait_for_children()

    finished: list[Finished] = []
    run = executor(handlers.Observed(), finished, slots=2, prefetch=0, handler=waits)
    assert run.start(grant("waiting")) is None
    assert run.start(grant("cancelled")) is None
    await harness.eventually(lambda: _at_least(finished, 1), timeout=5)
    assert run.stop(("cancelled", 1), jobwire.StopReason.CANCELLED) is Stopping.ASKED
    await harness.eventually(lambda: _at_least(finished, 2), timeout=5)
    outcomes = {done.key[0]: done.outcome for done in finished}
    assert outcomes["waiting"] == ChildrenWait()
    complete = _wire.wait(1, ("waiting", 1), ChildrenWait()).complete
    assert complete.wait_for_children and not complete.HasField("result")
    assert outcomes["cancelled"] == _wire.Failure(
        "waiting for its children", "cancelled", retryable=True
    )
