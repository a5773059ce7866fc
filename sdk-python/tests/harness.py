"""The test harness: real PostgreSQL, the real server binary, real worker processes.

Nothing is a fake. Conventions mirror the Rust tests (tests/src/lib.rs) and scripts/test:

- ``DATABASE_URL`` set: each test database is created on that server (its user needs
  CREATEDB) and dropped afterwards. Unset: on a private cluster in ``JOBWIRE_TEST_PG_DIR`` (by
  default a temporary directory), which the harness has ``jobwire-server --data-dir`` start,
  since the server's embedded PostgreSQL is the same code the Rust harness uses. A cluster
  found running there (the Rust tests leave theirs for the next test binary) is reused and
  left running; one the harness started is stopped at the end.
- The server binary is ``JOBWIRE_SERVER_BIN``, by default ``<repo>/target/debug/jobwire-server``;
  the Rust test worker and the Rust quickstart example come from the same directory.
- Each server prints ``jobwire-server listening on <addr>`` once it serves; its stderr goes to a
  file whose tail is printed when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

import jobwire

REPO = Path(__file__).resolve().parents[2]
SDK = REPO / "sdk-python"
SERVER_BIN = Path(
    os.environ.get("JOBWIRE_SERVER_BIN") or REPO / "target" / "debug" / "jobwire-server"
)
RUST_BIN_DIR = SERVER_BIN.parent
READY_PREFIX = "jobwire-server listening on "
READY_TIMEOUT = 60.0
#: Leases that lapse quickly, for tests of workers that die.
SHORT_LEASES = {"--lease-duration": "2s", "--heartbeat-interval": "500ms"}
#: Settings that make the server's loops quick to react. Leases stay long enough that a test
#: process stalled by a loaded machine keeps them; fault tests shorten them.
FAST = {
    "--lease-duration": "10s",
    "--heartbeat-interval": "1s",
    "--reap-interval": "200ms",
    "--poll-interval": "200ms",
    "--stop-grace": "3s",
}

T = TypeVar("T")


class Postgres:
    """Where test databases are created."""

    def __init__(self, workdir: Path) -> None:
        self._bootstrap: subprocess.Popen[bytes] | None = None
        self._reused = False
        url = os.environ.get("DATABASE_URL")
        if url:
            self._admin = url
            self._kind = "external"
            return
        self._kind = "private"
        data_dir = Path(os.environ.get("JOBWIRE_TEST_PG_DIR") or workdir / "pg")
        self._reused = _postmaster(data_dir) is not None
        # The server's embedded PostgreSQL starts (or reuses) the cluster, then serves; its
        # ready line comes after the cluster is up.
        self._bootstrap, _ = start_process(
            [str(SERVER_BIN), "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
            workdir / "bootstrap-server.log",
            env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        )
        postmaster = _postmaster(data_dir)
        if postmaster is None:
            raise RuntimeError(f"no PostgreSQL running in {data_dir} after the server started it")
        self._socket_dir, self._port = postmaster
        self._admin = f"host={self._socket_dir} port={self._port} user=postgres dbname=postgres"

    def create(self) -> tuple[str, str]:
        """A fresh database: its name and the URL to give the server."""
        name = f"jobwire_py_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        if self._kind == "external":
            parts = urlsplit(self._admin)
            return name, urlunsplit(parts._replace(path=f"/{name}"))
        host = quote(self._socket_dir, safe="")
        return name, f"postgres://postgres@localhost/{name}?host={host}&port={self._port}"

    def drop(self, name: str) -> None:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())

    def close(self) -> None:
        if self._bootstrap is None:
            return
        # SIGTERM stops the cluster along with the server; SIGKILL leaves a reused one running,
        # as found, for whoever started it.
        self._bootstrap.send_signal(signal.SIGKILL if self._reused else signal.SIGTERM)
        self._bootstrap.wait(60)


def _postmaster(data_dir: Path) -> tuple[str, int] | None:
    """The socket directory and port of the cluster running in ``data_dir``, if one is."""
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4]
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return socket_dir, port


def start_process(
    args: list[str], log: Path, *, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts a server and waits for its ready line; returns it and the address it printed."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True
        )
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith(READY_PREFIX):
                    selector.close()
                    return process, line[len(READY_PREFIX) :].strip()
        elif process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"{args[0]} did not get ready; its log:\n{tail(log)}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """A jobwire-server on a loopback port with a database of its own."""

    def __init__(self, pg: Postgres, workdir: Path, args: list[str]) -> None:
        self._pg = pg
        self.db, database_url = pg.create()
        self.log = workdir / f"server-{self.db}.log"
        self._args = ["--database-url", database_url, *args]
        self.process, self.addr = start_process(
            [str(SERVER_BIN), "--listen", "127.0.0.1:0", *self._args], self.log
        )
        self.url = f"http://{self.addr}"

    def crash(self) -> None:
        """SIGKILL: no drain, no goodbye to the workers' streams."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Starts the server again on the same address and database."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.process, _ = start_process(
                    [str(SERVER_BIN), "--listen", self.addr, *self._args], self.log
                )
                return
            except RuntimeError:
                # The old socket may hold the port for a moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pg.drop(self.db)


class WorkerProcess:
    """The Python test worker (tests/worker_app.py) or the Rust one, as a process a test can
    SIGKILL or SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )

    @classmethod
    def python(
        cls,
        url: str,
        worker_id: str,
        workdir: Path,
        concurrency: int = 4,
        *,
        prefetch: int = 0,
        queued_wait: float | None = None,
        items_log: Path | None = None,
    ) -> WorkerProcess:
        env = {
            "JOBWIRE_URL": url,
            "WORKER_ID": worker_id,
            "CONCURRENCY": str(concurrency),
            "PREFETCH": str(prefetch),
            "PYTHONUNBUFFERED": "1",
        }
        if queued_wait is not None:
            env["QUEUED_WAIT"] = str(queued_wait)
        if items_log is not None:
            env["ITEMS_LOG"] = str(items_log)
        app = str(SDK / "tests" / "worker_app.py")
        return cls([sys.executable, app], env, workdir / f"worker-{worker_id}.log")

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker did not exit within {timeout}s:\n{tail(self.log)}")
            await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 30.0) -> T:
    """Polls ``check`` until it returns a value; for state with no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        await asyncio.sleep(0.05)


async def until_running(
    client: jobwire.Client, job_id: str, worker_id: str | None = None
) -> jobwire.JobEvent:
    """Follows the job's events until an attempt starts (on ``worker_id``, if given)."""
    async with client.watch_job(job_id) as events:
        async for event in events:
            kind = event.kind
            if (
                isinstance(kind, jobwire.StateChanged)
                and kind.state is jobwire.JobState.RUNNING
                and (worker_id is None or kind.worker_id == worker_id)
            ):
                return event
    raise AssertionError(f"job {job_id} ended without running on {worker_id}")


async def until_logged(client: jobwire.Client, job_id: str, message: str) -> jobwire.JobEvent:
    """Follows the job's events until its handler logs ``message``."""
    async with client.watch_job(job_id) as events:
        async for event in events:
            if isinstance(event.kind, jobwire.LogLine) and event.kind.message == message:
                return event
    raise AssertionError(f"job {job_id} ended without logging {message!r}")


@contextlib.contextmanager
def logged(prefix: str, containing: str = "") -> Iterator[asyncio.Event]:
    """An event set when the SDK logs a message starting with ``prefix`` (and containing
    ``containing``): how a test learns what the worker noticed, such as a broken stream."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(prefix) and containing in message:
                seen.set()

    handler = Watch()
    logger = logging.getLogger("jobwire")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.asynccontextmanager
async def running(worker: jobwire.Worker) -> AsyncIterator[jobwire.Worker]:
    """Runs an in-process worker for the block's length, then drains it."""
    task = asyncio.ensure_future(worker.run(handle_signals=False))
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
