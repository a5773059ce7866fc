"""Python producer to Python worker: results, retries, failures, bad input, JSON payloads,
listing, and the administration of queues and schedules."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import handlers
import harness
import pytest
import pytests_pb2 as pb

import jobwire

FAST_RETRY = jobwire.RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=50))


def echo_worker(
    server: harness.Server, worker_id: str = "py-worker", slots: int = 20
) -> jobwire.Worker:
    worker = jobwire.Worker(
        server.url, worker_id=worker_id, queues=["py", "default"], concurrency=slots
    )
    worker.register(handlers.ECHO, handlers.echo)
    return worker


async def test_two_hundred_jobs_return_their_results(
    server: harness.Server, client: jobwire.Client
) -> None:
    payloads = [pb.Echo(text=f"job {n}") for n in range(200)]
    handles = await client.enqueue_many(payloads[:100], job_type=handlers.ECHO)
    handles += await asyncio.gather(
        *(client.enqueue(p, job_type=handlers.ECHO) for p in payloads[100:])
    )
    async with harness.running(echo_worker(server)):
        results = await asyncio.gather(*(h.wait(timeout=60) for h in handles))
    assert [r.text for r in results] == [p.text for p in payloads]
    assert {r.worker for r in results} == {"py-worker"}
    assert all(r.attempt == 1 for r in results)


async def test_a_retryable_failure_is_retried(
    server: harness.Server, client: jobwire.Client
) -> None:
    handle = await client.enqueue(
        pb.Echo(text="again", fail_times=2, kind="flaky"), job_type=handlers.ECHO, retry=FAST_RETRY
    )
    async with harness.running(echo_worker(server)):
        result = await handle.wait(timeout=30)
    assert (result.text, result.attempt) == ("again", 3)
    job = await handle.get()
    assert [a.outcome for a in job.attempts] == [
        jobwire.v1.job_pb2.ATTEMPT_OUTCOME_FAILED,
        jobwire.v1.job_pb2.ATTEMPT_OUTCOME_FAILED,
        jobwire.v1.job_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    ]
    assert job.attempts[0].error.kind == "flaky"
    assert job.attempts[0].error.retryable


async def test_a_non_retryable_failure_fails_the_job_at_once(
    server: harness.Server, client: jobwire.Client
) -> None:
    handle = await client.enqueue(
        pb.Echo(fail_times=9, fatal=True, kind="bad_input"),
        job_type=handlers.ECHO,
        retry=FAST_RETRY,
    )
    async with harness.running(echo_worker(server)):
        with pytest.raises(jobwire.JobFailed) as failed:
            await handle.wait(timeout=30)
    assert failed.value.state is jobwire.JobState.FAILED
    assert failed.value.last_error is not None
    assert failed.value.last_error.kind == "bad_input"
    assert not failed.value.last_error.retryable
    assert failed.value.job.attempt == 1
    assert "attempt 1 failed" in str(failed.value)


async def test_bad_input_names_the_field(client: jobwire.Client) -> None:
    with pytest.raises(jobwire.InvalidArgument) as refused:
        await client.enqueue(pb.Echo(), job_type=handlers.ECHO, priority=500)
    fields = [v.field for v in refused.value.violations]
    assert fields == ["job.priority"], refused.value
    assert "priority" in refused.value.message
    with pytest.raises(jobwire.NotFound):
        await client.get_job("0191f3c0-0000-7000-8000-000000000000")
    with pytest.raises(jobwire.InvalidArgument):
        await client.get_job("not-a-uuid")


async def test_a_registered_type_takes_json_and_lists_in_pages(
    server: harness.Server, client: jobwire.Client
) -> None:
    async with harness.running(echo_worker(server)):
        # The worker registers the schema of py.echo when it connects.
        async def registered() -> bool | None:
            try:
                await client.enqueue_json("py.echo", {"text": "probe"})
            except jobwire.RpcError:
                return None
            return True

        await harness.eventually(registered)
        handle = await client.enqueue_json("py.echo", {"text": "from json"})
        result = await handle.wait(timeout=30)
        assert isinstance(result, pb.EchoResult)
        assert result.text == "from json"
        with pytest.raises(jobwire.InvalidArgument) as refused:
            await client.enqueue_json("py.echo", {"txet": "typo"})
        assert "txet" in str(refused.value)

    jobs = [job async for job in client.list_jobs(job_type="py.echo", page_size=1)]
    assert handle.id in {job.id for job in jobs}
    assert len(jobs) == 2
    assert all(job.queue == "py" for job in jobs), "the type's default queue applies"


async def test_idempotency_keys_return_the_first_job(client: jobwire.Client) -> None:
    first = await client.enqueue(pb.Echo(text="once"), idempotency_key="k-1")
    again = await client.enqueue(pb.Echo(text="once"), idempotency_key="k-1")
    assert (first.created, again.created) == (True, False)
    assert again.id == first.id
    # The key with another payload is refused, naming the first job, unless accepted.
    with pytest.raises(jobwire.AlreadyExists) as refused:
        await client.enqueue(pb.Echo(text="twice"), idempotency_key="k-1")
    assert first.id in str(refused.value)
    accepted = await client.enqueue(
        pb.Echo(text="twice"), idempotency_key="k-1", accept_existing=True
    )
    assert (accepted.id, accepted.created) == (first.id, False)


async def test_queues_and_schedules_are_administered(client: jobwire.Client) -> None:
    queue = await client.queues.update(
        "downloads",
        concurrency_limit=4,
        rate_limit=jobwire.RateLimit(2.5, burst=5),
        create_if_missing=True,
    )
    assert (queue.concurrency_limit, queue.rate_limit.burst) == (4, 5)
    queue = await client.queues.pause("downloads", "mirror down")
    assert queue.paused and queue.pause_reason == "mirror down"
    queue = await client.queues.resume("downloads")
    assert not queue.paused
    queue = await client.queues.update("downloads", concurrency_limit=None)
    assert not queue.HasField("concurrency_limit")
    assert "downloads" in [q.name async for q in client.queues.list()]
    with pytest.raises(jobwire.NotFound):
        await client.queues.get("never-used")

    schedule = await client.schedules.create(
        "nightly",
        "0 3 * * *",
        pb.Echo(text="tick"),
        time_zone="Europe/Berlin",
        overlap=jobwire.OverlapPolicy.SKIP,
    )
    assert schedule.next_run_at.seconds > 0
    with pytest.raises(jobwire.AlreadyExists):
        await client.schedules.create("nightly", "0 3 * * *", pb.Echo())
    schedule = await client.schedules.update("nightly", cron="30 4 * * *")
    assert schedule.cron == "30 4 * * *"
    job = await client.schedules.trigger("nightly")
    assert job.job_type == "py.echo"
    assert (await client.schedules.pause("nightly")).paused
    assert not (await client.schedules.resume("nightly")).paused
    assert [s.name async for s in client.schedules.list()] == ["nightly"]
    await client.schedules.delete("nightly")
    with pytest.raises(jobwire.NotFound):
        await client.schedules.get("nightly")
