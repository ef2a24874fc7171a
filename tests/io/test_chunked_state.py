"""Chunked projects: zarr arrays on disk, incremental saves, a real SIGKILL, hostile stores."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_segtool.errors import InputError
from napari_segtool.io import chunked_state
from napari_segtool.io.chunked_state import STORE_DIR, ChunkedState
from napari_segtool.io.project import Project, ProjectState, merge_untouched

SHAPE = (4, 40, 40)
CHUNKS = (1, 16, 16)


def _data(seed: int = 0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    machine = rng.integers(0, 3, shape).astype(np.uint8)
    labels = machine.copy()
    labels[1, 2:6, 3:9] = 2  # the user's corrections (before the project started)
    return labels, machine


def _project(tmp_path, *, seed: int = 0, chunks=CHUNKS) -> tuple[Project, ChunkedState]:
    labels, machine = _data(seed)
    project = Project(tmp_path / "img.zarr.segtool")
    state = project.create_chunked(
        labels=labels,
        machine=machine,
        chunks=chunks,
        base_model="em-membranes-2d",
        image={"path": "img.zarr"},
    )
    return project, state


def _chunk_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every chunk file of the store: (mtime in ns, inode) by key."""
    root = folder / STORE_DIR
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and "/c/" in path.as_posix() and path.name.isdigit():
            info = path.stat()
            out[path.relative_to(root).as_posix()] = (info.st_mtime_ns, info.st_ino)
    return out


# -- round trip and the ProjectState interface ---------------------------------------------------


def test_round_trip(tmp_path):
    project, state = _project(tmp_path)
    assert project.chunked
    assert project.state_path.name == "state.json"
    assert sorted(p.name for p in project.folder.iterdir()) == [
        "project.lock", "state.json", "state.zarr"]  # fmt: skip
    atom = ((np.array([0, 3]), np.array([1, 39]), np.array([2, 39])), np.zeros(2), 1)
    assert state.mark_painted([atom]) == 2
    state.labels[0, 1, 2] = 1
    state.reviewed = {3}
    state.versions = [{"version": 1, "file": "models/v0001.pt", "val_dice": 0.8}]
    state.current_version = 1
    project.save(state)
    back = project.load()
    assert isinstance(back, ChunkedState)
    assert isinstance(back.labels, zarr.Array)
    for name in ("labels", "machine", "painted"):
        assert np.array_equal(getattr(back, name)[:], getattr(state, name)[:]), name
    assert back.labels.dtype == np.uint8
    assert back.painted.dtype == bool
    assert back.chunks == CHUNKS
    assert back.reviewed == {3}
    assert back.current_version == 1
    assert back.versions == state.versions
    assert back.base_model == "em-membranes-2d"
    assert back.image == {"path": "img.zarr"}
    record = json.loads(project.state_path.read_text())
    assert record["storage"] == "chunked"
    assert record["shape"] == list(SHAPE)
    # the one definition of labelled voxels, against the in-memory state of the same arrays
    mem = ProjectState(labels=back.labels[:], machine=back.machine[:], painted=back.painted[:],
                       reviewed={3})  # fmt: skip
    assert np.array_equal(back.labelled(), mem.labelled())
    assert back.labelled_voxels() == mem.labelled_voxels() == int(mem.labelled().sum())
    assert back.painted_voxels() == int(back.painted[:].sum())


def test_creation_marks_the_starting_corrections_painted(tmp_path):
    _, state = _project(tmp_path)
    labels, machine = _data()
    assert np.array_equal(state.painted[:], labels != machine)
    assert state.painted_chunks() == {(1, 0, 0)}


def test_labels_take_napari_style_paint_writes(tmp_path):
    """napari's Labels.data_setitem: read, copy for history, then write by index arrays."""
    _, state = _project(tmp_path)
    yy, xx = np.mgrid[-3:4, -3:4]
    disc = yy**2 + xx**2 <= 9
    indices = (np.full(disc.sum(), 2), yy[disc] + 16, xx[disc] + 16)  # straddles 4 chunks
    t0 = time.perf_counter()
    old = np.array(state.labels[indices], copy=True)
    state.labels[indices] = 7
    state.mark_painted([(indices, old, 7)])
    seconds = time.perf_counter() - t0
    assert (state.labels[indices] == 7).all()
    assert state.painted[indices].all()
    assert seconds < 0.5  # milliseconds in practice; generous for a loaded machine


def test_save_writes_only_the_changed_chunks(tmp_path):
    project, state = _project(tmp_path)
    before = _chunk_files(project.folder)
    assert state.pending_keys() == set()  # creation saved (and flushed) everything
    state.labels[2, 20, 20] = 9
    state.mark_painted([((np.array([2]), np.array([20]), np.array([20])), np.zeros(1), 9)])
    state.reviewed.add(0)
    assert state.pending_keys() == {"labels/c/2/1/1", "painted/c/2/1/1"}
    project.save(state)
    after = _chunk_files(project.folder)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"labels/c/2/1/1", "painted/c/2/1/1"}
    assert set(before) - set(after) == set()
    assert state.pending_keys() == set()
    assert project.load().reviewed == {0}
    project.save(state)  # nothing changed: no chunk written
    assert _chunk_files(project.folder) == after


def test_a_script_writing_labels_is_found_without_a_scan(tmp_path):
    project, state = _project(tmp_path)
    state.labels[3, 30, 30] = 1 if state.machine[3, 30, 30] != 1 else 2  # no paint event
    cells = {(b[0].start, b[1].start, b[2].start) for b in state.labelled_boxes()}
    assert (3, 16, 16) in cells  # the labels chunk written this session
    project.save(state)  # marks the differing voxel painted
    back = project.load()
    assert back.painted[3, 30, 30]
    assert (3, 16, 16) in {(b[0].start, b[1].start, b[2].start) for b in back.labelled_boxes()}


def test_labels_written_by_another_program_need_a_scan(tmp_path):
    project, state = _project(tmp_path)
    foreign = zarr.open_array(project.folder / STORE_DIR / "labels", mode="r+")
    foreign[0, 35, 5] = 1 if state.machine[0, 35, 5] != 1 else 2
    back = project.load()
    plain = {(b[0].start, b[1].start, b[2].start) for b in back.labelled_boxes()}
    scanned = {(b[0].start, b[1].start, b[2].start) for b in back.labelled_boxes(scan=True)}
    assert (0, 32, 0) not in plain
    assert scanned == plain | {(0, 32, 0)}


def _count_chunk_reads(monkeypatch) -> list[str]:
    """The chunk keys read through any project store from now on."""
    reads: list[str] = []
    real_get = chunked_state._TrackedStore.get

    async def get(self, key, *args, **kwargs):
        if "/c/" in key:
            reads.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(chunked_state._TrackedStore, "get", get)
    return reads


def _segment_by_chunks(state: ChunkedState, prediction, *, between=None) -> None:
    """Write ``prediction`` as the block engine's writer does: per chunk, labels then machine;
    ``between(box)`` runs between the two writes."""
    for box in state.boxes():
        state.labels[box] = prediction[box]
        if between is not None:
            between(box)
        state.machine[box] = prediction[box]


def test_a_segmentation_writing_labels_and_machine_alike_costs_the_save_no_read(
    tmp_path, monkeypatch
):
    project = Project(tmp_path / "p.segtool")
    state = project.create_chunked(shape=SHAPE, dtype=np.uint8, chunks=CHUNKS)
    prediction = np.random.default_rng(1).integers(1, 3, SHAPE).astype(np.uint8)
    prediction[2] = 0  # all fill value: those chunks are deleted, not written
    _segment_by_chunks(state, prediction)
    chunks = sum(1 for _ in state.boxes())  # 36 per array
    assert sum(k.startswith("labels/c/") for k in state.pending_keys()) == chunks
    assert state.labelled_boxes() == []  # nothing painted or reviewed, nothing changed
    reads = _count_chunk_reads(monkeypatch)
    project.save(state)
    assert reads == []  # before: every labels and machine chunk, 2 * 36 reads
    assert state.pending_keys() == set()
    assert not project.load().painted[:].any()
    # a paint after it (napari writes labels, here without a paint event) still folds
    state.labels[3, 30, 30] = 0
    reads.clear()
    project.save(state)
    assert sorted(reads) == ["labels/c/3/1/1", "machine/c/3/1/1", "painted/c/3/1/1"]
    back = project.load()
    assert back.painted_chunks() == {(3, 1, 1)}
    assert np.argwhere(back.painted[:]).tolist() == [[3, 30, 30]]


def test_labels_written_between_a_segmentations_two_writes_still_fold(tmp_path):
    project = Project(tmp_path / "p.segtool")
    state = project.create_chunked(shape=SHAPE, dtype=np.uint8, chunks=CHUNKS)
    prediction = np.ones(SHAPE, np.uint8)

    def user(box):  # the user's write lands between the labels' and the machine's
        if box[0].start == 1 and box[1].start == 16 and box[2].start == 0:
            state.labels[1, 20, 5] = 2

    _segment_by_chunks(state, prediction, between=user)
    state.labels[0, 0, 0] = 2  # and one after, into a chunk written alike
    project.save(state)
    back = project.load()
    assert np.argwhere(back.painted[:]).tolist() == [[0, 0, 0], [1, 20, 5]]
    assert back.labels[1, 20, 5] == 2


def test_chunks_are_compared_only_when_known_and_encoded_alike():
    written = chunked_state._Written()
    key, twin = "labels/c/0/1/2", "machine/c/0/1/2"
    for k in (key, twin):
        written.begin(k)
        written.end(k, b"same")
    assert written.suspects() == {key}  # not twins: equal bytes may hold other values
    written.twins = True
    assert written.suspects() == set()
    written.begin(twin)  # a write under way: unknown until it ends
    assert written.suspects() == {key}
    written.end(twin, b"same")
    written.begin(key)
    written.begin(key)  # two writes of one chunk at once: which one landed is unknown
    written.end(key, b"same")
    written.end(key, b"same")
    assert written.take_suspects() == {key}
    written.begin(key)
    written.end(key, b"same")
    assert written.suspects() == {key}  # a save forgets the digests: the machine's unknown
    written.begin(twin)
    written.end(twin, b"same")
    assert written.suspects() == set()
    written.forget("labels/")  # removed by other means
    assert written.take_suspects() == {key}

    def array(level):
        return zarr.create_array(store={}, shape=(2, 4), chunks=(1, 4), dtype="u1",
                                 compressors=[zarr.codecs.ZstdCodec(level=level)])  # fmt: skip

    same = array(1)
    same.attrs["note"] = "attributes do not matter"
    assert chunked_state._same_encoding(array(1), same)
    assert not chunked_state._same_encoding(array(1), array(3))


# -- a real SIGKILL in the middle of a save ------------------------------------------------------


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import zarr.storage._local as local
    from napari_segtool.io.project import Project

    folder, stop_at = sys.argv[1], int(sys.argv[2])
    real_put, count = local._put, [0]

    def put(path, value, exclusive=False):
        if "/labels/c/" in path.as_posix():
            count[0] += 1
            if count[0] == stop_at:  # half of this chunk's temporary, then wait for the kill
                data = bytes(value.as_buffer_like())
                with local._atomic_write(path, "wb", exclusive=exclusive) as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    print("HALF", flush=True)
                    time.sleep(120)
        return real_put(path, value, exclusive)

    local._put = put
    project = Project(folder)
    with project.lock():
        state = project.load()
        state.merge_untouched(np.full(state.shape, 2, np.uint8))
        state.reviewed = {0, 1}
        project.save(state)
    print("SAVED", flush=True)
""")


def test_a_process_killed_mid_save_leaves_each_chunk_old_or_new(tmp_path):
    project, state = _project(tmp_path)
    state.reviewed = {3}
    project.save(state)
    old = {n: getattr(state, n)[:] for n in ("labels", "machine", "painted")}
    expected = ProjectState(labels=old["labels"].copy(), machine=old["machine"].copy(),
                            painted=old["painted"].copy(), reviewed={3})  # fmt: skip
    merge_untouched(expected, np.full(SHAPE, 2, np.uint8))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(project.folder), "20"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "HALF"  # 19 chunks merged, the 20th half
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    partial = list((project.folder / STORE_DIR).rglob("*.partial"))
    assert len(partial) == 1  # the chunk it was writing
    back = project.load()  # loadable, the temporary ignored
    assert back.reviewed == {3}  # the record of the last save: the new one was never written
    labels = back.labels[:]
    new_chunks = 0
    for box in back.boxes():
        got = labels[box]
        if np.array_equal(got, expected.labels[box]) and not np.array_equal(
            got, old["labels"][box]
        ):
            new_chunks += 1
        else:
            assert np.array_equal(got, old["labels"][box]), box
    assert new_chunks == 19
    # the killed writer's temporary goes at the next load under the lock, once it is stale
    os.utime(partial[0], (time.time() - 60, time.time() - 60))
    with project.lock():
        project.load()
    assert not partial[0].exists()
    # and the project carries on: the merge finishes and saves
    again = project.load()
    again.merge_untouched(np.full(SHAPE, 2, np.uint8))
    project.save(again)
    assert np.array_equal(project.load().labels[:], expected.labels)


# -- hostile stores ------------------------------------------------------------------------------


def _edit_meta(project: Project, name: str, **changes) -> None:
    path = project.folder / STORE_DIR / name / "zarr.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _load_error(project: Project, monkeypatch=None) -> str:
    if monkeypatch is not None:  # the checks come first: zarr never opens a bad store

        def refuse(*args, **kwargs):
            raise AssertionError("zarr opened a store that the checks should have refused")

        monkeypatch.setattr(chunked_state.zarr, "open_array", refuse)
    with pytest.raises(InputError) as info:
        project.load()
    assert type(info.value) is InputError
    message = str(info.value)
    assert str(project.folder) in message
    return message


@pytest.mark.parametrize(
    ("name", "changes", "words"),
    [
        ("labels", {"shape": [2**20, 2**20, 2**20]}, "voxels is more than"),
        ("labels", {"shape": [4, 40]}, "chunk shape"),
        ("labels", {"data_type": "float32"}, "not an integer type"),
        ("machine", {"data_type": "uint16"}, "'machine'"),
        ("painted", {"data_type": "uint8"}, "not what painted holds"),
        ("labels", {"shape": [4096, 4096, 4096],
                    "chunk_grid": {"name": "regular",
                                   "configuration": {"chunk_shape": [1, 1, 1]}}}, "chunks is"),
        ("labels", {"chunk_grid": {"name": "regular",
                                   "configuration": {"chunk_shape": [64, 4096, 4096]}}},
         "voxels are more than"),
        ("labels", {"chunk_grid": {"name": "rectilinear"}}, "not a regular one"),
        ("labels", {"codecs": [{"name": "sharding_indexed", "configuration": {}}]}, "codecs"),
        ("labels", {"fill_value": 5}, "fill value"),
        ("painted", {"fill_value": True}, "fill value"),
        ("labels", {"chunk_key_encoding": {"name": "v2"}}, "chunk keys"),
        ("labels", {"storage_transformers": [{"name": "x"}]}, "storage transformers"),
        ("labels", {"zarr_format": 2}, "not a zarr v3 array"),
        ("labels", {"must_understand": True}, "unknown zarr metadata"),
    ],
)  # fmt: skip
def test_hostile_array_metadata_is_refused_before_zarr_opens_it(
    tmp_path, monkeypatch, name, changes, words
):
    project, _ = _project(tmp_path)
    _edit_meta(project, name, **changes)
    message = _load_error(project, monkeypatch)
    assert "state.zarr" in message
    assert words in message


def test_damaged_metadata_files_are_named(tmp_path, monkeypatch):
    project, _ = _project(tmp_path)
    meta = project.folder / STORE_DIR / "painted" / "zarr.json"
    meta.write_bytes(b"\xff not json")
    assert "'painted'" in _load_error(project, monkeypatch)
    meta.write_bytes(b" " * (2**20 + 1))
    assert "more than" in _load_error(project, monkeypatch)
    meta.unlink()
    assert "'painted'" in _load_error(project, monkeypatch)


def test_a_record_out_of_range_or_damaged_is_refused(tmp_path):
    project, _state = _project(tmp_path)
    record = json.loads(project.state_path.read_text())
    for changes, words in [
        ({"reviewed": [9]}, "'reviewed'"),
        ({"shape": [4, 40, 41]}, "'shape'"),
        ({"versions": [{"version": 1, "file": "../outside.pt"}]}, "inside the project folder"),
        ({"storage": "npz"}, "'storage'"),
        ({"format": "something else"}, "not a napari-segtool project"),
        ({"format_version": 99}, "newer"),
    ]:
        project.state_path.write_text(json.dumps({**record, **changes}))
        message = _load_error(project)
        assert "state.json" in message, changes
        assert words in message, changes
    project.state_path.write_bytes(b"{ damaged")
    assert "damaged" in _load_error(project)


def test_links_in_the_store_are_refused(tmp_path):
    project, _state = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chunk_dir = project.folder / STORE_DIR / "labels" / "c" / "3"
    moved = tmp_path / "moved"
    chunk_dir.rename(moved)
    chunk_dir.symlink_to(elsewhere, target_is_directory=True)  # writes would land outside
    message = _load_error(project)
    assert "labels/c/3 is a link" in message
    chunk_dir.unlink()
    moved.rename(chunk_dir)
    project.load()  # sound again
    store = project.folder / STORE_DIR
    store.rename(tmp_path / "real.zarr")
    store.symlink_to(tmp_path / "real.zarr", target_is_directory=True)
    assert "not a folder" in _load_error(project)


def test_formats_are_never_mixed(tmp_path):
    project, state = _project(tmp_path)
    with pytest.raises(InputError, match="is chunked"):
        project.save(ProjectState.start(np.zeros(SHAPE, np.uint8)))
    with pytest.raises(InputError, match="saved here already"):
        project.create_chunked(shape=SHAPE, dtype=np.uint8)
    other = Project(tmp_path / "other")
    with pytest.raises(InputError, match="its own project"):
        other.save(state)
    other.save(ProjectState.start(np.zeros(SHAPE, np.uint8)))
    with pytest.raises(InputError, match="saved here already"):
        other.create_chunked(shape=SHAPE, dtype=np.uint8)
    (project.folder / "state.npz").write_bytes((other.folder / "state.npz").read_bytes())
    with pytest.raises(InputError, match="holds both"):
        project.load()


def test_bad_layouts_are_refused_on_creation(tmp_path):
    project = Project(tmp_path / "p")
    with pytest.raises(InputError, match="not an integer type"):
        project.create_chunked(shape=SHAPE, dtype=np.float32)
    with pytest.raises(InputError, match="leaves the project folder"):
        project.create_chunked(shape=SHAPE, dtype=np.uint8, base_model="../x.pt")
    with pytest.raises(InputError, match="chunks is more than"):
        project.create_chunked(shape=(2**12, 2**12, 2**12), dtype=np.uint8, chunks=(1, 8, 8))
    assert not project.exists()


def test_versions_are_recorded_in_a_chunked_project(tmp_path):
    project, state = _project(tmp_path)
    entry = project.add_version(state, lambda path, v: path.parent.mkdir(exist_ok=True)
                                or path.write_bytes(b"model"), {"val_dice": 0.5},
                                promote=True)  # fmt: skip
    assert entry["file"] == "models/v0001.pt"
    back = project.load()
    assert back.current_version == 1
    assert back.version(1)["val_dice"] == 0.5


# -- boxes ---------------------------------------------------------------------------------------


def _starts(boxes) -> list[tuple[int, ...]]:
    return [tuple(s.start for s in b) for b in boxes]


def test_labelled_and_unlabelled_boxes_by_hand(tmp_path):
    project = Project(tmp_path / "p")
    state = project.create_chunked(shape=(4, 6, 6), dtype=np.uint8, chunks=(1, 3, 3))
    state.mark_painted([((np.array([0]), np.array([1]), np.array([1])), np.zeros(1), 1)])
    state.mark_painted([_Fill((slice(3, 4), slice(0, 3), slice(3, 6)))])  # a whole chunk
    state.reviewed = {2}
    assert state.painted_chunks() == {(0, 0, 0), (3, 0, 1)}
    assert _starts(state.labelled_boxes()) == [
        (0, 0, 0), (2, 0, 0), (2, 0, 3), (2, 3, 0), (2, 3, 3), (3, 0, 3)]  # fmt: skip
    unlabelled = _starts(state.unlabelled_boxes())
    assert len(unlabelled) == 16 - 4 - 1  # slice 2 reviewed, chunk (3, 0, 3) all painted
    assert (0, 0, 0) in unlabelled
    assert (3, 0, 3) not in unlabelled
    # larger blocks, not aligned with the chunks
    assert _starts(state.labelled_boxes((2, 6, 6))) == [(0, 0, 0), (2, 0, 0)]
    assert _starts(state.unlabelled_boxes((2, 6, 6))) == [(0, 0, 0), (2, 0, 0)]
    assert _starts(state.unlabelled_boxes((1, 6, 6))) == [(0, 0, 0), (1, 0, 0), (3, 0, 0)]
    # the in-memory state agrees
    mem = ProjectState(labels=state.labels[:], machine=state.machine[:],
                       painted=state.painted[:], reviewed={2})  # fmt: skip
    assert _starts(mem.labelled_boxes((1, 3, 3))) == _starts(state.labelled_boxes())
    assert _starts(mem.unlabelled_boxes((1, 3, 3))) == unlabelled


class _Fill:
    """A fill atom as newer napari sends it (slice_key, mask None: the whole box)."""

    def __init__(self, box):
        self.slice_key = box
        self.mask = None
        self.old_values = np.zeros(int(np.prod([s.stop - s.start for s in box])))
        self.new_value = 1


def test_a_reviewed_2d_image_has_no_unlabelled_box(tmp_path):
    state = Project(tmp_path / "p").create_chunked(shape=(50, 70), dtype=np.uint16,
                                                   chunks=(32, 32))  # fmt: skip
    assert len(list(state.unlabelled_boxes())) == 6
    assert state.labelled_boxes() == []
    state.reviewed = {0}
    assert list(state.unlabelled_boxes()) == []
    assert len(state.labelled_boxes()) == 6


def test_a_gigavoxel_project_costs_a_few_chunks(tmp_path):
    project = Project(tmp_path / "big")
    t0 = time.perf_counter()
    state = project.create_chunked(shape=(1024, 1024, 1024), dtype=np.uint16)
    atom = ((np.array([500, 501]), np.array([10, 900]), np.array([10, 900])), np.zeros(2), 1)
    state.labels[atom[0]] = 1
    state.mark_painted([atom])
    state.reviewed = {7}
    project.save(state)
    assert len(state.labelled_boxes()) == 2 + 16
    assert sum(1 for _ in state.unlabelled_boxes()) == 1024 * 16 - 16
    assert state.painted_voxels() == 2
    assert state.labelled_voxels() == 2 + 1024 * 1024
    with pytest.raises(InputError, match=r"labelled_region\(box\)"):
        state.labelled()
    files = [p for p in (project.folder / STORE_DIR).rglob("*") if p.is_file()]
    assert len(files) <= 4 + 4  # metadata, and the two painted and labelled chunks
    assert time.perf_counter() - t0 < 30


def test_box_methods_refuse_boxes_outside_the_image(tmp_path):
    _, state = _project(tmp_path)
    with pytest.raises(InputError, match="not one slice"):
        state.labelled_region((slice(0, 1), slice(0, 4)))
    with pytest.raises(InputError, match="empty"):
        state.labelled_region((slice(2, 2), slice(0, 4), slice(0, 4)))
    with pytest.raises(InputError, match="block"):
        list(state.unlabelled_boxes((1, 0, 4)))


# -- blockwise merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, (2, 5, 7), (4, 40, 40)])
@pytest.mark.parametrize("callable_prediction", [False, True])
def test_blockwise_merge_equals_the_in_memory_merge(tmp_path, block, callable_prediction):
    rng = np.random.default_rng(3)
    project, state = _project(tmp_path)
    for _ in range(12):  # corrections, some painted back to the machine's value
        z, y, x = (int(v) for v in rng.integers(0, [4, 34, 34]))
        box = (slice(z, z + 1), slice(y, y + 6), slice(x, x + 6))
        value = int(rng.integers(0, 3))
        state.labels[box] = value
        state.mark_painted([_Fill(box)])
    state.labels[0, 0:16, 0:16] = 2  # a whole chunk painted: skipped by the merge
    state.mark_painted([_Fill((slice(0, 1), slice(0, 16), slice(0, 16)))])
    state.reviewed = {2}
    mem = ProjectState(labels=state.labels[:], machine=state.machine[:],
                       painted=state.painted[:], reviewed={2})  # fmt: skip
    new = rng.integers(0, 4, SHAPE).astype(np.uint8)
    new[3] = mem.labels[3]  # slice 3 predicted as it is: its chunks must not be rewritten
    labels_before = mem.labels.copy()
    before = _chunk_files(project.folder)
    expected = merge_untouched(mem, new)
    seen = []

    def predict(box):
        seen.append(box)
        return new[box]

    prediction = predict if callable_prediction else new
    changed = state.merge_untouched(prediction, block=block, progress=lambda d, t: None)
    assert changed == expected
    assert np.array_equal(state.labels[:], mem.labels)
    assert np.array_equal(state.machine[:], mem.machine)
    if callable_prediction:  # only boxes holding an unlabelled voxel were predicted
        assert seen
        assert all(not mem.labelled()[b].all() for b in seen)
    # a chunk whose labels did not change was not rewritten
    after = _chunk_files(project.folder)
    for box in state.boxes():
        key = "labels/c/" + "/".join(str(s.start // c) for s, c in zip(box, CHUNKS, strict=True))
        if np.array_equal(labels_before[box], mem.labels[box]):
            assert after.get(key) == before.get(key), key
        else:
            assert after.get(key) != before.get(key), key
    assert any(k.startswith("labels/c/3/") for k in after)


def test_merge_untouched_dispatches_and_checks(tmp_path):
    _, state = _project(tmp_path)
    with pytest.raises(InputError, match="does not match"):
        merge_untouched(state, np.zeros((4, 40, 39), np.uint8))
    with pytest.raises(InputError, match="cannot hold"):
        state.merge_untouched(np.full(SHAPE, 300, np.int32))
    assert merge_untouched(state, state.machine) == 0


def test_saving_in_a_worker_never_drops_a_dab_painted_meanwhile(tmp_path):
    import threading

    project, state = _project(tmp_path)
    done = threading.Event()
    errors = []

    def autosave():  # a script's writes make each save re-mark the chunk painted
        try:
            k = 0
            while not done.is_set():
                k += 1
                state.labels[0, 15, 15] = 1 + k % 2 if state.machine[0, 15, 15] == 0 else 0
                project.save(state.snapshot())
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=autosave)
    worker.start()
    try:
        for i in range(120):  # painted back to the machine's value: only `painted` records it
            y, x = divmod(i, 12)
            state.mark_painted([((np.array([0]), np.array([y]), np.array([x])), np.zeros(1), 0)])
    finally:
        done.set()
        worker.join(timeout=60)
    assert errors == []
    assert state.painted[0, :10, :12].all()
