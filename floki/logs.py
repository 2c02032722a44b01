"""Process-wide logging set-up: one format for every Floki process, to stderr.

Owns: the log line formats and the level. Each process calls `setup(role, level, fmt)` once at
start.
Rules:
  1. Two formats (config key `log_format`): "text", a line a person reads
     (`time LEVEL role[pid] logger: message`), and "json", exactly one JSON object per line for
     log collectors. A traceback or a message with newlines stays inside its one JSON object.
  2. Every record carries the process role (supervisor, frontend, shard-N) and pid, so the
     interleaved stderr of a whole `floki start` can be told apart.
  3. Formatting never raises: a message that cannot be %-formatted is logged as its template
     with the arguments' reprs (logging's own behaviour would print a traceback instead).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LOG_FORMATS = ("text", "json")


class TextFormatter(logging.Formatter):
    """`2024-05-01 12:00:00,123 INFO shard-0[4242] floki.shard.main: message` (rule 1)."""

    def __init__(self, role: str):
        super().__init__(f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except (TypeError, ValueError):     # rule 3: bad %-arguments
            record.msg, record.args = _message(record), None
            return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (rule 1).

    Fields: ts (UTC, ISO 8601 with milliseconds), level, role, pid, logger, msg; `exc` holds the
    formatted traceback when the record has one.
    """

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "msg": _message(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps the line plain ASCII whatever a queue name or message holds;
        # json.dumps escapes newlines, so one record is always one line.
        return json.dumps(entry, ensure_ascii=True, default=repr)


def _iso_utc(created_s: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_s))
    return f"{seconds}.{int(created_s % 1 * 1000):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:   # noqa: BLE001 - rule 3: a bad format string must not lose the record
        return f"{record.msg!s} (unformattable arguments: {record.args!r})"


def formatter(role: str, fmt: str = "text") -> logging.Formatter:
    """Returns the formatter for `fmt` ("text" or "json"). Raises ValueError for another."""
    if fmt == "text":
        return TextFormatter(role)
    if fmt == "json":
        return JsonFormatter(role)
    raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")


def setup(role: str, level: str = "info", fmt: str = "text",
          stream: TextIO | None = None) -> None:
    """Sends every log record of this process to `stream` (default: stderr) in format `fmt`,
    replacing any handler set up before. Raises ValueError for an unknown format or level."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(role, fmt))
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.handlers[:] = [handler]
