"""floki/frontend/fanout.py: merging the per-shard parts of INFO and CONFIG."""
import json

import pytest

from floki import requests as rq
from floki import wire
from floki.errors import ConfigDisagreement, QueueNotFound

DOWN = (b"!", b"-ERR shard unavailable, try again\r\n")


class Facts:
    def __init__(self):
        self.applied = []

    def status(self):
        return {"version": "9.9", "pid": 1, "uptime_s": 2.5, "client_count": 3, "shards": 2}

    def apply_config(self, key, value):
        self.applied.append((key, value))


def json_of(reply: bytes):
    head, length, body, tail = reply.split(b"\r\n")
    assert head == b"*1" and int(length[1:]) == len(body) and tail == b""
    return json.loads(body)


def merge(request, parts, facts=None, protover=2):
    from floki.frontend.fanout import merge as real_merge
    return real_merge(request, parts, facts or Facts(), protover)


def test_info_server_sums_counts_and_joins_broken_queues():
    parts = [(wire.JSON, b'{"queue_count":2,"blocked_client_count":1,"broken_queues":{"a":"x"}}'),
             (wire.JSON, b'{"queue_count":1,"blocked_client_count":4,"broken_queues":{"b":"y"}}')]
    info = json_of(merge(rq.InfoServer(), parts))
    assert info == {"version": "9.9", "pid": 1, "uptime_s": 2.5, "client_count": 3, "shards": 2,
                    "shards_up": 2, "queue_count": 3, "blocked_client_count": 5,
                    "broken_queues": {"a": "x", "b": "y"}}


def test_info_server_answers_with_shards_down():
    info = json_of(merge(rq.InfoServer(), [(wire.JSON, b'{"queue_count":2}'), DOWN]))
    assert info["shards_up"] == 1 and info["queue_count"] == 2


@pytest.mark.parametrize("protover,head", [(2, b"$"), (3, b"=")])
def test_plain_info_is_text_lines(protover, head):
    reply = merge(rq.InfoServer(bulk=True), [(wire.JSON, b'{"queue_count":2}'), DOWN],
                  protover=protover)
    assert reply[:1] == head
    text = reply.split(b"\r\n", 1)[1]
    assert b"# Server\r\nversion:9.9\r\n" in text and b"\r\nshards_up:1\r\n" in text
    assert b"\r\nbroken_queue_count:0\r\n" in text


def test_info_queues_union_and_first_error_wins():
    parts = [(wire.JSON, b'{"a":{"head":1}}'), (wire.JSON, b'{"b":{"head":5}}')]
    assert json_of(merge(rq.InfoQueues(""), parts)) == {"a": {"head": 1}, "b": {"head": 5}}
    error = (wire.RESP, b"-IPA nope\r\n")
    assert merge(rq.InfoQueues(""), [error, DOWN]) == b"-IPA nope\r\n"
    assert merge(rq.InfoQueues(""), [(wire.JSON, b"{}"), DOWN]) == DOWN[1]


def test_config_get_server_is_the_configuration_every_answering_shard_runs():
    parts = [DOWN, (wire.JSON, b'{"fsync":"always"}')]
    assert json_of(merge(rq.ConfigGetServer(), parts)) == {"fsync": "always"}
    assert merge(rq.ConfigGetServer(), [DOWN, DOWN]) == DOWN[1]
    same = (wire.JSON, b'{"fsync":"always","max_get_count":5}')
    assert json_of(merge(rq.ConfigGetServer(), [same, DOWN, same])) == {
        "fsync": "always", "max_get_count": 5}


def test_config_get_server_names_what_shards_disagree_on():
    """A CONFIG SET that failed on one shard after another applied it: the first shard must
    not speak for all (fanout.py rule 5)."""
    parts = [(wire.JSON, b'{"fsync":"always","max_get_count":5,"requirepass":"a"}'),
             (wire.JSON, b'{"fsync":"interval","max_get_count":5,"requirepass":"b"}')]
    with pytest.raises(ConfigDisagreement) as caught:
        merge(rq.ConfigGetServer(), parts)
    message = str(caught.value)
    assert "fsync (shard 0: always, shard 1: interval)" in message
    assert "requirepass" in message and "a," not in message and "b)" not in message
    assert "max_get_count" not in message and message.endswith("CONFIG SET it again")


def test_config_get_queues_exact_miss_is_queue_not_found():
    with pytest.raises(QueueNotFound):
        merge(rq.ConfigGetQueues("q", exact=True), [(wire.JSON, b"{}"), (wire.JSON, b"{}")])
    assert json_of(merge(rq.ConfigGetQueues("q", exact=False),
                         [(wire.JSON, b"{}"), (wire.JSON, b"{}")])) == {}
    found = [(wire.JSON, b"{}"), (wire.JSON, b'{"q":{"segment_size":4096}}')]
    assert json_of(merge(rq.ConfigGetQueues("q", exact=True), found)) == {
        "q": {"segment_size": 4096}}


def test_config_set_applies_only_when_every_shard_agrees():
    facts = Facts()
    ok = (wire.JSON, b'{"ok":true}')
    assert merge(rq.ConfigSetServer("fsync", "always"), [ok, ok], facts) == b"+OK\r\n"
    assert facts.applied == [("fsync", "always")]
    assert merge(rq.ConfigSetServer("fsync", "never"), [ok, DOWN], facts) == DOWN[1]
    assert facts.applied == [("fsync", "always")]


def test_json_that_is_not_an_object_is_a_bug():
    with pytest.raises(ValueError):
        merge(rq.InfoQueues(""), [(wire.JSON, b"[1]"), (wire.JSON, b"{}")])


def test_config_get_server_masks_the_password():
    from floki.frontend.fanout import SECRET_MASK
    parts = [(wire.JSON, b'{"requirepass":"s3cret","bind":"0.0.0.0:1"}'), DOWN]
    assert json_of(merge(rq.ConfigGetServer(), parts)) == {"requirepass": SECRET_MASK,
                                                           "bind": "0.0.0.0:1"}
    unset = [(wire.JSON, b'{"requirepass":""}')]
    assert json_of(merge(rq.ConfigGetServer(), unset)) == {"requirepass": ""}
