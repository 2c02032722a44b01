import dataclasses
from pathlib import Path

import pytest

from floki.cli import (build_parser, common_args, index_from_hostname, main, resolve_config,
                       shard_index)
from floki.config import ConfigError, ServerConfig
from floki.supervisor import ExitCode, Role, child_specs


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
    args = parse("start", "--shards", "3", "--log-level", "warning", "--log-format", "json",
                 "--bind", "0.0.0.0:7000")
    config = resolve_config(args)
    # The argv the supervisor really gives each child (floki.supervisor.child_specs).
    specs = child_specs(config.shard_count, common_args(args), config.bind)
    monkeypatch.chdir(elsewhere)
    assert [s.role for s in specs] == [Role.SHARD] * 3 + [Role.FRONTEND]
    for spec in specs:
        child = resolve_config(parse(*spec.argv[3:]))
        assert child.data_dir == str((home / "d").resolve())
        assert dataclasses.replace(child, data_dir=config.data_dir) == config
        assert (child.bind, child.log_format) == ("0.0.0.0:7000", "json")


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


def test_shard_bind_is_a_zeromq_endpoint_and_the_client_address_is_client_bind():
    args = parse("shard", "--index", "2", "--bind", "tcp://0.0.0.0:9800",
                 "--client-bind", "10.0.0.1:9797")
    assert (args.shard_bind, args.index) == ("tcp://0.0.0.0:9800", 2)
    assert resolve_config(args).bind == "10.0.0.1:9797"
    assert parse("shard", "--index", "0").shard_bind is None


@pytest.mark.parametrize("command", ["start", "frontend"])
def test_start_and_frontend_bind_is_the_client_address(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(parse(command, "--bind", "0.0.0.0:6000")).bind == "0.0.0.0:6000"


@pytest.mark.parametrize("bind", ["127.0.0.1:9800", "tcp://nohost", "http://x:1"])
def test_a_shard_bind_that_is_no_endpoint_is_a_boot_error(bind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["shard", "--index", "0", "--bind", bind]) == ExitCode.BOOT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'--bind'" in err and "tcp://HOST:PORT" in err


def test_index_and_index_from_hostname_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("shard", "--index", "1", "--index-from-hostname")
    assert exit_.value.code == ExitCode.USAGE
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("hostname,index", [
    ("floki-shard-0", 0), ("floki-shard-12", 12), ("floki-shard-3.floki-shard.ns.svc", 3),
    ("web-7", 7)])
def test_index_from_hostname_takes_the_trailing_number(hostname, index):
    assert index_from_hostname(hostname) == index
    assert shard_index(parse("shard", "--index-from-hostname"), hostname) == index


@pytest.mark.parametrize("hostname", ["floki-shard", "floki0", "shard-x", "a-1b", ""])
def test_a_hostname_without_a_trailing_index_is_a_config_error(hostname):
    with pytest.raises(ConfigError) as err:
        index_from_hostname(hostname)
    assert err.value.key == "--index-from-hostname"


def test_an_explicit_index_ignores_the_hostname():
    assert shard_index(parse("shard", "--index", "4"), "floki-shard-1") == 4


def test_log_format_option_overrides_the_file_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "floki.toml").write_text('[server]\nlog_format = "json"\n')
    assert resolve_config(parse("start")).log_format == "json"
    assert resolve_config(parse("start", "--log-format", "text")).log_format == "text"
    with pytest.raises(ConfigError) as err:
        resolve_config(parse("start", "--log-format", "xml"))
    assert err.value.key == "log_format"


def test_rebalance_needs_a_config_and_data_dirs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["rebalance", "/tmp"])
    assert exit_.value.code == ExitCode.USAGE
    assert "-c/--config" in capsys.readouterr().err


def test_shards_and_frontends_keep_freed_heap_on_glibc():
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    # In a child, so this test process keeps its allocator settings.
    code = "from floki import cli; print(cli.keep_freed_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
