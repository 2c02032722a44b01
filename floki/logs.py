"""Process-wide logging set-up: one format for every Floki process, to stderr.

Owns: the log line format and level. Each process calls `setup(role, level)` once at start.
"""
from __future__ import annotations

import logging
import sys


def setup(role: str, level: str = "info") -> None:
    """Logs to stderr as `time LEVEL role[pid] logger: message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
