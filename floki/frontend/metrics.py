"""Prometheus metrics: the frontend serves GET /metrics on `metrics_bind` in the text format.

Owns: the metric names, their labels and help, the per-command latency histograms, the scrape
(every shard asked for its numbers with a wire STATS request) and the small HTTP server.
Rules:
  1. A scrape asks every UP shard at once and waits at most `shard_timeout`: a dead or stuck
     shard never hangs it. A shard that is down or did not answer is reported with
     floki_shard_up 0 and none of its other series (absent, never stale numbers).
  2. Counters start at 0 with each shard process and only grow during its life (queue
     delete/create and channel delete/create start their series again). A new life is always
     visible: floki_shard_start_time_seconds changes and floki_shard_restarts_total grows
     (the supervisor's count from <data_dir>/.run/supervisor.json, else the changes of start
     time this frontend saw).
  3. Command latency is measured here: from the command's argv being read to its reply being
     ready, per command name, in fixed buckets (one dict lookup and one bisect per command).
     Long polls (HMGET with a timeout) wait by design and are not timed; errors are not timed.
  4. The HTTP side is minimal and defensive: one request per connection, a request head of
     at most MAX_REQUEST_HEAD_BYTES read within REQUEST_TIMEOUT_S, at most MAX_CONNECTIONS at
     once. There is no password: bind it to a loopback or private address.
  5. A port in use is not fatal (Floki keeps serving clients; the bind is retried every
     BIND_RETRY_S); an address that cannot be bound at all is a boot error (exit 3).

Metrics (labels in braces; every shard series also has shard="i"):
  floki_shard_up{shard}                          1 when the shard answered this scrape
  floki_shard_start_time_seconds{shard}          Unix time the shard process started serving
  floki_shard_restarts_total{shard}              restarts of the shard process
  floki_shard_blocked_clients{shard}             long polls parked at the shard
  floki_shard_broken_queues{shard}               queues the shard could not open
  floki_messages_pushed_total{shard,queue}
  floki_messages_delivered_total{shard,queue,channel}    every delivery, redeliveries included
  floki_messages_redelivered_total{shard,queue,channel}  expired or restored, handed out again
  floki_messages_acked_total{shard,queue,channel}
  floki_channel_backlog_messages{shard,queue,channel}    messages the channel has not read yet
  floki_channel_in_flight_messages{shard,queue,channel}  deliveries not acked (expired ones not
                                                         yet handed out again included)
  floki_queue_disk_bytes{shard,queue}            segment and index files
  floki_queue_segments{shard,queue}
  floki_fsync_duration_seconds{shard}            histogram of the data fsyncs (group commit in
                                                 "always" mode, the timer in "interval" mode)
  floki_command_duration_seconds{command}        histogram, measured by the frontend (rule 3)
  floki_connected_clients                        client connections of the frontend
  floki_frontend_start_time_seconds              Unix time the frontend started
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

from floki import wire
from floki.commands import COMMANDS
from floki.config import ServerConfig, runtime_dir
from floki.frontend import access
from floki.frontend.router import ShardState
from floki.histogram import Histogram
from floki.supervisor import STATE_FILE_NAME

log = logging.getLogger(__name__)

# Upper bounds of the command latency buckets (seconds): a local answer takes microseconds, a
# shard round trip tens of them, a group-committed push an fsync.
COMMAND_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
BIND_RETRY_S = 5.0

# name -> (type, help), in the order the families are written
_FAMILIES: dict[str, tuple[str, str]] = {
    "floki_shard_up": ("gauge", "1 if the shard answered this scrape, 0 if it is down"),
    "floki_shard_start_time_seconds": (
        "gauge", "Unix time the shard process started serving; a change is a restart"),
    "floki_shard_restarts_total": ("counter", "Times the shard process was restarted"),
    "floki_shard_blocked_clients": ("gauge", "Long polls (HMGET with a timeout) parked"),
    "floki_shard_broken_queues": ("gauge", "Queues the shard could not open"),
    "floki_messages_pushed_total": ("counter", "Messages pushed, since the shard started"),
    "floki_messages_delivered_total": (
        "counter", "Messages handed out to the channel (redeliveries included)"),
    "floki_messages_redelivered_total": (
        "counter", "Messages handed out again after their delivery expired or a restart"),
    "floki_messages_acked_total": ("counter", "Deliveries acknowledged"),
    "floki_channel_backlog_messages": ("gauge", "Messages the channel has not read yet"),
    "floki_channel_in_flight_messages": ("gauge", "Deliveries handed out and not acked"),
    "floki_queue_disk_bytes": ("gauge", "Bytes of the queue's segment and index files"),
    "floki_queue_segments": ("gauge", "Segment files of the queue"),
    "floki_fsync_duration_seconds": ("histogram", "Duration of the shard's data fsyncs"),
    "floki_command_duration_seconds": (
        "histogram", "Time from a command read to its reply ready, measured by the frontend"),
    "floki_connected_clients": ("gauge", "Client connections to the frontend"),
    "floki_frontend_start_time_seconds": ("gauge", "Unix time the frontend started"),
}
_QUEUE_COUNTERS = {"messages_pushed": "floki_messages_pushed_total"}
_QUEUE_GAUGES = {"disk_bytes": "floki_queue_disk_bytes", "segments": "floki_queue_segments"}
_CHANNEL_VALUES = {"messages_delivered": "floki_messages_delivered_total",
                   "messages_redelivered": "floki_messages_redelivered_total",
                   "messages_acked": "floki_messages_acked_total",
                   "backlog": "floki_channel_backlog_messages",
                   "in_flight": "floki_channel_in_flight_messages"}

Labels = tuple[tuple[str, str], ...]


class CommandTimes:
    """One latency histogram per command name (rule 3)."""

    def __init__(self) -> None:
        self.by_name: dict[bytes, Histogram] = {}    # upper- and lower-case spellings
        self.histograms: dict[str, Histogram] = {}   # command name -> its histogram
        for name in COMMANDS:
            histogram = Histogram(COMMAND_BUCKETS_S)
            self.histograms[name.decode()] = histogram
            self.by_name[name] = self.by_name[name.lower()] = histogram

    def of(self, name: bytes) -> Histogram | None:
        """Returns the histogram of command `name` (any case), None for an unknown command."""
        histogram = self.by_name.get(name)
        return histogram if histogram is not None else self.by_name.get(name.upper())


# --- the text format ------------------------------------------------------------------------

def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels_text(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


class Exposition:
    """Collects samples by family and writes the text format (every family's samples together,
    each after its HELP and TYPE lines)."""

    def __init__(self) -> None:
        self._lines: dict[str, list[str]] = {name: [] for name in _FAMILIES}

    def add(self, family: str, labels: Labels, value: float) -> None:
        self._lines[family].append(f"{family}{_labels_text(labels)} {_format_value(value)}")

    def add_histogram(self, family: str, labels: Labels, histogram: Histogram) -> None:
        lines = self._lines[family]
        for bound, count in histogram.cumulative():
            le = (("le", _format_value(bound)),)
            lines.append(f"{family}_bucket{_labels_text(labels + le)} {count}")
        lines.append(f"{family}_sum{_labels_text(labels)} {_format_value(histogram.sum)}")
        lines.append(f"{family}_count{_labels_text(labels)} {histogram.count}")

    def text(self) -> str:
        out = []
        for family, lines in self._lines.items():
            if not lines:
                continue
            kind, help_text = _FAMILIES[family]
            out.append(f"# HELP {family} {help_text}")
            out.append(f"# TYPE {family} {kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


# --- the scrape -----------------------------------------------------------------------------

def _number(value: Any) -> int | float:
    """Returns `value` if it is a finite non-negative number. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"not a count: {value!r}")
    return value


def shard_samples(index: int, stats: Any) -> tuple[list[tuple[str, Labels, float]],
                                                      list[tuple[str, Labels, Histogram]]]:
    """Returns (samples, histograms) for one shard's STATS reply, every one labelled
    shard="index". Raises ValueError (or KeyError/TypeError) for a reply of the wrong shape,
    before anything of it is used, so a bad reply never leaves half a shard in a scrape."""
    shard = (("shard", str(index)),)
    samples: list[tuple[str, Labels, float]] = [
        ("floki_shard_start_time_seconds", shard, float(_number(stats["start_time_s"]))),
        ("floki_shard_blocked_clients", shard, _number(stats["blocked_clients"])),
        ("floki_shard_broken_queues", shard, _number(stats["broken_queues"])),
    ]
    for queue, numbers in sorted(stats["queues"].items()):
        labels = shard + (("queue", str(queue)),)
        for key, family in (*_QUEUE_COUNTERS.items(), *_QUEUE_GAUGES.items()):
            samples.append((family, labels, _number(numbers[key])))
        for channel, values in sorted(numbers["channels"].items()):
            channel_labels = labels + (("channel", str(channel)),)
            for key, family in _CHANNEL_VALUES.items():
                samples.append((family, channel_labels, _number(values[key])))
    histograms = [("floki_fsync_duration_seconds", shard,
                   Histogram.from_dict(stats["fsync_seconds"]))]
    return samples, histograms


def read_supervisor_restarts(path: Path) -> dict[int, int]:
    """Returns {shard index: restarts} from supervisor.json at `path` ({} if it cannot be
    read: no supervisor, e.g. shards on other hosts)."""
    try:
        state = json.loads(path.read_text())
        restarts = {}
        for child in state["children"]:
            if child.get("role") == "shard" and isinstance(child.get("index"), int):
                restarts[child["index"]] = int(_number(child.get("restarts", 0)))
        return restarts
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class Metrics:
    """The scrape: shard numbers (over the router), restarts, and the frontend's own numbers."""

    def __init__(self, config: ServerConfig, router: Any, connections: Any,
                 command_times: CommandTimes):
        self.router = router
        self.connections = connections           # the frontend's set of live connections
        self.command_times = command_times
        self.timeout_s = config.shard_timeout
        self.state_path = runtime_dir(config) / STATE_FILE_NAME
        self.started_s = time.time()
        count = router.shard_count
        self._start_times: list[float | None] = [None] * count   # last seen, per shard
        self._seen_restarts = [0] * count        # start time changes this frontend saw
        self._supervised: dict[int, int] = {}    # the supervisor's last readable counts

    async def shard_stats(self, index: int) -> dict | None:
        """Returns shard `index`'s STATS reply, or None if it is down, does not answer within
        the timeout, or answers with something else (rule 1)."""
        if self.router.state(index) is not ShardState.UP:
            return None
        try:
            status, payload = await asyncio.wait_for(
                self.router.call(index, [], wire.STATS), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("metrics: shard %d did not answer STATS within %.1f s", index,
                        self.timeout_s)
            return None
        if status != wire.JSON:
            return None                # the router's ShardUnavailable: it went down meanwhile
        try:
            stats = json.loads(payload)
        except ValueError:
            stats = None
        if not isinstance(stats, dict):
            log.warning("metrics: shard %d sent STATS that is not a JSON object", index)
            return None
        return stats

    async def render(self) -> bytes:
        """Returns the text format of one scrape."""
        replies = await asyncio.gather(*(self.shard_stats(i)
                                         for i in range(self.router.shard_count)))
        return self.render_replies(replies).encode()

    def render_replies(self, replies: list[dict | None]) -> str:
        """Returns the text format for the shards' STATS `replies` (None: no answer)."""
        out = Exposition()
        supervised = read_supervisor_restarts(self.state_path)
        self._supervised.update(supervised)      # unreadable for a moment: keep the last counts
        for index, stats in enumerate(replies):
            shard = (("shard", str(index)),)
            parts = None
            if stats is not None:
                try:
                    parts = shard_samples(index, stats)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    log.warning("metrics: shard %d sent malformed STATS: %r", index, exc)
            if parts is not None:
                start_time = float(stats["start_time_s"])
                last = self._start_times[index]
                if last is not None and start_time != last:
                    self._seen_restarts[index] += 1
                self._start_times[index] = start_time
            out.add("floki_shard_up", shard, 0 if parts is None else 1)
            out.add("floki_shard_restarts_total", shard,
                    self._supervised.get(index, self._seen_restarts[index]))
            if parts is not None:
                for family, labels, value in parts[0]:
                    out.add(family, labels, value)
                for family, labels, histogram in parts[1]:
                    out.add_histogram(family, labels, histogram)
        for name, histogram in self.command_times.histograms.items():
            if histogram.count:
                out.add_histogram("floki_command_duration_seconds", (("command", name),),
                                  histogram)
        out.add("floki_connected_clients", (), len(self.connections))
        out.add("floki_frontend_start_time_seconds", (), self.started_s)
        return out.text()


# --- HTTP -----------------------------------------------------------------------------------

def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: Iterable[str] = (), head_only: bool = False) -> bytes:
    headers = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}",
               f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body)


class MetricsServer:
    """GET /metrics over HTTP/1.x on `bind` (rules 4 and 5)."""

    def __init__(self, metrics: Metrics, bind: str):
        self.metrics = metrics
        self.host = access.bind_host(bind)
        self.port = int(bind.rpartition(":")[2])
        self.server: asyncio.AbstractServer | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._active = 0

    async def start(self) -> None:
        """Listens, or (port in use) keeps trying every BIND_RETRY_S in the background.
        Raises OSError for an address that cannot be bound (rule 5)."""
        try:
            self.server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True,
                limit=MAX_REQUEST_HEAD_BYTES)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            log.error("metrics: cannot listen on %s:%d (%s); retrying every %.0f s",
                      self.host or "*", self.port, exc.strerror, BIND_RETRY_S)
            self._schedule_retry()
            return
        address = self.server.sockets[0].getsockname()
        log.info("metrics on http://%s:%d/metrics", address[0], address[1])

    def _schedule_retry(self) -> None:
        loop = asyncio.get_running_loop()
        self._retry = loop.call_later(BIND_RETRY_S, lambda: loop.create_task(self._try_again()))

    async def _try_again(self) -> None:
        if self._closed:
            return
        try:
            self.server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True,
                limit=MAX_REQUEST_HEAD_BYTES)
        except OSError as exc:
            log.debug("metrics: still cannot listen on port %d: %s", self.port, exc)
            self._schedule_retry()
            return
        if self._closed:
            self.server.close()
            return
        log.info("metrics on http://%s:%d/metrics", self.host or "*", self.port)

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) listened on, None while not listening."""
        if self.server is None or not self.server.sockets:
            return None
        return self.server.sockets[0].getsockname()[:2]

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            writer.write(await self.respond(head))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            pass                        # a client that left, dawdled or sent too much
        except Exception:
            log.exception("metrics: internal error answering a request")
        finally:
            self._active -= 1
            writer.close()

    async def respond(self, head: bytes) -> bytes:
        """Returns the HTTP response to a request whose head (request line and headers) is
        `head`."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return _response("404 Not Found", b"not found: try /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"method not allowed\n",
                             extra=("Allow: GET, HEAD",))
        body = await self.metrics.render()
        return _response("200 OK", body, CONTENT_TYPE, head_only=method == "HEAD")
