"""The SDK's composition features against the real server: item-based jobs resumed from their
first unfinished item after their worker process is SIGKILLed, retry predicates deciding from
the handler's exception, recipes applied to many job types, a parent fanning out to children
and resuming once they ended, and handlers waiting for signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import handlers
import harness
import pytest
import pytests_pb2 as pb

import jobwire
from jobwire.client import specs

COUNT = 10
HANG_AT = 6
FAILING = (2, 8)


def _runs(log: Path, job_id: str) -> list[tuple[int, int, str, str]]:
    """(item, attempt, phase, worker) of every recorded run of the job's items, sorted."""
    if not log.exists():
        return []
    runs = []
    for line in log.read_text().splitlines():
        job, item, attempt, phase, worker = line.split()
        if job == job_id:
            runs.append((int(item), int(attempt), phase, worker))
    return sorted(runs)


async def test_an_item_job_resumes_from_its_first_unfinished_item_after_a_sigkill(
    start_server: Callable[..., harness.Server], workdir: Path
) -> None:
    server = start_server(harness.SHORT_LEASES)
    log = workdir / f"items-{server.db}.log"
    async with await jobwire.Client.connect(server.url) as client:
        handle = await client.enqueue(
            pb.ItemBatch(count=COUNT, hangs=True, hang_at=HANG_AT, fail=FAILING),
            job_type=handlers.ITEMS,
            retry=jobwire.RetryPolicy(max_attempts=5, initial_backoff=0.05),
        )
        victim = harness.WorkerProcess.python(server.url, "py-victim", workdir, items_log=log)
        try:
            # It hangs in item 6 once items 0 to 5 finished and their checkpoint was stored
            # (the next item starts only after the server has it).
            async def hanging() -> bool | None:
                runs = _runs(log, handle.id)
                return True if (HANG_AT, 1, "hang", "py-victim") in runs else None

            await harness.eventually(hanging, timeout=60)

            # Progress is counted in items: 6 of 10.
            async def six_done() -> jobwire.v1.job_pb2.Progress | None:
                job = await client.get_job(handle.id)
                return job.progress if job.progress.items_done == HANG_AT else None

            progress = await harness.eventually(six_done, timeout=60)
            assert progress.items_total == COUNT
            assert progress.message == "1 failed"
            victim.signal(signal.SIGKILL)
            assert await victim.wait(10) == -signal.SIGKILL
        finally:
            victim.kill()

        rescuer = harness.WorkerProcess.python(server.url, "py-rescuer", workdir, items_log=log)
        try:
            output = await handle.wait(timeout=60)
        finally:
            rescuer.kill()
        job = await client.get_job(handle.id)

    expected = []
    for item in range(COUNT):
        attempt, worker = (1, "py-victim") if item < HANG_AT else (2, "py-rescuer")
        if item == HANG_AT:
            expected.append((item, 1, "hang", "py-victim"))
        expected.append((item, attempt, "fail" if item in FAILING else "done", worker))
    assert _runs(log, handle.id) == expected, "items before 6 ran exactly once"

    results = jobwire.ItemResults.from_message(output)
    assert (len(results), results.done_count, results.failed_count) == (COUNT, 8, 2)
    for index, outcome in enumerate(results.outcomes):
        if index in FAILING:
            assert not outcome.done
            assert (outcome.error, outcome.kind) == (f"item {index} failed as asked", "item_fail")
        else:
            run = outcome.output_as(pb.ItemRun)
            assert run is not None
            assert (run.index, run.attempt) == (index, 1 if index < HANG_AT else 2)
    assert job.state == jobwire.v1.job_pb2.JOB_STATE_SUCCEEDED
    assert (job.progress.items_done, job.progress.items_total) == (COUNT, COUNT)


async def test_items_can_fail_the_job_and_resume_in_process(
    server: harness.Server, client: jobwire.Client, workdir: Path
) -> None:
    """Under FAIL_JOB, a non-retryable item fails the job, its message naming the item; the
    items before it keep their outcomes in the checkpoint."""
    log = workdir / f"items-fail-{server.db}.log"
    handle = await client.enqueue(
        pb.ItemBatch(count=5, fail=[3]),
        job_type=handlers.ITEMS,
        retry=jobwire.RetryPolicy(max_attempts=3, initial_backoff=0.05),
    )
    worker = jobwire.Worker(server.url, worker_id="py-items")
    worker.register_items(
        handlers.ITEMS,
        handlers.batch_items,
        handlers.item_runner(log),
        options=jobwire.ItemOptions(on_failure=jobwire.OnItemFailure.FAIL_JOB),
    )
    async with harness.running(worker):
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=30)
    assert failed.value.last_error is not None
    assert failed.value.last_error.message == "item 3: item 3 failed as asked"
    assert failed.value.last_error.kind == "item_fail"
    assert failed.value.job.attempts_counted == 1
    assert [(item, phase) for item, _, phase, _ in _runs(log, handle.id)] == [
        (0, "done"),
        (1, "done"),
        (2, "done"),
        (3, "fail"),
    ]
    assert failed.value.job.has_checkpoint


class HttpError(Exception):
    """An HTTP client's error, as a handler would get it from its client library."""

    def __init__(self, status: int) -> None:
        super().__init__(f"GET https://example.com/item answered {status}")
        self.status = status


def http(error: Exception) -> jobwire.RetryDecision | None:
    if isinstance(error, HttpError):
        return jobwire.RetryDecision(error.status >= 500, kind=f"http_{error.status // 100}xx")
    return None


async def fetch(ctx: jobwire.JobContext, job: pb.Echo) -> pb.EchoResult:
    if ctx.attempt <= job.fail_times:
        raise HttpError(int(job.text))
    return pb.EchoResult(text=job.text, attempt=ctx.attempt, worker=ctx.worker_id)


async def test_a_retry_predicate_retries_a_5xx_and_fails_a_4xx_at_once(
    server: harness.Server, client: jobwire.Client
) -> None:
    retry = jobwire.RetryPolicy(max_attempts=5, initial_backoff=0.05)
    flaky = await client.enqueue(
        pb.Echo(text="503", fail_times=2), job_type=handlers.ECHO, retry=retry
    )
    missing = await client.enqueue(
        pb.Echo(text="404", fail_times=5), job_type=handlers.ECHO, retry=retry
    )
    # Steps has no predicate of its own: the worker's (every failure fatal) decides.
    other = await client.enqueue(
        pb.Steps(steps=1, step_millis=1), job_type=handlers.STEPS, retry=retry
    )

    async def failing_steps(ctx: jobwire.JobContext, job: pb.Steps) -> pb.StepsResult:
        raise jobwire.Retryable("retryable by the handler's word")

    worker = jobwire.Worker(
        server.url,
        queues=["py", "default"],
        retry_if=lambda error: jobwire.RetryDecision(False, kind="worker_wide"),
    )
    worker.register(handlers.ECHO, fetch, retry_if=http)
    worker.register(handlers.STEPS, failing_steps)
    async with harness.running(worker):
        result = await flaky.wait(timeout=30)
        with pytest.raises(jobwire.JobFailed) as failed:
            await missing.wait(timeout=30)
        with pytest.raises(jobwire.JobFailed) as other_failed:
            await other.wait(timeout=30)

    assert result.attempt == 3
    job = await flaky.get()
    assert job.attempts_counted == 3
    assert job.last_error.kind == "http_5xx"
    assert job.last_error.message == "HttpError: GET https://example.com/item answered 503"

    assert failed.value.state is jobwire.JobState.FAILED
    assert failed.value.job.attempts_counted == 1, "a 4xx is not retried"
    assert failed.value.last_error is not None
    assert failed.value.last_error.kind == "http_4xx"
    assert not failed.value.last_error.retryable

    assert other_failed.value.job.attempts_counted == 1
    assert other_failed.value.last_error is not None
    assert other_failed.value.last_error.kind == "worker_wide"


async def test_a_recipe_gives_many_job_types_its_settings_and_a_call_overrides_it(
    client: jobwire.Client,
) -> None:
    recipe = jobwire.Recipe(
        queue="backups",
        priority=30,
        retry=jobwire.RetryPolicy(max_attempts=7),
        labels={"team": "storage", "tier": "gold"},
        timeout=timedelta(minutes=10),
        needs_approval=True,
    )
    echo = await client.enqueue(pb.Echo(text="a"), job_type=handlers.ECHO, recipe=recipe)
    steps = await client.enqueue(pb.Steps(steps=1), job_type=handlers.STEPS, recipe=recipe)
    for handle in (echo, steps):
        job = await handle.get()
        assert job.queue == "backups", job.job_type
        assert job.priority == 30
        assert job.retry_policy.max_attempts == 7
        assert job.timeout.ToTimedelta() == timedelta(minutes=10)
        assert job.state == jobwire.v1.job_pb2.JOB_STATE_AWAITING_APPROVAL
        assert dict(job.labels) == {"team": "storage", "tier": "gold"}

    overridden = await client.enqueue(
        pb.Echo(text="b"),
        job_type=handlers.ECHO,
        recipe=recipe,
        queue="urgent",
        priority=90,
        retry=jobwire.RetryPolicy(max_attempts=1),
        labels={"tier": "silver", "ticket": "42"},
    )
    job = await overridden.get()
    assert (job.queue, job.priority, job.retry_policy.max_attempts) == ("urgent", 90, 1)
    assert job.timeout.ToTimedelta() == timedelta(minutes=10), "kept from the recipe"
    assert dict(job.labels) == {"team": "storage", "tier": "silver", "ticket": "42"}

    plain = await (await client.enqueue(pb.Echo(text="c"), job_type=handlers.ECHO)).get()
    assert plain.queue == "default"
    assert dict(plain.labels) == {}
    assert plain.state == jobwire.v1.job_pb2.JOB_STATE_AVAILABLE


FAN_OUT = jobwire.JobType.of(pb.FanOut, pb.FanOutResult)
SQUARE = jobwire.JobType.of(pb.Square, pb.SquareResult)
AWAIT_SIGNALS = jobwire.JobType.of(pb.AwaitSignals, pb.SignalTexts)


def fan_out(
    runs: list[tuple[int, bool]],
) -> Callable[[jobwire.JobContext, pb.FanOut], Awaitable[pb.FanOutResult]]:
    """The parent: records each run's (attempt, children_ended) in ``runs``."""

    async def run(ctx: jobwire.JobContext, job: pb.FanOut) -> pb.FanOutResult:
        runs.append((ctx.attempt, ctx.children_ended))
        if not ctx.children_ended:
            half = job.count // 2
            # Two calls, so the default keys number the second call's children after the first's;
            # the second names its children's keys but for its last, which takes the default.
            await ctx.enqueue_children([pb.Square(n=n) for n in range(half)], job_type=SQUARE)
            await ctx.enqueue_children(
                [pb.Square(n=n) for n in range(half, job.count)],
                job_type=SQUARE,
                keys=[f"square-{n}" for n in range(half, job.count - 1)] + [""],
            )
            raise ctx.wait_for_children()
        total = 0
        children = await ctx.children()
        for child in children:
            assert child.state == jobwire.v1.job_pb2.JOB_STATE_SUCCEEDED, child
            result = pb.SquareResult()
            assert child.result.Unpack(result)
            total += result.squared
        return pb.FanOutResult(sum=total, children=len(children))

    return run


def squarer(
    seen: set[str], both: asyncio.Event
) -> Callable[[jobwire.JobContext, pb.Square], Awaitable[pb.SquareResult]]:
    """A child: waits until children run on two workers (the first children block until the
    second worker takes one, so both workers provably share them), then squares."""

    async def run(ctx: jobwire.JobContext, job: pb.Square) -> pb.SquareResult:
        seen.add(ctx.worker_id)
        if len(seen) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 30)
        return pb.SquareResult(squared=job.n * job.n, worker=ctx.worker_id)

    return run


async def test_a_parent_fans_out_to_children_on_two_workers_and_aggregates_them_once(
    server: harness.Server, client: jobwire.Client
) -> None:
    count = 20
    runs: list[tuple[int, bool]] = []
    seen: set[str] = set()
    both = asyncio.Event()
    workers = []
    for worker_id in ("py-a", "py-b"):
        worker = jobwire.Worker(
            server.url, queues=["py", "default"], concurrency=2, worker_id=worker_id
        )
        worker.register(FAN_OUT, fan_out(runs))
        worker.register(SQUARE, squarer(seen, both))
        workers.append(worker)
    parent = await client.enqueue(pb.FanOut(count=count), job_type=FAN_OUT)
    async with harness.running(workers[0]), harness.running(workers[1]):
        output = await parent.wait(timeout=60)

    assert (output.sum, output.children) == (sum(n * n for n in range(count)), count)
    assert [ended for _, ended in runs] == [False, True], "resumed once, with children_ended"
    job = await parent.get()
    assert job.attempts_counted == 1, "the attempt that waited does not count"
    assert (job.children.total, job.children.succeeded, job.children.unfinished) == (
        count,
        count,
        0,
    )

    children = [child async for child in client.list_jobs(parent_id=parent.id)]
    assert len(children) == count
    assert {child.parent_id for child in children} == {parent.id}
    half = count // 2
    assert {child.idempotency_key for child in children} == (
        {f"{parent.id}/child/{n}" for n in range(half)}
        | {f"square-{n}" for n in range(half, count - 1)}
        | {f"{parent.id}/child/{count - 1}"}
    )
    ran_on = set()
    for child in children:
        result = pb.SquareResult()
        assert child.result.Unpack(result)
        ran_on.add(result.worker)
    assert ran_on == {"py-a", "py-b"}

    # The family's events: every child's, and the stream ends with the parent's own end.
    async with parent.watch(include_children=True) as events:
        family = [event async for event in events]
    assert {event.job_id for event in family} == {parent.id} | {child.id for child in children}
    assert family[-1].job_id == parent.id and family[-1].is_terminal


async def await_signals(ctx: jobwire.JobContext, job: pb.AwaitSignals) -> pb.SignalTexts:
    timeout = job.timeout_millis / 1000 if job.timeout_millis else None
    texts = []
    for _ in range(job.count):
        payload = ctx.wait_signal(job.name, timeout).payload_as(pb.Echo)
        texts.append(payload.text if payload is not None else "")
    return pb.SignalTexts(texts=texts, attempt=ctx.attempt)


async def test_a_handler_waits_for_signals_the_client_sends(
    server: harness.Server, client: jobwire.Client
) -> None:
    handle = await client.enqueue(pb.AwaitSignals(name="go", count=2), job_type=AWAIT_SIGNALS)
    # A predicate that makes every failure fatal: a wait is no failure, so it never sees one.
    worker = jobwire.Worker(server.url, queues=["py", "default"], retry_if=lambda error: False)
    worker.register(AWAIT_SIGNALS, await_signals)
    async with harness.running(worker):

        async def waiting() -> jobwire.v1.job_pb2.Job | None:
            job = await handle.get()
            return job if job.awaiting_signal == "go" else None

        job = await harness.eventually(waiting)
        assert job.state == jobwire.v1.job_pb2.JOB_STATE_PENDING
        assert await handle.signal("go", pb.Echo(text="first"), request_id="r1") == 1
        assert await client.signal_job(handle.id, "go", pb.Echo(text="first"), request_id="r1") == 1
        assert await client.signal_job(handle.id, "other") == 1
        assert await client.signal_job(handle.id, "go", pb.Echo(text="second")) == 2
        output = await handle.wait(timeout=60)

    assert list(output.texts) == ["first", "second"], "a repeated request id stored nothing"
    job = await handle.get()
    assert job.attempts_counted == 1, "the attempts that waited do not count"
    assert output.attempt == job.attempt
    async with handle.watch() as events:
        received = [e.kind.name async for e in events if isinstance(e.kind, jobwire.SignalReceived)]
    assert received == ["go", "other", "go"]


async def test_a_signal_wait_that_times_out_fails_the_resumed_attempt(
    server: harness.Server, client: jobwire.Client
) -> None:
    handle = await client.enqueue(
        pb.AwaitSignals(name="never", count=1, timeout_millis=1000),
        job_type=AWAIT_SIGNALS,
        retry=jobwire.RetryPolicy(max_attempts=1),
    )
    worker = jobwire.Worker(server.url, queues=["py", "default"])
    worker.register(AWAIT_SIGNALS, await_signals)
    async with harness.running(worker):
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=60)
    assert failed.value.last_error is not None
    assert failed.value.last_error.kind == "signal_timeout"
    assert failed.value.last_error.message == "waiting for signal never timed out"
    assert failed.value.last_error.retryable
    assert failed.value.job.attempts_counted == 1, "only the resumed attempt counts"


def test_a_batchs_keys_go_one_to_each_payload_or_are_refused() -> None:
    payloads = [pb.Square(n=n) for n in range(3)]
    batch = specs(payloads, SQUARE, None, None, None, None, None, None, ["a", "", "c"])
    assert [spec.idempotency_key for spec in batch] == ["a", "", "c"]
    for keys in (["a", "b"], "abc"):
        with pytest.raises(ValueError, match="keys"):
            specs(payloads, SQUARE, None, None, None, None, None, None, keys)


def test_item_results_have_the_rust_sdks_bytes() -> None:
    """The same bytes as jobwire::items::ItemResults (its unit test pins them too), so either
    SDK reads the other's results and checkpoints."""
    results = jobwire.ItemResults(
        (jobwire.ItemOutcome(output=b""), jobwire.ItemOutcome(error="gone", kind="http_4xx"))
    )
    data = results.to_message().SerializeToString()
    assert data == b"\x0a\x02\x0a\x00\x0a\x12\x12\x10\x0a\x04gone\x12\x08http_4xx"
    assert jobwire.ItemResults.parse(data) == results


def test_a_retry_decision_may_be_a_bool_or_keep_the_handlers_own() -> None:
    from jobwire import retry

    error = jobwire.Retryable("slow down", kind="rate_limited", retry_after=timedelta(seconds=3))
    fatal = retry.decide(lambda _: False, error)
    assert fatal is not None
    assert (fatal.retryable, fatal.kind, fatal.retry_after) == (
        False,
        "rate_limited",
        timedelta(seconds=3),
    )
    assert retry.decide(lambda _: None, error) is None
    assert retry.decide(None, error) is None
    plain = retry.decide(lambda _: jobwire.RetryDecision(True, kind="io"), OSError("disk"))
    assert plain is not None
    assert (plain.retryable, plain.kind, plain.message) == (True, "io", "OSError: disk")


def test_checkpoints_fall_due_by_count_or_time() -> None:
    from jobwire.items import _Saved

    saved = _Saved(3)
    assert not saved.is_due(jobwire.ItemOptions(), 3), "nothing unsaved"
    assert saved.is_due(jobwire.ItemOptions(), 4)
    every_ten = jobwire.ItemOptions(checkpoint_every=10)
    assert not saved.is_due(every_ten, 12)
    assert saved.is_due(every_ten, 13)
    timed = jobwire.ItemOptions(checkpoint_every=10, checkpoint_interval=0.0)
    assert saved.is_due(timed, 4)
    assert not saved.is_due(timed, 3)
