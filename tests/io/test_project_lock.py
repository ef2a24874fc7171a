"""One writer per project: real processes contending, and a SIGKILLed holder letting go."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.io.project import HOLDER_FILE, Project, ProjectState


def _state() -> ProjectState:
    return ProjectState.start(np.zeros((2, 8, 8), np.uint8), base_model="new-2d")


def _spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err


def _holder_process(folder: Path, program: str) -> subprocess.Popen:
    proc = _spawn(f"""
        import sys, time
        from napari_segtool.io.project import Project
        project = Project({str(folder)!r}, program={program!r})
        project.lock()  # held while this object lives
        print("locked", flush=True)
        time.sleep(60)
    """)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_writer_is_refused_naming_the_holder_until_it_is_killed(tmp_path):
    folder = tmp_path / "p"
    Project(folder).save(_state())
    holder = _holder_process(folder, "napari-segtool finetune")
    try:
        other = Project(folder, wait=0.2)
        started = time.monotonic()
        with pytest.raises(InputError) as info:
            other.lock()
        assert time.monotonic() - started < 1.0  # no waiting forever
        message = str(info.value)
        assert f"held by napari-segtool finetune (pid {holder.pid} on " in message
        assert socket.gethostname() in message
        assert ", since " in message
        assert "try again" in message
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            other.save(_state())  # a one-off save waits briefly, then gives up
        assert other.holder()["pid"] == holder.pid
        assert not other.locked
        note = folder / HOLDER_FILE  # a damaged or partial note still gives a clear refusal
        note.write_text('{"program": 1}')
        with pytest.raises(InputError, match="held by another process"):
            other.lock()
        host = socket.gethostname()
        note.write_text(json.dumps({"program": "x", "pid": holder.pid, "host": host}))
        expected = re.escape(f"held by x (pid {holder.pid} on {host});")
        with pytest.raises(InputError, match=expected):
            other.lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL
    # the OS released the dead holder's lock; its note must not claim otherwise
    assert Project(folder).holder() is None
    assert not (folder / HOLDER_FILE).exists()
    with Project(folder, program="second").lock() as lock:
        assert lock.held
        note = json.loads((folder / HOLDER_FILE).read_text())
        assert note["pid"] == os.getpid()
        assert note["program"] == "second"
    assert not (folder / HOLDER_FILE).exists()


def test_the_note_of_a_killed_holder_blocks_nobody(tmp_path):
    folder = tmp_path / "p"
    holder = _holder_process(folder, "napari-segtool")
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    assert (folder / HOLDER_FILE).exists()  # the dead holder's note is still there ...
    project = Project(folder)
    assert project.holder() is None  # ... but nobody holds the lock, so it is ignored
    project.lock()
    assert project.holder()["pid"] == os.getpid()
    project.unlock()


def test_two_projects_in_one_process_are_two_writers(tmp_path):
    """Two napari windows live in one process: the second must be refused too."""
    first, second = Project(tmp_path / "p"), Project(tmp_path / "p")
    first.lock()
    first.lock()  # again: nothing happens
    with pytest.raises(InputError, match=f"pid {os.getpid()}"):
        second.lock()
    first.unlock()
    second.lock()
    assert second.locked
    assert not first.locked
    second.unlock()


def test_saves_from_a_worker_thread_share_the_session_lock(tmp_path):
    project = Project(tmp_path / "p", wait=0.5)
    project.lock()
    errors = []

    def autosave():
        try:
            project.save(_state())
        except InputError as exc:
            errors.append(exc)

    worker = threading.Thread(target=autosave)
    worker.start()
    worker.join()
    assert errors == []
    assert project.locked  # the worker's save did not release the session
    assert project.holder()["pid"] == os.getpid()
    project.unlock()
    assert not project.locked


def test_bad_timeouts_are_refused(tmp_path):
    project = Project(tmp_path / "p")
    for timeout in (-1, float("inf"), float("nan"), "1"):
        with pytest.raises(InputError, match="lock timeout"):
            project.lock(timeout=timeout)


_ROUNDS_SCRIPT = """
    import sys, time
    from pathlib import Path
    from napari_segtool.io.project import Project
    folder, name, rounds, session = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    go = Path(folder).parent / "go"
    while not go.exists():
        time.sleep(0.005)
    project = Project(folder, program=name, wait=30)
    state = project.load()  # each writer's copy goes stale as the other records rounds

    def write(path, version):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name}:{version}")

    for i in range(rounds):
        entry = {"writer": name, "round": i}
        if session == "session":  # like a CLI round: hold the project for the round
            with project.lock(timeout=30):
                project.add_version(state, write, entry, promote=True, save=True)
        else:  # like the widget's worker: only the call's own hold, state not saved
            project.add_version(state, write, entry, promote=i % 2 == 0, save=False)
"""


def test_two_processes_recording_rounds_lose_none(tmp_path):
    folder = tmp_path / "p"
    Project(folder).save(_state())
    rounds = 15
    procs = [
        _spawn(_ROUNDS_SCRIPT, folder, name, rounds, mode)
        for name, mode in (("a", "session"), ("b", "call"))
    ]
    (tmp_path / "go").touch()
    for proc in procs:
        _finish(proc, 60)
    state = Project(folder).load()
    numbers = [v["version"] for v in state.versions]
    assert numbers == list(range(1, 2 * rounds + 1))  # all 30 listed, none claimed twice
    for writer in "ab":
        mine = [v for v in state.versions if v["writer"] == writer]
        assert [v["round"] for v in mine] == list(range(rounds))
    for entry in state.versions:  # each listed file holds the model of the writer that claimed it
        assert (folder / entry["file"]).read_text() == f"{entry['writer']}:{entry['version']}"
    assert state.current_version in numbers
    assert not (folder / HOLDER_FILE).exists()


_RECORD_SCRIPT = """
    import sys, time
    from pathlib import Path
    from napari_segtool.config import ModelConfig
    from napari_segtool.io.project import Project
    from napari_segtool.model.checkpoint import SegmentationModel
    from napari_segtool.training.finetune import FinetuneResult
    from napari_segtool.training.versions import record_round
    folder, rounds = sys.argv[1], int(sys.argv[2])
    model = SegmentationModel.new(
        ModelConfig(spatial_dims=2, depth=2, base_features=4), tile_shape=(16, 16), seed=0
    )
    project = Project(folder, wait=30)
    state = project.load()
    (Path(folder).parent / f"ready-{os.getpid()}").touch()
    go = Path(folder).parent / "go"
    while not go.exists():
        time.sleep(0.005)
    for _ in range(rounds):
        result = FinetuneResult(model=model, baseline_dice=0.5, best_dice=0.6, epochs=1,
                                stopped_early=False, seconds=0.1, promote=True,
                                labelled_voxels=os.getpid(), validation_voxels=1)
        record_round(project, state, result)
"""


def test_two_processes_calling_record_round_lose_no_versions(tmp_path):
    """The 15 + 15 rounds that left 16 listed, with the real record_round (and torch)."""
    from napari_segtool.model.checkpoint import SegmentationModel

    folder = tmp_path / "p"
    Project(folder).save(_state())
    rounds = 5
    script = "import os\n" + textwrap.dedent(_RECORD_SCRIPT)
    procs = [_spawn(script, folder, rounds) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported torch: start together
        assert time.monotonic() < deadline
        assert all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for proc in procs:
        _finish(proc, 120)
    state = Project(folder).load()
    assert [v["version"] for v in state.versions] == list(range(1, 2 * rounds + 1))
    pids = sorted({v["labelled_voxels"] for v in state.versions})
    assert pids == sorted(p.pid for p in procs)
    for entry in state.versions:
        model = SegmentationModel.load(folder / entry["file"])
        assert model.name.endswith(f" v{entry['version']}")
