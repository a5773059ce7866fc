"""A Python worker process for fault tests: serves py.echo and py.steps until SIGTERM (then
drains) or SIGKILL. Settings come from the environment: JOBWIRE_URL, WORKER_ID, CONCURRENCY,
PREFETCH, QUEUED_WAIT (seconds a prefetched lease may wait unstarted before it is handed
back; the runtime's 250 ms otherwise, which a test that kills the worker while it holds such a
lease cannot rely on catching) and ITEMS_LOG (the file py.items records its item runs in; the
type is served only when it is set)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "_generated"))

import handlers

import jobwire
from jobwire.worker import _runtime


async def main() -> None:
    if "QUEUED_WAIT" in os.environ:
        _runtime.MAX_QUEUED_WAIT = float(os.environ["QUEUED_WAIT"])
    worker = jobwire.Worker(
        os.environ["JOBWIRE_URL"],
        worker_id=os.environ.get("WORKER_ID", "py-test-worker"),
        concurrency=int(os.environ.get("CONCURRENCY", "4")),
        prefetch=int(os.environ.get("PREFETCH", "0")),
        queues=["py", "default"],
    )
    worker.register(handlers.ECHO, handlers.echo)
    worker.register(handlers.STEPS, handlers.steps)
    if "ITEMS_LOG" in os.environ:
        worker.register_items(
            handlers.ITEMS,
            handlers.batch_items,
            handlers.item_runner(Path(os.environ["ITEMS_LOG"])),
        )
    await worker.run()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main())
