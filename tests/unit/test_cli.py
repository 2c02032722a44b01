import dataclasses
from pathlib import Path

import pytest

from floki.cli import build_parser, common_args, main, resolve_config
from floki.config import ConfigError, ServerConfig
from floki.supervisor import ExitCode


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_built_in_defaults_when_there_is_no_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(parse("start")) == ServerConfig()


def test_floki_toml_in_the_working_directory_is_read_without_c(tmp_path, monkeypatch):
    (tmp_path / "floki.toml").write_text('[server]\nfsync = "always"\n[queue]\nsegment_size = "1mb"\n')
    monkeypatch.chdir(tmp_path)
    config = resolve_config(parse("start"))
    assert config.fsync == "always" and config.queue.segment_size == 1024**2


def test_command_line_options_override_the_file(tmp_path):
    toml = tmp_path / "f.toml"
    toml.write_text('[server]\nbind = "127.0.0.1:1"\nshards = 4\nlog_level = "error"\n'
                    'data_dir = "/x"\nfsync = "never"\n')
    config = resolve_config(parse("start", "-c", str(toml), "--bind", "0.0.0.0:7000",
                                  "--shards", "2", "--log-level", "debug", "--data-dir", "/y"))
    assert (config.bind, config.shards, config.log_level, config.data_dir, config.fsync) == \
        ("0.0.0.0:7000", 2, "debug", "/y", "never")


@pytest.mark.parametrize("option,value,key", [
    ("--shards", "many", "shards"), ("--shards", "999", "shards"), ("--bind", "nowhere", "bind"),
    ("--log-level", "loud", "log_level"),
])
def test_bad_options_are_rejected_like_bad_file_values(tmp_path, monkeypatch, option, value, key):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_config(parse("start", option, value))
    assert err.value.key == key and value in str(err.value)


def test_children_resolve_the_same_config_from_any_working_directory(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    (home / "floki.toml").write_text('[server]\ndata_dir = "./d"\nfsync = "always"\n'
                                     '[queue]\nmessage_timeout = "5s"\n')
    monkeypatch.chdir(home)
    args = parse("start", "--shards", "3", "--log-level", "warning")
    config = resolve_config(args)
    common = common_args(args)
    monkeypatch.chdir(elsewhere)
    for child_argv in (["shard", "--index", "1", *common], ["frontend", *common]):
        child = resolve_config(parse(*child_argv))
        assert child.data_dir == str((home / "d").resolve())
        assert dataclasses.replace(child, data_dir=config.data_dir) == config


def test_common_args_use_absolute_paths_and_a_fixed_shard_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "floki.toml").write_text("[server]\nshards = 0\n")
    common = common_args(parse("start", "--data-dir", "rel/data"))
    opts = dict(zip(common[::2], common[1::2]))
    assert Path(opts["-c"]).is_absolute() and Path(opts["-c"]) == (tmp_path / "floki.toml")
    assert opts["--data-dir"] == str(tmp_path / "rel" / "data")
    assert int(opts["--shards"]) == ServerConfig().shard_count >= 1


def test_without_a_config_file_children_get_no_c(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "-c" not in common_args(parse("start"))


@pytest.mark.parametrize("command", [["start"], ["shard", "--index", "0"], ["frontend"]])
def test_a_bad_config_is_a_boot_error_with_one_line_naming_the_key(tmp_path, capsys, command):
    toml = tmp_path / "floki.toml"
    toml.write_text('[server]\nfsync = "sometimes"\n')
    assert main([*command, "-c", str(toml)]) == ExitCode.BOOT_ERROR == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'fsync'" in err and "'sometimes'" in err


def test_an_unknown_key_is_a_boot_error(tmp_path, capsys):
    toml = tmp_path / "floki.toml"
    toml.write_text("[server]\nshard = 2\n")
    assert main(["start", "-c", str(toml)]) == 3
    assert "'shard'" in capsys.readouterr().err


def test_a_missing_config_file_is_a_boot_error(tmp_path, capsys):
    assert main(["start", "-c", str(tmp_path / "absent.toml")]) == 3
    assert "absent.toml" in capsys.readouterr().err


def test_broken_toml_is_a_boot_error(tmp_path, capsys):
    toml = tmp_path / "floki.toml"
    toml.write_text("[server\n")
    assert main(["start", "-c", str(toml)]) == 3
    assert "valid TOML" in capsys.readouterr().err


def test_shard_needs_an_index(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["shard"])
    assert exit_.value.code == ExitCode.USAGE
    assert "--index" in capsys.readouterr().err
