"""Shard process entry: open this shard's queues, serve, stop cleanly.

Owns: the life of one shard worker process (`floki shard --index I`).
Rules:
  1. Recover before serving: every owned queue is opened (and its torn tail cut) before the
     socket binds, so no request ever sees a half-recovered queue.
  2. SIGTERM/SIGINT: finish the current pass, fsync, write final checkpoints, exit 0.
     A second signal exits at once (the data stays safe: every push was written to the OS).
  3. If the parent (the supervisor) disappears, stop as if signalled: no orphan shard keeps
     queue locks that a new supervisor's shards need.
  4. Exit codes: 0 clean stop, 1 fatal storage error (fsync failed in "always" mode; restarting
     and recovering from disk is the safe answer), 3 boot error a restart cannot fix.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from pathlib import Path

import zmq

from floki.config import ServerConfig, shard_endpoint
from floki.overrides import at_start
from floki.shard.catalog import Catalog
from floki.shard.server import FsyncFailed, ShardServer

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL, EXIT_BOOT = 0, 1, 3


def run(config: ServerConfig, index: int, bind: str | None = None) -> int:
    """Runs shard `index` until signalled. Returns the process exit code.

    `bind`: the ZeroMQ endpoint to bind (e.g. tcp://0.0.0.0:9800 on a host whose advertised
    [[shard]] endpoint is tcp://floki-shard-0.floki-shard:9800); default: the shard's endpoint.
    """
    if not 0 <= index < config.shard_count:
        log.error("shard index %d out of range for %d shards", index, config.shard_count)
        return EXIT_BOOT
    signals_seen: list[int] = []

    def on_signal(signum, frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            os._exit(EXIT_OK if signum == signal.SIGTERM else 130)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    # CONFIG SET values this shard applied earlier in this run (a supervisor restart), before
    # anything opens: above all the fsync mode (floki/overrides.py rule 1).
    overrides, config = at_start(config, f"shard-{index}")

    data_dir = Path(config.data_dir)
    catalog = Catalog(data_dir, index, config.shard_count, config.queue, config.fsync)
    catalog.open_all()

    endpoint = bind if bind is not None else shard_endpoint(config, index)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        log.error("shard %d cannot bind %s: %s", index, endpoint, exc)
        catalog.close()
        # An ipc path too long for a unix socket (a deep data_dir) fails the same way after
        # every restart: a boot error, not a restart loop. Other causes (address still in use
        # by a previous shard) may pass.
        return EXIT_BOOT if exc.errno == errno.ENAMETOOLONG else EXIT_FATAL
    log.info("shard %d of %d serving on %s (pid %d, fsync=%s)", index, config.shard_count,
             endpoint, os.getpid(), config.fsync)

    server = ShardServer(config, index, catalog, socket, overrides)
    try:
        server.serve(lambda: bool(signals_seen) or os.getppid() != parent)
    except FsyncFailed as exc:
        log.critical("fsync failed, exiting without acknowledging: %s", exc)
        sys.stderr.flush()
        os._exit(EXIT_FATAL)  # no final checkpoint: recovery from disk decides what survived
    catalog.close()
    socket.close(linger=500)
    context.term()
    log.info("shard %d stopped", index)
    return EXIT_OK
