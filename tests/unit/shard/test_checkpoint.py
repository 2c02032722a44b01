import errno
import os

import pytest

from floki.errors import DiskFull, StorageIOError
from floki.shard import checkpoint, files
from floki.shard.checkpoint import CheckpointCorrupt, read_json, write_atomic, write_json


def test_write_atomic_writes_the_bytes_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "queue.json"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["queue.json"]


def test_write_atomic_fsyncs_the_file_before_rename_and_the_directory_after(tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "channels.json"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: events.append("fsync") or
                        real_fsync(fd))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: events.append("rename") or
                        real_replace(a, b))
    monkeypatch.setattr(checkpoint.files, "fsync_directory",
                        lambda d: events.append(("dir", d)))
    write_atomic(path, b"{}")
    assert events == ["fsync", "rename", ("dir", tmp_path)]


@pytest.mark.parametrize("err,kind", [(errno.ENOSPC, DiskFull), (errno.EIO, StorageIOError)])
def test_failed_write_keeps_the_old_file_and_removes_the_tmp(tmp_path, monkeypatch, err, kind):
    path = tmp_path / "queue.json"
    write_atomic(path, b'{"old":1}')

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(kind):
        write_atomic(path, b'{"new":2}')
    monkeypatch.undo()
    assert path.read_bytes() == b'{"old":1}'
    assert sorted(os.listdir(tmp_path)) == ["queue.json"]


def test_json_round_trip_is_compact(tmp_path):
    path = tmp_path / "queue.json"
    obj = {"version": 1, "next_id": 2**63, "settings": {"a": [1, 2]}, "name": "é"}
    write_json(path, obj)
    assert read_json(path) == obj
    assert b" " not in path.read_bytes()


def test_read_json_of_a_missing_file_is_none(tmp_path):
    assert read_json(tmp_path / "queue.json") is None


@pytest.mark.parametrize("content", [b"", b"\x00" * 16, b"{", b"garbage", b"[1, 2]", b"3",
                                     b"null", b'"text"', b"\xff\xfe{}", b"[" * 100000])
def test_read_json_of_garbage_raises_checkpoint_corrupt(tmp_path, content):
    path = tmp_path / "channels.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointCorrupt) as err:
        read_json(path)
    assert "channels.json" in str(err.value)


def test_stale_tmp_is_ignored_and_removed(tmp_path):
    path = tmp_path / "queue.json"
    write_json(path, {"good": True})
    files.tmp_path(path).write_bytes(b'{"half-writ')
    assert read_json(path) == {"good": True}
    assert not files.tmp_path(path).exists()
    files.tmp_path(path).write_bytes(b'{"never": "renamed"}')
    path.unlink()
    assert read_json(path) is None
    assert not files.tmp_path(path).exists()


def test_write_json_refuses_values_json_cannot_hold(tmp_path):
    path = tmp_path / "queue.json"
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")})
    assert not path.exists() and not files.tmp_path(path).exists()
