import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from floki import logs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(fmt: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    logs.setup("shard-3", level, fmt, stream=stream)
    return stream


def test_text_is_one_readable_line_with_role_pid_and_logger(restore_root_logger):
    stream = capture("text")
    logging.getLogger("floki.shard.main").info("shard %d serving on %s", 3, "tcp://*:9800")
    line = stream.getvalue()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO shard-3\[\d+\] "
                        r"floki\.shard\.main: shard 3 serving on tcp://\*:9800\n", line), line
    assert f"[{os.getpid()}]" in line


def test_json_is_one_object_per_line_with_every_field(restore_root_logger):
    stream = capture("json")
    log = logging.getLogger("floki.frontend.router")
    log.warning("shard %d down: %s", 1, "no pong")
    log.debug("second")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {"ts": first["ts"], "level": "WARNING", "role": "shard-3",
                     "pid": os.getpid(), "logger": "floki.frontend.router",
                     "msg": "shard 1 down: no pong"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert json.loads(lines[1])["level"] == "DEBUG"


def test_json_keeps_a_traceback_and_newlines_inside_one_line(restore_root_logger):
    stream = capture("json")
    try:
        raise OSError(5, "Input/output error")
    except OSError:
        logging.getLogger("floki.shard.queue").exception("queue %r:\nappend failed", "q\u00e9")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.isascii()
    entry = json.loads(text)
    assert entry["msg"] == "queue 'q\u00e9':\nappend failed"
    assert entry["level"] == "ERROR"
    assert entry["exc"].startswith("Traceback") and "OSError: [Errno 5]" in entry["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_bad_format_string_is_logged_not_raised(restore_root_logger, fmt, capsys):
    stream = capture(fmt)
    logging.getLogger("x").info("%d queues", "many")
    out = stream.getvalue()
    assert "%d queues" in out and "'many'" in out
    assert "Traceback" not in capsys.readouterr().err


def test_the_level_filters(restore_root_logger):
    stream = capture("json", level="warning")
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").error("shown")
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["shown"]


def test_unknown_format_is_refused(restore_root_logger):
    with pytest.raises(ValueError, match="xml"):
        logs.setup("frontend", "info", "xml")


def test_a_shard_process_logs_json_lines_to_stderr_when_configured(tmp_path):
    # The whole path: floki.toml -> cli -> logs.setup, in a real `floki shard` process.
    toml = tmp_path / "floki.toml"
    toml.write_text(f'[server]\nlog_format = "json"\ndata_dir = "{tmp_path / "d"}"\n'
                    'shards = 1\n')
    proc = subprocess.Popen([sys.executable, "-m", "floki", "shard", "--index", "0", "-c",
                             str(toml)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        entries = []
        while not any("serving on" in e["msg"] for e in entries):
            line = proc.stderr.readline()
            assert line, f"shard exited: {entries}"
            entries.append(json.loads(line))
        proc.terminate()
        assert proc.wait(30) == 0
        entries += [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        proc.kill()
        proc.wait()
    assert {(e["role"], e["pid"]) for e in entries} == {("shard-0", proc.pid)}
    assert entries[-1]["msg"] == "shard 0 stopped"
