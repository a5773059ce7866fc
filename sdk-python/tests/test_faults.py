"""Worker processes that die or are told to stop: a SIGKILLed worker's lease lapses and
another worker finishes its job, the attempt counted only if its handler had started; SIGTERM
drains a worker, which finishes what it runs."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import handlers
import harness
import pytest
import pytests_pb2 as pb

import jobwire


async def test_a_killed_workers_job_is_finished_by_another_worker(
    start_server: Callable[..., harness.Server], workdir: Path
) -> None:
    server = start_server(harness.SHORT_LEASES)
    async with await jobwire.Client.connect(server.url) as client:
        doomed = harness.WorkerProcess.python(server.url, "py-doomed", workdir)
        try:
            handle = await client.enqueue(
                pb.Echo(text="survives", first_attempt_millis=60_000),
                job_type=handlers.ECHO,
                queue="py",
                retry=jobwire.RetryPolicy(max_attempts=5, initial_backoff=0.05),
            )
            await harness.until_running(client, handle.id, "py-doomed")
            # Killed once its handler runs: a worker killed before that gives its attempt back
            # uncounted, with no attempt of its own in the history this test reads.
            await harness.until_logged(client, handle.id, "first attempt waiting")
            doomed.signal(signal.SIGKILL)
            assert await doomed.wait(10) == -signal.SIGKILL
        finally:
            doomed.kill()

        rescuer = jobwire.Worker(server.url, worker_id="py-rescuer", queues=["py"])
        rescuer.register(handlers.ECHO, handlers.echo)
        async with harness.running(rescuer):
            result = await handle.wait(timeout=60)
        job = await handle.get()
    assert (result.text, result.worker) == ("survives", "py-rescuer")
    assert result.attempt >= 2
    doomed_attempts = [a for a in job.attempts if a.worker_id == "py-doomed"]
    assert doomed_attempts
    assert all(
        a.outcome == jobwire.v1.job_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED for a in doomed_attempts
    )


async def test_a_lease_lost_with_its_worker_counts_only_if_its_handler_had_started(
    start_server: Callable[..., harness.Server], workdir: Path
) -> None:
    """The worker reports each handler's start (Hello.reports_started). With one attempt
    allowed, a job whose handler started on a worker that is SIGKILLed fails when its lease
    lapses (the attempt counted); jobs whose leases waited in that worker's prefetch queue
    come back uncounted and succeed on another worker."""
    server = start_server(harness.SHORT_LEASES)
    once = jobwire.RetryPolicy(max_attempts=1)
    async with await jobwire.Client.connect(server.url) as client:
        # One slot, a prefetch queue, and queued leases kept (not handed back after 250 ms) so
        # that the worker still holds some unstarted when it dies.
        doomed = harness.WorkerProcess.python(
            server.url, "py-doomed", workdir, concurrency=1, prefetch=20, queued_wait=300
        )
        try:
            quick = await client.enqueue_many(
                [pb.Echo(text=f"quick {n}") for n in range(300)],
                job_type=handlers.ECHO,
                queue="py",
                retry=once,
            )
            # Once the worker keeps pace the server sends it leases ahead of its slot; the
            # long job, first in line, takes the slot and those behind it wait in the queue.
            await quick[30].wait(timeout=30)
            long = await client.enqueue(
                pb.Steps(steps=1_000_000, step_millis=20),
                job_type=handlers.STEPS,
                queue="py",
                priority=100,
                retry=once,
            )
            # A checkpoint stored: the handler runs, and its start, sent before the
            # checkpoint on the same stream, has reached the server.
            await harness.eventually(lambda: _checkpointed(client, long.id))
            # Leases claimed ahead and never sent go back within 250 ms; what the worker still
            # holds then, beside the long job, waits in its prefetch queue.
            await asyncio.sleep(0.6)
            held = [
                job.id
                async for job in client.list_jobs(states=[jobwire.JobState.RUNNING], queue="py")
                if job.lease_owner == "py-doomed" and job.id != long.id
            ]
            assert held, "the worker held no lease in its prefetch queue"
            doomed.signal(signal.SIGKILL)
            assert await doomed.wait(10) == -signal.SIGKILL
        finally:
            doomed.kill()

        with pytest.raises(jobwire.JobFailed) as failed:
            await long.wait(timeout=60)
        assert failed.value.state is jobwire.JobState.FAILED
        job = await long.get()
        assert (job.attempt, job.attempts_counted) == (1, 1)
        assert [a.outcome for a in job.attempts] == [
            jobwire.v1.job_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED
        ]

        rescuer = jobwire.Worker(server.url, worker_id="py-rescuer", queues=["py"])
        rescuer.register(handlers.ECHO, handlers.echo)
        async with harness.running(rescuer):
            results = await asyncio.gather(*(h.wait(timeout=60) for h in quick))
        assert [r.text for r in results] == [f"quick {n}" for n in range(300)]
        by_id = {h.id: r for h, r in zip(quick, results, strict=True)}
        for job_id in held:
            assert by_id[job_id].worker == "py-rescuer"
            job = await client.get_job(job_id)
            assert job.attempt >= 2, "its lease on the killed worker took a number"
            assert job.attempts_counted == 1, "and did not count"


async def _checkpointed(client: jobwire.Client, job_id: str) -> bool | None:
    return True if (await client.get_job(job_id)).has_checkpoint else None


async def test_sigterm_drains_the_worker_which_finishes_its_running_job(
    server: harness.Server, client: jobwire.Client, workdir: Path
) -> None:
    draining = harness.WorkerProcess.python(server.url, "py-draining", workdir)
    try:
        handle = await client.enqueue(
            pb.Echo(text="finished in the drain", first_attempt_millis=1500),
            job_type=handlers.ECHO,
            queue="py",
        )
        await harness.until_running(client, handle.id, "py-draining")
        draining.signal(signal.SIGTERM)
        assert await draining.wait(30) == 0, harness.tail(draining.log)
    finally:
        draining.kill()
    job = await handle.get()
    assert jobwire.JobState.parse(job.state) is jobwire.JobState.SUCCEEDED
    result = await handle.wait(timeout=5)
    assert (result.worker, result.attempt) == ("py-draining", 1)
    log = draining.log.read_text()
    assert "draining" in log and "drained; stream closed" in log

    # Drained means gone: a job enqueued now waits for another worker.
    later = await client.enqueue(pb.Echo(text="later"), queue="py")
    job = await client.get_job(later.id)
    assert jobwire.JobState.parse(job.state) is jobwire.JobState.AVAILABLE


async def test_a_server_crash_loses_nothing_the_worker_or_a_watcher_holds(
    start_server: Callable[..., harness.Server],
) -> None:
    """The worker reconnects and adopts its running lease (Hello.running); the result its
    handler returned while the server was down is sent on the new stream; a watcher resumes
    by sequence and sees every event once."""
    # A lease outlasting the worker's reconnect backoff while the server is down.
    server = start_server({"--lease-duration": "15s"})
    client = await jobwire.Client.connect(server.url)
    worker = jobwire.Worker(server.url, worker_id="py-steady", queues=["py"])
    returned = asyncio.Event()
    worker.register(handlers.ECHO, telling(returned))
    async with harness.running(worker):
        handle = await client.enqueue(
            pb.Echo(text="outlives the server", first_attempt_millis=1000),
            job_type=handlers.ECHO,
            queue="py",
        )
        watched: list[jobwire.JobEvent] = []
        events = handle.watch()
        async for event in events:
            watched.append(event)
            kind = event.kind
            if isinstance(kind, jobwire.StateChanged) and kind.state is jobwire.JobState.RUNNING:
                break
        server.crash()
        # The handler returns while the server is down; its result waits in the outbox.
        await asyncio.wait_for(returned.wait(), 30)
        await asyncio.to_thread(server.restart)
        watched += [event async for event in events]
        result = await handle.wait(timeout=60)
    assert (result.worker, result.attempt) == ("py-steady", 1), "the lease was adopted"
    history = [event async for event in handle.watch()]
    await client.close()
    assert [e.sequence for e in watched] == [e.sequence for e in history]
    assert watched[-1].is_terminal


async def test_a_drain_begun_while_the_server_is_down_delivers_its_results(
    start_server: Callable[..., harness.Server],
) -> None:
    """The worker is told to stop while it cannot reach the server: it comes back only to
    deliver what its handler returned meanwhile (a Hello followed by Drain), then exits."""
    server = start_server({"--lease-duration": "15s"})
    client = await jobwire.Client.connect(server.url)
    worker = jobwire.Worker(server.url, worker_id="py-late-drain", queues=["py"])
    returned = asyncio.Event()
    worker.register(handlers.ECHO, telling(returned))
    run = asyncio.ensure_future(worker.run(handle_signals=False))
    try:
        handle = await client.enqueue(
            pb.Echo(text="delivered late", first_attempt_millis=800),
            job_type=handlers.ECHO,
            queue="py",
        )
        await harness.until_running(client, handle.id, "py-late-drain")
        server.crash()
        worker.stop()
        await asyncio.wait_for(returned.wait(), 30)
        assert not run.done(), "the result is not delivered yet"
        await asyncio.to_thread(server.restart)
        await asyncio.wait_for(run, 30)
        result = await handle.wait(timeout=30)
    finally:
        run.cancel()
        await client.close()
    assert (result.text, result.worker, result.attempt) == ("delivered late", "py-late-drain", 1)


def telling(
    returned: asyncio.Event,
) -> Callable[[jobwire.JobContext, pb.Echo], Awaitable[pb.EchoResult]]:
    """The echo handler, setting ``returned`` once it has returned its result."""

    async def echo(ctx: jobwire.JobContext, job: pb.Echo) -> pb.EchoResult:
        try:
            return await handlers.echo(ctx, job)
        finally:
            asyncio.get_running_loop().call_soon(returned.set)

    return echo


async def test_prefetched_leases_are_handed_back_unstarted_and_run_elsewhere(
    server: harness.Server, client: jobwire.Client
) -> None:
    """A worker holding leases beyond its slot hands back, on its drain (and when they wait
    too long), those it has not started; another worker runs them, and a lease handed back
    counts against no job's attempts (docs/architecture.md, invariant 9)."""
    handles = await client.enqueue_many(
        [pb.Echo(text=f"quick {n}") for n in range(300)], job_type=handlers.ECHO, queue="py"
    )
    prefetching = jobwire.Worker(
        server.url, worker_id="py-prefetching", queues=["py"], concurrency=1, prefetch=10
    )
    prefetching.register(handlers.ECHO, handlers.echo)
    run = asyncio.ensure_future(prefetching.run(handle_signals=False))
    await handles[50].wait(timeout=30)
    prefetching.stop()
    await asyncio.wait_for(run, 30)

    finishing = jobwire.Worker(server.url, worker_id="py-finishing", queues=["py"], concurrency=4)
    finishing.register(handlers.ECHO, handlers.echo)
    async with harness.running(finishing):
        results = await asyncio.gather(*(h.wait(timeout=60) for h in handles))
    assert [r.text for r in results] == [f"quick {n}" for n in range(300)]
    jobs = [await client.get_job(h.id) for h in handles]
    assert all(job.attempts_counted == 1 for job in jobs)
    handed_back = [job for job in jobs if job.attempt > job.attempts_counted]
    assert handed_back, "the prefetching worker handed no lease back"


async def test_a_checkpoint_asked_for_while_the_server_is_down_is_stored_after_it_returns(
    start_server: Callable[..., harness.Server],
) -> None:
    server = start_server({"--lease-duration": "15s"})
    started, gate = asyncio.Event(), asyncio.Event()

    async def save_when_let(ctx: jobwire.JobContext, job: pb.Block) -> None:
        started.set()
        await gate.wait()
        while True:
            try:
                await ctx.checkpoint(b"saved")
                return
            except jobwire.Disconnected:
                # Asked for just before the worker noticed the stream was gone: ask again.
                await asyncio.sleep(0.05)

    worker = jobwire.Worker(server.url, worker_id="py-saver", queues=["py"])
    worker.register(handlers.BLOCK, save_when_let)
    async with (
        await jobwire.Client.connect(server.url) as client,
        harness.running(worker),
    ):
        handle = await client.enqueue(pb.Block(note="save"), job_type=handlers.BLOCK, queue="py")
        await asyncio.wait_for(started.wait(), 30)
        with harness.logged("stream to the server failed") as broken:
            server.crash()
            await asyncio.wait_for(broken.wait(), 30)
        # Asked for while no stream is up: it must wait for the next one.
        gate.set()
        await asyncio.to_thread(server.restart)
        await handle.wait(timeout=30)
        job = await handle.get()
    assert job.has_checkpoint


async def test_a_paused_queue_has_a_prefetching_worker_hand_back_what_it_queued(
    server: harness.Server, client: jobwire.Client
) -> None:
    """PauseQueue reaches a prefetching worker as ReleaseQueued; it hands back the leases it
    holds unstarted for that queue, and the queue's jobs all run once it is resumed."""
    handles = await client.enqueue_many(
        [pb.Echo(text=f"held {n}") for n in range(400)], job_type=handlers.ECHO, queue="py"
    )
    worker = jobwire.Worker(
        server.url, worker_id="py-prefetching", queues=["py"], concurrency=1, prefetch=10
    )
    worker.register(handlers.ECHO, handlers.echo)
    async with harness.running(worker):
        await handles[50].wait(timeout=30)
        with harness.logged("queue py was paused or limited") as released:
            await client.queues.pause("py", "hold on")
            await asyncio.wait_for(released.wait(), 30)
        await client.queues.resume("py")
        results = await asyncio.gather(*(h.wait(timeout=60) for h in handles))
    assert len({r.text for r in results}) == 400
