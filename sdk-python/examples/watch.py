"""Enqueues a ``demo.countdown`` job and prints its events as they happen: state changes,
progress and log lines. Halfway it drops the stream and opens another after the last sequence
it saw, as a dashboard that reconnects would: no event is missed or repeated.

``JOBWIRE_URL=http://127.0.0.1:50051 python examples/watch.py`` with a worker running.
"""

from __future__ import annotations

import asyncio
import os

from protos import COUNTDOWN, Countdown

import jobwire


def show(event: jobwire.JobEvent) -> None:
    kind = event.kind
    if isinstance(kind, jobwire.StateChanged):
        print(f"#{event.sequence} {kind.state.name} {kind.reason}".rstrip())
    elif isinstance(kind, jobwire.Progress):
        total = kind.items_total or 1
        bar = "#" * (20 * kind.items_done // total)
        print(f"#{event.sequence} [{bar:<20}] {kind.items_done}/{kind.items_total} {kind.message}")
    elif isinstance(kind, jobwire.LogLine):
        print(f"#{event.sequence} {kind.level.name}: {kind.message}")


async def main() -> None:
    url = os.environ.get("JOBWIRE_URL", "http://127.0.0.1:50051")
    api_key = os.environ.get("JOBWIRE_API_KEY") or None
    async with await jobwire.Client.connect(url, api_key=api_key) as client:
        handle = await client.enqueue(Countdown(steps=20, step_millis=100), job_type=COUNTDOWN)
        print(f"watching job {handle.id}")
        async with handle.watch() as events:
            async for event in events:
                show(event)
                if isinstance(event.kind, jobwire.Progress) and event.kind.items_done >= 10:
                    break
            resume_after = events.last_sequence
        print(f"-- stream dropped; resuming after #{resume_after}")
        async for event in handle.watch(after_sequence=resume_after):
            show(event)
        output = await handle.wait()
        print(f"counted {output.steps} steps from {output.resumed_from}")


if __name__ == "__main__":
    asyncio.run(main())
