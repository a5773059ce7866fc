"""The handlers of the tests' job types, shared by in-process workers and the worker process
(worker_app.py), and what they observed, for the tests to check."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytests_pb2 as pb

import jobwire

ECHO = jobwire.JobType.of(pb.Echo, pb.EchoResult)
STEPS = jobwire.JobType.of(pb.Steps, pb.StepsResult)
BLOCK = jobwire.JobType.of(pb.Block)
ITEMS = jobwire.JobType("py.items", pb.ItemBatch, jobwire.ITEM_RESULTS)


@dataclass
class Observed:
    """What Block handlers saw: each job's start, and the reason it was told to stop."""

    started: dict[str, asyncio.Event] = field(default_factory=dict)
    stopped: dict[str, jobwire.StopReason] = field(default_factory=dict)

    def start_of(self, job_id: str) -> asyncio.Event:
        return self.started.setdefault(job_id, asyncio.Event())


async def echo(ctx: jobwire.JobContext, job: pb.Echo) -> pb.EchoResult:
    if ctx.attempt == 1 and job.first_attempt_millis:
        # Tells a test the handler runs (its start was reported first, on the same stream).
        ctx.info("first attempt waiting")
        stop = asyncio.ensure_future(ctx.wait_cancelled())
        await asyncio.wait([stop], timeout=job.first_attempt_millis / 1000)
        stop.cancel()
        ctx.raise_if_cancelled()
    if ctx.attempt <= job.fail_times:
        message = f"attempt {ctx.attempt} failed"
        kind = job.kind or None
        if job.fatal:
            raise jobwire.NonRetryable(message, kind=kind)
        raise jobwire.Retryable(message, kind=kind)
    return pb.EchoResult(text=job.text, attempt=ctx.attempt, worker=ctx.worker_id)


async def steps(ctx: jobwire.JobContext, job: pb.Steps) -> pb.StepsResult:
    started_from = int.from_bytes(ctx.last_checkpoint or b"\0", "little")
    for step in range(started_from, job.steps):
        stop = asyncio.ensure_future(ctx.wait_cancelled())
        await asyncio.wait([stop], timeout=job.step_millis / 1000)
        stop.cancel()
        ctx.raise_if_cancelled()
        ctx.progress(items_done=step + 1, items_total=job.steps, message=f"step {step + 1}")
        ctx.info(f"step {step + 1} done")
        await ctx.checkpoint((step + 1).to_bytes(4, "little"))
    return pb.StepsResult(started_from=started_from, reached=job.steps)


def blocker(observed: Observed) -> Callable[[jobwire.JobContext, pb.Block], Awaitable[None]]:
    """A handler that waits until told to stop, saving a checkpoint first when paused."""

    async def block(ctx: jobwire.JobContext, job: pb.Block) -> None:
        observed.start_of(ctx.job_id).set()
        reason = await ctx.wait_cancelled()
        observed.stopped[ctx.job_id] = reason
        if reason is jobwire.StopReason.PAUSED:
            await ctx.checkpoint(b"paused")
        raise jobwire.Retryable(f"{job.note} stopped: {reason}")

    return block


@dataclass(frozen=True)
class BatchItem:
    index: int
    hang: bool
    fail: bool


def batch_items(job: pb.ItemBatch) -> list[BatchItem]:
    return [BatchItem(i, job.hangs and i == job.hang_at, i in job.fail) for i in range(job.count)]


def item_runner(
    log: Path,
) -> Callable[[jobwire.JobContext, BatchItem], Awaitable[pb.ItemRun]]:
    """The per-item handler of py.items: each run is appended to ``log`` as a line
    ``job item attempt phase worker``, a side channel that survives the worker's SIGKILL."""

    def record(ctx: jobwire.JobContext, item: BatchItem, phase: str) -> None:
        with log.open("a") as out:
            out.write(f"{ctx.job_id} {item.index} {ctx.attempt} {phase} {ctx.worker_id}\n")
            out.flush()
            os.fsync(out.fileno())

    async def run(ctx: jobwire.JobContext, item: BatchItem) -> pb.ItemRun:
        if item.hang and ctx.attempt == 1:
            record(ctx, item, "hang")
            await ctx.wait_cancelled()
            raise jobwire.Retryable("stopped while hanging")
        await asyncio.sleep(0.005)
        if item.fail:
            record(ctx, item, "fail")
            raise jobwire.NonRetryable(f"item {item.index} failed as asked", kind="item_fail")
        record(ctx, item, "done")
        return pb.ItemRun(index=item.index, attempt=ctx.attempt)

    return run
