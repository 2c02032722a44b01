"""The frontend process: event loop, listener, router to the shards, and the way it stops.

Owns: the frontend's life. `run(config)` blocks until the process should exit and returns its
exit code (floki.supervisor.ExitCode); floki/cli.py has set up logging before calling it.
Rules:
  1. Start: connect the router to every shard, give the shards up to `shard_timeout` to answer
     a PING (so the first clients do not meet ShardUnavailable), then listen. A shard that is
     not up by then is served as DOWN until it answers.
  2. Stop (uvicorn's should_exit/force_exit): the first SIGTERM or SIGINT stops accepting, lets
     every connection finish its outstanding replies for up to GRACE_S, closes, returns 0. A
     second signal drops what is left at once.
  3. No orphans: if the parent process goes away (getppid() changes), the frontend stops, so no
     stray frontend keeps the port.
  4. The listener refuses nothing itself: a client above max_connections is accepted, told
     `-ERR max number of clients reached` and closed (Connection.connection_made).
  5. With `tls_port`, a second listener on the same host speaks TLS (access.tls_context); a TLS
     setting that cannot be used is a boot error (exit 3), never a server without TLS. Both
     listeners share the connections, their limit and every other rule.
  6. With `timeout`, Frontend.sweep_idle runs IDLE_SWEEPS_PER_TIMEOUT times per timeout (at most
     every IDLE_SWEEP_MAX_S), so an idle client is closed within a sweep of its deadline.
  7. With `metrics_bind`, GET /metrics is served there (floki/frontend/metrics.py) once the
     client listener is up; a port in use is retried, an unusable address is a boot error.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal

from floki.config import ConfigError, ServerConfig, shard_endpoint
from floki.frontend import access
from floki.frontend.connection import Connection, Frontend
from floki.frontend.metrics import Metrics, MetricsServer
from floki.frontend.router import Router, ShardState
from floki.overrides import Overrides, at_start
from floki.supervisor import ExitCode

try:
    import uvloop
except ImportError:    # uvloop is optional (not on Windows); asyncio's own loop works
    uvloop = None

log = logging.getLogger(__name__)

GRACE_S = 5.0                 # how long a graceful stop waits for outstanding replies
PARENT_CHECK_INTERVAL_S = 1.0
LISTEN_BACKLOG = 1024
_STOP_POLL_S = 0.02
TLS_HANDSHAKE_TIMEOUT_S = 10.0   # a client that never finishes its handshake holds no socket
IDLE_SWEEPS_PER_TIMEOUT = 4
IDLE_SWEEP_MAX_S = 1.0
IDLE_SWEEP_MIN_S = 0.01


def run(config: ServerConfig) -> int:
    """Runs the frontend until it is stopped. Returns the process exit code."""
    # CONFIG SET values this frontend applied earlier in this run (floki/overrides.py).
    overrides, config = at_start(config, "frontend")
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config, overrides=overrides))


def parse_bind(bind: str) -> tuple[str | None, int]:
    """Returns (host, port) for a `HOST:PORT` bind address (host None: every interface)."""
    return access.bind_host(bind), int(bind.rpartition(":")[2])


class _Stopper:
    """Signals and parent death -> `should_exit`, then `force_exit` (rules 2 and 3)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self._parent_pid = os.getppid()
        self._timer: asyncio.TimerHandle | None = None

    def request(self, reason: str) -> None:
        if self.should_exit.is_set():
            log.warning("%s again: stopping now", reason)
            self.force_exit.set()
        else:
            log.info("%s: stopping (up to %.0f s for outstanding replies)", reason, GRACE_S)
        self.should_exit.set()

    def watch_parent(self) -> None:
        """Checks every PARENT_CHECK_INTERVAL_S that the parent process still lives."""
        if os.getppid() != self._parent_pid and not self.should_exit.is_set():
            self.request(f"parent process {self._parent_pid} exited")
        self._timer = self.loop.call_later(PARENT_CHECK_INTERVAL_S, self.watch_parent)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def serve(config: ServerConfig, ready: asyncio.Future | None = None,
                metrics_ready: asyncio.Future | None = None,
                overrides: Overrides | None = None) -> int:
    """Runs the frontend on the running loop until stopped. Returns the exit code.

    `ready`, if given, receives the listening (host, port) once clients can connect;
    `metrics_ready` the MetricsServer (None when metrics_bind is "") right before.
    """
    loop = asyncio.get_running_loop()
    tls = None
    if config.tls_port:
        try:
            tls = access.tls_context(config)
        except ConfigError as exc:
            log.error("cannot serve TLS: %s", exc)
            return ExitCode.BOOT_ERROR
    stopper = _Stopper(loop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopper.request, signal.Signals(signum).name)
    stopper.watch_parent()
    router = Router([shard_endpoint(config, i) for i in range(config.shard_count)],
                    config.shard_timeout)
    router.start(loop)
    frontend = Frontend(config, router, loop, overrides)
    servers: list[asyncio.Server] = []
    metrics_server: MetricsServer | None = None
    sweeper: asyncio.TimerHandle | None = None

    def sweep_idle(interval_s: float) -> None:
        nonlocal sweeper
        frontend.sweep_idle(loop.time())
        sweeper = loop.call_later(interval_s, sweep_idle, interval_s)

    try:
        # Rule 1: wait for the shards (or a stop request), but not for ever.
        waiting = asyncio.ensure_future(router.wait_up(config.shard_timeout))
        stop_wait = asyncio.ensure_future(stopper.should_exit.wait())
        await asyncio.wait([waiting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        stop_wait.cancel()
        if stopper.should_exit.is_set():
            return ExitCode.OK
        down = [i for i in range(router.shard_count) if router.state(i) is not ShardState.UP]
        if down:
            log.warning("shards %s not answering yet; their queues get ShardUnavailable "
                        "until they do", down)

        host, port = parse_bind(config.bind)
        listeners = [(port, None)] + ([(config.tls_port, tls)] if tls is not None else [])
        for listen_port, context in listeners:
            extra = {} if context is None else {"ssl": context,
                                                "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}
            try:
                servers.append(await loop.create_server(
                    lambda: Connection(frontend), host, listen_port, backlog=LISTEN_BACKLOG,
                    reuse_address=True, **extra))
            except OSError as exc:
                log.error("cannot listen on %s:%d%s: %s", host or "*", listen_port,
                          " (TLS)" if context else "", exc)
                # A port still held by a dying predecessor may come free: worth a restart. A
                # bad address will not.
                return ExitCode.FATAL if exc.errno == errno.EADDRINUSE else ExitCode.BOOT_ERROR
        address = servers[0].sockets[0].getsockname()
        log.info("listening on %s:%d%s (%d shards, max %d clients%s%s)", address[0], address[1],
                 f", TLS on port {config.tls_port}" if tls is not None else "",
                 router.shard_count, config.max_connections,
                 ", password required" if config.requirepass else "",
                 ", protected mode" if frontend.protected else "")
        if config.metrics_bind:                                 # rule 7
            metrics_server = MetricsServer(
                Metrics(config, router, frontend.connections, frontend.command_times),
                config.metrics_bind)
            try:
                await metrics_server.start()
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", config.metrics_bind, exc)
                return ExitCode.BOOT_ERROR
        if metrics_ready is not None and not metrics_ready.done():
            metrics_ready.set_result(metrics_server)
        if config.timeout > 0:
            interval_s = min(max(config.timeout / IDLE_SWEEPS_PER_TIMEOUT, IDLE_SWEEP_MIN_S),
                             IDLE_SWEEP_MAX_S)
            sweep_idle(interval_s)
        if ready is not None and not ready.done():
            ready.set_result((address[0], address[1]))

        await stopper.should_exit.wait()
        for server in servers:
            server.close()                                  # accept no one else
        if metrics_server is not None:
            metrics_server.close()
        forced = await _drain_connections(loop, frontend, stopper)
        log.info("frontend stopped%s", " (forced)" if forced else "")
        return ExitCode.FATAL if forced else ExitCode.OK
    finally:
        stopper.close()
        if sweeper is not None:
            sweeper.cancel()
        for server in servers:
            server.close()
        if metrics_server is not None:
            metrics_server.close()
        for conn in list(frontend.connections):
            conn.abort()
        router.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _drain_connections(loop: asyncio.AbstractEventLoop, frontend: Frontend,
                             stopper: _Stopper) -> bool:
    """Lets each connection finish its outstanding replies, then close (rule 2).

    Returns True if the stop was forced (second signal) or the grace period ran out.
    """
    for conn in list(frontend.connections):
        conn.shutdown()
    deadline = loop.time() + GRACE_S
    while frontend.connections:
        if stopper.force_exit.is_set() or loop.time() >= deadline:
            log.warning("dropping %d connections with replies outstanding",
                        len(frontend.connections))
            for conn in list(frontend.connections):
                conn.abort()
            # connection_lost runs soon after abort(); it cancels what is parked at the shards.
            abort_deadline = loop.time() + 0.5
            while frontend.connections and loop.time() < abort_deadline:
                await asyncio.sleep(0.01)
            return True
        await asyncio.sleep(_STOP_POLL_S)
    return False
