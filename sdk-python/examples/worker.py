"""Serves ``image.resize`` and ``demo.countdown`` until SIGINT or SIGTERM, then drains and exits.

``JOBWIRE_URL=http://127.0.0.1:50051 python examples/worker.py``; optional ``JOBWIRE_QUEUES``
(comma-separated, default ``default``) and ``JOBWIRE_CONCURRENCY`` (default 4). The countdown
shows a handler's side of progress, logs, checkpoints and cooperative stops; watch one with
``examples/watch.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os

from protos import (
    COUNTDOWN,
    RESIZE,
    Countdown,
    CountdownCheckpoint,
    CountdownOutput,
    Resize,
    ResizeOutput,
)

import jobwire

#: A countdown logs a line, and saves a checkpoint, every this many steps.
EVERY = 5


async def resize(ctx: jobwire.JobContext, job: Resize) -> ResizeOutput:
    """Pretends to resize an image; the pause stands in for real work."""
    if job.width == 0:
        raise jobwire.NonRetryable("width must be positive", kind="invalid_payload")
    await asyncio.sleep(0.1)
    ctx.progress(1.0, message="resized")
    return ResizeOutput(url=f"{job.url}?w={job.width}", width=job.width, height=job.width * 3 // 4)


async def countdown(ctx: jobwire.JobContext, job: Countdown) -> CountdownOutput:
    """Counts down one step per ``step_millis``, from its last checkpoint, and stops as soon as
    it is told to: after saving its place when the job is being paused."""
    resumed_from = 0
    if ctx.last_checkpoint:
        resumed_from = min(CountdownCheckpoint.FromString(ctx.last_checkpoint).done, job.steps)
        ctx.info(f"resuming at step {resumed_from} of {job.steps}")
    else:
        ctx.info(f"counting down from {job.steps}")
    for done in range(resumed_from, job.steps):
        ctx.progress(
            items_done=done,
            items_total=job.steps,
            stage="countdown",
            message=f"T-minus {job.steps - done}",
        )
        stopped = asyncio.ensure_future(ctx.wait_cancelled())
        await asyncio.wait([stopped], timeout=job.step_millis / 1000)
        stopped.cancel()
        if ctx.stop_reason is jobwire.StopReason.PAUSED:
            await ctx.checkpoint(CountdownCheckpoint(done=done).SerializeToString())
        ctx.raise_if_cancelled()
        if (done + 1) % EVERY == 0:
            ctx.info(f"T-minus {job.steps - done - 1}")
            await ctx.checkpoint(CountdownCheckpoint(done=done + 1).SerializeToString())
    ctx.progress(items_done=job.steps, items_total=job.steps, stage="lift-off", message="T-minus 0")
    ctx.info("lift-off")
    return CountdownOutput(steps=job.steps, resumed_from=resumed_from, attempt=ctx.attempt)


async def main() -> None:
    queues = [
        q.strip() for q in os.environ.get("JOBWIRE_QUEUES", "default").split(",") if q.strip()
    ]
    worker = jobwire.Worker(
        os.environ.get("JOBWIRE_URL", "http://127.0.0.1:50051"),
        queues=queues,
        concurrency=int(os.environ.get("JOBWIRE_CONCURRENCY", "4")),
        # Needed once the server has keys: one with the worker role.
        api_key=os.environ.get("JOBWIRE_API_KEY") or None,
    )
    worker.register(RESIZE, resize)
    worker.register(COUNTDOWN, countdown)
    # Serves until SIGTERM or SIGINT, then drains: running jobs finish first.
    await worker.run()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main())
