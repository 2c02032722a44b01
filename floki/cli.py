"""Command line: `floki start | shard | frontend | check | health | rebalance` (argparse); no
other logic here.

Owns: the options, how they turn into the effective ServerConfig (`resolve_config`, the only
place that happens, so the supervisor and every child agree), and the options handed to
children (`common_args`).
Rules:
  1. Options override the config file through ServerConfig.with_value, so a bad `--shards`
     gets the same message as a bad `shards =` in floki.toml.
  2. A configuration that cannot be used is a boot error: one line on stderr, exit code 3.
  3. Without `-c`, ./floki.toml is read if it exists; otherwise the built-in defaults apply.
  4. `--bind` means the address a process itself listens on: HOST:PORT for clients on `start`
     and `frontend`, a ZeroMQ endpoint (tcp://HOST:PORT) on `shard`, whose client address
     (only reported by CONFIG GET server) is `--client-bind`. Both land in the same config key
     `bind` for clients, so every process of one `floki start` reports the same configuration.
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path
from typing import Sequence

from floki import logs
from floki.config import ConfigError, ServerConfig, load_config, parse_endpoint
from floki.supervisor import ExitCode, Supervisor

DEFAULT_CONFIG_FILE = "floki.toml"

# option dest -> ServerConfig key it overrides
_OVERRIDES = {"bind": "bind", "data_dir": "data_dir", "shards": "shards",
              "log_level": "log_level", "log_format": "log_format"}
_HOSTNAME_INDEX = re.compile(r"-(\d+)$")


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help=f"config file (default: ./{DEFAULT_CONFIG_FILE} if it exists)")
    common.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="queue storage dir")
    common.add_argument("--shards", metavar="N", help="shard processes (0: one per CPU)")
    common.add_argument("--log-level", dest="log_level", metavar="LEVEL",
                        help="debug | info | warning | error")
    common.add_argument("--log-format", dest="log_format", metavar="FORMAT",
                        help="text (one readable line per record) | json (one object per line)")
    client_bind = argparse.ArgumentParser(add_help=False)
    client_bind.add_argument("--bind", metavar="HOST:PORT", help="address clients connect to")

    parser = argparse.ArgumentParser(
        prog="floki", description="Floki: a disk-backed message broker spoken over RESP.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("start", parents=[common, client_bind],
                        help="run the supervisor, the shards and the frontend (foreground)")
    shard = commands.add_parser(
        "shard", parents=[common],
        help="run one shard worker (the supervisor runs these; or alone, on a host of its own)",
        description="Runs shard I until SIGTERM. It serves the queues routed to it from "
                    "--data-dir and listens on --bind, by default its [[shard]] endpoint (or "
                    "an ipc:// socket under DATA_DIR/.run without [[shard]] tables).")
    which = shard.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, metavar="I", help="shard index")
    which.add_argument("--index-from-hostname", dest="index_from_hostname",
                       action="store_true",
                       help="take the index from the trailing -N of the host name (a "
                            "Kubernetes StatefulSet pod: floki-shard-2 is shard 2)")
    shard.add_argument("--bind", dest="shard_bind", metavar="ENDPOINT",
                       help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:9800 (default: this "
                            "shard's [[shard]] endpoint)")
    shard.add_argument("--client-bind", dest="bind", metavar="HOST:PORT",
                       help="the frontend's client address; only reported by CONFIG GET "
                            "server (floki start passes it so every process agrees)")
    commands.add_parser("frontend", parents=[common, client_bind],
                        help="run a client-facing frontend (started by the supervisor; or "
                             "alone: several may serve the same shards)")
    check = commands.add_parser(
        "check", help="verify every segment and checkpoint of a stopped data directory",
        description="Verifies every segment (headers, record checksums, ids, indexes) and "
                    "checkpoint of DATA_DIR offline and reports what is damaged. Exit codes: "
                    "0 clean (notes only), 1 damage found (with --repair: damage left), "
                    "2 usage error, unreadable DATA_DIR, or a queue in use by a running server.")
    check.add_argument("data_dir", metavar="DATA_DIR", help="the data directory to check")
    check.add_argument("--repair", action="store_true",
                       help="cut torn tails, rewrite stale indexes, restore checkpoints from "
                            "their previous generation: what recovery would do, never more")
    health = commands.add_parser(
        "health", help="check that the frontend answers (for container health checks)",
        description="Sends PING to the frontend of the config's bind address (a wildcard "
                    "host is checked on the loopback). Exit codes: 0 it answered (+PONG, or "
                    "-NOAUTH when a password is set), 1 it did not within --timeout.")
    health.add_argument("-c", "--config", metavar="FILE",
                        help=f"config file (default: ./{DEFAULT_CONFIG_FILE} if it exists)")
    health.add_argument("--bind", metavar="HOST:PORT", help="the frontend's client address")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="how long to wait for the answer (default: 3)")
    rebalance = commands.add_parser(
        "rebalance", help="move queue directories to the shards that own them under a new "
                          "shard layout (cluster stopped)",
        description="Moves each queue directory found in DATA_DIR... and --from DIR... into "
                    "DATA_DIR[I], I being the shard that owns the queue under the config given "
                    "with -c (its [[shard]] tables or `shards`). Give one DATA_DIR per shard, "
                    "in shard index order (or one DATA_DIR that every shard shares). Every "
                    "server on these directories must be stopped. Without --apply, prints the "
                    "plan and changes nothing. Exit codes: 0 done (or nothing blocks the plan), "
                    "1 refused (a queue in use, a queue in two places, a move failed), 2 usage "
                    "error, 3 bad config.")
    rebalance.add_argument("-c", "--config", metavar="FILE", required=True,
                           help="the NEW config: the shard layout the cluster restarts with")
    rebalance.add_argument("data_dirs", nargs="+", metavar="DATA_DIR",
                           help="data directory of shard 0, 1, ... under the new config")
    rebalance.add_argument("--from", dest="sources", action="append", default=[],
                           metavar="DIR", help="an old data directory no new shard uses "
                                               "(emptied of queues); repeatable")
    rebalance.add_argument("--apply", action="store_true",
                           help="do the moves (default: dry run, print the plan)")
    return parser


def config_file(args: argparse.Namespace) -> Path | None:
    """Returns the config file `args` select (absolute), or None for the built-in defaults."""
    if args.config is not None:
        return Path(args.config).resolve()
    default = Path(DEFAULT_CONFIG_FILE)
    return default.resolve() if default.is_file() else None


def resolve_config(args: argparse.Namespace) -> ServerConfig:
    """Returns the effective configuration: config file, then command-line overrides.

    Raises ConfigError (bad value or unreadable file).
    """
    path = config_file(args)
    try:
        config = load_config(path)
    except OSError as exc:
        raise ConfigError("--config", str(path), f"a readable file ({exc.strerror})") from None
    for dest, key in _OVERRIDES.items():
        raw = getattr(args, dest, None)   # not every subcommand has every option
        if raw is not None:
            config = config.with_value(key, raw)
    return config


def common_args(args: argparse.Namespace) -> list[str]:
    """Returns the options that make a child resolve the same configuration as `args`.

    Paths are absolute, so a child's working directory cannot change their meaning, and each
    overridable key is passed with its effective value (`--shards` with the count actually
    spawned, never 0, so children cannot disagree on it). The client address is not among
    them: its option differs per kind of child (rule 4; see supervisor.child_specs).
    Raises ConfigError.
    """
    config = resolve_config(args)
    path = config_file(args)
    out = ["-c", str(path)] if path is not None else []
    out += ["--data-dir", str(Path(config.data_dir).resolve()),
            "--shards", str(config.shard_count),
            "--log-level", config.log_level,
            "--log-format", config.log_format]
    return out


def index_from_hostname(hostname: str) -> int:
    """Returns N for a host name ending in `-N` (a StatefulSet pod: `floki-shard-2` -> 2).

    Raises ConfigError for a name without that suffix.
    """
    m = _HOSTNAME_INDEX.search(hostname.split(".", 1)[0])
    if m is None:
        raise ConfigError("--index-from-hostname", hostname,
                          "a host name ending in -N (e.g. floki-shard-2)")
    return int(m.group(1))


def shard_index(args: argparse.Namespace, hostname: str | None = None) -> int:
    """Returns the shard index `args` select: --index, or the host name's trailing -N
    (`hostname`, default: this host's). Raises ConfigError."""
    if not args.index_from_hostname:
        return args.index
    return index_from_hostname(hostname if hostname is not None else socket.gethostname())


def _start(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    logs.setup("supervisor", config.log_level, config.log_format)
    return Supervisor.from_config(config, common_args(args)).run()


def _shard(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    index = shard_index(args)
    bind = parse_endpoint("--bind", args.shard_bind) if args.shard_bind is not None else None
    logs.setup(f"shard-{index}", config.log_level, config.log_format)
    from floki.shard.main import run   # imported here: only shard processes load the engine
    return run(config, index, bind=bind)


def _frontend(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    logs.setup("frontend", config.log_level, config.log_format)
    from floki.frontend.main import run   # imported here: only the frontend loads asyncio
    return run(config)


def _check(args: argparse.Namespace) -> int:
    from floki.shard.check import run   # imported here: the checker is not needed to serve
    return run(args.data_dir, repair=args.repair)


def _health(args: argparse.Namespace) -> int:
    from floki.health import run   # a client of the frontend: nothing of the server is loaded
    return run(resolve_config(args).bind, args.timeout)


def _rebalance(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    from floki.shard.rebalance import run   # an offline tool on the storage layout
    return run(config, args.data_dirs, sources=args.sources, apply=args.apply)


def raise_fd_limit() -> None:
    """Lifts the soft open-files limit to the hard one: a shard keeps an fd per segment of each
    queue and the frontend one per client, so the usual soft limit of 1024 is far too low."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass  # not fatal: the process runs with the limit it has


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD_BYTES = 4 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_heap() -> bool:
    """Makes glibc keep freed memory for reuse instead of handing it back to the OS at once.
    Returns True when the allocator took the settings.

    By default a buffer of a few hundred KiB (a batch or a get of 64 KiB messages) is mmap'ed
    or trimmed away when freed, so the next request faults the same pages in again: measured in
    the W4 benchmark, that page-fault work was most of the shard's CPU. Allocations below 4 MiB
    now come from the heap, and up to 64 MiB of free heap is kept (well within the footprint
    target). Without glibc (musl, macOS) the default allocator behaviour stays.
    """
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES) == 1)


_COMMANDS = {"start": _start, "shard": _shard, "frontend": _frontend, "check": _check,
             "health": _health, "rebalance": _rebalance}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `floki` and `python -m floki`. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    if args.command in ("shard", "frontend"):
        keep_freed_heap()
    try:
        return int(_COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"floki {args.command}: {exc}", file=sys.stderr)
        return ExitCode.BOOT_ERROR
