import json
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

from napari_segtool.errors import InputError
from napari_segtool.io import project_checks
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
    left = [p for p in project.folder.iterdir() if not p.name.startswith("project.lock")]
    assert left == [project.state_path]  # no temporary left behind
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


# -- item 7: a project's own state is checked on load ------------------------------------------


def _record(state: ProjectState, **changes) -> dict:
    record = {
        "format": "napari-segtool-project",
        "format_version": 1,
        "reviewed": sorted(state.reviewed),
        "versions": state.versions,
        "current_version": state.current_version,
        "base_model": state.base_model,
        "image": state.image,
        "shape": list(state.labels.shape),
    }
    record.update(changes)
    return record


def _write_raw(project: Project, *, record: dict | bytes | None = None, **arrays) -> None:
    """Write state.npz by hand, bypassing Project.save's checks."""
    state = _state()
    meta = record if isinstance(record, bytes) else json.dumps(record or _record(state)).encode()
    members = {
        "labels": state.labels,
        "machine": state.machine,
        "painted": np.packbits(state.painted, axis=None),
        "meta": np.frombuffer(meta, np.uint8),
    }
    members.update(arrays)
    project.folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(project.state_path, **members)


def _load_error(project: Project) -> str:
    with pytest.raises(InputError) as info:
        project.load()
    assert type(info.value) is InputError
    message = str(info.value)
    assert "state.npz" in message
    return message


@pytest.mark.parametrize(
    ("file", "field"),
    [
        ("../outside.pt", "'versions'[0]"),
        ("models/../../outside.pt", "'versions'[0]"),
        ("/etc/passwd", "'versions'[0]"),
        ("", "'versions'[0]"),
        (".", "'versions'[0]"),
    ],
)
def test_version_files_outside_the_project_are_refused(tmp_path, file, field):
    project = Project(tmp_path / "p")
    versions = [{"version": 1, "file": file}]
    _write_raw(project, record=_record(_state(), versions=versions))
    message = _load_error(project)
    assert field in message
    assert "inside the project folder" in message


def test_a_symlinked_models_folder_leading_outside_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    project = Project(tmp_path / "p")
    project.folder.mkdir()
    (project.folder / "models").symlink_to(elsewhere, target_is_directory=True)
    _write_raw(project)  # names models/v0001.pt, which resolves outside
    assert "'versions'[0]" in _load_error(project)
    with pytest.raises(InputError, match="inside the project folder"):
        project.file("models/v0001.pt")


@pytest.mark.parametrize(
    ("base_model", "ok"),
    [
        ("em-membranes-2d", True),
        ("", True),
        ("models/start.pt", True),
        ("../start.pt", False),
        ("models/../../start.pt", False),
        ("/no/such/model.pt", False),
        (42, False),
    ],
)
def test_base_model_is_a_name_a_file_inside_or_an_existing_absolute_path(tmp_path, base_model, ok):
    project = Project(tmp_path / "p")
    _write_raw(project, record=_record(_state(), base_model=base_model))
    if ok:
        assert project.load().base_model == base_model
    else:
        assert "'base_model'" in _load_error(project)


def test_base_model_absolute_existing_file_is_accepted(tmp_path):
    model = tmp_path / "start.pt"
    model.write_bytes(b"x")
    project = Project(tmp_path / "p")
    _write_raw(project, record=_record(_state(), base_model=str(model)))
    assert project.load().base_model == str(model)
    assert project.base_model_path(str(model)) == model
    assert project.base_model_path("em-membranes-2d") is None
    with pytest.raises(InputError, match="leaves the project folder"):
        project.base_model_path("../start.pt")


def test_a_short_or_long_painted_mask_is_refused(tmp_path):
    project = Project(tmp_path / "p")
    bits = np.packbits(_state().painted, axis=None)
    _write_raw(project, painted=bits[:-3])
    assert "'painted'" in _load_error(project)
    _write_raw(project, painted=np.concatenate([bits, bits[:1]]))
    assert "'painted'" in _load_error(project)
    _write_raw(project, painted=bits.astype(np.int16))
    assert "'painted'" in _load_error(project)


@pytest.mark.parametrize("reviewed", [[-1], [4], [0, 0], [1.5], ["2"], [True], "0-3"])
def test_reviewed_slices_out_of_range_or_not_ints_are_refused(tmp_path, reviewed):
    project = Project(tmp_path / "p")  # 4 slices: 0..3 are valid
    _write_raw(project, record=_record(_state(), reviewed=reviewed))
    assert "'reviewed'" in _load_error(project)


def test_negative_reviewed_slice_no_longer_protects_the_last_one():
    state = ProjectState.start(np.zeros((3, 4, 4), np.uint8))
    state.reviewed = {-1}
    with pytest.raises(InputError, match=r"outside 0\.\.2"):
        state.protected()


@pytest.mark.parametrize(
    ("versions", "current"),
    [
        ([{"version": "1", "file": "models/v0001.pt"}], None),
        ([{"version": True, "file": "models/v0001.pt"}], None),
        ([{"version": 1.0, "file": "models/v0001.pt"}], None),
        ([{"version": 0, "file": "models/v0000.pt"}], None),
        ([{"version": 1, "file": "models/v0001.pt"}] * 2, 1),
        ([{"version": 1, "file": "models/v0001.pt"}], 2),
        ([{"version": 1, "file": "models/v0001.pt"}], "1"),
        ([{"version": 1, "file": "models/v0001.pt", "promoted": "yes"}], 1),
        ([{"version": 1, "file": "models/v0001.pt", "val_dice": "0.8"}], 1),
        (["v1"], None),
        ({"1": "models/v0001.pt"}, None),
    ],
)
def test_malformed_versions_are_refused(tmp_path, versions, current):
    project = Project(tmp_path / "p")
    _write_raw(project, record=_record(_state(), versions=versions, current_version=current))
    message = _load_error(project)
    assert "'versions'" in message or "'current_version'" in message


def test_labels_machine_and_image_must_agree(tmp_path):
    project = Project(tmp_path / "p")
    state = _state()
    _write_raw(project, machine=state.machine.astype(np.int32))
    assert "'machine'" in _load_error(project)
    _write_raw(project, machine=state.machine[:3])
    assert "'machine'" in _load_error(project)
    _write_raw(project, labels=state.labels.astype(np.float32),
               machine=state.machine.astype(np.float32))  # fmt: skip
    assert "not an integer type" in _load_error(project)
    _write_raw(project, record=_record(state, image={"shape": [4, 16, 15]}))
    assert "'image'" in _load_error(project)
    _write_raw(project, record=_record(state, image=["x.tif"]))
    assert "'image'" in _load_error(project)


def test_every_problem_is_named_in_one_message(tmp_path):
    project = Project(tmp_path / "p")
    record = _record(_state(), reviewed=[9], versions=[{"version": 1, "file": "../x.pt"}],
                     current_version=1, base_model="../m.pt")  # fmt: skip
    _write_raw(project, record=record)
    message = _load_error(project)
    for field in ("'reviewed'", "'versions'[0]", "'current_version'", "'base_model'"):
        assert field in message


@pytest.mark.parametrize("meta", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b""])
def test_a_damaged_record_is_one_input_error(tmp_path, meta):
    project = Project(tmp_path / "p")
    _write_raw(project, record=meta)
    _load_error(project)


def test_random_damage_gives_only_input_errors(tmp_path):
    project = Project(tmp_path / "p")
    project.save(_state())
    good = project.state_path.read_bytes()
    rng = np.random.default_rng(7)
    errors, loaded = [], 0
    for _ in range(150):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), rng.integers(1, 6)):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        project.state_path.write_bytes(bytes(data))
        try:
            project.load()
        except Exception as exc:  # every exception is inspected below
            errors.append(exc)
        else:
            loaded += 1
    assert len(errors) > 100
    assert {type(e) for e in errors} == {InputError}
    assert all("state.npz" in str(e) for e in errors)


def test_headers_are_checked_before_any_data_is_read(tmp_path, monkeypatch):
    project = Project(tmp_path / "p")
    project.save(_state())
    read = []
    real = np.lib.format.read_array

    def spy(fh, *args, **kwargs):
        array = real(fh, *args, **kwargs)
        read.append(array.size)
        return array

    monkeypatch.setattr(np.lib.format, "read_array", spy)
    monkeypatch.setattr(project_checks, "MAX_VOXELS", 4 * 16 * 16 - 1)
    assert "more than" in _load_error(project)
    assert read == []  # not even the record


def test_a_header_claiming_a_huge_array_allocates_nothing(tmp_path):
    project = Project(tmp_path / "p")
    project.save(_state())
    # rewrite the labels member with a header that claims 10^12 voxels over 1 KB of data
    with zipfile.ZipFile(project.state_path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = {"descr": "|u1", "fortran_order": False, "shape": (10_000, 10_000, 10_000)}
    fake = tmp_path / "fake.npy"
    with open(fake, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 1024)
    members["labels.npy"] = fake.read_bytes()
    with zipfile.ZipFile(project.state_path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    tracemalloc.start()
    try:
        message = _load_error(project)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "labels" in message
    assert peak < 5 * 2**20


def test_save_refuses_a_state_that_would_not_load(tmp_path):
    project = Project(tmp_path / "p")
    state = _state()
    state.versions = [{"version": 1, "file": "../../x.pt"}]
    with pytest.raises(InputError, match=r"not saved: 'versions'\[0\]"):
        project.save(state)
    assert not project.exists()


# -- item 11: a round records its version without saving stale labels --------------------------


def _finished_round():
    from napari_segtool.config import ModelConfig
    from napari_segtool.model.checkpoint import SegmentationModel
    from napari_segtool.training.finetune import FinetuneResult

    model = SegmentationModel.new(
        ModelConfig(spatial_dims=2, depth=2, base_features=4), tile_shape=(16, 16), seed=0
    )
    return FinetuneResult(model=model, baseline_dice=0.5, best_dice=0.6, epochs=1,
                          stopped_early=False, seconds=0.1, promote=True,
                          labelled_voxels=10, validation_voxels=5)  # fmt: skip


def test_a_round_from_a_snapshot_keeps_the_corrections_saved_since(tmp_path):
    from napari_segtool.training.versions import record_round

    project = Project(tmp_path / "p")
    live = _state()
    live.versions, live.current_version = [], None
    project.save(live)
    snapshot = live.snapshot()  # the round starts and trains on this copy
    live.labels[2, 5:9, 5:9] = 7  # the user keeps correcting; autosave writes it
    live.painted[2, 5:9, 5:9] = True
    live.reviewed.add(0)
    project.save(live.snapshot())
    entry = record_round(project, snapshot, _finished_round(), save=False)
    back = project.load()
    assert np.array_equal(back.labels, live.labels)  # the autosaved correction survives
    assert np.array_equal(back.painted, live.painted)
    assert back.reviewed == {0, 3}
    assert [v["version"] for v in back.versions] == [1] == [entry["version"]]
    assert back.current_version == 1
    assert snapshot.current_version == 1  # the caller's copy learns the new version
    assert snapshot.versions == back.versions
    assert (project.folder / entry["file"]).is_file()
    # the default still saves the state it is given, as before
    record_round(project, live, _finished_round())
    back = project.load()
    assert [v["version"] for v in back.versions] == [1, 2]
    assert np.array_equal(back.labels, live.labels)


def test_a_save_from_an_old_copy_keeps_versions_recorded_since(tmp_path):
    project = Project(tmp_path / "p")
    live = _state()
    project.save(live)
    old = live.snapshot()
    live.versions.append({"version": 2, "file": "models/v0002.pt"})
    project.save(live)
    project.save(old)  # e.g. an autosave of a snapshot taken before the round finished
    assert [v["version"] for v in project.load().versions] == [1, 2]
    assert [v["version"] for v in old.versions] == [1, 2]
    live.versions.append({"version": 3, "file": "models/v0003.pt"})
    live.current_version = 3  # promoted
    project.save(live)
    project.save(old)  # never saw version 3, so cannot have chosen against it
    assert project.load().current_version == 3
    live.current_version = 1  # the user switched back, knowing version 3
    project.save(live)
    assert project.load().current_version == 1


def test_a_bare_base_model_name_is_bundled_or_a_file_in_the_project_never_the_cwd(
    tmp_path, monkeypatch
):
    from napari_segtool.training.versions import current_model

    project = Project(tmp_path / "p")
    project.folder.mkdir()
    model = _finished_round().model
    model.save(project.folder / "start.pt")
    state = ProjectState.start(np.zeros((16, 16), np.uint8), base_model="start.pt")
    assert current_model(project, state).config == model.config
    monkeypatch.chdir(tmp_path)
    model.save(tmp_path / "elsewhere.pt")  # in the working directory, not in the project
    state.base_model = "elsewhere.pt"
    with pytest.raises(InputError, match=r"'elsewhere\.pt' is neither a bundled model nor a file"):
        current_model(project, state)
    state.base_model = "../elsewhere.pt"
    with pytest.raises(InputError, match="leaves the project folder"):
        current_model(project, state)


def test_a_damaged_state_file_can_be_saved_over(tmp_path, caplog):
    project = Project(tmp_path / "p")
    project.folder.mkdir()
    project.state_path.write_bytes(b"PK\x03\x04 damaged")
    project.save(_state())
    assert project.load().reviewed == {3}
    assert "replacing a damaged project file" in caplog.text


def test_in_memory_states_answer_box_by_box_like_chunked_ones():
    state = _state()
    labelled = state.labelled()
    boxes = list(state.boxes((2, 8, 8)))
    assert len(boxes) == 2 * 2 * 2
    assert state.labelled_boxes((2, 8, 8)) == [b for b in boxes if labelled[b].any()]
    assert list(state.unlabelled_boxes((2, 8, 8))) == [b for b in boxes if not labelled[b].all()]
    for box in boxes:
        assert np.array_equal(state.labelled_region(box), labelled[box])
    assert state.labelled_voxels() == int(labelled.sum())
    assert state.painted_voxels() == 16
    assert state.shape == (4, 16, 16)
    with pytest.raises(InputError, match="block"):
        state.labelled_boxes((2, 0, 8))
