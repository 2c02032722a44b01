"""Frozen request dataclasses: what a validated command means.

Owns: the vocabulary passed from `commands.parse` to the code that executes a command.
Rules:
  1. A request holds only validated values (names checked, integers parsed, limits applied).
  2. `queue` is the routing key: a request with a queue goes to the shard that owns it; a shard
     request without one (INFO queues, CONFIG ...) fans out to every shard.
  3. Requests carry no sockets, clocks or config; executing them is someone else's job.
"""
from __future__ import annotations

from dataclasses import dataclass


# --- executed by the shard that owns `queue` ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Push:
    queue: str
    bodies: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Get:
    queue: str
    channel: str
    count: int
    timeout_s: float  # 0 = answer at once


@dataclass(frozen=True, slots=True)
class Ack:
    queue: str
    channel: str
    tickets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SeekId:
    queue: str
    channel: str
    id: int


@dataclass(frozen=True, slots=True)
class SeekTimestamp:
    queue: str
    channel: str
    timestamp_s: float


@dataclass(frozen=True, slots=True)
class Create:
    queue: str
    channel: str
    nx: bool


@dataclass(frozen=True, slots=True)
class Delete:
    queue: str
    channel: str | None  # None: the whole queue


@dataclass(frozen=True, slots=True)
class Purge:
    queue: str
    channel: str | None  # None ("*"): the whole queue


@dataclass(frozen=True, slots=True)
class QueueConfigSet:
    queue: str
    key: str
    value: str


# --- fanned out to every shard, answers merged by the frontend --------------------------------

@dataclass(frozen=True, slots=True)
class InfoServer:
    queue = None
    bulk: bool = False  # plain `INFO`: a bulk string (redis-cli expects one), not an array


@dataclass(frozen=True, slots=True)
class InfoQueues:
    prefix: str  # "" = every queue
    queue = None


@dataclass(frozen=True, slots=True)
class ConfigGetServer:
    queue = None


@dataclass(frozen=True, slots=True)
class ConfigGetQueues:
    prefix: str  # "" = every queue; otherwise a queue name or a prefix ending in "*"
    exact: bool
    queue = None


@dataclass(frozen=True, slots=True)
class ConfigSetServer:
    key: str
    value: str
    queue = None


# --- answered by the frontend itself -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ping:
    message: bytes | None


@dataclass(frozen=True, slots=True)
class Echo:
    message: bytes


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Select:
    db: int


@dataclass(frozen=True, slots=True)
class Auth:
    username: str
    password: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    protover: int | None        # None: keep the connection's protocol
    auth: tuple[str, bytes] | None
    setname: str | None


@dataclass(frozen=True, slots=True)
class ClientCommand:
    subcommand: str               # upper case: SETNAME, GETNAME, SETINFO, ID, INFO
    args: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CommandInfo:
    subcommand: str               # "" (plain COMMAND), COUNT, DOCS, INFO, LIST


SHARD_REQUESTS = (Push, Get, Ack, SeekId, SeekTimestamp, Create, Delete, Purge, QueueConfigSet)
FANOUT_REQUESTS = (InfoServer, InfoQueues, ConfigGetServer, ConfigGetQueues, ConfigSetServer)
FRONTEND_REQUESTS = (Ping, Echo, Quit, Select, Auth, Hello, ClientCommand, CommandInfo)
