"""Fast tests of the benchmark's own machinery (bench/): command encoding, reply parsing, the
pipelined connection, the percentile/ratio/target math and the table. No broker runs here;
`make bench ARGS=--quick` is the end-to-end check."""
from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# bench/ is a directory of the repository, not part of the installed package.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import loadgen, report, stats, workloads   # noqa: E402
from bench.loadgen import Connection, FlokiDialect, RedisDialect, ServerError  # noqa: E402
from bench.profile import summarize   # noqa: E402
from bench.run import build_parser   # noqa: E402


def parse_commands(data: bytes) -> list[list[bytes]]:
    """What a server's RESP reader makes of `data`: every command's argv."""
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (item := reader.gets()) is not False:
        out.append(item)
    return out


# --- encoding --------------------------------------------------------------------------------

def test_encode_command_exact_bytes():
    assert loadgen.encode_command("RPUSH", b"q", 12) == \
        b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$2\r\n12\r\n"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_encode_command_round_trips_through_a_resp_reader(args):
    assert parse_commands(loadgen.encode_command(*args)) == [args]


def test_make_body_has_the_size_and_is_deterministic_and_distinct_per_seed():
    body = loadgen.make_body(100)
    assert len(body) == 100 and body == loadgen.make_body(100)
    assert body != loadgen.make_body(100, seed=1)
    assert len(set(body)) > 30 and all(32 < b < 127 for b in body)
    assert loadgen.make_body(0) == b""


def test_floki_push_batch_is_one_rpush_with_every_body():
    cmd, replies = FlokiDialect().push_batch("orders", [b"a", b"bb", b"ccc"])
    assert replies == 1
    assert parse_commands(cmd) == [[b"RPUSH", b"orders", b"a", b"bb", b"ccc"]]


def test_redis_push_batch_is_one_xadd_per_message():
    cmd, replies = RedisDialect().push_batch("orders", [b"a", b"bb"])
    assert replies == 2
    assert parse_commands(cmd) == [[b"XADD", b"orders", b"*", b"d", b"a"],
                                   [b"XADD", b"orders", b"*", b"d", b"bb"]]


@pytest.mark.parametrize("dialect", [FlokiDialect(), RedisDialect()], ids=lambda d: d.name)
def test_paced_prefix_plus_body_is_the_same_command_as_push_batch(dialect):
    body = loadgen.STAMP.pack(123456789) + loadgen.make_body(92)
    spliced = dialect.push_one_prefix("w3", len(body)) + body + b"\r\n"
    assert spliced == dialect.push_batch("w3", [body])[0]


def test_get_commands_of_both_dialects():
    assert parse_commands(FlokiDialect().get_command("q", "ch", 100, None)) == \
        [[b"HMGET", b"q", b"ch", b"100"]]
    assert parse_commands(FlokiDialect().get_command("q", "ch", 100, 1500)) == \
        [[b"HMGET", b"q", b"ch", b"100", b"1.5"]]
    assert parse_commands(RedisDialect().get_command("q", "ch", 10, 200)) == \
        [[b"XREADGROUP", b"GROUP", b"ch", b"c", b"COUNT", b"10", b"BLOCK", b"200",
          b"STREAMS", b"q", b">"]]
    assert b"BLOCK" not in RedisDialect().get_command("q", "ch", 10, None)


def test_create_commands_make_the_queue_then_more_channels():
    assert parse_commands(b"".join(FlokiDialect().create_commands("q", ["a", "b"]))) == \
        [[b"SET", b"q", b"a"], [b"SET", b"q", b"b", b"NX"]]
    assert parse_commands(b"".join(RedisDialect().create_commands("q", ["a", "b"]))) == \
        [[b"XGROUP", b"CREATE", b"q", b"a", b"$", b"MKSTREAM"],
         [b"XGROUP", b"CREATE", b"q", b"b", b"$"]]


def test_ack_commands_carry_the_tokens():
    assert parse_commands(FlokiDialect().ack_command("q", "ch", [b"11", b"22"])) == \
        [[b"HDEL", b"q", b"ch", b"11", b"22"]]
    assert parse_commands(RedisDialect().ack_command("q", "ch", [b"1-0"])) == \
        [[b"XACK", b"q", b"ch", b"1-0"]]


# --- reply parsing ---------------------------------------------------------------------------

def parse_reply(data: bytes):
    reader = hiredis.Reader()
    reader.feed(data)
    return reader.gets()


def test_floki_get_reply_becomes_deliveries_with_ticket_tokens():
    reply = parse_reply(b"*2\r\n*3\r\n:1\r\n:5712373411012907390\r\n$1\r\na\r\n"
                        b"*3\r\n:2\r\n:-7\r\n$2\r\nbb\r\n")
    got = FlokiDialect().parse_get(reply)
    assert [(d.msg_id, d.token, d.body) for d in got] == \
        [(1, b"5712373411012907390", b"a"), (2, b"-7", b"bb")]
    assert FlokiDialect().parse_get(parse_reply(b"*0\r\n")) == []
    with pytest.raises(ServerError):
        FlokiDialect().parse_get(b"OK")


def test_redis_get_reply_becomes_deliveries_with_id_tokens():
    reply = parse_reply(b"*1\r\n*2\r\n$1\r\nq\r\n*2\r\n"
                        b"*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$1\r\na\r\n"
                        b"*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nd\r\n$2\r\nbb\r\n")
    got = RedisDialect().parse_get(reply)
    assert [(d.msg_id, d.token, d.body) for d in got] == \
        [(b"1-0", b"1-0", b"a"), (b"1-1", b"1-1", b"bb")]
    assert RedisDialect().parse_get(parse_reply(b"*-1\r\n")) == []   # nil: nothing came


def test_push_replies_are_checked():
    FlokiDialect().check_push(100, 100)
    with pytest.raises(ServerError):
        FlokiDialect().check_push(99, 100)
    RedisDialect().check_push(b"1700000000000-0", 1)
    with pytest.raises(ServerError):
        RedisDialect().check_push(None, 1)


def test_batches_cover_every_message_and_reuse_the_encoded_bytes():
    got = list(loadgen._batches(FlokiDialect(), ["a", "b"], 250, 3, 100))
    assert [m for _, _, m in got] == [100, 100, 100, 100, 50, 50]
    argvs = [parse_commands(cmd)[0] for cmd, _, _ in got]
    assert [argv[1] for argv in argvs] == [b"a", b"b", b"a", b"b", b"a", b"b"]
    assert all(len(argv) - 2 == m for argv, (_, _, m) in zip(argvs, got))
    assert argvs[0][2:] != argvs[2][2:]          # variants carry different bodies
    assert len(set(argvs[0][2:])) == 100         # all distinct within a batch


def test_batches_are_encoded_once_and_cycled():
    got = list(loadgen._batches(RedisDialect(), ["q"], 100 * (loadgen.BATCH_VARIANTS + 1), 10,
                                100))
    assert got[0][0] is got[loadgen.BATCH_VARIANTS][0]   # the same bytes object, reused
    assert got[0][1] == 100                              # one XADD reply per message


def test_batches_are_encoded_before_the_first_one_is_taken():
    # A producer builds its batches before the timed phase starts: encoding must not wait for
    # the first next() (it did, and W5's 1,000 queues were encoded inside the timed window).
    calls = []

    class Counting(FlokiDialect):
        def push_batch(self, queue, bodies):
            calls.append(queue)
            return super().push_batch(queue, bodies)

    batches = loadgen._batches(Counting(), ["a", "b", "c"], 150, 10, 100)
    assert sorted(set(calls)) == ["a", "b", "c"] and len(calls) > 3
    encoded = len(calls)
    assert len(list(batches)) == 6
    assert len(calls) == encoded                 # iterating encodes nothing more


def test_batch_variants_stay_within_the_memory_budget():
    queues = [f"q{i}" for i in range(1000)]
    batches = loadgen._batches(FlokiDialect(), queues, 200, 100, 100)
    first = [next(batches) for _ in range(2000)]
    distinct = {id(cmd) for cmd, _, _ in first}
    assert len(distinct) * 100 * 116 <= loadgen.ENCODED_BUDGET_BYTES


# --- connection ------------------------------------------------------------------------------

@pytest.fixture
def canned_server():
    """A one-connection TCP server on loopback that answers each client write with the next
    canned chunk list, sent piece by piece (replies split across recv calls)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    chunks: list[list[bytes]] = []

    def serve():
        conn, _ = listener.accept()
        with conn:
            for pieces in chunks:
                if not conn.recv(65536):
                    return
                for piece in pieces:
                    conn.sendall(piece)
            conn.recv(65536)   # wait for the client to close

    thread = threading.Thread(target=serve, daemon=True)
    yield listener.getsockname()[1], chunks, thread
    listener.close()
    thread.join(5)


def test_connection_reads_replies_split_across_reads_and_raises_on_errors(canned_server):
    port, chunks, thread = canned_server
    chunks += [[b"*1\r\n*3\r\n:1\r\n:2", b"\r\n$3\r\nabc\r\n"], [b"-QNF Queue Not Found\r\n"],
               [b":3\r\n:4", b"\r\n"]]
    thread.start()
    conn = Connection("127.0.0.1", port)
    try:
        assert conn.call(b"*1\r\n$4\r\nPING\r\n") == [[1, 2, b"abc"]]
        with pytest.raises(ServerError, match="QNF"):
            conn.call(b"*1\r\n$4\r\nPING\r\n")
        conn.send(b"*1\r\n$4\r\nPING\r\n")
        assert [conn.next_reply(), conn.next_reply()] == [3, 4]
    finally:
        conn.close()


# --- stats -----------------------------------------------------------------------------------

def test_percentile_nearest_rank():
    values = list(range(1, 1001))
    assert stats.percentile(values, 50) == 500
    assert stats.percentile(values, 99) == 990
    assert stats.percentile(values, 99.9) == 999
    assert stats.percentile(values, 100) == 1000
    assert stats.percentile([7], 0.1) == 7
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1], 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=300),
       st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_percentile_is_a_sample_with_p_percent_at_or_below_it(values, p, q):
    ordered = sorted(values)
    value = stats.percentile(ordered, p)
    assert value in ordered
    assert sum(1 for v in ordered if v <= value) >= p / 100 * len(ordered) - 1e-9
    # the nearest rank: one sample fewer would be below p%
    assert sum(1 for v in ordered if v < value) < p / 100 * len(ordered) + 1e-9
    if p <= q:
        assert value <= stats.percentile(ordered, q)


def test_latency_summary_is_in_milliseconds():
    summary = stats.latency_summary_ms([1000] * 98 + [5000, 40000])
    assert summary == {"count": 100, "p50_ms": 1.0, "p99_ms": 5.0, "p999_ms": 40.0,
                       "max_ms": 40.0}


def test_rate_and_ratio():
    assert stats.rate_per_s(1000, 0.5) == 2000
    with pytest.raises(ValueError):
        stats.rate_per_s(1, 0)
    assert stats.ratio(150, 100) == 1.5
    assert stats.ratio(None, 100) is None
    assert stats.ratio(1, 0) is None
    row = stats.Row("W1", "throughput", "msgs/s", 50.0, 100.0, True)
    assert row.ratio == 0.5 and row.to_json()["ratio"] == 0.5


def _results(**changes):
    results = {
        "w1_produce": {"floki": {"msgs_per_s": 200.0}, "redis": {"msgs_per_s": 100.0}},
        "w2_fanout": {"floki": {"msgs_per_s": 90.0, "exactly_once": True},
                      "redis": {"msgs_per_s": 100.0}},
        "w3_latency": {"floki": {"p99_ms": 3.0, "max_ms": 49.0}, "redis": {"p99_ms": 1.0}},
        "w4_large": {"floki": {"produce_mb_per_s": 100.0, "consume_mb_per_s": 100.0},
                     "redis": {"produce_mb_per_s": 100.0, "consume_mb_per_s": 50.0}},
        "w5_many_queues": {"floki": {"produce_msgs_per_s": 160.0}, "redis": {}},
        "footprint": {"floki": {"shard_rss_max_bytes": 150 * stats.MIB, "restart_s": 2.5},
                      "redis": {}},
    }
    results.update(changes)
    return results


def test_targets_pass_miss_and_skip():
    verdicts = {t.name: t.verdict.value for t in stats.evaluate_targets(_results())}
    assert verdicts == {
        "W1 produce (everysec)": "PASS", "W2 fanout": "MISS", "W4 large, produce": "PASS",
        "W4 large, consume": "PASS", "W3 latency p99": "MISS", "W3 latency max": "PASS",
        "W1 produce (fsync always)": "SKIP", "W5 many queues": "PASS", "Shard RSS": "PASS",
        "Restart after kill -9": "MISS"}


def test_a_failed_delivery_check_misses_w2_whatever_the_speed():
    results = _results(w2_fanout={"floki": {"msgs_per_s": 500.0, "exactly_once": False},
                                  "redis": {"msgs_per_s": 100.0}})
    w2 = next(t for t in stats.evaluate_targets(results) if t.name == "W2 fanout")
    assert w2.verdict is stats.Verdict.MISS and "FAILED" in w2.measured


def test_no_results_means_every_target_is_skipped():
    assert {t.verdict for t in stats.evaluate_targets({})} == {stats.Verdict.SKIP}


# --- workloads, report, profile, command line ------------------------------------------------

def test_every_workload_has_rows_that_read_its_figures():
    for name in workloads.WORKLOADS:
        assert workloads.rows(name, None, None)          # known to rows(); None is allowed
    w1 = workloads.rows("w1_produce", {"msgs_per_s": 10.0, "mb_per_s": 1.0},
                        {"msgs_per_s": 20.0, "mb_per_s": 2.0})
    assert [(r.floki, r.redis, r.ratio) for r in w1] == [(10.0, 20.0, 0.5), (1.0, 2.0, 0.5)]
    disk = workloads.rows("footprint", {"disk_bytes": 3 * stats.MIB}, None)[1]
    assert disk.floki == 3.0 and disk.redis is None


def test_sizes_overrides_and_quick():
    sizes = workloads.Sizes().with_overrides({"w1_messages": 5, "batch": None, "other": 1})
    assert sizes.w1_messages == 5 and sizes.batch == 100
    assert workloads.Sizes.quick().w1_messages < workloads.Sizes().w1_messages


def test_every_size_is_a_command_line_flag():
    args = build_parser().parse_args(["--w1-messages", "7", "--w3-rate", "10.5", "--quick"])
    assert args.w1_messages == 7 and args.w3_rate == 10.5 and args.quick
    assert all(hasattr(args, f) for f in workloads.Sizes.__dataclass_fields__)


def test_table_is_aligned_and_shows_missing_figures_as_dashes():
    lines = report.table_lines([stats.Row("W1 produce", "throughput", "msgs/s", 123456.7,
                                          None, True),
                                stats.Row("W3 latency", "p99", "ms", 0.01234, 0.5, False)])
    assert len({len(line) for line in lines[:2]}) == 1
    assert "123,457" in lines[2] and lines[2].count("-") >= 2
    assert "0.0123" in lines[3] and "0.02x" in lines[3] and "lower" in lines[3]
    assert report.format_number(None) == "-" and report.format_number(12.345) == "12.3"


def test_target_lines_show_the_verdict_first():
    target = stats.ratio_target("W1", 1.2, 1.0)
    assert report.target_lines([target])[0].startswith("PASS  W1")


def test_profile_summary_counts_own_and_total_time_per_function():
    raw = ["main (a.py:1);loop (a.py:5);push (b.py:10) 30",
           "main (a.py:1);loop (a.py:5);fsync (c.py:2) 10",
           "main (a.py:1);loop (a.py:5) 10"]
    text = summarize(raw, seconds=1.0, rate_hz=100)
    assert "samples: 50" in text and "50% of one core" in text
    own, total = text.split("total time")
    assert "60.0%  push (b.py)" in own and "20.0%  loop (a.py)" in own
    assert "100.0%  main (a.py)" in total


def test_median_of_runs_takes_medians_the_worst_max_and_every_check():
    runs = [{"msgs_per_s": 300.0, "max_ms": 9.0, "exactly_once": True, "phases": {"a": 1}},
            {"msgs_per_s": 100.0, "max_ms": 60.0, "exactly_once": True, "phases": {"a": 2}},
            {"msgs_per_s": 200.0, "max_ms": 5.0, "exactly_once": False, "phases": {"a": 3}}]
    merged = stats.median_of_runs(runs)
    assert merged == {"msgs_per_s": 200.0, "max_ms": 60.0, "exactly_once": False,
                      "phases": {"a": 1}}
    assert stats.median_of_runs(runs[:2])["msgs_per_s"] == 200.0
    assert stats.median_of_runs(runs[:1]) == runs[0]
    with pytest.raises(ValueError):
        stats.median_of_runs([])


def test_repeat_runs_take_turns_and_the_table_shows_medians(tmp_path, monkeypatch):
    from bench import run as bench_run
    order, figures = [], {"floki": iter([10.0, 30.0, 20.0]), "redis": iter([5.0, 5.0, 50.0])}

    def fake_run_one(name, kind, ctx, args):
        order.append((name, kind))
        return {"msgs_per_s": next(figures[kind]), "mb_per_s": 1.0}
    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    monkeypatch.setattr(bench_run, "redis_version", lambda path: "7.0")
    monkeypatch.setattr(bench_run, "ensure_redis_server", lambda: "redis-server")
    code = bench_run.main(["--only", "w1_produce", "--repeat", "3", "--no-chart",
                           "--no-progress", "--results-dir", str(tmp_path)])
    assert code == 0
    assert order == [("w1_produce", "floki"), ("w1_produce", "redis")] * 3
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert document["results"]["w1_produce"]["floki"]["msgs_per_s"] == 20.0
    assert document["results"]["w1_produce"]["redis"]["msgs_per_s"] == 5.0
    assert len(document["runs"]["w1_produce"]["floki"]) == 3
    assert document["rows"][0]["ratio"] == 4.0


def test_per_command_table_adds_up_the_threads_and_hides_the_idle_ones():
    from bench.percommand import Probe, format_table
    probe = Probe("push one", "floki", 10, 400.0, 40.0,
                  {"frontend/python": 180.0, "shard-0/python": 160.0, "shard-1/python": 0.4})
    assert probe.server_us == 340.4
    lines = format_table([probe]).splitlines()
    assert lines[1].split() == ["push", "one", "floki", "400", "340", "40"]
    assert lines[2].strip() == "frontend/python 180, shard-0/python 160"
