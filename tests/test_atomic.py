"""Atomic writes: a file or dataset folder appears complete, with its contents flushed to the disk before the rename
that makes it visible, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sonossl import atomic


class Flushes:
    """The files flushed to disk, each with whether the final path (``final``) already existed when it was."""

    def __init__(self) -> None:
        self.final = Path("/nonexistent")
        self.calls: list[tuple[str, bool]] = []


@pytest.fixture
def flushes(monkeypatch) -> Flushes:
    seen, flush = Flushes(), atomic.fsync_file

    def record(path: Path) -> None:
        seen.calls.append((Path(path).name, seen.final.exists()))
        flush(path)

    monkeypatch.setattr(atomic, "fsync_file", record)
    return seen


def test_every_file_of_a_folder_is_flushed_before_the_folder_appears(tmp_path, flushes):
    flushes.final = tmp_path / "dataset"
    with atomic.atomic_dir(flushes.final) as staging:
        (staging / "frames.npy").write_bytes(b"x" * 100)
        (staging / "sub").mkdir()
        (staging / "sub" / "index.parquet").write_bytes(b"y")
    assert sorted(flushes.calls) == [("frames.npy", False), ("index.parquet", False)]
    assert (flushes.final / "sub" / "index.parquet").read_bytes() == b"y"


def test_a_file_written_by_name_is_flushed_before_it_appears_and_absent_after_an_error(tmp_path, flushes):
    flushes.final = tmp_path / "clip.mp4"
    with atomic.atomic_file(flushes.final) as tmp:
        tmp.write_bytes(b"video")
    assert flushes.calls == [(f".clip.mp4.tmp-{os.getpid()}.mp4", False)]
    assert flushes.final.read_bytes() == b"video"
    flushes.final = tmp_path / "other.mp4"
    with pytest.raises(RuntimeError), atomic.atomic_file(flushes.final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not flushes.final.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_bytes_are_on_disk_before_the_rename_and_a_failed_write_leaves_the_old_file_alone(tmp_path, monkeypatch):
    """atomic_write_bytes (every checkpoint, encoder and metrics.json): the data is fsynced before the rename makes
    it the file; a write that fails leaves the previous file as it was and no temporary file behind."""
    events, fsync, replace = [], os.fsync, os.replace
    target = tmp_path / "metrics.json"
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(("fsync", target.exists())) or fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or replace(a, b))
    atomic.atomic_write_bytes(target, b"old")
    assert events[:2] == [("fsync", False), ("replace", "metrics.json")] and target.read_bytes() == b"old"

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write_bytes(target, b"new, half written")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_the_temporary_names_of_atomic_writes_and_downloads_are_recognised_and_nothing_else(tmp_path):
    import tempfile

    from sonossl.atomic import is_temporary

    made = [Path(tempfile.mkstemp(prefix=".frames.npy.", suffix=".tmp", dir=tmp_path)[1]).name,  # atomic_write_*
            Path(tempfile.mkstemp(prefix=".model.pt.", suffix=".part", dir=tmp_path)[1]).name,  # a download
            Path(tempfile.mkdtemp(prefix=".sim.staging-", dir=tmp_path)).name,  # atomic_dir
            ".frames.npy.tmp-4242.npy", ".sim.old-4242"]
    assert all(is_temporary(n) for n in made), made
    for data in ("frames.npy", ".dvcignore", ".env.local.tmp", ".data.v2.part", ".gitignore", "a.tmp"):
        assert not is_temporary(data), data


def test_a_second_writer_of_the_same_folder_is_refused_and_leaves_the_first_ones_work_alone(tmp_path):
    """Two runs into one output: the second is refused before it touches anything (it used to delete the first
    one's staging folder, whose workers then wrote a dataset with files missing, both exiting 0); the first ends
    whole; a staging folder nobody holds (a killed run's) is still cleared away."""
    out = tmp_path / "ds"
    with atomic.atomic_dir(out) as staging:
        (staging / "a.txt").write_text("first")
        with pytest.raises(atomic.OutputRefused, match=r"ds: another process is writing it now \(\.ds\.staging-"):
            with atomic.atomic_dir(out):
                pass
        assert staging.is_dir() and (staging / "a.txt").is_file()
    assert (out / "a.txt").read_text() == "first"
    left = tmp_path / ".ds.staging-abcd1234"
    left.mkdir()
    with atomic.atomic_dir(out) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and (out / "b.txt").is_file()


def test_an_output_is_replaced_only_where_it_holds_nothing_but_an_earlier_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "link").symlink_to(mine)
    for path, said in ((".", "is the working directory"), ("..", "or a folder above it"),
                       ("afile", "is a file"), ("link", "is a symbolic link"),
                       ("mine", r"holds 1 file\(s\) or folder\(s\) \(notes.txt\) but no file meta.json")):
        with pytest.raises(atomic.OutputRefused, match=said):
            atomic.check_replaceable(path, "meta.json", "clip dataset")
    (mine / "meta.json").write_text("{}")
    atomic.check_replaceable("mine", "meta.json", "clip dataset")  # an earlier one: replaced
    atomic.check_replaceable("new/sub", "meta.json", "clip dataset")
    (tmp_path / "empty").mkdir()
    atomic.check_replaceable("empty", "meta.json", "clip dataset")


def test_a_file_system_without_locks_on_folders_still_writes(tmp_path, monkeypatch):
    """NFS emulates flock with byte-range write locks, which a folder opened to read cannot take (EBADF): the
    write goes on unguarded, as before the lock, instead of failing every step on such a volume."""
    import errno

    def no_locks(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    with atomic.atomic_dir(tmp_path / "ds") as staging:
        (staging / "a.txt").write_text("x")
        assert not atomic._held_by_another(staging)
    assert (tmp_path / "ds" / "a.txt").read_text() == "x"


def test_a_writer_killed_with_sigkill_leaves_no_lock_behind_in_the_children_it_forked(tmp_path):
    """A writer killed with SIGKILL (the OOM killer, `timeout -s KILL`) can leave idle pool workers behind: they must
    not keep its lock (the output was refused to every later run for as long as they lived); its staging folder is
    a leftover, cleared by the next run. Names with glob characters are guarded too."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run[1]"
    script = ("import multiprocessing as mp, sys, time\nfrom sonossl import atomic\n"
              "with atomic.atomic_dir(sys.argv[1]) as s:\n"
              "    child = mp.get_context('fork').Process(target=time.sleep, args=(120,))\n"
              "    child.start()\n    print(child.pid, flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(atomic.OutputRefused, match="another process is writing it now"):
            with atomic.atomic_dir(out):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert Path(f"/proc/{child}").exists(), "the forked child outlives the writer"
        with atomic.atomic_dir(out) as staging:
            (staging / "a.txt").write_text("after")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run[1]"]
    finally:
        os.kill(child, signal.SIGKILL)


def test_an_output_named_dot_dot_is_refused_before_any_work(tmp_path):
    with pytest.raises(atomic.OutputRefused, match=r"name the output folder itself"):
        with atomic.atomic_dir(tmp_path / "x" / ".."):
            pass
