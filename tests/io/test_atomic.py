"""Atomic writes: stale temporaries of killed writers go, live ones stay, the folder is synced."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from napari_segtool.io import atomic
from napari_segtool.io.atomic import atomic_write, remove_stale_temporaries

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")


def _temporaries(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _age(path, seconds=60.0):
    old = time.time() - seconds
    os.utime(path, (old, old))


_WRITER = """
    import os, signal, sys, time
    from pathlib import Path
    from napari_segtool.io.atomic import atomic_path
    target, mode = sys.argv[1], sys.argv[2]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half of a new file")
        print(tmp.name, flush=True)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        go = Path(target).parent / "go"
        while not go.exists():  # a slow, live writer
            time.sleep(0.01)
        tmp.write_bytes(b"from the slow writer")
"""


def _writer(target, mode):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(target), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_temporaries_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    target = tmp_path / "state.npz"
    target.write_bytes(b"old")
    names = []
    for _ in range(2):
        proc = _writer(target, "die")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        names.append(out.strip())
    assert _temporaries(tmp_path, "state.npz") == sorted(names)
    assert target.read_bytes() == b"old"
    for name in names:
        _age(tmp_path / name)  # killed a while ago
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert _temporaries(tmp_path, "state.npz") == []
    assert target.read_bytes() == b"new"


def test_a_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "state.npz"
    proc = _writer(target, "wait")
    try:
        name = proc.stdout.readline().strip()
        _age(tmp_path / name)  # even an old one: its writer still holds the lock
        atomic_write(target, lambda fh: fh.write(b"from the fast writer"))
        assert (tmp_path / name).exists()
        assert target.read_bytes() == b"from the fast writer"
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert target.read_bytes() == b"from the slow writer"
    assert _temporaries(tmp_path, "state.npz") == []


def test_fresh_and_foreign_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "a.tif"
    fresh = tmp_path / ".a.tif.abc123_x.tmp"  # unlocked but just made: maybe about to be locked
    other = tmp_path / ".a.tif.x.abc123_x.tmp"  # belongs to "a.tif.x"
    mine = tmp_path / ".a.tif.zzz999_y.tmp"
    link = tmp_path / ".a.tif.lnk000_z.tmp"
    for p in (fresh, other, mine):
        p.write_bytes(b"x")
    link.symlink_to(target)
    for p in (other, mine):
        _age(p)
    assert remove_stale_temporaries(target) == [mine]
    assert fresh.exists()
    assert other.exists()
    assert link.is_symlink()


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write(tmp_path / "f.bin", lambda fh: fh.write(b"data"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "f.bin").read_bytes() == b"data"


def test_a_failed_write_leaves_no_temporary_and_keeps_the_mode(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)

    def half_then_fail(fh):
        fh.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _temporaries(tmp_path, "f.bin") == []
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
