"""`floki health`: does a frontend answer? For container health checks and Kubernetes probes.

Owns: one RESP `PING` round trip to a frontend, with one deadline.
Rules:
  1. Healthy means the frontend's event loop answered: `+PONG`, or `-NOAUTH ...` (a password
     is set; the frontend still answered). A port that accepts but never answers (a stuck
     loop: the kernel completes the handshake alone) is unhealthy, unlike a TCP-connect probe.
  2. Never hangs: connecting and reading share one deadline.
  3. A wildcard bind address (0.0.0.0, ::, *, empty) is checked on the loopback, which also
     passes protected mode.
Exit codes: 0 healthy, 1 unhealthy (one line on stderr says why).
"""
from __future__ import annotations

import socket
import sys
import time
from typing import TextIO

EXIT_HEALTHY, EXIT_UNHEALTHY = 0, 1
PING = b"*1\r\n$4\r\nPING\r\n"
DEFAULT_TIMEOUT_S = 3.0
_WILDCARDS = {"", "*", "0.0.0.0", "::", "[::]"}


def probe_address(bind: str) -> tuple[str, int]:
    """Returns the (host, port) to check for a `HOST:PORT` bind address (rule 3)."""
    host, _, port = bind.rpartition(":")
    if host in _WILDCARDS:
        host = "::1" if host in ("::", "[::]") else "127.0.0.1"
    return host.strip("[]"), int(port)


def check_frontend(host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """PINGs the frontend at host:port. Returns None when healthy, else why not (rule 1)."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(PING)
            line = b""
            while not line.endswith(b"\r\n"):
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return f"no answer to PING within {timeout_s:g} s"
                sock.settimeout(remaining_s)
                chunk = sock.recv(256)
                if not chunk:
                    return "connection closed without an answer"
                line += chunk
                if len(line) > 4096:
                    break
    except socket.timeout:
        return f"no answer to PING within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    first = line.split(b"\r\n", 1)[0]
    if first == b"+PONG" or first.startswith(b"-NOAUTH"):
        return None
    return f"unexpected answer to PING: {first[:80]!r}"


def run(bind: str, timeout_s: float = DEFAULT_TIMEOUT_S, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """`floki health`: checks the frontend serving `bind`. Returns the exit code."""
    host, port = probe_address(bind)
    problem = check_frontend(host, port, timeout_s)
    if problem is not None:
        print(f"floki health {host}:{port}: {problem}", file=err or sys.stderr)
        return EXIT_UNHEALTHY
    print(f"floki health {host}:{port}: ok", file=out or sys.stdout)
    return EXIT_HEALTHY
