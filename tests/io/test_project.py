import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.io.project import Project, ProjectState, default_project_dir, merge_untouched


def _state(seed: int = 0) -> ProjectState:
    rng = np.random.default_rng(seed)
    state = ProjectState.start(rng.integers(0, 3, (4, 16, 16)).astype(np.uint8),
                               base_model="em-membranes-2d", image={"path": "x.tif"})  # fmt: skip
    state.labels[1, :4, :4] = 2
    state.painted[1, :4, :4] = True
    state.reviewed = {3}
    state.versions = [{"version": 1, "file": "models/v0001.pt", "val_dice": 0.8}]
    state.current_version = 1
    return state


def test_round_trip(tmp_path):
    state = _state()
    project = Project(tmp_path / "img.tif.segtool")
    project.save(state)
    back = project.load()
    for name in ("labels", "machine", "painted"):
        assert np.array_equal(getattr(back, name), getattr(state, name)), name
    assert back.labels.dtype == np.uint8
    assert back.painted.dtype == bool
    assert back.reviewed == {3}
    assert back.current_version == 1
    assert back.versions == state.versions
    assert back.base_model == "em-membranes-2d"
    assert np.array_equal(back.protected(), state.protected())


def test_default_folder_is_beside_the_image(tmp_path):
    assert default_project_dir(tmp_path / "a.tif") == tmp_path / "a.tif.segtool"


def test_failed_save_leaves_the_previous_one(tmp_path, monkeypatch):
    project = Project(tmp_path / "p")
    project.save(_state(0))
    before = project.state_path.read_bytes()

    def explode(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", explode)
    with pytest.raises(OSError, match="disk full"):
        project.save(_state(1))
    assert project.state_path.read_bytes() == before
    assert list(project.folder.iterdir()) == [project.state_path]  # no temporary left behind
    assert project.load().reviewed == {3}


def test_process_killed_mid_save_leaves_a_loadable_project(tmp_path):
    project = Project(tmp_path / "p")
    good = _state(0)
    project.save(good)
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from napari_segtool.io.project import Project, ProjectState
        real = np.savez_compressed
        def dying(fh, **arrays):
            real(fh, **arrays)
            fh.flush()
            os._exit(9)  # killed after writing, before the rename
        np.savez_compressed = dying
        state = ProjectState.start(np.ones((4, 16, 16), np.uint8))
        Project({str(project.folder)!r}).save(state)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    back = project.load()
    assert np.array_equal(back.labels, good.labels)


def test_damaged_or_foreign_files_are_named(tmp_path):
    project = Project(tmp_path / "p")
    with pytest.raises(InputError, match="no project saved"):
        project.load()
    project.folder.mkdir()
    project.state_path.write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"state\.npz: damaged"):
        project.load()
    np.savez(project.state_path, labels=np.zeros(3))
    with pytest.raises(InputError, match="damaged"):
        project.load()


def test_merge_never_touches_protected_voxels():
    rng = np.random.default_rng(1)
    state = ProjectState.start(rng.integers(0, 2, (6, 20, 20)).astype(np.uint8))
    for _ in range(20):  # random corrections, some painted back to the machine's value
        z, y, x = rng.integers(0, [6, 15, 15])
        state.labels[z, y : y + 5, x : x + 5] = rng.integers(0, 3)
        state.painted[z, y : y + 5, x : x + 5] = True
    state.reviewed = {2, 5}
    protected = state.protected()
    kept = state.labels.copy()
    new = rng.integers(0, 3, state.labels.shape).astype(np.uint8)
    merge_untouched(state, new)
    assert np.array_equal(state.labels[protected], kept[protected])
    assert np.array_equal(state.labels[~protected], new[~protected])
    with pytest.raises(InputError, match="does not match"):
        merge_untouched(state, new[:3])
