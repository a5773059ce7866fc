"""Watching with a resume in the middle, and the control of running jobs (cancel, pause,
resume, a timeout) as the handler sees it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import grpc.aio
import handlers
import harness
import pytest
import pytests_pb2 as pb

import jobwire
from jobwire.v1 import worker_service_pb2, worker_service_pb2_grpc
from jobwire.worker import _runtime, _wire

TIMED_OUT = jobwire.v1.job_pb2.ATTEMPT_OUTCOME_TIMED_OUT


def worker(server: harness.Server, observed: handlers.Observed | None = None) -> jobwire.Worker:
    worker = jobwire.Worker(server.url, worker_id="py-control", queues=["py"], concurrency=4)
    worker.register(handlers.STEPS, handlers.steps)
    worker.register(handlers.BLOCK, handlers.blocker(observed or handlers.Observed()))
    return worker


async def test_a_watch_resumed_in_the_middle_sees_every_event_once_in_order(
    server: harness.Server, client: jobwire.Client
) -> None:
    async with harness.running(worker(server)):
        handle = await client.enqueue(
            pb.Steps(steps=12, step_millis=30), job_type=handlers.STEPS, queue="py"
        )
        first: list[jobwire.JobEvent] = []
        async with handle.watch() as events:
            async for event in events:
                first.append(event)
                if isinstance(event.kind, jobwire.Progress) and event.kind.items_done >= 4:
                    break
            resume_from = events.last_sequence
        assert resume_from == first[-1].sequence
        rest = [event async for event in handle.watch(after_sequence=resume_from)]
        result = await handle.wait(timeout=30)
    assert (result.started_from, result.reached) == (0, 12)

    history = [event async for event in handle.watch()]
    seen = first + rest
    assert [e.sequence for e in seen] == [e.sequence for e in history]
    assert len({e.sequence for e in seen}) == len(seen)
    assert seen[-1].is_terminal
    done = [e.kind.items_done for e in seen if isinstance(e.kind, jobwire.Progress)]
    assert done == sorted(done) and done[-1] == 12, "progress in order, ending at the last value"
    lines = [e.kind.message for e in seen if isinstance(e.kind, jobwire.LogLine)]
    assert lines == [f"step {n} done" for n in range(1, 13)]
    states = [e.kind.state for e in seen if isinstance(e.kind, jobwire.StateChanged)]
    assert states[-1] is jobwire.JobState.SUCCEEDED


async def test_a_cancel_reaches_the_running_handler(
    server: harness.Server, client: jobwire.Client
) -> None:
    observed = handlers.Observed()
    async with harness.running(worker(server, observed)):
        handle = await client.enqueue(pb.Block(note="cancel me"), queue="py")
        await asyncio.wait_for(observed.start_of(handle.id).wait(), 30)
        await handle.cancel("not needed")
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=30)
    assert observed.stopped[handle.id] is jobwire.StopReason.CANCELLED
    assert failed.value.state is jobwire.JobState.CANCELLED
    assert failed.value.cancel_reason == "not needed"


async def test_a_paused_job_checkpoints_stops_and_resumes_from_its_checkpoint(
    server: harness.Server, client: jobwire.Client
) -> None:
    async with harness.running(worker(server)):
        handle = await client.enqueue(
            pb.Steps(steps=40, step_millis=25), job_type=handlers.STEPS, queue="py"
        )
        paused = False
        async with handle.watch() as events:
            async for event in events:
                progress = event.kind
                if (
                    not paused
                    and isinstance(progress, jobwire.Progress)
                    and progress.items_done >= 3
                ):
                    await handle.pause("maintenance")
                    paused = True
                if (
                    isinstance(event.kind, jobwire.StateChanged)
                    and event.kind.state is jobwire.JobState.PAUSED
                ):
                    break
        job = await handle.get()
        assert jobwire.JobState.parse(job.state) is jobwire.JobState.PAUSED
        assert job.has_checkpoint
        assert job.attempts_counted == 0, "a pause uses no attempt"
        await handle.resume()
        result = await handle.wait(timeout=30)
    assert result.started_from >= 3
    assert result.reached == 40


async def test_a_pause_reaches_a_handler_waiting_on_its_context(
    server: harness.Server, client: jobwire.Client
) -> None:
    observed = handlers.Observed()
    async with harness.running(worker(server, observed)):
        handle = await client.enqueue(pb.Block(note="pause me"), queue="py")
        await asyncio.wait_for(observed.start_of(handle.id).wait(), 30)
        await handle.pause("hold on")
        job = await harness.eventually(
            lambda: _in_state(client, handle.id, jobwire.JobState.PAUSED)
        )
    assert observed.stopped[handle.id] is jobwire.StopReason.PAUSED
    assert job.has_checkpoint


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[worker_service_pb2.ConnectRequest]:
    """Every message in-process workers write on their streams, in order."""
    messages: list[worker_service_pb2.ConnectRequest] = []
    write = _runtime._write

    async def recording(
        call: grpc.aio.StreamStreamCall[Any, Any],
        message: worker_service_pb2.ConnectRequest,
        *,
        welcomed: bool,
    ) -> None:
        messages.append(message)
        await write(call, message, welcomed=welcomed)

    monkeypatch.setattr(_runtime, "_write", recording)
    return messages


def sent(messages: list[worker_service_pb2.ConnectRequest], which: str, job_id: str) -> list[Any]:
    """The messages of one kind (``fail``, ``complete``) written for the job."""
    return [
        getattr(m, which)
        for m in messages
        if m.WhichOneof("message") == which and getattr(m, which).lease.job_id == job_id
    ]


async def test_a_timeout_stops_the_handler_locally_and_fails_the_attempt_timed_out(
    server: harness.Server,
    client: jobwire.Client,
    written: list[worker_service_pb2.ConnectRequest],
) -> None:
    observed = handlers.Observed()
    async with harness.running(worker(server, observed)):
        handle = await client.enqueue(
            pb.Block(note="slow"),
            queue="py",
            timeout=0.5,
            retry=jobwire.RetryPolicy(max_attempts=1),
        )
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=30)
    assert observed.stopped[handle.id] is jobwire.StopReason.TIMED_OUT
    [fail] = sent(written, "fail", handle.id)
    assert (fail.timed_out, fail.kind, fail.non_retryable) == (True, "timeout", False)
    assert failed.value.last_error is not None
    assert failed.value.last_error.kind == "timeout"
    job = await handle.get()
    assert [a.outcome for a in job.attempts] == [TIMED_OUT]


async def test_the_servers_timed_out_stops_the_handler_and_keeps_its_failure_kind(
    server: harness.Server,
    client: jobwire.Client,
    written: list[worker_service_pb2.ConnectRequest],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no local deadline, STOP_REASON_TIMED_OUT from the server stops the handler as the
    deadline would: its context is cancelled as TIMED_OUT and the attempt fails timed out,
    under the failure kind the handler chose."""
    read_grant = _wire._grant

    def without_deadline(lease: worker_service_pb2.Lease, duration: float | None) -> _wire.Grant:
        return dataclasses.replace(read_grant(lease, duration), timeout=None)

    monkeypatch.setattr(_wire, "_grant", without_deadline)
    seen: list[tuple[jobwire.StopReason, float | None]] = []

    async def slow(ctx: jobwire.JobContext, job: pb.Block) -> None:
        reason = await ctx.wait_cancelled()
        seen.append((reason, ctx.time_left()))
        raise jobwire.Retryable("the upstream did not answer", kind="upstream_slow")

    slow_worker = jobwire.Worker(server.url, worker_id="py-slow", queues=["py"])
    slow_worker.register(handlers.BLOCK, slow)
    async with harness.running(slow_worker):
        handle = await client.enqueue(
            pb.Block(note="slow"),
            queue="py",
            timeout=0.5,
            retry=jobwire.RetryPolicy(max_attempts=2, initial_backoff=60),
        )
        await harness.eventually(lambda: _in_state(client, handle.id, jobwire.JobState.RETRYING))
    assert seen == [(jobwire.StopReason.TIMED_OUT, None)]
    [fail] = sent(written, "fail", handle.id)
    assert (fail.timed_out, fail.kind, fail.non_retryable) == (True, "upstream_slow", False)
    job = await handle.get()
    assert [a.outcome for a in job.attempts] == [TIMED_OUT]
    assert job.attempts[0].error.kind == "upstream_slow"
    assert job.attempts_counted == 1


async def test_a_result_after_the_deadline_is_refused_and_not_sent_again(
    start_server: Callable[..., harness.Server],
    written: list[worker_service_pb2.ConnectRequest],
) -> None:
    """A handler that ignores its timeout and returns late: the server refuses the result
    (ABORTED, naming the timeout), the worker drops it (its drain does not wait for it), and
    the attempt ends timed out when its lease lapses."""
    server = start_server(harness.SHORT_LEASES)
    finished = asyncio.Event()

    async def stubborn(ctx: jobwire.JobContext, job: pb.Block) -> None:
        await ctx.wait_cancelled()
        await asyncio.sleep(0.5)
        asyncio.get_running_loop().call_soon(finished.set)

    late_worker = jobwire.Worker(server.url, worker_id="py-late", queues=["py"], stop_grace=None)
    late_worker.register(handlers.BLOCK, stubborn)
    async with await jobwire.Client.connect(server.url) as client:
        with harness.logged("job ", "result refused, the attempt ran past its timeout") as refused:
            async with harness.running(late_worker):
                handle = await client.enqueue(
                    pb.Block(note="late"),
                    queue="py",
                    timeout=0.5,
                    retry=jobwire.RetryPolicy(max_attempts=1),
                )
                await asyncio.wait_for(finished.wait(), 30)
                await asyncio.wait_for(refused.wait(), 30)
            # The drain finished: nothing was left to deliver.
        assert len(sent(written, "complete", handle.id)) == 1
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=30)
        assert failed.value.state is jobwire.JobState.FAILED
        job = await handle.get()
    assert [a.outcome for a in job.attempts] == [TIMED_OUT]


async def _in_state(
    client: jobwire.Client, job_id: str, state: jobwire.JobState
) -> jobwire.v1.job_pb2.Job | None:
    job = await client.get_job(job_id)
    return job if jobwire.JobState.parse(job.state) is state else None


async def test_drain_worker_makes_the_worker_finish_its_job_and_leave(
    server: harness.Server, client: jobwire.Client
) -> None:
    drained = worker(server)
    run = asyncio.ensure_future(drained.run(handle_signals=False))
    try:
        handle = await client.enqueue(
            pb.Steps(steps=5, step_millis=100), job_type=handlers.STEPS, queue="py"
        )
        await harness.until_running(client, handle.id, "py-control")
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            answer = await stub.DrainWorker(
                worker_service_pb2.DrainWorkerRequest(worker_id="py-control")
            )
        assert [w.worker_id for w in answer.workers] == ["py-control"]
        # The worker finishes the job it runs, then returns from run() by itself.
        await asyncio.wait_for(run, 30)
        assert (await handle.wait(timeout=30)).reached == 5
    finally:
        drained.stop()
        if not run.done():
            await asyncio.wait_for(run, 30)
