"""floki/overrides.py: CONFIG SET server.* values kept for a restart within one run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from floki.config import ServerConfig
from floki.overrides import RUN_ID_ENV, Overrides


def config_in(tmp_path: Path) -> ServerConfig:
    return ServerConfig(data_dir=str(tmp_path / "data"))


def of_run(tmp_path: Path, run_id: str | None, process: str = "shard-0") -> Overrides:
    environ = {RUN_ID_ENV: run_id} if run_id is not None else {}
    return Overrides.for_process(config_in(tmp_path), process, environ)


def test_a_restart_in_the_same_run_gets_the_recorded_values_back(tmp_path):
    first = of_run(tmp_path, "run-a")
    first.record("fsync", "always")
    first.record("max_get_count", "7")
    first.record("fsync", "never")                       # the latest value wins
    restarted = of_run(tmp_path, "run-a")
    config = restarted.apply_to(config_in(tmp_path))
    assert (config.fsync, config.max_get_count) == ("never", 7)
    restarted.record("queue.message_timeout", "5s")      # keeps what it loaded
    again = of_run(tmp_path, "run-a").apply_to(config_in(tmp_path))
    assert (again.fsync, again.max_get_count, again.queue.message_timeout) == ("never", 7, 5.0)


def test_each_process_has_its_own_file(tmp_path):
    of_run(tmp_path, "run-a", "shard-0").record("fsync", "always")
    assert of_run(tmp_path, "run-a", "shard-1").apply_to(config_in(tmp_path)).fsync == "interval"
    assert of_run(tmp_path, "run-a", "frontend").load() == {}
    assert (tmp_path / "data" / ".run" / "shard-0.overrides.json").exists()


def test_a_new_run_starts_from_the_configuration_file(tmp_path):
    of_run(tmp_path, "run-a").record("fsync", "always")
    assert of_run(tmp_path, "run-b").apply_to(config_in(tmp_path)).fsync == "interval"


def test_without_a_run_id_nothing_is_written_or_read(tmp_path):
    standalone = of_run(tmp_path, None)
    standalone.record("fsync", "always")
    assert standalone.values == {"fsync": "always"}
    assert not (tmp_path / "data" / ".run").exists()
    # a file a supervised run left is not for a process outside any run
    of_run(tmp_path, "run-a").record("fsync", "always")
    assert of_run(tmp_path, None).apply_to(config_in(tmp_path)).fsync == "interval"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"run_id": "run-a"}',
                                     b'{"run_id": "run-a", "values": 3}'])
def test_an_unusable_file_is_ignored(tmp_path, content, caplog):
    path = tmp_path / "data" / ".run" / "shard-0.overrides.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        config = of_run(tmp_path, "run-a").apply_to(config_in(tmp_path))
    assert config == config_in(tmp_path)


def test_a_rejected_value_is_skipped_and_the_others_apply(tmp_path, caplog):
    path = tmp_path / "data" / ".run" / "shard-0.overrides.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run_id": "run-a", "values": {
        "fsync": "sometimes", "max_get_count": "9", "nonsense": "1", "log_level": 5}}))
    with caplog.at_level(logging.ERROR):
        config = of_run(tmp_path, "run-a").apply_to(config_in(tmp_path))
    assert (config.fsync, config.max_get_count) == ("interval", 9)
    assert "fsync" in caplog.text and "nonsense" in caplog.text


def test_a_failed_record_raises_and_keeps_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".run").write_text("a file where the directory should be")
    overrides = of_run(tmp_path, "run-a")
    with pytest.raises(OSError):
        overrides.record("fsync", "always")
    assert overrides.values == {}


def test_at_start_applies_the_run_s_values_and_the_recorded_log_level(tmp_path, monkeypatch):
    from floki.overrides import at_start
    of_run(tmp_path, "run-c", "frontend").record("log_level", "debug")
    monkeypatch.setenv(RUN_ID_ENV, "run-c")
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)  # restored after the test
    overrides, config = at_start(config_in(tmp_path), "frontend")
    assert config.log_level == "debug" and root.level == logging.DEBUG
    assert overrides.values == {"log_level": "debug"}
