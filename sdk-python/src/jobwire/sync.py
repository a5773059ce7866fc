"""A synchronous face on the asyncio client, for scripts and frameworks without an event loop.

``jobwire.sync.Client`` runs a private event loop on a daemon thread and hands each call to it,
blocking until it returns; the asyncio client underneath does the work, so both behave alike.
The common calls have methods here; ``call`` runs any other coroutine method of the asyncio
client (``client.call(client.aio.queues.pause, "downloads")``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Generic, ParamSpec, TypeVar

from google.protobuf.message import Message

from jobwire import client as aio
from jobwire._transport import Tls
from jobwire._watch import JobEvents
from jobwire.events import JobEvent
from jobwire.jobs import JobState, JobType
from jobwire.v1 import job_pb2

T = TypeVar("T")
O = TypeVar("O", bound=Message)  # noqa: E741
Params = ParamSpec("Params")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobwire", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await iterator.__anext__()
            except StopAsyncIteration:
                return False, None

        while True:
            more, item = self.run(step())
            if not more:
                return
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """The blocking client; see ``jobwire.Client`` for what each call does."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:50051",
        *,
        tenant: str | None = None,
        api_key: str | None = None,
        tls: Tls | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._runner = _LoopThread()
        try:
            self.aio = self._runner.run(
                aio.Client.connect(url, tenant=tenant, api_key=api_key, tls=tls, timeout=timeout)
            )
        except BaseException:
            self._runner.stop()
            raise

    def close(self) -> None:
        self._runner.run(self.aio.close())
        self._runner.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(
        self, method: Callable[Params, Awaitable[T]], *args: Params.args, **kwargs: Params.kwargs
    ) -> T:
        """Runs a coroutine method of the asyncio client (``self.aio``) and returns its result."""

        async def run() -> T:
            return await method(*args, **kwargs)

        return self._runner.run(run())

    def enqueue(self, payload: Message, **options: Any) -> JobHandle[Any]:
        """As ``jobwire.Client.enqueue``, with the same keyword options."""
        return JobHandle(self, self._runner.run(self.aio.enqueue(payload, **options)))

    def enqueue_json(
        self, job_type: str, payload: Mapping[str, Any], **options: Any
    ) -> JobHandle[Message]:
        return JobHandle(
            self, self._runner.run(self.aio.enqueue_json(job_type, payload, **options))
        )

    def job(self, job_id: str, job_type: JobType[Any, O] | None = None) -> JobHandle[Any]:
        handle = self.aio.job(job_id) if job_type is None else self.aio.job(job_id, job_type)
        return JobHandle(self, handle)

    def get_job(self, job_id: str) -> job_pb2.Job:
        return self._runner.run(self.aio.get_job(job_id))

    def list_jobs(
        self,
        *,
        states: tuple[JobState, ...] = (),
        queue: str = "",
        job_type: str = "",
        parent_id: str = "",
    ) -> Iterator[job_pb2.Job]:
        return self._runner.iterate(
            self.aio.list_jobs(states=states, queue=queue, job_type=job_type, parent_id=parent_id)
        )

    def signal_job(
        self,
        job_id: str,
        name: str,
        payload: Message | None = None,
        *,
        request_id: str | None = None,
    ) -> int:
        return self._runner.run(self.aio.signal_job(job_id, name, payload, request_id=request_id))

    def watch_jobs(self, **filters: Any) -> Iterator[JobEvent]:
        return self._runner.iterate(self.aio.watch_jobs(**filters))

    def _iterate(self, events: JobEvents) -> Iterator[JobEvent]:
        return self._runner.iterate(events)


class JobHandle(Generic[O]):
    """The blocking handle; see ``jobwire.JobHandle``."""

    def __init__(self, client: Client, handle: aio.JobHandle[O]) -> None:
        self._client = client
        self.aio = handle
        self.id = handle.id

    def get(self) -> job_pb2.Job:
        return self._client._runner.run(self.aio.get())

    def wait(self, timeout: float | None = None) -> O:
        return self._client._runner.run(self.aio.wait(timeout))

    def watch(
        self, *, after_sequence: int = 0, include_children: bool = False
    ) -> Iterator[JobEvent]:
        return self._client._iterate(
            self.aio.watch(after_sequence=after_sequence, include_children=include_children)
        )

    def signal(
        self, name: str, payload: Message | None = None, *, request_id: str | None = None
    ) -> int:
        return self._client._runner.run(self.aio.signal(name, payload, request_id=request_id))

    def cancel(self, reason: str = "") -> job_pb2.Job:
        return self._client._runner.run(self.aio.cancel(reason))

    def pause(self, reason: str = "") -> job_pb2.Job:
        return self._client._runner.run(self.aio.pause(reason))

    def resume(self) -> job_pb2.Job:
        return self._client._runner.run(self.aio.resume())

    def retry(self) -> job_pb2.Job:
        return self._client._runner.run(self.aio.retry())
