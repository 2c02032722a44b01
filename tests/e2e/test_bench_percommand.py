"""bench/percommand.py against a real `floki start` (bench.servers.FlokiServer): each probe runs,
gets correct replies, and its CPU is read from the threads of the processes that did the work.
Speed is not asserted (the brief: speed is measured by the benchmark, not by tests)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import percommand   # noqa: E402
from bench.servers import FlokiServer   # noqa: E402


def test_probes_run_against_floki_and_name_the_threads_that_worked(tmp_path):
    server = FlokiServer(tmp_path / "floki", shards=1)
    try:
        server.start()
        probes = percommand.measure(server, 40)
    finally:
        server.stop()
    assert [p.name for p in probes] == ["PING", "push one", "get one + ack"]
    by_name = {p.name: p for p in probes}
    for probe in probes:
        assert probe.server == "floki" and probe.count >= 40
        assert probe.round_trip_us > 0 and probe.client_us >= 0
    # PING is the frontend's own; a push and a get go through the shard.
    assert not any(k.startswith("shard-") for k in by_name["PING"].threads_us)
    for name in ("push one", "get one + ack"):
        roles = {k.split("/")[0] for k in by_name[name].threads_us}
        assert {"frontend", "shard-0"} <= roles, by_name[name].threads_us
    table = percommand.format_table(probes)
    assert "get one + ack" in table and "frontend/" in table
