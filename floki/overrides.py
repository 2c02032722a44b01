"""Runtime overrides: the CONFIG SET server.KEY values a process applied during this run.

Owns: the file `<data_dir>/.run/<process>.overrides.json` (process: `shard-N` or `frontend`)
and the run id that scopes it (FLOKI_RUN_ID, set by the supervisor for its children).
Rules:
  1. A value changed with CONFIG SET server.KEY lasts as long as the server runs (one
     `floki start`): a shard or frontend the supervisor restarts applies the values its file
     recorded over floki.toml before it serves anything. Without this a shard killed after
     `CONFIG SET server.fsync always` came back in "interval" mode and acknowledged pushes it
     had not fsynced, while CONFIG GET of the other shards still said "always".
  2. The supervisor names each run (a new random id per `floki start`, in every child's
     environment). A file of another run is ignored, so a new start begins from floki.toml:
     CONFIG SET is never written back to it. A process started without a run id (`floki
     shard` or `floki frontend` run by systemd or Kubernetes) records and loads nothing: there
     a restart starts from floki.toml, as the operations guide says.
  3. `record` writes the file atomically (temp file, fsync, rename, directory fsync) before the
     caller applies the value, so a value in effect is a value a restart brings back. It
     raises OSError: a shard then refuses the CONFIG SET with nothing changed; the frontend,
     which applies a value only after every shard did, logs it and applies it anyway.
     (Not the storage engine's writer: this file is no queue data, and the frontend must not
     load shard code.)
  4. A file that cannot be read, is not of this run, or holds a value floki.toml's rules
     reject is logged and skipped (key by key): a restart must never fail on it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

from floki.config import ConfigError, ServerConfig, runtime_dir

log = logging.getLogger(__name__)

RUN_ID_ENV = "FLOKI_RUN_ID"


class Overrides:
    """One process's recorded CONFIG SET server.* values (rules 1-4)."""

    def __init__(self, path: Path | None, run_id: str | None):
        self.path = path if run_id else None        # rule 2: no run, nothing kept
        self.run_id = run_id
        self.values: dict[str, str] = {}

    @classmethod
    def for_process(cls, config: ServerConfig, process: str,
                    environ: Mapping[str, str] = os.environ) -> "Overrides":
        """Returns the overrides of `process` ("shard-N", "frontend") in this run."""
        path = runtime_dir(config) / f"{process}.overrides.json"
        return cls(path, environ.get(RUN_ID_ENV) or None)

    def load(self) -> dict[str, str]:
        """Reads this run's recorded values (rule 4: anything unusable is logged and left out).
        Returns them; they also stay in `values` for the next `record`."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("run_id") != self.run_id:
            return {}                               # another run's (rule 2)
        values = data.get("values")
        if not isinstance(values, dict):
            log.error("ignoring %s: no values", self.path)
            return {}
        self.values = {k: v for k, v in values.items()
                       if isinstance(k, str) and isinstance(v, str)}
        return dict(self.values)

    def apply_to(self, config: ServerConfig) -> ServerConfig:
        """Returns `config` with this run's recorded values applied, key by key (rule 4)."""
        for key, value in self.load().items():
            try:
                config = config.with_value(key, value)
            except ConfigError as exc:
                log.error("ignoring the recorded CONFIG SET of %s: %s", key, exc)
                continue
            log.info("CONFIG SET server.%s %s, recorded earlier in this run, applies again",
                     key, value)
        return config

    def record(self, key: str, value: str) -> None:
        """Adds `key = value` and rewrites the file (rule 3). Without a run id this only
        remembers it. Raises OSError (then nothing is recorded)."""
        values = {**self.values, key: value}
        if self.path is not None:
            _write_atomic(self.path, json.dumps({"run_id": self.run_id, "values": values},
                                                indent=1).encode())
        self.values = values


def at_start(config: ServerConfig, process: str) -> tuple[Overrides, ServerConfig]:
    """What a shard or frontend does first: returns its overrides in this run and `config`
    with them applied (rule 1). cli.py set the root log level from floki.toml, so it follows
    a recorded log_level here."""
    overrides = Overrides.for_process(config, process)
    config = overrides.apply_to(config)
    logging.getLogger().setLevel(config.log_level.upper())
    return overrides, config


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes `path` whole or not at all, and durably. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
