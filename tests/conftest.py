"""Shared fixtures: `floki_server`, the `floki start` launcher every end-to-end test uses.

Rules:
  1. Every server a test starts is cleaned up at teardown, whatever the test did
     (FlokiServer.cleanup in helpers.py).
  2. A failing test gets the tail of each server's log attached to its report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import FlokiServer, free_port

# The soak test (tests/e2e/test_soak.py): its pytest time limit grows with --cycles.
SOAK_TIMEOUT_BASE_S = 60.0
SOAK_TIMEOUT_PER_CYCLE_S = 6.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("floki soak")
    group.addoption("--cycles", type=int, default=20,
                    help="kill cycles of the soak test (tests/e2e/test_soak.py); default 20")
    group.addoption("--soak-seed", type=int, default=None,
                    help="seed of the soak test's random kills and workload (default: random, "
                         "printed by the test)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Gives each soak test a time limit for the --cycles it will run (longer runs need more
    than the ini-wide pytest-timeout limit)."""
    cycles = config.getoption("--cycles")
    for item in items:
        if "soak_cycles" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(
                SOAK_TIMEOUT_BASE_S + SOAK_TIMEOUT_PER_CYCLE_S * max(cycles, 1)))


@pytest.fixture
def floki_server(tmp_path: Path, request: pytest.FixtureRequest):
    """Factory: `floki_server(shards=2, fsync="always")` starts a server and returns it ready.

    Pass `start=False` to get an unstarted FlokiServer. Every server is cleaned up at teardown.
    """
    servers: list[FlokiServer] = []
    request.node._floki_servers = servers

    def make(start: bool = True, **overrides: Any) -> FlokiServer:
        server = FlokiServer(tmp_path / f"floki{len(servers)}", **overrides)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in getattr(item, "_floki_servers", []):
            report.sections.append((f"floki log ({server.dir.name})", server.log_tail()))


@pytest.fixture
def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_port()
