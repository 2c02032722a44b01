"""The command table: RESP command name -> CommandSpec.

Owns: every command Floki answers, its arity, and the parser that turns an argv (list of bytes,
argv[0] the command name) into a frozen request (floki.requests).
Rules:
  1. Command names are case-insensitive; keywords inside commands (NX, TS, ID, server...) too.
  2. Every argument is validated here, before anything executes: a bad value raises
     InvalidParameter (IPA), a missing one MissingParameter (MPA), too many WrongArity.
     A command either runs whole or not at all (HDEL with one bad ticket acks nothing).
  3. `parse` needs the limits of the running server (message size, HMGET count cap).
  4. One RPUSH carries at most MAX_BATCH messages and one HDEL at most MAX_BATCH tickets,
     checked before anything is parsed: a shard runs each command whole, and one that takes
     longer than shard_timeout makes a healthy shard look down to the frontend (an HDEL of a
     million tickets, within max_args, took a shard 1.3-2 s and failed every other client's
     requests to it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from floki import requests as rq
from floki.errors import (InvalidParameter, MessageTooLarge, MissingParameter, UnknownCommand,
                          WrongArity)
from floki.names import validate_name

MAX_TIMEOUT_S = 365 * 86400.0
MAX_BATCH = 100_000          # messages per RPUSH, tickets per HDEL (rule 4)
_INTEGER = re.compile(rb"-?[0-9]{1,20}\Z")
_TICKETS = re.compile(rb"-?[0-9]{1,20}(?:,-?[0-9]{1,20})*\Z")


@dataclass(frozen=True)
class Limits:
    """The limits `parse` enforces (from ServerConfig; the frontend and shards both hold one)."""
    max_message_size: int = 8 * 1024**2
    max_get_count: int = 10_000


@dataclass(frozen=True)
class CommandSpec:
    name: str
    min_args: int             # counting the command name
    max_args: int | None      # None: unbounded
    missing: str | None       # MPA text when too few arguments; None: Redis's arity error
    parse: Callable[[list[bytes], Limits], object]


def _int(raw: bytes, error: str, low: int = 0, high: int = 2**63 - 1) -> int:
    if not _INTEGER.match(raw):
        raise InvalidParameter(error)
    value = int(raw)
    if not low <= value <= high:
        raise InvalidParameter(error)
    return value


def _seconds(raw: bytes, error: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter(error) from None
    if not math.isfinite(value) or value < 0 or value > MAX_TIMEOUT_S * 1000:
        raise InvalidParameter(error)
    return value


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_rpush(argv: list[bytes], limits: Limits) -> rq.Push:
    if len(argv) - 2 > MAX_BATCH:
        raise InvalidParameter(f"Too many messages in one RPUSH (max {MAX_BATCH})")
    bodies = tuple(argv[2:])
    largest = max(map(len, bodies))
    if largest > limits.max_message_size:
        raise MessageTooLarge(f"message too large ({largest} bytes, "
                              f"max_message_size is {limits.max_message_size})")
    return rq.Push(validate_name(argv[1]), bodies)


def _parse_hmget(argv: list[bytes], limits: Limits) -> rq.Get:
    queue, channel = validate_name(argv[1]), validate_name(argv[2])
    count = _int(argv[3], "Invalid count value")
    if count > limits.max_get_count:
        raise InvalidParameter(f"Invalid count value (max {limits.max_get_count})")
    timeout = 0.0
    if len(argv) == 5:
        timeout = _seconds(argv[4], "Invalid timeout value")
        if timeout > MAX_TIMEOUT_S:
            raise InvalidParameter("Invalid timeout value")
    return rq.Get(queue, channel, count, timeout)


def _parse_hdel(argv: list[bytes], limits: Limits) -> rq.Ack:
    if len(argv) - 3 > MAX_BATCH:
        raise InvalidParameter(f"Too many tickets in one HDEL (max {MAX_BATCH})")
    raw = argv[3:]
    # Hot path (an ack of a 100-message get is one HDEL of 100 tickets, parsed by the frontend
    # and again by the shard): one regex over the joined tickets instead of one per ticket.
    # A ticket holding the separator would add one to its count, so the count is checked too.
    joined = b",".join(raw)
    if _TICKETS.match(joined) and joined.count(b",") == len(raw) - 1:
        tickets = tuple(map(int, raw))
        if -(2**63) <= min(tickets) and max(tickets) <= 2**63 - 1:
            return rq.Ack(validate_name(argv[1]), validate_name(argv[2]), tickets)
    raise InvalidParameter("Invalid Ticket")


def _parse_hmset(argv: list[bytes], limits: Limits) -> object:
    queue, channel = validate_name(argv[1]), validate_name(argv[2])
    kind = argv[3].upper()
    if kind == b"ID":
        return rq.SeekId(queue, channel, _int(argv[4], "Invalid ID"))
    if kind == b"TS":
        return rq.SeekTimestamp(queue, channel, _seconds(argv[4], "Invalid Timestamp"))
    raise InvalidParameter("Invalid Seek Type Expected TS or ID")


def _parse_set(argv: list[bytes], limits: Limits) -> rq.Create:
    nx = False
    if len(argv) == 4:
        if argv[3].upper() != b"NX":
            raise InvalidParameter("Invalid SET option, expected NX")
        nx = True
    return rq.Create(validate_name(argv[1]), validate_name(argv[2]), nx)


def _parse_setnx(argv: list[bytes], limits: Limits) -> rq.Create:
    return rq.Create(validate_name(argv[1]), validate_name(argv[2]), True)


def _parse_del(argv: list[bytes], limits: Limits) -> rq.Delete:
    channel = validate_name(argv[2]) if len(argv) == 3 else None
    return rq.Delete(validate_name(argv[1]), channel)


def _parse_srem(argv: list[bytes], limits: Limits) -> rq.Purge:
    channel = None if argv[2] == b"*" else validate_name(argv[2])
    return rq.Purge(validate_name(argv[1]), channel)


def _parse_info(argv: list[bytes], limits: Limits) -> object:
    if len(argv) == 1:
        return rq.InfoServer(bulk=True)
    section = _text(argv[1])
    lowered = section.lower()
    if lowered in ("server", "default", "all", "everything"):
        return rq.InfoServer()
    if lowered == "queues":
        return rq.InfoQueues("")
    if lowered.startswith("queues."):
        return rq.InfoQueues(section[len("queues."):])
    raise InvalidParameter("Invalid INFO parameter")


def _parse_config(argv: list[bytes], limits: Limits) -> object:
    sub = argv[1].upper()
    if sub == b"GET":
        if len(argv) != 3:
            raise WrongArity("config|get")
        target = _text(argv[2])
        lowered = target.lower()
        if lowered == "server":
            return rq.ConfigGetServer()
        if lowered in ("queues", "queues.*"):
            return rq.ConfigGetQueues("", exact=False)
        if lowered.startswith("queues."):
            name = target[len("queues."):]
            if name.endswith("*"):
                return rq.ConfigGetQueues(name[:-1], exact=False)
            return rq.ConfigGetQueues(validate_name(name), exact=True)
        raise InvalidParameter("Invalid CONFIG parameter")
    if sub == b"SET":
        if len(argv) != 4:
            raise WrongArity("config|set")
        target, value = _text(argv[2]), _text(argv[3])
        lowered = target.lower()
        if lowered.startswith("server."):
            return rq.ConfigSetServer(lowered[len("server."):], value)
        if lowered.startswith("queues."):
            name, _, key = target[len("queues."):].rpartition(".")
            if not name or not key:
                raise InvalidParameter("Invalid CONFIG SET parameter")
            return rq.QueueConfigSet(validate_name(name), key.lower(), value)
        raise InvalidParameter("Invalid CONFIG SET parameter")
    raise InvalidParameter("Invalid CONFIG Parameter")


def _parse_ping(argv: list[bytes], limits: Limits) -> rq.Ping:
    return rq.Ping(argv[1] if len(argv) == 2 else None)


def _parse_echo(argv: list[bytes], limits: Limits) -> rq.Echo:
    return rq.Echo(argv[1])


def _parse_quit(argv: list[bytes], limits: Limits) -> rq.Quit:
    return rq.Quit()


def _parse_select(argv: list[bytes], limits: Limits) -> rq.Select:
    return rq.Select(_int(argv[1], "value is not an integer or out of range"))


def _parse_auth(argv: list[bytes], limits: Limits) -> rq.Auth:
    if len(argv) == 2:
        return rq.Auth("default", argv[1])
    return rq.Auth(_text(argv[1]), argv[2])


def _parse_hello(argv: list[bytes], limits: Limits) -> rq.Hello:
    protover = None
    i = 1
    if len(argv) > 1:
        try:
            protover = int(argv[1])
        except ValueError:
            raise InvalidParameter("Protocol version is not an integer or out of range") from None
        i = 2
    auth = setname = None
    while i < len(argv):
        option = argv[i].upper()
        if option == b"AUTH" and i + 2 < len(argv):
            auth = (_text(argv[i + 1]), argv[i + 2])
            i += 3
        elif option == b"SETNAME" and i + 1 < len(argv):
            setname = _text(argv[i + 1])
            i += 2
        else:
            raise InvalidParameter(f"Syntax error in HELLO option '{_text(argv[i])}'")
    return rq.Hello(protover, auth, setname)


def _parse_client(argv: list[bytes], limits: Limits) -> rq.ClientCommand:
    return rq.ClientCommand(_text(argv[1]).upper(), tuple(argv[2:]))


def _parse_command(argv: list[bytes], limits: Limits) -> rq.CommandInfo:
    return rq.CommandInfo(_text(argv[1]).upper() if len(argv) > 1 else "")


COMMANDS: dict[bytes, CommandSpec] = {spec.name.encode(): spec for spec in (
    CommandSpec("RPUSH", 3, None, "Queue or Value Missing", _parse_rpush),
    CommandSpec("HMGET", 4, 5, "Queue or Channel or Count Missing", _parse_hmget),
    CommandSpec("HDEL", 4, None, "Queue, Channel or Id Missing", _parse_hdel),
    CommandSpec("HMSET", 5, 5, "Queue or Channel or TS|ID or Value Missing", _parse_hmset),
    CommandSpec("SET", 3, 4, "Queue or Channel Missing", _parse_set),
    CommandSpec("SETNX", 3, 3, "Queue or Channel Missing", _parse_setnx),
    CommandSpec("DEL", 2, 3, "Queue Missing", _parse_del),
    CommandSpec("SREM", 3, 3, "Queue or Channel Missing", _parse_srem),
    CommandSpec("INFO", 1, 2, None, _parse_info),
    CommandSpec("CONFIG", 2, 4, "Missing CONFIG Parameter", _parse_config),
    CommandSpec("PING", 1, 2, None, _parse_ping),
    CommandSpec("ECHO", 2, 2, None, _parse_echo),
    CommandSpec("QUIT", 1, None, None, _parse_quit),
    CommandSpec("SELECT", 2, 2, None, _parse_select),
    CommandSpec("AUTH", 2, 3, None, _parse_auth),
    CommandSpec("HELLO", 1, None, None, _parse_hello),
    CommandSpec("CLIENT", 2, None, None, _parse_client),
    CommandSpec("COMMAND", 1, None, None, _parse_command),
)}


def parse(argv: list[bytes], limits: Limits) -> object:
    """Returns the request for `argv`.

    Raises UnknownCommand, WrongArity, MissingParameter, InvalidParameter, MessageTooLarge.
    """
    spec = COMMANDS.get(argv[0].upper())
    if spec is None:
        raise UnknownCommand(_text(argv[0]), argv[1:])
    if len(argv) < spec.min_args:
        if spec.missing:
            raise MissingParameter(spec.missing)
        raise WrongArity(spec.name)
    if spec.max_args is not None and len(argv) > spec.max_args:
        raise WrongArity(spec.name)
    return spec.parse(argv, limits)
