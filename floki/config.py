"""floki.toml -> frozen dataclasses.

Owns: every setting, its default, its unit and its parser, declared once in the tables below.
Rules:
  1. Sizes are bytes: a bare integer, or a number with k/kb/m/mb/g/gb (any case, powers of 1024).
  2. Durations are seconds (float): a bare number, or a number with ms/s/m/h/d.
  3. A bad value raises ConfigError naming the key, the value and what was expected.
  4. Unknown keys are errors; a typo must never be silently ignored.
The `[queue]` table holds the defaults every new queue copies into its own settings; each queue
then keeps its settings on disk, so changing a default never changes an existing queue.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII digits only: `\d` and str.isdigit() also take other scripts' digits and "²", which
# int() refuses.
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)
_INTEGER = re.compile(r"^\s*-?[0-9]{1,20}\s*$", re.ASCII)   # int() refuses > 4300 digits
# Bounds that keep every value finite and storable (queue.json, CONFIG GET's JSON): a number of
# 400 digits parses to float infinity.
MAX_SIZE = 2**63 - 1
MAX_DURATION_S = 100 * 365 * 86400.0


class ConfigError(ValueError):
    """A setting that cannot be used; the message names key, value and expectation."""

    def __init__(self, key: str, value: Any, expected: str):
        super().__init__(f"config key {key!r}: invalid value {value!r}; expected {expected}")
        self.key, self.value, self.expected = key, value, expected


def parse_size(key: str, value: Any) -> int:
    """Returns a byte count. Raises ConfigError."""
    expected = "a size: bytes, or a number with k/kb/m/mb/g/gb (e.g. \"64mb\")"
    if isinstance(value, bool):
        raise ConfigError(key, value, expected)
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise ConfigError(key, value, expected if value < 0 else f"at most {MAX_SIZE} bytes")
        return value
    if not isinstance(value, str):
        raise ConfigError(key, value, expected)
    m = _NUMBER_WITH_UNIT.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, value, expected)
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not size <= MAX_SIZE:                       # also inf
        raise ConfigError(key, value, f"at most {MAX_SIZE} bytes")
    return int(size)


def parse_duration(key: str, value: Any) -> float:
    """Returns seconds. Raises ConfigError."""
    expected = "a duration: seconds, or a number with ms/s/m/h/d (e.g. \"30s\")"
    if isinstance(value, bool):
        raise ConfigError(key, value, expected)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _NUMBER_WITH_UNIT.match(value)
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(key, value, expected)
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    else:
        raise ConfigError(key, value, expected)
    if not 0 <= seconds <= MAX_DURATION_S:         # also nan and inf
        raise ConfigError(key, value, expected if seconds < 0 or seconds != seconds
                          else f"at most {MAX_DURATION_S:.0f} s (100 years)")
    return seconds


def _parse_int(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        expected = f"an integer >= {low} and <= {MAX_SIZE if high is None else high}"
        if isinstance(value, str) and _INTEGER.match(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
                value > (MAX_SIZE if high is None else high)):
            raise ConfigError(key, value, expected)
        return value
    return parse


def _parse_choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value.lower()
    return parse


def _parse_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        return value.strip().lower() in ("true", "yes")
    raise ConfigError(key, value, "true or false")


def _parse_hostport(key: str, value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(key, value, "HOST:PORT (e.g. \"127.0.0.1:9797\")")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, value, "HOST:PORT with a port from 0 to 65535")
    return value


# --- per-queue settings --------------------------------------------------------------------

@dataclass(frozen=True)
class QueueSettings:
    """Settings each queue owns and persists (sizes in bytes, durations in seconds)."""
    segment_size: int = 64 * 1024**2
    message_timeout: float = 30.0
    max_in_flight: int = 100_000
    retention_period: float = 0.0
    retention_size: int = 0
    hard_retention_period: float = 24 * 3600.0
    hard_retention_size: int = 0

    def with_value(self, key: str, raw: Any) -> "QueueSettings":
        """Returns a copy with `key` parsed from `raw` (floki.toml syntax). Raises ConfigError."""
        if key not in QUEUE_KEYS:
            raise ConfigError(key, raw, "one of " + ", ".join(sorted(QUEUE_KEYS)))
        return dataclasses.replace(self, **{key: QUEUE_KEYS[key](key, raw)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "QueueSettings | None" = None) -> "QueueSettings":
        """Parses a (possibly partial) mapping over `base`. Raises ConfigError on any bad key."""
        settings = base or cls()
        for key, raw in data.items():
            settings = settings.with_value(key, raw)
        return settings


QUEUE_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "segment_size": lambda k, v: _check_min(k, v, parse_size(k, v), 4096, "a size >= 4kb"),
    "message_timeout": lambda k, v: _check_min(k, v, parse_duration(k, v), 0.001,
                                               "a duration >= 1ms"),
    "max_in_flight": _parse_int(1),
    "retention_period": parse_duration,
    "retention_size": parse_size,
    "hard_retention_period": parse_duration,
    "hard_retention_size": parse_size,
}


def _check_min(key: str, raw: Any, value: Any, low: Any, expected: str) -> Any:
    if value < low:
        raise ConfigError(key, raw, expected)
    return value


# --- server-wide settings --------------------------------------------------------------------

FSYNC_MODES = ("never", "interval", "always")


@dataclass(frozen=True)
class ServerConfig:
    """Server-wide settings (sizes in bytes, durations in seconds)."""
    bind: str = "127.0.0.1:9797"
    data_dir: str = "./data"
    shards: int = 0                      # 0 = one per CPU
    log_level: str = "info"
    log_format: str = "text"             # text: one readable line per record; json: one object
    fsync: str = "interval"
    fsync_interval: float = 1.0
    maintenance_interval: float = 1.0
    max_connections: int = 10_000
    max_message_size: int = 8 * 1024**2
    max_get_count: int = 10_000
    shard_timeout: float = 2.0           # a shard silent this long is treated as down
    # Client limits, enforced by the frontend from a request's headers, before its bytes are held.
    max_bulk_len: int = 512 * 1024**2    # a longer bulk: protocol error, connection closed
    max_args: int = 1024 * 1024          # arguments per command (the multibulk length)
    max_output_buffer: int = 256 * 1024**2   # unread replies above this: disconnect; 0 = no cap
    timeout: float = 0.0                 # close a client idle this long; 0 = never
    # Access: password, protected mode, TLS (enforced by the frontend; shards trust it).
    requirepass: str = ""                # "" = no password
    protected_mode: bool = True          # no password: refuse clients not on the loopback
    tls_port: int = 0                    # 0 = no TLS listener
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_cert_file: str = ""           # CA that signs client certificates
    tls_auth_clients: str = "no"         # no | optional | yes: ask clients for a certificate
    # Prometheus text format on http://metrics_bind/metrics (frontend/metrics.py); "" = off
    metrics_bind: str = "127.0.0.1:9798"
    queue: QueueSettings = field(default_factory=QueueSettings)
    # [[shard]] endpoint = "tcp://HOST:PORT" tables: explicit shard endpoints (their count is the
    # shard count); empty: one ipc:// socket per shard under <data_dir>/.run
    shard_endpoints: tuple[str, ...] = ()

    @property
    def shard_count(self) -> int:
        if self.shard_endpoints:
            return len(self.shard_endpoints)
        return self.shards or (os.cpu_count() or 1)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_value(self, key: str, raw: Any) -> "ServerConfig":
        """Returns a copy with server key `key` (or `queue.KEY`) parsed from `raw`."""
        if key.startswith("queue."):
            return dataclasses.replace(self, queue=self.queue.with_value(key[6:], raw))
        if key not in SERVER_KEYS:
            raise ConfigError(key, raw, "one of " + ", ".join(sorted(SERVER_KEYS)))
        return dataclasses.replace(self, **{key: SERVER_KEYS[key](key, raw)})


SERVER_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "bind": _parse_hostport,
    "data_dir": _parse_str,
    "shards": _parse_int(0, 256),
    "log_level": _parse_choice("debug", "info", "warning", "error"),
    "log_format": _parse_choice("text", "json"),
    "fsync": _parse_choice(*FSYNC_MODES),
    "fsync_interval": lambda k, v: _check_min(k, v, parse_duration(k, v), 0.001,
                                              "a duration >= 1ms"),
    "maintenance_interval": lambda k, v: _check_min(k, v, parse_duration(k, v), 0.01,
                                                    "a duration >= 10ms"),
    "max_connections": _parse_int(1),
    "max_message_size": lambda k, v: _check_min(k, v, parse_size(k, v), 1, "a size >= 1"),
    "max_get_count": _parse_int(1, 1_000_000),
    "shard_timeout": lambda k, v: _check_min(k, v, parse_duration(k, v), 0.1,
                                             "a duration >= 100ms"),
    "max_bulk_len": lambda k, v: _check_min(k, v, parse_size(k, v), 1024, "a size >= 1kb"),
    "max_args": _parse_int(8, 2**31 - 1),
    "max_output_buffer": parse_size,
    "timeout": parse_duration,
    "requirepass": _parse_str,
    "protected_mode": _parse_bool,
    "tls_port": _parse_int(0, 65535),
    "tls_cert_file": _parse_str,
    "tls_key_file": _parse_str,
    "tls_ca_cert_file": _parse_str,
    "tls_auth_clients": _parse_choice("no", "optional", "yes"),
    "metrics_bind": lambda k, v: v if v == "" else _parse_hostport(k, v),
}


# Server keys CONFIG SET server.KEY may change on a live server (the shards and the frontend
# each apply them; `queue.KEY` defaults are changeable too). Everything else needs a restart.
RUNTIME_KEYS = frozenset({"fsync", "fsync_interval", "maintenance_interval", "max_message_size",
                          "max_get_count", "log_level", "max_connections",
                          "max_output_buffer"})


def config_from_dict(data: dict[str, Any]) -> ServerConfig:
    """Builds a ServerConfig from a floki.toml mapping. Raises ConfigError."""
    config = ServerConfig()
    for section, body in data.items():
        if section == "server":
            if not isinstance(body, dict):
                raise ConfigError("server", body, "a table")
            for key, raw in body.items():
                config = config.with_value(key, raw)
        elif section == "queue":
            if not isinstance(body, dict):
                raise ConfigError("queue", body, "a table")
            config = dataclasses.replace(config, queue=QueueSettings.from_dict(body))
        elif section == "shard":
            config = dataclasses.replace(config, shard_endpoints=_parse_shard_tables(body))
        else:
            raise ConfigError(section, body, "a [server] or [queue] table, or [[shard]] tables")
    if config.shard_endpoints and config.shards not in (0, len(config.shard_endpoints)):
        raise ConfigError("shards", config.shards,
                          f"0 or {len(config.shard_endpoints)} (the number of [[shard]] tables)")
    return config


_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:\d{1,5}|ipc://\S+)$")


def parse_endpoint(key: str, value: Any) -> str:
    """Returns `value` if it is a ZeroMQ endpoint a shard can bind or a frontend can connect
    to: tcp://HOST:PORT (HOST may be a name or `*`/0.0.0.0 to bind every interface) or
    ipc://PATH. Raises ConfigError."""
    if not isinstance(value, str) or not _ENDPOINT.match(value):
        raise ConfigError(key, value, "tcp://HOST:PORT (or ipc://PATH)")
    return value


def _parse_shard_tables(body: Any) -> tuple[str, ...]:
    """[[shard]] tables, one per shard in index order, each `endpoint = "tcp://HOST:PORT"`."""
    expected = "[[shard]] tables, each with endpoint = \"tcp://HOST:PORT\" (or ipc://PATH)"
    if not isinstance(body, list) or not body:
        raise ConfigError("shard", body, expected)
    endpoints = []
    for i, table in enumerate(body):
        if not isinstance(table, dict) or set(table) != {"endpoint"}:
            raise ConfigError(f"shard[{i}]", table, expected)
        endpoint = table["endpoint"]
        if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
            raise ConfigError(f"shard[{i}].endpoint", endpoint, expected)
        endpoints.append(endpoint)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError("shard", endpoints, "distinct endpoints")
    return tuple(endpoints)


def load_config(path: str | os.PathLike | None) -> ServerConfig:
    """Reads floki.toml at `path` (None: all defaults). Raises ConfigError, OSError."""
    if path is None:
        return ServerConfig()
    with open(path, "rb") as f:
        try:
            data = tomli.load(f)
        except tomli.TOMLDecodeError as exc:
            raise ConfigError(str(path), "<file>", f"valid TOML ({exc})") from None
    return config_from_dict(data)


# The runtime dir under data_dir: the supervisor's lock and process map, the default shard
# sockets, the processes' runtime overrides (floki/overrides.py).
RUN_DIR_NAME = ".run"


def runtime_dir(config: ServerConfig) -> Path:
    """Returns `<data_dir>/.run`, absolute (a name starting with "." is never a queue)."""
    return Path(config.data_dir).resolve() / RUN_DIR_NAME


def shard_endpoint(config: ServerConfig, index: int) -> str:
    """Returns the ZeroMQ endpoint shard `index` binds and the frontend connects to.

    Default: an ipc:// socket under `<data_dir>/.run/` (runtime_dir).
    """
    if config.shard_endpoints:
        return config.shard_endpoints[index]
    return f"ipc://{runtime_dir(config)}/shard-{index}.ipc"
