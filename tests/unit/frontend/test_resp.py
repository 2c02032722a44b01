"""floki/frontend/resp.py: request framing (corpus, chunking, caps, fuzz) and reply encoders."""
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floki.errors import InvalidParameter, ProtocolError
from floki.frontend import resp
from floki.frontend.resp import FrameLimits, RequestReader, split_inline

CORPUS = Path(__file__).resolve().parents[2] / "data" / "resp"


def corpus(kind: str) -> list[tuple[str, bytes, dict]]:
    cases = []
    for path in sorted((CORPUS / kind).glob("*.resp")):
        expected = json.loads(path.with_suffix(".json").read_text())
        cases.append((path.stem, path.read_bytes(), expected))
    assert cases, f"empty corpus {kind}"
    return cases


def as_bytes(commands: list[list[str]]) -> list[list[bytes]]:
    return [[arg.encode("latin-1") for arg in argv] for argv in commands]


def chunkings(data: bytes) -> dict[str, list[bytes]]:
    """The same bytes split whole, byte by byte, and at random places (fixed seeds)."""
    out = {"whole": [data], "bytewise": [data[i:i + 1] for i in range(len(data))]}
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
        out[f"random{seed}"] = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return out


def run(reader: RequestReader, chunks: list[bytes]) -> tuple[list[list[bytes]], str | None]:
    """Feeds `chunks`, collecting commands; returns (commands, protocol error text or None)."""
    commands: list[list[bytes]] = []
    error = None
    for chunk in chunks:
        reader.feed(chunk)
        try:
            while batch := reader.commands():
                commands += batch
        except ProtocolError as exc:
            error = exc.message
            break
    return commands, error


def case_id(value) -> str:
    return value if isinstance(value, str) else ""


@pytest.mark.parametrize("name,data,expected", corpus("valid"), ids=case_id)
def test_valid_corpus_decodes_the_same_in_any_chunking(name, data, expected):
    for how, chunks in chunkings(data).items():
        reader = RequestReader()
        commands, error = run(reader, chunks)
        assert error is None, how
        assert commands == as_bytes(expected["commands"]), how
        assert reader.failed is False


@pytest.mark.parametrize("name,data,expected", corpus("invalid"), ids=case_id)
def test_invalid_corpus_gives_commands_then_the_redis_error(name, data, expected):
    for how, chunks in chunkings(data).items():
        reader = RequestReader()
        commands, error = run(reader, chunks)
        assert commands == as_bytes(expected["commands"]), how
        assert error == expected["error"], how


def test_partial_frame_is_completed_by_later_bytes():
    reader = RequestReader()
    reader.feed(b"*2\r\n$4\r\nECHO\r\n$5\r\nhel")
    assert reader.commands() == []
    reader.feed(b"lo\r")
    assert reader.commands() == []
    reader.feed(b"\n")
    assert reader.commands() == [[b"ECHO", b"hello"]]


def test_a_large_body_split_anywhere_comes_out_whole():
    body = bytes(range(256)) * 400
    data = b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$%d\r\n%b\r\n" % (len(body), body) + b"PING\r\n"
    for how, chunks in chunkings(data).items():
        if how == "bytewise":
            chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
        assert run(RequestReader(), chunks) == ([[b"RPUSH", b"q", body], [b"PING"]], None), how


def test_error_is_final_and_later_bytes_are_ignored():
    reader = RequestReader()
    reader.feed(b"*1\r\n$x\r\n")
    with pytest.raises(ProtocolError):
        reader.commands()
    reader.feed(b"*1\r\n$4\r\nPING\r\n")
    with pytest.raises(ProtocolError) as err:
        reader.commands()
    assert err.value.fatal and reader.failed


def test_commands_before_the_error_come_first_in_the_same_feed():
    reader = RequestReader()
    reader.feed(b"PING\r\nPING\r\n*1\r\n:1\r\n")
    assert reader.commands() == [[b"PING"], [b"PING"]]
    with pytest.raises(ProtocolError, match="expected '\\$', got ':'"):
        reader.commands()


def test_bulk_above_the_cap_is_refused_from_its_header_alone():
    reader = RequestReader(FrameLimits(max_bulk_bytes=1000))
    reader.feed(b"*2\r\n$4\r\nECHO\r\n$1000\r\n")   # at the cap: fine, waits for the body
    assert reader.commands() == []
    reader = RequestReader(FrameLimits(max_bulk_bytes=1000))
    reader.feed(b"*2\r\n$4\r\nECHO\r\n$1001\r\n")   # no body byte sent yet
    with pytest.raises(ProtocolError, match="invalid bulk length"):
        reader.commands()


def test_multibulk_count_above_the_cap_is_refused():
    reader = RequestReader(FrameLimits(max_multibulk_length=10))
    reader.feed(b"*10\r\n")
    assert reader.commands() == []
    reader = RequestReader(FrameLimits(max_multibulk_length=10))
    reader.feed(b"*11\r\n")
    with pytest.raises(ProtocolError, match="invalid multibulk length"):
        reader.commands()


def test_request_size_cap_counts_declared_bytes_before_they_arrive():
    reader = RequestReader(FrameLimits(max_request_bytes=100))
    reader.feed(b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$70\r\n")   # 4+11+7+76 = 98 declared
    assert reader.commands() == []
    reader = RequestReader(FrameLimits(max_request_bytes=100))
    reader.feed(b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$73\r\n")
    with pytest.raises(ProtocolError, match="too big request"):
        reader.commands()


def test_request_size_cap_is_per_command():
    reader = RequestReader(FrameLimits(max_request_bytes=40))
    one = b"*2\r\n$4\r\nECHO\r\n$10\r\n0123456789\r\n"           # 34 bytes
    assert run(reader, [one * 20]) == ([[b"ECHO", b"0123456789"]] * 20, None)


@pytest.mark.parametrize("head,error", [
    (b"PING ", "too big inline request"),
    (b"*1", "too big mbulk count string"),
    (b"*1\r\n$1", "too big bulk count string"),
])
def test_a_line_without_newline_past_64_kib_is_refused(head, error):
    reader = RequestReader()
    line = head[head.rfind(b"\n") + 1:]     # the limit counts from the start of the line
    reader.feed(head + b"1" * (resp.MAX_INLINE_BYTES - len(line)))
    assert reader.commands() == []          # exactly 64 KiB: still waiting
    reader.feed(b"1")
    with pytest.raises(ProtocolError, match=error):
        reader.commands()


@pytest.mark.parametrize("prefix", [b"\x00", b"*\x00", b"$\x00"])
def test_desync_garbage_closes_with_a_protocol_error(prefix):
    """Redis protocol.tcl 'Protocol desync regression test #1-3'."""
    rng = random.Random(7)
    garbage = bytes(rng.choice(b"abcdef\x00\x01*$:+ ") for _ in range(resp.MAX_INLINE_BYTES + 10))
    commands, error = run(RequestReader(), [prefix, garbage[:1000], garbage[1000:]])
    assert error is not None and error.startswith("Protocol error")


@pytest.mark.parametrize("line,argv", [
    (b"", []),
    (b"   \t ", []),
    (b"get key", [b"get", b"key"]),
    (b'set "a b" c', [b"set", b"a b", b"c"]),
    (b"set 'it''s'", None),                           # closing quote followed by a quote
    (b"""set 'it\\'s' x""", [b"set", b"it's", b"x"]),
    (b'echo "\\x41\\x4a\\xzz"', [b"echo", b"AJxzz"]),
    (b'echo "tab\\there"', [b"echo", b"tab\there"]),
    (b'echo "unterminated', None),
    (b"echo 'unterminated", None),
    (b'echo ""', [b"echo", b""]),
    (b'echo "a"b', None),
    (b"a\x0bb c", [b"a\x0bb", b"c"]),                 # \v ends no argument (only skipped between)
    (b"a\x00b c", [b"a"]),                            # C string: NUL ends the line
])
def test_split_inline_follows_sdssplitargs(line, argv):
    if argv is None:
        with pytest.raises(ProtocolError, match="unbalanced quotes"):
            split_inline(line)
    else:
        assert split_inline(line) == argv


# --- encoders -------------------------------------------------------------------------------

def test_scalar_encoders():
    assert resp.encode_simple("OK") == b"+OK\r\n"
    assert resp.encode_integer(-42) == b":-42\r\n"
    assert resp.encode_bulk(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert resp.encode_bulk("é") == b"$2\r\n\xc3\xa9\r\n"
    assert resp.encode_null(2) == b"$-1\r\n"
    assert resp.encode_null(3) == b"_\r\n"
    assert resp.encode_error(InvalidParameter("Invalid count")) == b"-IPA Invalid count\r\n"
    assert resp.encode_error(KeyError("x")) == b"-ERR internal error\r\n"


def test_verbatim_is_bulk_in_resp2_and_txt_in_resp3():
    assert resp.encode_verbatim("a:1\r\n", 2) == b"$5\r\na:1\r\n\r\n"
    assert resp.encode_verbatim("a:1\r\n", 3) == b"=9\r\ntxt:a:1\r\n\r\n"


def test_map_is_flat_array_in_resp2_and_map_in_resp3():
    value = {"server": "floki", "proto": 2, "modules": []}
    assert resp.encode_map(value, 2) == (b"*6\r\n$6\r\nserver\r\n$5\r\nfloki\r\n"
                                         b"$5\r\nproto\r\n:2\r\n$7\r\nmodules\r\n*0\r\n")
    assert resp.encode_map(value, 3).startswith(b"%3\r\n$6\r\nserver\r\n")


def test_encoded_values_parse_back_with_hiredis():
    import hiredis
    value = [b"x", 1, None, [b"", -5], "text"]
    reader = hiredis.Reader()
    reader.feed(resp.encode_array(value, 2))
    assert reader.gets() == [b"x", 1, None, [b"", -5], b"text"]
    with pytest.raises(TypeError):
        resp.encode_value(1.5)


# --- properties -------------------------------------------------------------------------------

def encode_request(argv: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(argv) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in argv)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


argvs = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(commands=argvs, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_commands_in_any_chunking_round_trip(commands, cuts):
    data = b"".join(encode_request(argv) for argv in commands)
    assert run(RequestReader(), split_at(data, cuts)) == (commands, None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_random_bytes_give_only_argvs_need_more_or_protocol_error(data, cuts):
    reader = RequestReader(FrameLimits(max_bulk_bytes=1000, max_multibulk_length=100,
                                        max_request_bytes=5000))
    for chunk in split_at(data, cuts):
        reader.feed(chunk)
        try:
            for argv in reader.commands():
                assert isinstance(argv, list) and argv
                assert all(type(arg) is bytes for arg in argv)
        except ProtocolError:
            return
    assert reader.commands() == []           # whatever is left is a partial command


resp_bytes = st.sampled_from([b"*", b"$", b"\r\n", b"\r", b"\n", b"1", b"0", b"-", b"3", b"x",
                              b"*1\r\n", b"*2\r\n", b"$1\r\n", b"$0\r\n", b"PING", b" ", b"\""])


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(resp_bytes, max_size=40),
       cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_resp_like_token_soup_parses_the_same_in_any_chunking(tokens, cuts):
    """Mutated frames: whole and chunked feeding agree on every command and on the error."""
    data = b"".join(tokens)
    assert run(RequestReader(), split_at(data, cuts)) == run(RequestReader(), [data])


# --- limits (issue 4): dropped arguments, long arrays, pre-auth limits -------------------------

def refused_run(reader: RequestReader, chunks: list[bytes]):
    """Like run(), but keeps the FlokiErrors the reader returns in a refused command's place."""
    out, error = [], None
    for chunk in chunks:
        reader.feed(chunk)
        try:
            while batch := reader.commands():
                out += [item if isinstance(item, list) else f"refused: {item.message}"
                        for item in batch]
        except ProtocolError as exc:
            error = exc.message
            break
    return out, error


def test_an_argument_above_max_message_size_is_dropped_and_its_command_refused():
    limits = FrameLimits(max_message_bytes=100 * 1024)
    body = b"x" * (200 * 1024)
    data = (encode_request([b"RPUSH", b"q", b"ok", body, b"tail"]) + b"PING\r\n"
            + encode_request([b"ECHO", b"after"]))
    expected = (["refused: message too large (204800 bytes, max_message_size is 102400)",
                 [b"PING"], [b"ECHO", b"after"]], None)
    for how, chunks in chunkings(data).items():
        if how == "bytewise":
            chunks = [data[i:i + 997] for i in range(0, len(data), 997)]
        assert refused_run(RequestReader(limits), chunks) == expected, how


def test_a_dropped_body_is_never_held():
    reader = RequestReader(FrameLimits(max_message_bytes=64 * 1024))
    reader.feed(b"*3\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n$%d\r\n" % (50 * 1024**2))
    for _ in range(100):
        reader.feed(b"z" * 65536)
        assert reader._hiredis.len() < 1024          # hiredis holds headers only
    assert reader.commands() == []


def test_a_dropped_body_must_still_end_with_crlf():
    reader = RequestReader(FrameLimits(max_message_bytes=64 * 1024))
    data = b"*2\r\n$4\r\nECHO\r\n$70000\r\n" + b"a" * 70000 + b"XY"
    assert refused_run(reader, [data[:100], data[100:]]) == (
        [], "Protocol error: bulk data does not end with CRLF")


def test_names_and_numbers_are_never_dropped_however_small_max_message_size():
    reader = RequestReader(FrameLimits(max_message_bytes=1))
    reader.feed(encode_request([b"HMGET", b"q" * 200, b"c", b"10"]))
    assert reader.commands() == [[b"HMGET", b"q" * 200, b"c", b"10"]]


def test_max_bulk_len_wins_over_max_message_size():
    reader = RequestReader(FrameLimits(max_bulk_bytes=1000, max_message_bytes=10**9))
    reader.feed(b"*2\r\n$4\r\nECHO\r\n$1001\r\n")
    with pytest.raises(ProtocolError, match="invalid bulk length"):
        reader.commands()


def test_a_runtime_change_of_max_message_size_holds_for_the_next_read():
    limits = FrameLimits(max_message_bytes=10**6)
    reader = RequestReader(limits)
    frame = encode_request([b"ECHO", b"y" * 100_000])
    reader.feed(frame)
    assert reader.commands() == [[b"ECHO", b"y" * 100_000]]
    limits.set_max_message_bytes(70_000)
    reader.feed(frame)
    assert [item.message for item in reader.commands()] == [
        "message too large (100000 bytes, max_message_size is 70000)"]


def test_a_million_element_header_commits_no_memory():
    import tracemalloc
    tracemalloc.start()
    try:
        readers = [RequestReader() for _ in range(20)]
        before = tracemalloc.get_traced_memory()[0]
        for reader in readers:
            reader.feed(b"*1000000\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n")
            assert reader.commands() == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown          # a list of 10**6 slots is 8 MB per reader


@pytest.mark.parametrize("count", [1024, 1025, 3000])
def test_long_arrays_split_anywhere_come_out_whole(count):
    argv = [b"HDEL", b"q", b"c"] + [b"%d" % i for i in range(count - 3)]
    data = encode_request(argv) + encode_request([b"PING"])
    for how, chunks in chunkings(data).items():
        if how == "bytewise":
            chunks = [data[i:i + 5] for i in range(0, len(data), 5)]
        assert run(RequestReader(), chunks) == ([argv, [b"PING"]], None), how


def test_a_long_array_with_a_dropped_argument_is_refused_whole():
    limits = FrameLimits(max_message_bytes=64 * 1024)
    argv = [b"RPUSH", b"q"] + [b"m"] * 2000 + [b"b" * 70_000]
    data = encode_request(argv) + encode_request([b"ECHO", b"x"])
    out = refused_run(RequestReader(limits), [data[:5000], data[5000:]])
    assert out == (["refused: message too large (70000 bytes, max_message_size is 65536)",
                    [b"ECHO", b"x"]], None)


def before_auth() -> FrameLimits:
    return FrameLimits.before_auth_of(FrameLimits())


@pytest.mark.parametrize("data,error", [
    (b"*11\r\n", "Protocol error: unauthenticated multibulk length"),
    (b"*2\r\n$4\r\nECHO\r\n$16385\r\n", "Protocol error: unauthenticated bulk length"),
    (b"*2\r\n$4\r\nECHO\r\n$536870913\r\n", "Protocol error: invalid bulk length"),
    (b"*1048577\r\n", "Protocol error: invalid multibulk length"),
])
def test_limits_before_auth_are_redis_s(data, error):
    assert run(RequestReader(before_auth()), [data]) == ([], error)


def test_before_auth_ten_args_and_16_kib_bulks_pass():
    argv = [b"HELLO", b"3", b"AUTH", b"default", b"p" * 16384, b"SETNAME", b"x", b"a", b"b", b"c"]
    assert run(RequestReader(before_auth()), [encode_request(argv)]) == ([argv], None)


def test_a_limit_broken_after_auth_in_the_same_read_waits_for_the_auth():
    big = encode_request([b"RPUSH", b"q", b"m" * 20_000])
    data = encode_request([b"AUTH", b"pw"]) + big + encode_request([b"PING"])
    reader = RequestReader(before_auth())
    reader.feed(data)
    assert reader.commands() == [[b"AUTH", b"pw"]]
    reader.set_limits(FrameLimits())                  # the AUTH succeeded
    assert reader.commands() == [[b"RPUSH", b"q", b"m" * 20_000], [b"PING"]]
    reader.feed(b"*1\r\n$4\r\nPING\r\n")
    assert reader.commands() == [[b"PING"]]


def test_a_limit_broken_after_a_failed_auth_is_final():
    data = encode_request([b"AUTH", b"bad"]) + b"*11\r\n" + encode_request([b"PING"])
    reader = RequestReader(before_auth())
    reader.feed(data)
    assert reader.commands() == [[b"AUTH", b"bad"]]
    reader.feed(encode_request([b"PING"]))            # bytes after the broken frame: ignored
    with pytest.raises(ProtocolError, match="unauthenticated multibulk length"):
        reader.commands()
    reader.set_limits(FrameLimits())                  # too late: the error stands
    with pytest.raises(ProtocolError):
        reader.commands()


small_argvs = st.lists(st.lists(st.binary(max_size=12), min_size=1, max_size=4), max_size=5)
any_argvs = st.lists(st.lists(st.one_of(st.binary(max_size=12), st.just(b"L" * 17_000)),
                              min_size=1, max_size=14), max_size=5)


@settings(max_examples=200, deadline=None)
@given(first=st.lists(st.binary(max_size=12), min_size=1, max_size=4), rest=any_argvs,
       cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_authenticating_after_the_first_command_equals_reading_authenticated(first, rest, cuts):
    """Rule 7: whatever the chunking, lifting the limits once the first command is out gives
    the same commands as a reader that never had them."""
    data = b"".join(encode_request(argv) for argv in [first, *rest])
    reader = RequestReader(before_auth())
    out, error = [], None
    for chunk in split_at(data, cuts):
        reader.feed(chunk)
        try:
            while batch := reader.commands():
                if not out:
                    reader.set_limits(FrameLimits())
                out += batch
        except ProtocolError as exc:
            error = exc.message
            break
    assert (out, error) == ([first, *rest], None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=8),
       pre_auth=st.booleans())
def test_random_bytes_under_every_limit_give_only_known_outcomes(data, cuts, pre_auth):
    limits = FrameLimits(max_bulk_bytes=300, max_multibulk_length=20, max_request_bytes=2000,
                         max_message_bytes=1)
    limits.max_arg_bytes = 8               # drop bodies above 8 bytes (the floor is for servers)
    reader = RequestReader(FrameLimits.before_auth_of(limits) if pre_auth else limits)
    for chunk in split_at(data, cuts):
        reader.feed(chunk)
        try:
            for item in reader.commands():
                if isinstance(item, list):
                    assert item and all(type(arg) is bytes for arg in item)
                    assert len(item) <= 20 and all(len(arg) <= 300 for arg in item)
                else:
                    assert item.message.startswith("message too large")
        except ProtocolError as exc:
            assert exc.message.startswith("Protocol error: ")
            return
    try:
        assert reader.commands() == []       # whatever is left is a partial command
    except ProtocolError:
        assert pre_auth                      # or a frame held back by rule 7, now final


# --- speed (rule 8): vetted-header lookups and runs of equal bulks ---------------------------
# Fed byte by byte, a bulk header always starts a read, so it is never found among the vetted
# ones and no run is taken: bytewise feeding is the reference the shortcuts are held to.

def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@pytest.fixture
def runs_taken(monkeypatch) -> list[int]:
    """The lengths of the runs the scanner took, so a test can check it went down that path."""
    taken: list[int] = []
    same_bulks = resp._same_bulks

    def spy(data, at, pattern, step, count):
        result = same_bulks(data, at, pattern, step, count)
        taken.append(result)
        return result
    monkeypatch.setattr(resp, "_same_bulks", spy)
    return taken


def run_of(length: int, count: int, fill: int = 97) -> list[bytes]:
    """`count` arguments of `length` bytes: one header, distinct bodies."""
    return [bytes([fill + i % 26]) * length for i in range(count)]


def assert_same_in_every_chunking(data: bytes, expected, limits=None, runner=run):
    make = (lambda: RequestReader(limits)) if limits is not None else RequestReader
    for how, chunks in chunkings(data).items():
        assert runner(make(), chunks) == expected, how


def test_a_run_broken_by_another_length_gives_every_argument(runs_taken):
    argv = [b"RPUSH", b"q", *run_of(5, 30), b"x" * 6, *run_of(5, 30, fill=65), b"d" * 4]
    data = encode_request(argv) + encode_request([b"PING"])
    assert_same_in_every_chunking(data, ([argv, [b"PING"]], None))
    assert runs_taken and max(runs_taken) >= 16


def test_a_run_of_tickets_with_another_digit_count_gives_every_ticket():
    tickets = [b"%d" % (10**18 + i) for i in range(40)]
    tickets[7] = tickets[23] = b"1" * 18                   # a digit less: another header
    argv = [b"HDEL", b"q", b"ch", *tickets]
    assert_same_in_every_chunking(encode_request(argv), ([argv], None))


@pytest.mark.parametrize("broken", [0, 1, 17, 18, 19, 35, 39])
@pytest.mark.parametrize("ending", [b"XY", b"\rX", b"X\n", b"\n\r"])
def test_a_body_without_crlf_in_a_run_is_still_refused(broken, ending):
    bodies = run_of(5, 40)
    frame = bytearray(encode_request([b"RPUSH", b"q", *bodies]))
    at = frame.index(bodies[broken]) + 5
    frame[at:at + 2] = ending
    data = encode_request([b"PING"]) + bytes(frame) + encode_request([b"PING"])
    expected = ([[b"PING"]], "Protocol error: bulk data does not end with CRLF")
    assert_same_in_every_chunking(data, expected)
    assert run(RequestReader(), bytewise(data)) == expected


def test_a_run_cut_by_the_end_of_the_array_leaves_the_next_command_alone():
    first = [b"RPUSH", b"q", *run_of(3, 20)]
    second = [b"RPUSH", b"q", *run_of(3, 20, fill=65)]      # same header right after the array
    data = encode_request(first) + encode_request(second)
    assert_same_in_every_chunking(data, ([first, second], None))
    # Inline commands that look like more of the run are inline commands.
    data = encode_request(first) + b"$3\r\nabc\r\n" * 20
    assert_same_in_every_chunking(data, ([first, *[[b"$3"], [b"abc"]] * 20], None))


def test_an_oversized_bulk_inside_a_run_refuses_its_command_only(runs_taken):
    limits = FrameLimits(max_message_bytes=1)
    limits.max_arg_bytes = 8               # drop bodies above 8 bytes (the floor is for servers)
    bodies = run_of(5, 40)
    bodies[20] = b"z" * 9
    data = (encode_request([b"RPUSH", b"q", *bodies]) + encode_request([b"PING"])
            + encode_request([b"RPUSH", b"q", *run_of(5, 40)]))
    expected = (["refused: message too large (9 bytes, max_message_size is 1)", [b"PING"],
                 [b"RPUSH", b"q", *run_of(5, 40)]], None)
    assert_same_in_every_chunking(data, expected, limits, refused_run)
    assert refused_run(RequestReader(limits), bytewise(data)) == expected
    assert runs_taken


def test_max_request_bytes_crossed_inside_a_run():
    argv = [b"RPUSH", b"q", *run_of(10, 40)]
    frame = encode_request(argv)
    step = len(b"$10\r\n") + 10 + 2
    before_25th = len(frame) - (40 - 24) * step          # the declared size through 24 bodies
    data = encode_request([b"PING"]) + frame
    for cap, expected in [
        (len(frame), ([[b"PING"], argv], None)),        # exactly the whole request: fine
        (len(frame) - 1, ([[b"PING"]], "Protocol error: too big request")),
        (before_25th, ([[b"PING"]], "Protocol error: too big request")),
        (before_25th + step, ([[b"PING"]], "Protocol error: too big request")),
    ]:
        limits = FrameLimits(max_request_bytes=cap)
        assert_same_in_every_chunking(data, expected, limits)
        assert run(RequestReader(limits), bytewise(data)) == expected, cap
    # And the 25th body is the one that crosses: its header alone is enough to refuse.
    reader = RequestReader(FrameLimits(max_request_bytes=before_25th))
    reader.feed(frame[:before_25th + len(b"$10\r\n")])
    with pytest.raises(ProtocolError, match="too big request"):
        reader.commands()
    reader = RequestReader(FrameLimits(max_request_bytes=before_25th))
    reader.feed(frame[:before_25th])
    assert reader.commands() == []


def test_runs_split_at_every_byte_give_what_one_read_gives():
    good = (encode_request([b"RPUSH", b"q", *run_of(7, 40)])
            + encode_request([b"HDEL", b"q", b"c", *[b"%d" % (10**18 + i) for i in range(30)]]))
    broken = bytearray(good)
    broken[good.index(b"g" * 7) + 7] = ord("X")        # the 7th body's CR
    for data in (good, bytes(broken)):
        whole = run(RequestReader(), [data])
        assert whole == run(RequestReader(), bytewise(data))
        for cut in range(len(data) + 1):
            assert run(RequestReader(), [data[:cut], data[cut:]]) == whole, cut
    assert run(RequestReader(), [bytes(broken)])[1] == (
        "Protocol error: bulk data does not end with CRLF")


def test_a_run_longer_than_one_column_slice_is_taken_in_parts(runs_taken):
    argv = [b"RPUSH", b"q", *[b"m"] * (resp._MAX_RUN * 2 + 100)]
    assert run(RequestReader(), [encode_request(argv)]) == ([argv], None)
    assert runs_taken.count(resp._MAX_RUN) == 2


def test_a_count_header_never_passes_for_a_bulk_header():
    reader = RequestReader()
    reader.feed(encode_request([b"PING"]))                # b"*1\r\n" is now a vetted count
    assert reader.commands() == [[b"PING"]]
    reader.feed(b"*1\r\n*1\r\n$4\r\nPING\r\n")
    with pytest.raises(ProtocolError, match="expected '\\$', got '\\*'"):
        reader.commands()


def test_headers_vetted_for_one_reader_meet_the_limits_of_another():
    argv = [b"ECHO", b"a" * 16385, *[b"b"] * 9]            # 11 arguments, a bulk above 16 KiB
    assert run(RequestReader(), [encode_request(argv)]) == ([argv], None)
    # Headers of the same size as the last ones, so the other reader looks them up.
    ten = [b"ECHO", *[b"c"] * 9]
    assert run(RequestReader(before_auth()), [encode_request(ten) + b"*11\r\n"]) == (
        [ten], "Protocol error: unauthenticated multibulk length")
    data = b"*3\r\n$4\r\nECHO\r\n$16384\r\n" + b"d" * 16384 + b"\r\n$16385\r\n"
    assert run(RequestReader(before_auth()), [data]) == (
        [], "Protocol error: unauthenticated bulk length")


def test_a_header_cut_short_by_the_end_of_a_read_after_a_longer_one():
    reader = RequestReader()
    reader.feed(encode_request([b"ECHO", b"x" * 5]))       # vets b"$5\r\n"
    assert reader.commands() == [[b"ECHO", b"x" * 5]]
    data = encode_request([b"ECHO", b"y" * 12, b"z" * 5])
    cut = data.index(b"$5\r\n") + 4                          # the read ends right after it
    reader.feed(data[:cut])
    assert reader.commands() == []
    reader.feed(data[cut:])
    assert reader.commands() == [[b"ECHO", b"y" * 12, b"z" * 5]]


@pytest.mark.parametrize("size,kept", [(65536, True), (65537, False)])
def test_the_drop_threshold_is_the_argument_s_length_not_its_frame(size, kept):
    reader = RequestReader(FrameLimits(max_message_bytes=1))     # drops above 64 KiB
    body = b"k" * size
    reader.feed(encode_request([b"RPUSH", b"q", body, body]))
    out = reader.commands()
    if kept:
        assert out == [[b"RPUSH", b"q", body, body]]
    else:
        assert [item.message for item in out] == [
            f"message too large ({size} bytes, max_message_size is 1)"]


segments = st.lists(st.tuples(st.sampled_from([0, 1, 2, 5, 9, 10, 11, 12]),
                              st.integers(min_value=1, max_value=40)), min_size=1, max_size=3)
mutations = st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(
    [b"", b"X", b"\r", b"\n", b"$", b"1", b"0", b"*"]), st.booleans()), max_size=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(segments, min_size=1, max_size=3), edits=mutations,
       cuts=st.lists(st.integers(min_value=0), max_size=6),
       limit=st.sampled_from(["default", "request", "drop", "pre_auth"]))
def test_runs_of_equal_bulks_with_damage_read_the_same_in_any_chunking(commands, edits, cuts,
                                                                       limit):
    """Rule 8: arrays made of runs of one header, damaged anywhere, under each limit: one read,
    byte-by-byte reads and random reads give the same commands and the same error."""
    data = bytearray()
    for segs in commands:
        argv = [b"RPUSH", b"q"]
        for length, count in segs:
            argv += run_of(length, count)
        data += encode_request(argv)
    for offset, byte, insert in edits:
        at = offset % (len(data) + 1)
        data[at:at if insert else at + 1] = byte
    data = bytes(data)

    def make() -> RequestReader:
        if limit == "pre_auth":
            return RequestReader(before_auth())
        limits = FrameLimits(max_request_bytes=300 if limit == "request"
                             else resp.MAX_REQUEST_BYTES)
        if limit == "drop":
            limits.max_arg_bytes = 6
        return RequestReader(limits)
    whole = refused_run(make(), [data])
    assert refused_run(make(), bytewise(data)) == whole
    assert refused_run(make(), split_at(data, cuts)) == whole
