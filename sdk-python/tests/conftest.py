"""Fixtures: a PostgreSQL for the run, a fresh server (and database) per test, clients and
in-process workers. See harness.py for the conventions."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest
import stubs

sys.path.insert(0, str(stubs.generate()))

import harness

import jobwire


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
    """Starts servers with the fast settings, overridden by any given (``{"--flag": value}``);
    stops them after the test and prints their log tails when it failed."""
    servers: list[harness.Server] = []

    def start(settings: dict[str, str] | None = None) -> harness.Server:
        merged = {**harness.FAST, **(settings or {})}
        server = harness.Server(pg, workdir, [part for item in merged.items() for part in item])
        servers.append(server)
        return server

    yield start
    report: pytest.TestReport | None = getattr(request.node, "rep_call", None)
    for server in servers:
        if report is not None and report.failed:
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
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the item, so fixtures know whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
