"""The producer's side: enqueue typed jobs, then inspect, watch, wait for, pause, resume,
cancel, retry and signal them through ``JobService``; administer queues (``client.queues``) and cron
schedules (``client.schedules``).

A ``Client`` holds one multiplexed HTTP/2 channel; share it between tasks instead of connecting
again. It never runs jobs (that is the worker's job) and shares no state with the worker.

Nothing is validated here beyond encoding payloads: the server owns the rules (name syntax,
priority range, label limits) and names the field at fault in the ``InvalidArgument`` it
raises, so checking twice could only make the two disagree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar, cast, overload

import grpc
import grpc.aio
from google.protobuf.message import Message

from jobwire import _codec
from jobwire._transport import Connection, Tls
from jobwire._watch import Backoff, JobEvents
from jobwire.admin import Queues, Schedules
from jobwire.errors import JobFailed, RpcError, Unavailable, Unimplemented, from_rpc_error
from jobwire.events import StateChanged
from jobwire.jobs import JobState, JobType, Recipe, RetryPolicy
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc, worker_service_pb2

log = logging.getLogger("jobwire.client")

P = TypeVar("P", bound=Message)
O = TypeVar("O", bound=Message)  # noqa: E741
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

_FIRST_POLL = 0.01
_MAX_POLL = 0.5


class Client:
    """A connection to a jobwire server for enqueueing and managing jobs, queues and schedules.

    Every call acts within the tenant given at connect time (the ``jobwire-tenant`` header), or
    the server's ``default`` tenant.
    """

    def __init__(self, channel: grpc.aio.Channel, connection: Connection) -> None:
        self._channel = channel
        self._metadata = connection.metadata
        self._jobs = job_service_pb2_grpc.JobServiceStub(channel)
        self.queues = Queues(channel, connection.metadata)
        self.schedules = Schedules(channel, connection.metadata)

    @classmethod
    async def connect(
        cls,
        url: str = "http://127.0.0.1:50051",
        *,
        tenant: str | None = None,
        api_key: str | None = None,
        tls: Tls | None = None,
        timeout: float = 10.0,
    ) -> Client:
        """Connects to the server at ``url``; a wrong address fails here rather than on the
        first call. ``api_key`` is sent as ``authorization: Bearer <key>``; ``tls`` (or an
        ``https://`` URL) makes the channel secure."""
        connection = Connection.parse(url, tenant=tenant, api_key=api_key, tls=tls)
        channel = connection.channel()
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            await channel.close()
            raise Unavailable(f"could not reach the server at {url} within {timeout}s") from None
        return cls(channel, connection)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # Enqueue.

    @overload
    async def enqueue(
        self,
        payload: P,
        *,
        job_type: JobType[P, O],
        queue: str | None = ...,
        priority: int | None = ...,
        delay: timedelta | float | None = ...,
        run_at: datetime | None = ...,
        retry: RetryPolicy | None = ...,
        idempotency_key: str | None = ...,
        labels: Mapping[str, str] | None = ...,
        timeout: timedelta | float | None = ...,
        needs_approval: bool = ...,
        accept_existing: bool = ...,
        recipe: Recipe | None = ...,
    ) -> JobHandle[O]: ...

    @overload
    async def enqueue(
        self,
        payload: Message,
        *,
        job_type: str | None = ...,
        queue: str | None = ...,
        priority: int | None = ...,
        delay: timedelta | float | None = ...,
        run_at: datetime | None = ...,
        retry: RetryPolicy | None = ...,
        idempotency_key: str | None = ...,
        labels: Mapping[str, str] | None = ...,
        timeout: timedelta | float | None = ...,
        needs_approval: bool = ...,
        accept_existing: bool = ...,
        recipe: Recipe | None = ...,
    ) -> JobHandle[Message]: ...

    async def enqueue(
        self,
        payload: Message,
        *,
        job_type: JobType[Any, Any] | str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: timedelta | float | None = None,
        needs_approval: bool = False,
        accept_existing: bool = False,
        recipe: Recipe | None = None,
    ) -> JobHandle[Any]:
        """Stores a job durably and returns its handle.

        ``job_type`` is a ``JobType`` (then ``wait`` returns its output type), a job type name,
        or None to read it from the payload's ``(jobwire.v1.job)`` option. Raises
        ``InvalidArgument`` naming the field when the server refuses the job. An
        ``idempotency_key`` already used for another job type or payload raises
        ``AlreadyExists`` naming that job, unless ``accept_existing`` is set (then that job's
        handle comes back, ``created`` false). A ``recipe`` gives the settings the call leaves
        unset (see ``jobwire.Recipe``).
        """
        kind = _resolve(payload, job_type)
        spec = job_service_pb2.JobSpec(job_type=kind.name if isinstance(kind, JobType) else kind)
        spec.payload.CopyFrom(_codec.pack(payload))
        _apply(spec, queue, priority, delay, run_at, retry, idempotency_key, labels, timeout)
        _apply_recipe(spec, recipe)
        spec.needs_approval = spec.needs_approval or needs_approval
        spec.accept_existing = accept_existing
        response = await self._call(
            self._jobs.EnqueueJob, job_service_pb2.EnqueueJobRequest(job=spec)
        )
        output = kind.output if isinstance(kind, JobType) else None
        return JobHandle(self, response.job.id, output, created=response.created)

    async def enqueue_json(
        self,
        job_type: str,
        payload: Mapping[str, Any],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: timedelta | float | None = None,
        needs_approval: bool = False,
        recipe: Recipe | None = None,
    ) -> JobHandle[Message]:
        """Enqueues a job of a registered type with its payload as JSON (``payload_json``),
        which the server checks against the type's schema, naming a wrong field's path."""
        spec = job_service_pb2.JobSpec(job_type=job_type)
        spec.payload_json.CopyFrom(_codec.to_struct(payload))
        _apply(spec, queue, priority, delay, run_at, retry, idempotency_key, labels, timeout)
        _apply_recipe(spec, recipe)
        spec.needs_approval = spec.needs_approval or needs_approval
        response = await self._call(
            self._jobs.EnqueueJob, job_service_pb2.EnqueueJobRequest(job=spec)
        )
        return JobHandle(self, response.job.id, None, created=response.created)

    async def enqueue_many(
        self,
        payloads: Iterable[P],
        *,
        job_type: JobType[P, O],
        queue: str | None = None,
        priority: int | None = None,
        retry: RetryPolicy | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: timedelta | float | None = None,
        recipe: Recipe | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[JobHandle[O]]:
        """Stores many jobs of one type in one transaction (1 to 5000): all, or none when any
        is invalid. Handles come back in the order of ``payloads``. ``keys``, when given, holds
        one idempotency key per payload, in the same order (``ValueError`` otherwise); an
        empty one leaves its job without."""
        batch = specs(payloads, job_type, queue, priority, retry, labels, timeout, recipe, keys)
        return await self._enqueue_specs(batch, job_type.output, None)

    async def _enqueue_specs(
        self,
        batch: list[job_service_pb2.JobSpec],
        output: type[O],
        parent: worker_service_pb2.LeaseRef | None,
    ) -> list[JobHandle[O]]:
        """Stores jobs already in their request form, as children of ``parent`` when it is
        given (the lease of the running attempt enqueuing them: ``JobContext``'s only)."""
        request = job_service_pb2.EnqueueJobsRequest(jobs=batch, parent=parent)
        response = await self._call(self._jobs.EnqueueJobs, request)
        return [JobHandle(self, j.id, output, created=j.created) for j in response.jobs]

    # Jobs by id.

    @overload
    def job(self, job_id: str) -> JobHandle[Message]: ...

    @overload
    def job(self, job_id: str, job_type: JobType[Any, O]) -> JobHandle[O]: ...

    def job(self, job_id: str, job_type: JobType[Any, Any] | None = None) -> JobHandle[Any]:
        """A handle to an existing job, such as one whose id was stored."""
        return JobHandle(self, job_id, job_type.output if job_type else None)

    async def get_job(
        self, job_id: str, *, view: job_pb2.JobView.ValueType = job_pb2.JOB_VIEW_FULL
    ) -> job_pb2.Job:
        """The job, by default with its attempt history; ``NotFound`` if the tenant has none."""
        request = job_service_pb2.GetJobRequest(id=job_id, view=view)
        return (await self._call(self._jobs.GetJob, request)).job

    async def list_jobs(
        self,
        *,
        states: Sequence[JobState] = (),
        queue: str = "",
        job_type: str = "",
        parent_id: str = "",
        page_size: int = 100,
        view: job_pb2.JobView.ValueType = job_pb2.JOB_VIEW_BASIC,
    ) -> AsyncIterator[job_pb2.Job]:
        """Every matching job, newest first, fetched a page at a time (1 to 1000 jobs) as the
        caller reads on. ``parent_id`` keeps the children of that job (those its handler
        enqueued with ``JobContext.enqueue_children``)."""
        request = job_service_pb2.ListJobsRequest(
            page_size=page_size,
            states=[job_pb2.JobState.ValueType(s) for s in states],
            queue=queue,
            job_type=job_type,
            parent_id=parent_id,
            view=view,
        )
        while True:
            page = await self._call(self._jobs.ListJobs, request)
            for job in page.jobs:
                yield job
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def cancel_job(self, job_id: str, reason: str = "") -> job_pb2.Job:
        """A queued job is CANCELLED at once; a running one's handler is told to stop.
        ``FailedPrecondition`` when the job already finished."""
        request = job_service_pb2.CancelJobRequest(id=job_id, reason=reason)
        return (await self._call(self._jobs.CancelJob, request)).job

    async def pause_job(self, job_id: str, reason: str = "") -> job_pb2.Job:
        """A queued job is PAUSED at once; a running one is asked to checkpoint and stop. A
        pause uses none of the job's attempts."""
        request = job_service_pb2.PauseJobRequest(id=job_id, reason=reason)
        return (await self._call(self._jobs.PauseJob, request)).job

    async def resume_job(self, job_id: str) -> job_pb2.Job:
        """Makes a PAUSED job available; its next attempt starts from its last checkpoint."""
        request = job_service_pb2.ResumeJobRequest(id=job_id)
        return (await self._call(self._jobs.ResumeJob, request)).job

    async def retry_job(self, job_id: str) -> job_pb2.Job:
        """Runs a FAILED or CANCELLED job again with a fresh set of attempts."""
        request = job_service_pb2.RetryJobRequest(id=job_id)
        return (await self._call(self._jobs.RetryJob, request)).job

    async def approve_job(self, job_id: str, reason: str = "") -> job_pb2.Job:
        request = job_service_pb2.ApproveJobRequest(id=job_id, reason=reason)
        return (await self._call(self._jobs.ApproveJob, request)).job

    async def reject_job(self, job_id: str, reason: str = "") -> job_pb2.Job:
        request = job_service_pb2.RejectJobRequest(id=job_id, reason=reason)
        return (await self._call(self._jobs.RejectJob, request)).job

    async def signal_job(
        self,
        job_id: str,
        name: str,
        payload: Message | None = None,
        *,
        request_id: str | None = None,
    ) -> int:
        """Delivers a signal named ``name``, carrying ``payload`` if given (at most 16 KiB),
        to a job that has not ended; a handler waiting for it (``JobContext.wait_signal``)
        runs again with it. With a ``request_id``, a repeat of the call stores nothing more and
        answers as the first did. Returns the signal's place among the job's signals of its
        name (1 for the first). ``FailedPrecondition`` when the job has ended,
        ``ResourceExhausted`` when it holds 100 signals already."""
        request = job_service_pb2.SignalJobRequest(
            id=job_id, name=name, request_id=request_id or ""
        )
        if payload is not None:
            request.payload.CopyFrom(_codec.pack(payload))
        return (await self._call(self._jobs.SignalJob, request)).number

    # Watching.

    def watch_job(
        self, job_id: str, *, after_sequence: int = 0, include_children: bool = False
    ) -> JobEvents:
        """The job's events after ``after_sequence`` (0: its whole history), each once and in
        order across reconnects, ending after its terminal state change. With
        ``include_children``, the events of its children (``JobEvent.job_id`` tells them apart)
        come interleaved in order, and the stream still ends with the job's own end."""

        def open_stream(after: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
            request = job_service_pb2.WatchJobRequest(
                id=job_id, after_sequence=after, include_children=include_children
            )
            return self._jobs.WatchJob(request, metadata=self._metadata)

        async def finished() -> bool:
            request = job_service_pb2.GetJobRequest(id=job_id, view=job_pb2.JOB_VIEW_BASIC)
            job = (await self._jobs.GetJob(request, metadata=self._metadata)).job
            return JobState.parse(job.state).is_terminal

        return JobEvents(open_stream, after_sequence, ends_with=job_id, job_finished=finished)

    def watch_jobs(
        self,
        *,
        queue: str = "",
        job_type: str = "",
        states: Sequence[JobState] = (),
        labels: Mapping[str, str] | None = None,
        after_sequence: int = 0,
    ) -> JobEvents:
        """The events of every matching job, never ending by itself. With ``states`` set, only
        state changes into them come (no progress or logs)."""

        def open_stream(after: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
            request = job_service_pb2.WatchJobsRequest(
                queue=queue,
                job_type=job_type,
                states=[job_pb2.JobState.ValueType(s) for s in states],
                labels=dict(labels or {}),
                after_sequence=after,
            )
            return self._jobs.WatchJobs(request, metadata=self._metadata)

        async def never() -> bool:
            return False

        return JobEvents(open_stream, after_sequence, ends_with=None, job_finished=never)

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req
    ) -> Resp:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None


@dataclass
class JobHandle(Generic[O]):
    """A job on the server, remembering its output type so ``wait`` returns it typed.

    Cheap: only the id, the output class and the client. ``created`` is False when an
    idempotency key returned an existing job.
    """

    client: Client
    id: str
    output: type[O] | None
    created: bool = True

    async def get(self) -> job_pb2.Job:
        return await self.client.get_job(self.id)

    def watch(self, *, after_sequence: int = 0, include_children: bool = False) -> JobEvents:
        return self.client.watch_job(
            self.id, after_sequence=after_sequence, include_children=include_children
        )

    async def signal(
        self, name: str, payload: Message | None = None, *, request_id: str | None = None
    ) -> int:
        return await self.client.signal_job(self.id, name, payload, request_id=request_id)

    async def wait(self, timeout: float | None = None) -> O:
        """Waits until the job finishes and returns its typed output.

        Follows the job's events until its terminal state change; an unreachable or
        restarting server does not end the wait (the stream resumes), an error status about
        the job does. Raises ``JobFailed`` when the job ends FAILED or CANCELLED, and
        ``TimeoutError`` after ``timeout`` seconds.
        """
        if timeout is not None:
            return await asyncio.wait_for(self.wait(), timeout)
        events = self.watch()
        events.give_up_after = float("inf")
        try:
            async for event in events:
                if event.is_terminal:
                    assert isinstance(event.kind, StateChanged)
                    job = event.kind.job
                    if job is not None and (
                        JobState.parse(job.state) is not JobState.SUCCEEDED
                        or job.HasField("result")
                    ):
                        return self._outcome(job)
                    break
        except Unimplemented:
            log.debug("WatchJob is not offered; polling job %s", self.id)
        finally:
            await events.aclose()
        return await self._poll()

    async def cancel(self, reason: str = "") -> job_pb2.Job:
        return await self.client.cancel_job(self.id, reason)

    async def pause(self, reason: str = "") -> job_pb2.Job:
        return await self.client.pause_job(self.id, reason)

    async def resume(self) -> job_pb2.Job:
        return await self.client.resume_job(self.id)

    async def retry(self) -> job_pb2.Job:
        return await self.client.retry_job(self.id)

    def _outcome(self, job: job_pb2.Job) -> O:
        state = JobState.parse(job.state)
        if state in (JobState.FAILED, JobState.CANCELLED):
            raise JobFailed(job)
        if self.output is None:
            # A handle made without an output class is a JobHandle[Message].
            return cast(O, _codec.unpack_known(job.result, "job result"))
        return _codec.unpack(job.result, self.output, "job result")

    async def _poll(self) -> O:
        """Reads the job until it has finished, backing off from 10 ms to 500 ms; an
        unavailable server does not end it."""
        backoff = Backoff(_FIRST_POLL, _MAX_POLL, jitter=0.0)
        while True:
            try:
                job = await self.client.get_job(self.id, view=job_pb2.JOB_VIEW_BASIC)
                if JobState.parse(job.state).is_terminal:
                    return self._outcome(job)
            except RpcError as error:
                if not isinstance(error, Unavailable):
                    raise
            await asyncio.sleep(backoff.next_delay())


def _resolve(payload: Message, job_type: JobType[Any, Any] | str | None) -> JobType[Any, Any] | str:
    if job_type is not None:
        return job_type
    return JobType.of(type(payload))


def specs(
    payloads: Iterable[P],
    job_type: JobType[P, O],
    queue: str | None,
    priority: int | None,
    retry: RetryPolicy | None,
    labels: Mapping[str, str] | None,
    timeout: timedelta | float | None,
    recipe: Recipe | None,
    keys: Sequence[str] | None = None,
) -> list[job_service_pb2.JobSpec]:
    """The specs of a batch of one type with shared options (``enqueue_many``, and a handler's
    ``enqueue_children``), each with its key from ``keys`` when given."""
    batch = []
    for payload in payloads:
        spec = job_service_pb2.JobSpec(job_type=job_type.name)
        spec.payload.CopyFrom(_codec.pack(payload))
        _apply(spec, queue, priority, None, None, retry, None, labels, timeout)
        _apply_recipe(spec, recipe)
        batch.append(spec)
    if keys is not None:
        if isinstance(keys, str) or len(keys) != len(batch):
            raise ValueError(f"keys: {len(batch)} payloads need as many keys, one each")
        for spec, key in zip(batch, keys, strict=True):
            spec.idempotency_key = key
    return batch


def _apply_recipe(spec: job_service_pb2.JobSpec, recipe: Recipe | None) -> None:
    """Fills what the call left unset in ``spec`` from ``recipe``; run after ``_apply``, so the
    call's own settings win."""
    if recipe is None:
        return
    if not spec.queue and recipe.queue is not None:
        spec.queue = recipe.queue
    if not spec.HasField("priority") and recipe.priority is not None:
        spec.priority = recipe.priority
    if not spec.HasField("retry_policy") and recipe.retry is not None:
        spec.retry_policy.CopyFrom(recipe.retry.to_proto())
    if not spec.HasField("timeout") and recipe.timeout is not None:
        spec.timeout.CopyFrom(_codec.to_duration(recipe.timeout))
    for key, value in recipe.labels.items():
        # Not setdefault: reading a missing key of a protobuf map inserts it.
        if key not in spec.labels:
            spec.labels[key] = value
    spec.needs_approval = spec.needs_approval or recipe.needs_approval


def _apply(
    spec: job_service_pb2.JobSpec,
    queue: str | None,
    priority: int | None,
    delay: timedelta | float | None,
    run_at: datetime | None,
    retry: RetryPolicy | None,
    idempotency_key: str | None,
    labels: Mapping[str, str] | None,
    timeout: timedelta | float | None,
) -> None:
    """Sets the options of a spec; one function so that every enqueue builds them alike."""
    if queue is not None:
        spec.queue = queue
    if priority is not None:
        spec.priority = priority
    if delay is not None and run_at is not None:
        raise ValueError("give delay or run_at, not both")
    if delay is not None:
        spec.delay.CopyFrom(_codec.to_duration(delay))
    if run_at is not None:
        spec.run_at.CopyFrom(_codec.to_timestamp(run_at))
    if retry is not None:
        spec.retry_policy.CopyFrom(retry.to_proto())
    if idempotency_key is not None:
        spec.idempotency_key = idempotency_key
    if labels:
        spec.labels.update(labels)
    if timeout is not None:
        spec.timeout.CopyFrom(_codec.to_duration(timeout))
