"""The Python SDK against the Rust SDK, with typed results both ways: a Python producer's job
run by the Rust test worker, and the Rust quickstart example's job run by a Python worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import harness
import interop_tests_pb2 as rust_tests
import jobwire_examples_pb2 as examples
import pytest

import jobwire

SLEEP = jobwire.JobType("test.sleep", rust_tests.Sleep, rust_tests.SleepOutput)
RESIZE = jobwire.JobType("image.resize", examples.Resize, examples.ResizeOutput)


def rust_binary(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: scripts/test-python builds it")
    return path


async def test_a_rust_worker_runs_a_python_producers_job(
    server: harness.Server, client: jobwire.Client, workdir: Path
) -> None:
    binary = rust_binary(harness.RUST_BIN_DIR / "test-worker")
    env = {"JOBWIRE_URL": server.url, "WORKER_ID": "rust-worker", "CONCURRENCY": "2"}
    rust = harness.WorkerProcess([str(binary)], env, workdir / "rust-worker.log")
    try:
        handle = await client.enqueue(
            rust_tests.Sleep(millis=10, fail_times=1, seq=42),
            job_type=SLEEP,
            retry=jobwire.RetryPolicy(max_attempts=3, initial_backoff=0.05),
        )
        output = await handle.wait(timeout=60)
        assert isinstance(output, rust_tests.SleepOutput)
        assert (output.seq, output.attempt, output.worker) == (42, 2, "rust-worker")

        fatal = await client.enqueue(rust_tests.Sleep(fail_times=1, fatal=True), job_type=SLEEP)
        with pytest.raises(jobwire.JobFailed) as failed:
            await fatal.wait(timeout=60)
        assert failed.value.last_error is not None
        assert not failed.value.last_error.retryable
    finally:
        rust.kill()


async def test_a_python_worker_runs_a_rust_producers_job(
    server: harness.Server, workdir: Path
) -> None:
    quickstart = rust_binary(harness.RUST_BIN_DIR / "examples" / "quickstart")
    seen: list[examples.Resize] = []

    async def resize(ctx: jobwire.JobContext, job: examples.Resize) -> examples.ResizeOutput:
        seen.append(job)
        ctx.progress(1.0, message="resized")
        return examples.ResizeOutput(
            url=job.url + "?w=320", width=job.width, height=job.width * 3 // 4
        )

    worker = jobwire.Worker(server.url, worker_id="py-resizer")
    worker.register(RESIZE, resize)
    async with harness.running(worker):
        producer = await asyncio.create_subprocess_exec(
            str(quickstart),
            env={"JOBWIRE_URL": server.url, "JOBWIRE_WAIT_SECS": "60", "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(producer.communicate(), 90)
    assert producer.returncode == 0, stderr.decode(errors="replace")
    assert [job.width for job in seen] == [320]
    # The Rust producer decoded the Python worker's typed result.
    assert "resized to 320x240: https://example.com/cat.png?w=320" in stdout.decode()
