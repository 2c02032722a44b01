import errno
import logging
import os

import pytest

from floki.errors import DiskFull, InvalidParameter, StorageIOError
from floki.shard import files


def test_segment_and_index_names_are_zero_padded_first_ids(tmp_path):
    assert files.segment_name(1) == "00000000000000000001.seg"
    assert files.segment_path(tmp_path, 42) == tmp_path / "00000000000000000042.seg"
    assert files.index_path(tmp_path, 42) == tmp_path / "00000000000000000042.idx"
    assert files.segment_name(2**64 - 1) == "18446744073709551615.seg"


@pytest.mark.parametrize("first_id", [1, 9, 10, 4096, 10**19, 2**64 - 1])
def test_segment_name_round_trips(first_id):
    assert files.parse_segment_name(files.segment_name(first_id)) == first_id
    assert files.parse_index_name(files.index_path("d", first_id).name) == first_id


@pytest.mark.parametrize("name", [
    "1.seg", "0000000000000000001.seg", "000000000000000000001.seg",
    "00000000000000000000.seg", "99999999999999999999.seg", "00000000000000000001.SEG",
    "0000000000000000000a.seg", "0000000000000000000١.seg", "00000000000000000001.seg.tmp",
    "00000000000000000001.idx", "queue.json", "", ".seg",
])
def test_names_that_are_not_segments_parse_to_none(name):
    assert files.parse_segment_name(name) is None


def test_name_order_is_id_order():
    ids = [1, 2, 9, 10, 99, 100, 12345678901234]
    assert sorted(files.segment_name(i) for i in ids) == [files.segment_name(i) for i in ids]


def test_list_segment_ids_sorts_and_skips_strays_with_a_warning(tmp_path, caplog):
    for first_id in (30, 1, 7):
        files.segment_path(tmp_path, first_id).write_bytes(b"")
        files.index_path(tmp_path, first_id).write_bytes(b"")
    for known in ("queue.json", "channels.json", "LOCK", "queue.json.tmp"):
        (tmp_path / known).write_bytes(b"")
    (tmp_path / "7.seg").write_bytes(b"")
    (tmp_path / "core.1234").write_bytes(b"")
    (tmp_path / files.segment_name(99)).mkdir()
    with caplog.at_level(logging.WARNING, logger="floki.shard.files"):
        assert files.list_segment_ids(tmp_path) == [1, 7, 30]
    warned = caplog.text
    assert "7.seg" in warned and "core.1234" in warned and files.segment_name(99) in warned
    assert "queue.json" not in warned and "LOCK" not in warned
    assert files.list_index_ids(tmp_path) == [1, 7, 30]
    assert files.list_segment_ids(tmp_path / "missing") == []


def test_queue_files_and_tmp_names(tmp_path):
    assert files.queue_file(tmp_path) == tmp_path / "queue.json"
    assert files.channels_file(tmp_path) == tmp_path / "channels.json"
    assert files.lock_path(tmp_path) == tmp_path / "LOCK"
    assert files.tmp_path(tmp_path / "queue.json") == tmp_path / "queue.json.tmp"
    assert files.run_dir(tmp_path) == tmp_path / ".run"


@pytest.mark.parametrize("name", ["../etc", "..", ".", "", "a/b", ".run", "x" * 201, "é"])
def test_queue_dir_refuses_names_that_could_escape(tmp_path, name):
    with pytest.raises(InvalidParameter):
        files.queue_dir(tmp_path, name)


def test_queue_dir_accepts_valid_names(tmp_path):
    assert files.queue_dir(tmp_path, "orders:eu-1.v2") == tmp_path / "orders:eu-1.v2"
    assert files.queue_dir(tmp_path, b"jobs") == tmp_path / "jobs"


def test_list_queue_names_finds_queues_and_skips_everything_else(tmp_path, caplog):
    (tmp_path / "with_meta").mkdir()
    (tmp_path / "with_meta" / "queue.json").write_text("{}")
    (tmp_path / "with_segment").mkdir()
    files.segment_path(tmp_path / "with_segment", 5).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad name").mkdir()
    (tmp_path / "bad name" / "queue.json").write_text("{}")
    (tmp_path / ".run").mkdir()
    (tmp_path / ".run" / "queue.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "with_meta")
    with caplog.at_level(logging.WARNING, logger="floki.shard.files"):
        assert files.list_queue_names(tmp_path) == ["with_meta", "with_segment"]
    assert "empty" in caplog.text and "bad name" in caplog.text and "link" in caplog.text
    assert ".run" not in caplog.text
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["with_meta", "with_segment", "empty", "bad name", ".run", "a_file", "link"])
    assert files.list_queue_names(tmp_path / "nope") == []


def test_fsync_directory_works_on_a_directory(tmp_path):
    files.fsync_directory(tmp_path)
    with pytest.raises(OSError):
        files.fsync_directory(tmp_path / "missing")


@pytest.mark.parametrize("err,kind", [(errno.ENOSPC, DiskFull), (errno.EDQUOT, DiskFull),
                                      (errno.EIO, StorageIOError),
                                      (errno.EACCES, StorageIOError)])
def test_storage_error_maps_errno(err, kind):
    mapped = files.storage_error(OSError(err, os.strerror(err)), "append")
    assert type(mapped) is kind
    assert "append" in mapped.message and "\n" not in mapped.message
