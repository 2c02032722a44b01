"""`floki check DATA_DIR [--repair]`: the offline checker (floki/shard/check.py).

Each kind of damage is made by hand on a real queue and must be found with the right severity;
a check without --repair changes nothing; --repair fixes exactly what the server's recovery
would fix and leaves real damage alone; power-loss images (faultfs) never hold damage that
--repair cannot fix, and after --repair the server opens them without cutting anything.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
from pathlib import Path

import pytest

from faultfs import FaultyFileIO
from floki import cli
from floki.config import QueueSettings
from floki.shard import check, fileio, files
from floki.shard.check import EXIT_CLEAN, EXIT_DAMAGE, EXIT_USAGE, Severity
from floki.shard.queue import Queue
from floki.shard.segment import SEGMENT_HEADER_SIZE

SETTINGS = QueueSettings(segment_size=4096)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def make_queue(data_dir: Path, name: str = "q", messages: int = 200) -> Path:
    """A cleanly closed queue with a channel and several segments. Returns its directory."""
    queue = Queue.create(data_dir, name, SETTINGS, "interval")
    queue.create_channel("c")
    for n in range(messages):
        queue.push([f"message {n} ".encode() * 3], 1_700_000_000_000 + n)
    queue.close()
    return data_dir / name


def segments(directory: Path) -> list[Path]:
    return [files.segment_path(directory, i) for i in files.list_segment_ids(directory)]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def findings(report: check.CheckReport) -> list[tuple[str, Severity, bool]]:
    return [(f.path.name, f.severity, f.repaired) for q in report.queues for f in q.findings]


def run_check(data_dir: Path, repair: bool = False) -> check.CheckReport:
    return check.check_data_dir(data_dir, repair=repair)


# --- clean, usage ------------------------------------------------------------------------------

def test_a_clean_data_dir_is_clean(data_dir, capsys):
    make_queue(data_dir, "a")
    make_queue(data_dir, "b", messages=0)
    assert cli.main(["check", str(data_dir)]) == EXIT_CLEAN
    out = capsys.readouterr().out
    assert "queue a: clean (" in out and "ids 1..200" in out and "queue b: clean" in out
    assert "result: clean (exit code 0)" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert check.run(str(tmp_path / "missing")) == EXIT_USAGE
    (tmp_path / "file").write_text("x")
    assert check.run(str(tmp_path / "file")) == EXIT_USAGE
    with pytest.raises(SystemExit) as raised:
        cli.main(["check"])
    assert raised.value.code == EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err


def test_a_queue_in_use_by_a_server_is_skipped_with_exit_2(data_dir, capsys):
    directory = make_queue(data_dir)
    fd = os.open(files.lock_path(directory), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # what a running shard holds
    try:
        assert check.run(str(data_dir), repair=True) == EXIT_USAGE
        assert "SKIPPED, in use" in capsys.readouterr().out
    finally:
        os.close(fd)
    assert check.run(str(data_dir)) == EXIT_CLEAN


# --- damage, one kind at a time ---------------------------------------------------------------

def test_a_torn_tail_is_repairable_and_repair_cuts_it(data_dir):
    directory = make_queue(data_dir)
    newest = segments(directory)[-1]
    good_size = newest.stat().st_size
    with open(newest, "ab") as f:
        f.write(b"\x11" * 30)                                # half a record
    before = snapshot(data_dir)
    report = run_check(data_dir)
    assert findings(report) == [(newest.name, Severity.REPAIRABLE, False)]
    assert report.exit_code == EXIT_DAMAGE
    assert snapshot(data_dir) == before                      # rule 1: a check writes nothing
    report = run_check(data_dir, repair=True)
    assert findings(report) == [(newest.name, Severity.REPAIRABLE, True)]
    assert report.exit_code == EXIT_CLEAN
    assert newest.stat().st_size == good_size
    assert run_check(data_dir).exit_code == EXIT_CLEAN


def test_a_bit_flip_in_a_sealed_segment_is_damage_that_repair_leaves_alone(data_dir, capsys):
    directory = make_queue(data_dir)
    sealed = segments(directory)[0]
    data = bytearray(sealed.read_bytes())
    data[SEGMENT_HEADER_SIZE + 100] ^= 0x40
    sealed.write_bytes(bytes(data))
    assert check.run(str(data_dir), repair=True) == EXIT_DAMAGE
    out = capsys.readouterr().out
    assert "damage: 00000000000000000001.seg: id " in out and "unreadable" in out
    assert sealed.read_bytes() == bytes(data)                # rule 2: never touched
    report = run_check(data_dir)
    damage = [f for q in report.queues for f in q.findings if f.severity is Severity.DAMAGE]
    assert len(damage) == 1 and "skipped when read" in damage[0].what


@pytest.mark.parametrize("damage", ["magic", "version", "first_id"])
def test_a_bad_header_is_damage_and_never_rewritten(data_dir, damage):
    directory = make_queue(data_dir)
    victim = segments(directory)[1]
    data = bytearray(victim.read_bytes())
    offset = {"magic": 0, "version": 8, "first_id": 16}[damage]
    data[offset] ^= 0x01
    victim.write_bytes(bytes(data))
    report = run_check(data_dir, repair=True)
    assert [(n, s) for n, s, _ in findings(report)] == [(victim.name, Severity.DAMAGE)]
    assert "will not open" in report.queues[0].findings[0].what
    assert victim.read_bytes() == bytes(data)


def test_an_unfinished_newest_segment_gets_a_fresh_header(data_dir):
    directory = make_queue(data_dir)
    last = segments(directory)[-1]
    next_name = files.segment_path(directory, files.parse_segment_name(last.name) + 500)
    next_name.write_bytes(bytes(SEGMENT_HEADER_SIZE))        # created, header never written
    report = run_check(data_dir, repair=True)
    assert (next_name.name, Severity.REPAIRABLE, True) in findings(report)
    assert report.exit_code == EXIT_CLEAN
    queue = Queue.open(data_dir, "q", SETTINGS, "interval")
    try:
        # the name still counts: ids continue from it, never below
        assert queue.push([b"x"], 1)[0] >= files.parse_segment_name(next_name.name)
    finally:
        queue.close()


def test_index_problems_are_notes_that_repair_rewrites(data_dir):
    directory = make_queue(data_dir)
    first, second = [files.index_path(directory, i) for i in files.list_segment_ids(directory)[:2]]
    first.write_bytes(first.read_bytes()[:-8] + b"\x00" * 8)
    expected = second.read_bytes()
    second.unlink()
    report = run_check(data_dir)
    assert sorted((n, s) for n, s, _ in findings(report)) == [
        (first.name, Severity.NOTE), (second.name, Severity.NOTE)]
    assert report.exit_code == EXIT_CLEAN                    # the index is only a hint
    run_check(data_dir, repair=True)
    assert second.read_bytes() == expected
    assert findings(run_check(data_dir)) == []


def test_leftovers_are_notes_and_repair_removes_them(data_dir):
    directory = make_queue(data_dir)
    (directory / "queue.json.tmp").write_text("{half")
    files.index_path(directory, 99999).write_bytes(b"\x20\x00\x00\x00")
    (directory / "README").write_text("an operator's note")
    (data_dir / ".deleting-old-1234").mkdir()
    (data_dir / ".deleting-old-1234" / "x.seg").write_text("x")
    (data_dir / "not a queue!").mkdir()
    report = run_check(data_dir, repair=True)
    assert report.exit_code == EXIT_CLEAN
    assert not (directory / "queue.json.tmp").exists()
    assert not files.index_path(directory, 99999).exists()
    assert (directory / "README").exists()                   # not ours: never removed
    assert not (data_dir / ".deleting-old-1234").exists()
    assert (data_dir / "not a queue!").exists()


def test_a_bad_checkpoint_with_a_good_previous_generation_is_restored(data_dir):
    directory = make_queue(data_dir)
    channels = files.channels_file(directory)
    previous = files.previous_path(channels).read_bytes()
    channels.write_text("{not json")
    report = run_check(data_dir)
    assert findings(report) == [(channels.name, Severity.REPAIRABLE, False)]
    assert run_check(data_dir, repair=True).exit_code == EXIT_CLEAN
    assert channels.read_bytes() == previous


@pytest.mark.parametrize("name", [files.QUEUE_FILE, files.CHANNELS_FILE])
def test_a_checkpoint_without_a_good_generation_is_damage(data_dir, name):
    directory = make_queue(data_dir)
    (directory / name).write_text("[1, 2]")
    files.previous_path(directory / name).write_text("garbage")
    report = run_check(data_dir, repair=True)
    assert findings(report) == [(name, Severity.DAMAGE, False)]
    assert report.exit_code == EXIT_DAMAGE


def test_a_hole_in_the_newest_segment_after_an_unclean_stop_is_cut_there(data_dir):
    directory = make_queue(data_dir)
    queue_file = files.queue_file(directory)
    meta = json.loads(queue_file.read_text())
    newest = segments(directory)[-1]
    data = bytearray(newest.read_bytes())
    data[SEGMENT_HEADER_SIZE + 60:SEGMENT_HEADER_SIZE + 120] = bytes(60)   # the 2nd record
    newest.write_bytes(bytes(data))
    # after a clean stop that is corruption: reported, skipped when read, not repairable
    assert [s for _, s, _ in findings(run_check(data_dir))] == [Severity.DAMAGE]
    meta["clean_next_id"] = None                          # an unclean stop
    queue_file.write_text(json.dumps(meta))
    report = run_check(data_dir, repair=True)
    assert findings(report) == [(newest.name, Severity.REPAIRABLE, True)]
    assert report.exit_code == EXIT_CLEAN
    queue = Queue.open(data_dir, "q", SETTINGS, "interval")
    try:
        assert queue.info(0.0)["corrupt_records"] == 0
    finally:
        queue.close()


# --- power-loss images ---------------------------------------------------------------------------

def test_power_loss_images_hold_only_repairable_damage_and_repair_matches_recovery(
        tmp_path, caplog):
    rng = random.Random()
    repaired = 0
    for run in range(12):
        data = tmp_path / f"run{run}" / "data"
        data.mkdir(parents=True)
        layer = FaultyFileIO(data, seed=rng.randrange(1 << 30))
        with fileio.installed(layer):
            queue = Queue.create(data, "q", SETTINGS, "never")
            queue.create_channel("c")
            for n in range(rng.randint(10, 120)):
                queue.push([rng.randbytes(rng.randint(1, 150))], n)
                if rng.random() < 0.1:
                    queue.sync()
            image = layer.power_loss(data.parent / "image")
            layer.close_all()
            queue._unlock()
        report = run_check(image)
        severities = {s for _, s, _ in findings(report)}
        assert Severity.DAMAGE not in severities, findings(report)
        after_repair = run_check(image, repair=True)
        assert after_repair.exit_code == EXIT_CLEAN
        repaired += sum(r for _, _, r in findings(after_repair))
        assert findings(run_check(image)) == []
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            reopened = Queue.open(image, "q", SETTINGS, "never")
            reopened.close()
        assert not [r for r in caplog.records if "torn" in r.getMessage()
                    or "rebuild" in r.getMessage()], "recovery had to repair more"
    assert repaired > 0, "no power loss left anything to repair: the test proves nothing"
