"""fileio (the storage engine's one doorway to files) and the fault layer tests rely on.

The fault layer (tests/faultfs.py) is test code, but every power-loss and disk-full result
rests on it modelling fsync, torn writes and directory entries right, so it is tested here.
"""
from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest

from faultfs import FaultyFileIO, OsLayer, PowerLost
from floki.shard import fileio, files

STORAGE_MODULES = ["segment.py", "wal.py", "checkpoint.py", "files.py", "check.py", "queue.py"]


# --- fileio -----------------------------------------------------------------------------------

def test_in_production_the_operations_are_the_os_functions_themselves():
    previous = fileio.install(None)
    try:
        for name in fileio.OPERATIONS:
            assert getattr(fileio, name) is getattr(os, name), name   # no wrapper, no cost
        assert fileio.current() is None
    finally:
        fileio.install(previous)


def test_install_swaps_every_operation_and_hands_back_the_previous_layer(tmp_path):
    layer = FaultyFileIO(tmp_path)
    before = fileio.current()
    with fileio.installed(layer):
        assert fileio.current() is layer
        assert all(getattr(fileio, name).__self__ is layer for name in fileio.OPERATIONS)
    assert fileio.current() is before


def test_a_layer_missing_an_operation_is_refused_and_nothing_changes():
    class Partial:
        def write(self, fd, data):
            return 0

    before = {name: getattr(fileio, name) for name in fileio.OPERATIONS}
    with pytest.raises(AttributeError):
        fileio.install(Partial())
    assert {name: getattr(fileio, name) for name in fileio.OPERATIONS} == before


@pytest.mark.parametrize("module", STORAGE_MODULES)
def test_storage_code_changes_files_only_through_fileio(module):
    """An os.write/os.fsync/... call in the storage engine would bypass the fault layer."""
    source = Path(fileio.__file__).with_name(module)
    tree = ast.parse(source.read_text())
    direct = [f"line {node.lineno}: os.{node.func.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
              and node.func.attr in fileio.OPERATIONS
              # a queue's LOCK is taken outside the layer (tests/faultfs.py, "Limits"), and
              # the checker's probe of it never writes (check.py rule 1)
              and not (module in ("check.py", "queue.py")
                       and node.func.attr in ("open", "close"))]
    assert not direct, f"{module} bypasses fileio: {direct}"


def test_os_layer_sees_monkeypatched_os_functions(monkeypatch, tmp_path):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    with fileio.installed(OsLayer()):
        fd = fileio.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        fileio.fsync(fd)
        fileio.close(fd)
    assert calls == [fd]


# --- the fault layer: what was fsynced --------------------------------------------------------

def write_file(path: Path, *chunks: bytes, sync_after: int | None = None) -> None:
    """Writes chunks through fileio into a new file; fsyncs after chunk `sync_after`."""
    fd = fileio.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for k, chunk in enumerate(chunks):
            fileio.write(fd, chunk)
            if k == sync_after:
                fileio.fsync(fd)
    finally:
        fileio.close(fd)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def layer(root: Path):
    faulty = FaultyFileIO(root, seed=7)
    with fileio.installed(faulty):
        yield faulty


def test_only_fsynced_bytes_survive_the_strictest_power_loss(root, layer, tmp_path):
    write_file(root / "f", b"synced-", b"later", sync_after=0)
    files.fsync_directory(root)
    assert layer.synced_bytes(root / "f") == b"synced-"
    strict = layer.power_loss(tmp_path / "strict", unsynced="none", names="synced")
    assert (strict / "f").read_bytes() == b"synced-"
    everything = layer.power_loss(tmp_path / "all", unsynced="all", names="current")
    assert (everything / "f").read_bytes() == b"synced-later"


def test_a_random_power_loss_keeps_the_synced_bytes_and_a_torn_part_of_the_rest(
        root, layer, tmp_path):
    tail = bytes(range(1, 256)) * 8
    write_file(root / "f", b"S" * 100, tail, sync_after=0)
    files.fsync_directory(root)
    lengths, holes = set(), 0
    for k in range(60):
        data = (layer.power_loss(tmp_path / f"img{k}") / "f").read_bytes()
        assert data[:100] == b"S" * 100
        kept = data[100:]
        assert len(kept) <= len(tail)
        assert all(b in (0, t) for b, t in zip(kept, tail))      # each byte: written or a hole
        lengths.add(len(kept))
        holes += 0 in kept
    assert len(lengths) > 10 and holes > 0        # torn at many places, holes do happen


def test_a_new_file_is_durable_only_once_its_directory_is_fsynced(root, layer, tmp_path):
    write_file(root / "new", b"data", sync_after=0)
    assert not (layer.power_loss(tmp_path / "a", names="synced") / "new").exists()
    assert (layer.power_loss(tmp_path / "b", names="current") / "new").exists()
    files.fsync_directory(root)
    assert (layer.power_loss(tmp_path / "c", names="synced") / "new").read_bytes() == b"data"


def test_a_rename_not_followed_by_a_directory_fsync_may_be_undone(root, layer, tmp_path):
    write_file(root / "file", b"old", sync_after=0)
    files.fsync_directory(root)
    write_file(root / "file.tmp", b"new", sync_after=0)
    fileio.replace(root / "file.tmp", root / "file")
    undone = layer.power_loss(tmp_path / "a", names="synced")
    assert sorted(p.name for p in undone.iterdir()) == ["file"]
    assert (undone / "file").read_bytes() == b"old"
    seen = {(layer.power_loss(tmp_path / f"r{k}") / "file").read_bytes() for k in range(30)}
    assert seen == {b"old", b"new"}               # one state or the other, never a mix
    files.fsync_directory(root)
    assert (layer.power_loss(tmp_path / "b", names="synced") / "file").read_bytes() == b"new"


def test_subdirectories_follow_their_own_fsyncs(root, layer, tmp_path):
    (root / "q").mkdir()
    files.fsync_directory(root)
    write_file(root / "q" / "seg", b"abc", sync_after=0)
    assert list((layer.power_loss(tmp_path / "a", names="synced") / "q").iterdir()) == []
    files.fsync_directory(root / "q")
    assert (layer.power_loss(tmp_path / "b", names="synced") / "q" / "seg").read_bytes() == b"abc"


def test_what_exists_when_the_layer_starts_counts_as_synced(tmp_path):
    root = tmp_path / "root"
    (root / "q").mkdir(parents=True)
    (root / "q" / "f").write_bytes(b"before")
    layer = FaultyFileIO(root)
    image = layer.power_loss(tmp_path / "img", unsynced="none", names="synced")
    assert (image / "q" / "f").read_bytes() == b"before"


# --- the fault layer: failing calls ----------------------------------------------------------

def test_the_nth_write_fails_after_writing_a_prefix(root, layer):
    rule = layer.fail("write", errno.ENOSPC, nth=2, partial_bytes=3)
    fd = fileio.open(root / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        assert fileio.write(fd, b"first") == 5
        with pytest.raises(OSError) as raised:
            fileio.write(fd, b"second")
        assert raised.value.errno == errno.ENOSPC
        assert fileio.write(fd, b"third") == 5
    finally:
        fileio.close(fd)
    assert (root / "f").read_bytes() == b"firstsecthird"
    assert rule.fired == 1 and rule not in layer.rules


def test_a_failed_fsync_syncs_nothing(root, layer):
    layer.fail("fsync", errno.EIO)
    fd = fileio.open(root / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fileio.write(fd, b"data")
        with pytest.raises(OSError) as raised:
            fileio.fsync(fd)
        assert raised.value.errno == errno.EIO
        assert layer.synced_bytes(root / "f") == b""
        fileio.fsync(fd)                          # the rule struck once
        assert layer.synced_bytes(root / "f") == b"data"
    finally:
        fileio.close(fd)


def test_rules_can_be_limited_to_paths_and_last_until_cleared(root, layer):
    layer.fail("write", errno.EIO, times=None, path_contains="bad")
    write_file(root / "good", b"ok")
    for _ in range(3):
        with pytest.raises(OSError):
            write_file(root / "bad", b"no")
    layer.clear()
    write_file(root / "bad", b"yes")
    assert (root / "bad").read_bytes() == b"yes"


def test_files_outside_the_root_are_passed_through_untouched(root, layer, tmp_path):
    layer.fail("write", errno.EIO, times=None, path_contains="elsewhere")
    with pytest.raises(OSError):
        write_file(tmp_path / "elsewhere", b"x")  # rules apply everywhere ...
    write_file(tmp_path / "other", b"x", sync_after=0)
    image = layer.power_loss(tmp_path / "img")
    assert list(image.iterdir()) == []            # ... but only the root is imaged


def test_crash_at_cuts_the_power_before_the_nth_change_and_then_refuses_everything(
        root, layer, tmp_path):
    image = tmp_path / "img"
    layer.crash_at(3, image, unsynced="all", names="current")   # create, write, [write]
    fd = fileio.open(root / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fileio.write(fd, b"one")
    with pytest.raises(PowerLost):
        fileio.write(fd, b"two")
    assert (image / "f").read_bytes() == b"one"
    for call in (lambda: fileio.fsync(fd), lambda: fileio.pread(fd, 1, 0),
                 lambda: fileio.unlink(root / "f")):
        with pytest.raises(PowerLost):
            call()
    layer.close_all()
    assert layer.power_losses == 1
