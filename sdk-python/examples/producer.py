"""Enqueues one ``image.resize`` job, waits for its typed result and prints it.

Run a server and a worker (``python examples/worker.py``, or the Rust example worker) first:
``JOBWIRE_URL=http://127.0.0.1:50051 python examples/producer.py``. Exits non-zero when the job
failed, was cancelled, or took longer than 60 s.
"""

from __future__ import annotations

import asyncio
import os

from protos import RESIZE, Resize

import jobwire


async def main() -> None:
    url = os.environ.get("JOBWIRE_URL", "http://127.0.0.1:50051")
    api_key = os.environ.get("JOBWIRE_API_KEY") or None
    async with await jobwire.Client.connect(url, api_key=api_key) as client:
        handle = await client.enqueue(
            Resize(url="https://example.com/cat.png", width=320),
            job_type=RESIZE,
            priority=75,
            retry=jobwire.RetryPolicy(max_attempts=3),
            labels={"example": "producer"},
        )
        print(f"enqueued job {handle.id}")
        try:
            output = await handle.wait(timeout=60)
        except jobwire.JobFailed as failed:
            raise SystemExit(f"job {handle.id}: {failed}") from None
        print(f"resized to {output.width}x{output.height}: {output.url}")


if __name__ == "__main__":
    asyncio.run(main())
