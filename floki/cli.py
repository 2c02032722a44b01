"""Command line: `floki start | shard | frontend | check` (argparse); no other logic here.

Owns: the options, how they turn into the effective ServerConfig (`resolve_config`, the only
place that happens, so the supervisor and every child agree), and the options handed to
children (`common_args`).
Rules:
  1. Options override the config file through ServerConfig.with_value, so a bad `--shards`
     gets the same message as a bad `shards =` in floki.toml.
  2. A configuration that cannot be used is a boot error: one line on stderr, exit code 3.
  3. Without `-c`, ./floki.toml is read if it exists; otherwise the built-in defaults apply.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from floki import logs
from floki.config import ConfigError, ServerConfig, load_config
from floki.supervisor import ExitCode, Supervisor

DEFAULT_CONFIG_FILE = "floki.toml"

# option dest -> ServerConfig key it overrides
_OVERRIDES = {"bind": "bind", "data_dir": "data_dir", "shards": "shards", "log_level": "log_level"}


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help=f"config file (default: ./{DEFAULT_CONFIG_FILE} if it exists)")
    common.add_argument("--bind", metavar="HOST:PORT", help="address clients connect to")
    common.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="queue storage dir")
    common.add_argument("--shards", metavar="N", help="shard processes (0: one per CPU)")
    common.add_argument("--log-level", dest="log_level", metavar="LEVEL",
                        help="debug | info | warning | error")

    parser = argparse.ArgumentParser(
        prog="floki", description="Floki: a disk-backed message broker spoken over RESP.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("start", parents=[common],
                        help="run the supervisor, the shards and the frontend (foreground)")
    shard = commands.add_parser("shard", parents=[common],
                                help="run one shard worker (started by the supervisor)")
    shard.add_argument("--index", type=int, required=True, metavar="I", help="shard index")
    commands.add_parser("frontend", parents=[common],
                        help="run the client-facing frontend (started by the supervisor)")
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
        raw = getattr(args, dest)
        if raw is not None:
            config = config.with_value(key, raw)
    return config


def common_args(args: argparse.Namespace) -> list[str]:
    """Returns the options that make a child resolve the same configuration as `args`.

    Paths are absolute, so a child's working directory cannot change their meaning, and each
    overridable key is passed with its effective value (`--shards` with the count actually
    spawned, never 0, so children cannot disagree on it). Raises ConfigError.
    """
    config = resolve_config(args)
    path = config_file(args)
    out = ["-c", str(path)] if path is not None else []
    out += ["--bind", config.bind,
            "--data-dir", str(Path(config.data_dir).resolve()),
            "--shards", str(config.shard_count),
            "--log-level", config.log_level]
    return out


def _start(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    logs.setup("supervisor", config.log_level)
    return Supervisor.from_config(config, common_args(args)).run()


def _shard(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    logs.setup(f"shard-{args.index}", config.log_level)
    from floki.shard.main import run   # imported here: only shard processes load the engine
    return run(config, args.index)


def _frontend(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    logs.setup("frontend", config.log_level)
    from floki.frontend.main import run   # imported here: only the frontend loads asyncio
    return run(config)


def _check(args: argparse.Namespace) -> int:
    from floki.shard.check import run   # imported here: the checker is not needed to serve
    return run(args.data_dir, repair=args.repair)


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


_COMMANDS = {"start": _start, "shard": _shard, "frontend": _frontend, "check": _check}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `floki` and `python -m floki`. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    try:
        return int(_COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"floki {args.command}: {exc}", file=sys.stderr)
        return ExitCode.BOOT_ERROR
