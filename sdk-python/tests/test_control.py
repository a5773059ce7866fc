"""Watching with a resume in the middle, and the control of running jobs (cancel, pause,
resume, a timeout) as the handler sees it."""

from __future__ import annotations

import asyncio

import handlers
import harness
import pytest
import pytests_pb2 as pb

import jobwire


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


async def test_a_timeout_stops_the_handler_locally(
    server: harness.Server, client: jobwire.Client
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
    assert failed.value.last_error is not None
    assert failed.value.last_error.kind == "timeout"


async def _in_state(
    client: jobwire.Client, job_id: str, state: jobwire.JobState
) -> jobwire.v1.job_pb2.Job | None:
    job = await client.get_job(job_id)
    return job if jobwire.JobState.parse(job.state) is state else None
