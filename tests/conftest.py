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
