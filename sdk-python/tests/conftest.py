"""Fixtures: a PostgreSQL for the run, a fresh server (and database) per test, clients and
in-process workers. See harness.py for the conventions."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import stubs

sys.path.insert(0, str(stubs.generate()))

import harness  # noqa: E402

import jobwire  # noqa: E402


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jobwire-pytest-"))
    # The private cluster's `postgres` user must reach its data directory inside.
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(workdir: Path) -> Iterator[harness.Postgres]:
    if not harness.SERVER_BIN.exists():
        pytest.exit(f"no server binary at {harness.SERVER_BIN}: run scripts/test-python", 2)
    postgres = harness.Postgres(workdir)
    yield postgres
    postgres.close()


@pytest.fixture
def start_server(
    pg: harness.Postgres, workdir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., harness.Server]]:
    """Starts servers with the fast settings plus any given; stops them after the test and
    prints their log tails when it failed."""
    servers: list[harness.Server] = []

    def start(*args: str) -> harness.Server:
        server = harness.Server(pg, workdir, [*harness.FAST, *args])
        servers.append(server)
        return server

    yield start
    failed = getattr(request.node, "rep_call", None)
    for server in servers:
        if failed is not None and failed.failed:
            print(f"--- {server.log.name}\n{harness.tail(server.log)}")
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., harness.Server]) -> harness.Server:
    return start_server()


@pytest.fixture
async def client(server: harness.Server) -> AsyncIterator[jobwire.Client]:
    async with await jobwire.Client.connect(server.url) as connected:
        yield connected


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
