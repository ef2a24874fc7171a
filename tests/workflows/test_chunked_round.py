"""A correction round on a chunked project (zarr state, zarr image), box by box."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_segtool.config import FinetuneConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import Progress
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.project import ChunkedState, Project, ProjectState
from napari_segtool.training import EpochReport, finetune
from napari_segtool.training.finetune import split_labelled_boxes
from napari_segtool.training.versions import training_data
from napari_segtool.workflows import correction, describe_project, iter_correction_round
from napari_segtool.workflows.correction import iter_resegment_boxes
from tests.training.conftest import tiny_model

SAMPLE = Path(__file__).parents[2] / "napari_segtool" / "sample_data"
FAST = FinetuneConfig(epochs=2, steps_per_epoch=6, batch_size=4, learning_rate=1e-2,
                      device="cpu", patch_shape=(48, 48), validation_fraction=0.25)  # fmt: skip
REVIEWED = (1, 4, 6)
CHUNKS = (1, 64, 64)


@pytest.fixture
def chunked(tmp_path):
    """8 x 128 x 128 of the bundled EM sample as a zarr image; a chunked project whose
    labels are a checkerboard (any prediction changes them), three slices corrected and
    reviewed, one painted stroke."""
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:8, :128, :128]
    truth = tifffile.imread(SAMPLE / "isbi2012_em_membranes.tif")[:8, :128, :128]
    image = zarr.create_array(tmp_path / "em.zarr", shape=em.shape, dtype=em.dtype,
                              chunks=(1, 128, 128))  # fmt: skip
    image[:] = em
    start = tiny_model().save(tmp_path / "start.pt")
    project = Project(tmp_path / "em.segtool")
    blank = (np.indices(em.shape).sum(axis=0) % 2).astype(np.uint8)
    state = project.create_chunked(labels=blank, machine=blank, chunks=CHUNKS,
                                   base_model=str(start), image={"name": "em"})  # fmt: skip
    for z in REVIEWED:
        state.labels[z] = truth[z]
    state.reviewed = set(REVIEWED)
    state.labels[3, 10:40, 10:40] = truth[3, 10:40, 10:40]
    state.painted[3, 10:40, 10:40] = True
    project.save(state)
    return project, image, truth


def _label_chunk_times(project: Project, zs) -> dict[str, int]:
    root = project.folder / "state.zarr" / "labels" / "c"
    return {str(p): p.stat().st_mtime_ns for z in zs for p in (root / str(z)).rglob("*")
            if p.is_file()}  # fmt: skip


def test_split_holds_out_foreground_boxes_where_it_can():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, 2:4, 2:4] = 1
    labels[2, 5:7, 1:3] = 2
    state = ProjectState(labels=labels, machine=labels.copy(), painted=np.zeros_like(labels, bool),
                         reviewed={0, 1, 2, 3})  # fmt: skip
    split = split_labelled_boxes(state, fraction=0.5, seed=3)
    assert len(split.validation) == 2
    assert len(split.train) == 2
    fg = [b for b in split.validation if labels[b].any()]
    assert len(fg) == 1  # one of the two foreground slices validates, the other trains
    assert any(labels[b].any() for b in split.train)
    assert split.values == (0, 1, 2)
    assert split.labelled_voxels == labels.size
    assert split.validation_voxels == 2 * 64


def test_split_of_one_box_trains_it():
    labels = np.zeros((8, 8), np.uint8)
    state = ProjectState(labels=labels, machine=labels.copy(), painted=np.zeros_like(labels, bool),
                         reviewed={0})  # fmt: skip
    split = split_labelled_boxes(state, fraction=0.5)
    assert split.validation == []
    assert len(split.train) == 1
    assert split.validation_voxels == 0


def test_chunked_round_records_a_version_and_keeps_every_protected_voxel(chunked):
    project, image, _ = chunked
    state = project.load()
    assert isinstance(state, ChunkedState)
    labels_before = np.asarray(state.labels[:])
    protected = state.protected()
    reviewed_times = _label_chunk_times(project, REVIEWED)
    seen = []
    with project.lock():
        result = run_to_end(iter_correction_round(project, image, state, config=FAST),
                            seen.append)  # fmt: skip
    assert any(isinstance(item, EpochReport) for item in seen)
    assert result.version == 1
    assert result.training.validation_voxels > 0
    assert result.baseline_dice is not None
    assert result.val_dice is not None
    assert result.promoted == (result.val_dice >= result.baseline_dice)
    again = project.load()
    assert [v["version"] for v in again.versions] == [1]
    assert (project.folder / "models" / "v0001.pt").is_file()
    assert again.current_version == (1 if result.promoted else None)
    after = np.asarray(again.labels[:])
    assert np.array_equal(after[protected], labels_before[protected])
    assert _label_chunk_times(project, REVIEWED) == reviewed_times
    if result.promoted:
        assert any(isinstance(item, Progress) for item in seen)
        assert result.resegmented == int(np.count_nonzero(after != labels_before))
    else:
        assert result.resegmented is None
        assert np.array_equal(after, labels_before)
    info = describe_project(project)
    assert info["storage"] == "chunked"
    assert info["labelled_voxels"] == int(protected.sum())


def test_resegment_boxes_segments_only_unlabelled_boxes(chunked, monkeypatch):
    project, image, _ = chunked
    state = project.load()
    boxes = []
    real = correction.segment_box

    def counting(image, model, box, **kwargs):
        boxes.append(box)
        return real(image, model, box, **kwargs)

    monkeypatch.setattr(correction, "segment_box", counting)
    labels_before = np.asarray(state.labels[:])
    protected = state.protected()
    reviewed_times = _label_chunk_times(project, REVIEWED)
    expected = list(state.unlabelled_boxes(CHUNKS))
    gen = iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS)
    steps = []
    changed = run_to_end(gen, steps.append)
    assert boxes == expected
    assert len(expected) == (8 - len(REVIEWED)) * 4
    assert all(box[0].start not in REVIEWED for box in boxes)
    assert steps[-1] == Progress(len(expected), len(expected))
    after = np.asarray(state.labels[:])
    assert np.array_equal(after[protected], labels_before[protected])
    assert changed == int(np.count_nonzero(after != labels_before)) > 0
    assert np.array_equal(np.asarray(state.machine[:])[~protected], after[~protected])
    assert _label_chunk_times(project, REVIEWED) == reviewed_times


def test_cancelled_resegmentation_stops_after_the_current_box(chunked):
    project, image, _ = chunked
    state = project.load()
    before = np.asarray(state.labels[:])
    gen = iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS)
    assert next(gen) == Progress(1, 20)
    gen.close()
    after = np.asarray(state.labels[:])
    changed_slices = {int(z) for z in np.flatnonzero((after != before).any(axis=(1, 2)))}
    assert changed_slices <= {0}  # only the first box (slice 0, top left) was merged
    assert np.array_equal(after[:, 64:], before[:, 64:])


def test_a_worse_round_on_a_chunked_project_is_kept_but_not_used(chunked, monkeypatch):
    project, image, _ = chunked
    state = project.load()
    real = finetune.box_scores
    calls = []

    def scores(m, image, state, boxes, **kwargs):
        dice, err = real(m, image, state, boxes, **kwargs)
        calls.append(dice)
        return (1.0 if len(calls) == 1 else min(dice, 0.5)), err

    monkeypatch.setattr(finetune, "box_scores", scores)
    before = np.asarray(state.labels[:])
    with project.lock():
        result = run_to_end(iter_correction_round(project, image, state, config=FAST))
    assert not result.promoted
    assert result.resegmented is None
    assert project.load().current_version is None
    assert np.array_equal(np.asarray(state.labels[:]), before)


def test_chunked_round_refuses_ground_truth_and_whole_training_data(chunked):
    project, image, truth = chunked
    state = project.load()
    with pytest.raises(InputError, match="ground-truth"):
        run_to_end(iter_correction_round(project, image, state, config=FAST, truth=truth))
    with pytest.raises(InputError, match="box by box"):
        training_data(image, state)
