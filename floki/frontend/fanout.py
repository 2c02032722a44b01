"""Merging fanned-out answers: INFO and CONFIG go to every shard, the client gets one reply.

Owns: how the per-shard parts of a request in floki.requests.FANOUT_REQUESTS become one reply.
Rules:
  1. A part is `(status, payload)` in shard order: wire.JSON with a JSON object, or anything
     else with a RESP error to pass on (a shard's own error, or the router's ShardUnavailable).
  2. INFO server always answers, counting the shards that did (`shards_up`); every other request
     needs every shard, and the first error in shard order is the reply.
  3. INFO and CONFIG GET reply with a one-element array holding the JSON text (Floki's original
     format); plain `INFO` is a bulk of `key:value` lines, because redis-cli insists on one.
  4. CONFIG SET takes effect on the frontend (`frontend.apply_config`) only after every shard
     accepted it, so all processes keep the same configuration. It is sent only while every
     shard is up, and one that some shard fails (it died on the way, or could not record it)
     is set back on the shards that applied it (connection.py). If that fails too, they
     disagree until it is set again, and:
  5. CONFIG GET server answers with the shards' configuration only when every shard that
     answered runs the same one; otherwise it names the keys and each shard's value
     (ConfigDisagreement), instead of letting the first shard speak for all. It never shows a
     secret (`requirepass`): a set one reads as SECRET_MASK.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from floki import reply, wire
from floki import requests as rq
from floki.errors import ConfigDisagreement, QueueNotFound
from floki.frontend.resp import OK, encode_verbatim

Part = tuple[bytes, bytes]
SECRET_KEYS = ("requirepass",)
SECRET_MASK = "********"


class FrontendFacts(Protocol):
    """What a merge needs from the frontend process (connection.Frontend provides it)."""

    def status(self) -> dict[str, Any]: ...

    def apply_config(self, key: str, value: str) -> None: ...


def merge(request: object, parts: list[Part], frontend: FrontendFacts, protover: int) -> bytes:
    """Returns the reply to a fanned-out `request` from its per-shard `parts`.

    Raises QueueNotFound (CONFIG GET of one queue no shard has), ValueError (a shard sent JSON
    that is not an object: a bug), InvalidParameter (CONFIG SET the frontend cannot apply).
    """
    return _MERGERS[type(request)](request, parts, frontend, protover)


def _json_reply(obj: dict) -> bytes:
    return reply.json_array(json.dumps(obj, separators=(",", ":")).encode())


def _first_error(parts: list[Part]) -> bytes | None:
    for status, payload in parts:
        if status != wire.JSON:
            return payload
    return None


def _objects(parts: list[Part]) -> list[dict]:
    objects = [json.loads(payload) for status, payload in parts if status == wire.JSON]
    if not all(isinstance(obj, dict) for obj in objects):
        raise ValueError("a shard answered a fan-out request with JSON that is not an object")
    return objects


def _union(parts: list[Part]) -> dict:
    merged: dict = {}
    for obj in _objects(parts):
        merged.update(obj)
    return merged


def _info_server(request: rq.InfoServer, parts: list[Part], frontend: FrontendFacts,
                 protover: int) -> bytes:
    shards = _objects(parts)
    info = frontend.status()
    info["shards_up"] = len(shards)
    info["queue_count"] = sum(int(s.get("queue_count", 0)) for s in shards)
    info["blocked_client_count"] = sum(int(s.get("blocked_client_count", 0)) for s in shards)
    broken: dict = {}
    for shard in shards:
        broken.update(shard.get("broken_queues") or {})
    info["broken_queues"] = broken
    if not request.bulk:
        return _json_reply(info)
    lines = ["# Server"]
    for key, value in info.items():
        if key == "broken_queues":
            key, value = "broken_queue_count", len(value)
        lines.append(f"{key}:{value}")
    return encode_verbatim("\r\n".join(lines) + "\r\n", protover)


def _info_queues(request: rq.InfoQueues, parts: list[Part], frontend: FrontendFacts,
                 protover: int) -> bytes:
    error = _first_error(parts)
    return error if error is not None else _json_reply(_union(parts))


def _config_get_server(request: rq.ConfigGetServer, parts: list[Part], frontend: FrontendFacts,
                       protover: int) -> bytes:
    # _objects keeps the JSON parts in shard order: pair them with their shards' indexes
    answered = dict(zip([i for i, (status, _) in enumerate(parts) if status == wire.JSON],
                        _objects(parts)))
    if not answered:
        return parts[0][1]
    configs = list(answered.values())
    config = configs[0]
    differing = sorted({key for other in configs[1:] for key in config.keys() | other.keys()
                        if other.get(key) != config.get(key)})
    if differing:                                       # rule 5
        raise ConfigDisagreement("shards disagree on " + "; ".join(
            f"{key} (" + ", ".join(f"shard {index}: {_shown(key, obj.get(key))}"
                                   for index, obj in answered.items()) + ")"
            for key in differing) + "; CONFIG SET it again")
    return _json_reply({key: _shown(key, value) for key, value in config.items()})


def _shown(key: str, value: Any) -> Any:
    """A configuration value as CONFIG GET may show it (rule 5: no secret)."""
    return SECRET_MASK if key in SECRET_KEYS and value else value


def _config_get_queues(request: rq.ConfigGetQueues, parts: list[Part], frontend: FrontendFacts,
                       protover: int) -> bytes:
    error = _first_error(parts)
    if error is not None:
        return error
    merged = _union(parts)
    if request.exact and not merged:
        raise QueueNotFound()
    return _json_reply(merged)


def _config_set_server(request: rq.ConfigSetServer, parts: list[Part], frontend: FrontendFacts,
                       protover: int) -> bytes:
    error = _first_error(parts)
    if error is not None:
        return error
    frontend.apply_config(request.key, request.value)
    return OK


_MERGERS: dict[type, Callable[[Any, list[Part], FrontendFacts, int], bytes]] = {
    rq.InfoServer: _info_server, rq.InfoQueues: _info_queues,
    rq.ConfigGetServer: _config_get_server, rq.ConfigGetQueues: _config_get_queues,
    rq.ConfigSetServer: _config_set_server,
}
