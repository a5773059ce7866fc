"""Throughput of a Python worker with no-op handlers: enqueues N jobs, then times one worker
with S slots draining them, and prints one JSON line.

    python bench/noop_worker.py --url http://127.0.0.1:50051 --jobs 20000 --slots 20

Run it against a server of its own (a fresh database): the jobs go to a queue named for the run,
but a busy server skews the figure. The drain is timed from the worker's start until the queue
counts every job SUCCEEDED, so it includes the last results' acknowledgements and commits. A
benchmark, not a test: nothing here asserts a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from google.protobuf import empty_pb2

import jobwire

NOOP = jobwire.JobType("bench.noop", empty_pb2.Empty, empty_pb2.Empty)
#: Jobs per EnqueueJobs call (the protocol allows up to 5000).
BATCH = 1000


async def noop(ctx: jobwire.JobContext, job: empty_pb2.Empty) -> None:
    return None


async def succeeded(client: jobwire.Client, queue: str) -> int:
    stats = (await client.queues.get(queue)).stats
    return sum(c.count for c in stats.counts if c.state == jobwire.JobState.SUCCEEDED.value)


async def main(url: str, jobs: int, slots: int, prefetch: int) -> dict[str, float | int | str]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    async with await jobwire.Client.connect(url) as client:
        started = time.perf_counter()
        for first in range(0, jobs, BATCH):
            count = min(BATCH, jobs - first)
            await client.enqueue_many([empty_pb2.Empty()] * count, job_type=NOOP, queue=queue)
        enqueued = time.perf_counter() - started

        worker = jobwire.Worker(url, queues=[queue], concurrency=slots, prefetch=prefetch)
        worker.register(NOOP, noop)
        started = time.perf_counter()
        running = asyncio.ensure_future(worker.run(handle_signals=False))
        while await succeeded(client, queue) < jobs:
            if running.done():
                running.result()
            await asyncio.sleep(0.05)
        drained = time.perf_counter() - started
        worker.stop()
        await running
    return {
        "workload": "python_noop_worker",
        "jobs": jobs,
        "slots": slots,
        "prefetch": prefetch,
        "enqueue_per_s": round(jobs / enqueued),
        "drain_s": round(drained, 3),
        "jobs_per_s": round(jobs / drained),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:50051")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--prefetch", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.url, args.jobs, args.slots, args.prefetch))))
