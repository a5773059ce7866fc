"""The blocking client, from a thread with no event loop, against a worker on another."""

from __future__ import annotations

import asyncio

import handlers
import harness
import pytests_pb2 as pb

import jobwire
import jobwire.sync


async def test_the_blocking_client_enqueues_waits_and_watches(server: harness.Server) -> None:
    worker = jobwire.Worker(server.url, worker_id="py-sync", queues=["py"])
    worker.register(handlers.ECHO, handlers.echo)
    worker.register(handlers.STEPS, handlers.steps)

    def produce() -> tuple[pb.EchoResult, list[jobwire.JobEvent], str]:
        with jobwire.sync.Client(server.url) as client:
            echo = client.enqueue(pb.Echo(text="blocking"), job_type=handlers.ECHO, queue="py")
            result = echo.wait(timeout=30)
            steps = client.enqueue(pb.Steps(steps=3, step_millis=10), queue="py")
            events = list(steps.watch())
            queue = client.call(client.aio.queues.get, "py")
            return result, events, queue.name

    async with harness.running(worker):
        result, events, queue = await asyncio.to_thread(produce)
    assert (result.text, result.worker) == ("blocking", "py-sync")
    assert events[-1].is_terminal
    assert queue == "py"
