"""A correction round on a chunked project (zarr state, zarr image), box by box."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_segtool.config import FinetuneConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import Progress
from napari_segtool.inference.blocks import iter_segment_blocks, labels_dtype, subsample_range
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.project import ChunkedState, Project, ProjectState
from napari_segtool.training import EpochReport, finetune
from napari_segtool.training.finetune import context_box, split_labelled_boxes, tile_context
from napari_segtool.training.versions import current_model, training_data
from napari_segtool.workflows import correction, describe_project, iter_correction_round
from napari_segtool.workflows.correction import iter_resegment_boxes, resegment_config
from napari_segtool.workflows.lazy_segment import UNCERTAINTY_STORE
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


def _uncertainty_store(project: Project, value: float) -> zarr.Array:
    """An uncertainty map as Segment leaves it (the labels' shape and chunks), all ``value``."""
    unc = zarr.open_array(project.folder / UNCERTAINTY_STORE, mode="w", shape=(8, 128, 128),
                          chunks=CHUNKS, dtype="f4", fill_value=0.0, zarr_format=3)  # fmt: skip
    unc[:] = value
    return unc


def _fresh_uncertainty(project: Project, image, state: ChunkedState, box) -> np.ndarray:
    """The model in use's uncertainty of ``box``: the block engine on the region that
    segment_box reads (half a tile of context), with the recorded flips, cropped."""
    model = current_model(project, state)
    config = resegment_config(state, device="cpu", precision="auto")
    assert config.tta
    assert "value_range" not in state.image  # none recorded: the volume's, as the merge takes
    region = context_box(box, tile_context(model, state.ndim), state.shape)
    shape = tuple(s.stop - s.start for s in region)
    labels, unc = np.zeros(shape, labels_dtype(model)), np.zeros(shape, np.float32)
    run_to_end(iter_segment_blocks(image, model, labels_out=labels, uncertainty_out=unc,
                                   value_range=subsample_range(image, model.normalization),
                                   config=config, region=region))  # fmt: skip
    inner = zip(box, region, strict=True)
    return unc[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in inner)]


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
    # no uncertainty map yet: made with the labels' shape and chunks, the boxes' written
    unc = zarr.open_array(project.folder / UNCERTAINTY_STORE, mode="r")
    assert (unc.shape, unc.chunks, unc.dtype) == (state.shape, CHUNKS, np.float32)
    values = np.asarray(unc[:])
    assert not values[list(REVIEWED)].any()  # fully labelled: not segmented, 0
    written = np.array([values[box].any() for box in expected])
    assert written.all()
    assert values.min() >= 0
    assert values.max() <= 1


def test_resegmentation_after_a_round_writes_the_new_models_uncertainty(chunked, monkeypatch):
    project, image, _ = chunked
    old = _uncertainty_store(project, 0.75)  # the starting model's map, as Segment wrote it
    real = finetune.box_scores
    calls = []

    def scores(m, image, state, boxes, **kwargs):  # the starting model scores 0: promoted
        dice, err = real(m, image, state, boxes, **kwargs)
        calls.append(dice)
        return (0.0 if len(calls) == 1 else dice), err

    monkeypatch.setattr(finetune, "box_scores", scores)
    state = project.load()
    with project.lock():  # record only (as the widget does), then re-segment box by box
        result = run_to_end(iter_correction_round(project, image, state, config=FAST,
                                                  save=False))  # fmt: skip
        assert result.promoted
        assert state.current_version == 1  # the new model is in use
        run_to_end(iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS))
    unc = np.asarray(old[:])
    boxes = list(state.unlabelled_boxes(CHUNKS))
    assert len(boxes) == (8 - len(REVIEWED)) * 4
    for box in boxes:
        np.testing.assert_array_equal(unc[box], _fresh_uncertainty(project, image, state, box))
    assert (unc[list(REVIEWED)] == 0.75).all()  # not re-segmented: the old map, untouched


def test_resegmentation_without_flips_leaves_the_uncertainty_as_it_was(chunked):
    project, image, _ = chunked
    state = project.load()
    state.image = {**state.image, "inference": {"tta": False}}  # Segment ran without flips
    before = np.asarray(state.labels[:])
    changed = run_to_end(iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS))
    assert changed == int(np.count_nonzero(np.asarray(state.labels[:]) != before)) > 0
    assert not (project.folder / UNCERTAINTY_STORE).exists()  # none made
    _uncertainty_store(project, 0.75)
    run_to_end(iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS))
    unc = zarr.open_array(project.folder / UNCERTAINTY_STORE, mode="r")
    assert (np.asarray(unc[:]) == 0.75).all()  # an earlier map: left as it was


def test_cancelled_resegmentation_stops_after_the_current_box(chunked):
    project, image, _ = chunked
    state = project.load()
    before = np.asarray(state.labels[:])
    old = _uncertainty_store(project, 0.75)
    gen = iter_resegment_boxes(project, image, state, device="cpu", block=CHUNKS)
    assert next(gen) == Progress(1, 20)
    gen.close()
    after = np.asarray(state.labels[:])
    changed_slices = {int(z) for z in np.flatnonzero((after != before).any(axis=(1, 2)))}
    assert changed_slices <= {0}  # only the first box (slice 0, top left) was merged
    assert np.array_equal(after[:, 64:], before[:, 64:])
    unc = np.asarray(old[:])  # its uncertainty was written with its labels, and only its
    first = np.zeros(unc.shape, bool)
    first[0, :64, :64] = True
    assert (unc[first] != 0.75).any()
    assert (unc[~first] == 0.75).all()


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
