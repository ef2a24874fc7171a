"""Lazy training patches: only from labelled boxes, only the patches read, one seed one draw."""

import numpy as np
import pytest

from napari_segtool.config import TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.io.project import Project, ProjectState
from napari_segtool.training import EpochReport, iter_train
from napari_segtool.training.lazy_patches import LazyPatchSampler, labelled_values, split_boxes
from tests.training.conftest import blobs, tiny_model

SHAPE = (6, 96, 96)
CHUNKS = (1, 32, 32)
RANGE = (np.array([0.0]), np.array([255.0]))


class CountingImage:
    """A lazy image that records every region read (as a zarr or dask array would serve it)."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads = []

    def __getitem__(self, region):
        self.reads.append(region)
        return self.data[region]


def _state(tmp_path):
    image, labels = blobs(SHAPE)
    state = Project(tmp_path / "p").create_chunked(labels=labels, chunks=CHUNKS)
    box = (slice(1, 2), slice(70, 90), slice(5, 25))  # corrections in two chunks of slice 1
    state.labels[box] = 1 - labels[box]
    atoms = [(tuple(i.ravel() for i in np.mgrid[box]), labels[box].ravel(), 1)]
    state.mark_painted(atoms)
    state.reviewed = {4}
    return image, state


def _labelled(state) -> np.ndarray:
    return ProjectState(labels=state.labels[:], machine=state.machine[:],
                        painted=state.painted[:], reviewed=state.reviewed).labelled()  # fmt: skip


@pytest.mark.parametrize("patch_shape", [(2, 32, 32), (32, 32)])
def test_patches_come_only_from_labelled_boxes(tmp_path, patch_shape):
    image, state = _state(tmp_path)
    lazy = CountingImage(image)
    sampler = LazyPatchSampler(lazy, state, patch_shape, label_values=(0, 1), value_range=RANGE)
    assert {tuple(s.start for s in b) for b in sampler.boxes} == {
        (1, 64, 0), *((4, y, x) for y in (0, 32, 64) for x in (0, 32, 64))}  # fmt: skip
    assert sampler.labelled_voxels == int(_labelled(state).sum())
    assert lazy.reads == []  # counting read the labels, never the image
    labelled = _labelled(state)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x, y, valid, region = sampler.patch(rng)
        assert lazy.reads[-1] == region  # one read per patch, of the patch alone
        size = tuple(s.stop - s.start for s in region)
        assert size == ((1, *patch_shape) if len(patch_shape) == 2 else patch_shape)
        expected = labelled[region].reshape(valid.shape)
        assert np.array_equal(valid, expected)  # valid: the labelled voxels, nothing else
        assert valid.any()
        assert x.shape == (1, *patch_shape)
        assert x.dtype == np.float32
        assert np.allclose(x, image[region].reshape(patch_shape) / 255.0)
        assert np.array_equal(y[valid], np.asarray(state.labels[region]).reshape(y.shape)[valid])
    x, y, v = sampler.sample(4, rng)
    assert x.shape == (4, 1, *patch_shape)
    assert y.dtype == np.int64
    assert v.dtype == bool


def test_the_same_seed_gives_the_same_patches(tmp_path):
    image, state = _state(tmp_path)

    def draw(seed):
        sampler = LazyPatchSampler(image, state, (2, 32, 32), label_values=(0, 1),
                                   value_range=RANGE, cache_boxes=2)  # fmt: skip
        return sampler.sample(6, np.random.default_rng(seed))

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_held_out_boxes_never_train(tmp_path):
    image, state = _state(tmp_path)
    train, val = split_boxes(state.labelled_boxes(), fraction=0.3, seed=0)
    assert len(val) == 3
    assert len(train) == 7
    sampler = LazyPatchSampler(image, state, (1, 48, 48), label_values=(0, 1),
                               value_range=RANGE, boxes=train, holdout=val)  # fmt: skip
    held = np.zeros(SHAPE, bool)
    for box in val:
        held[box] = True
    rng = np.random.default_rng(1)
    for _ in range(30):
        _, _, valid, region = sampler.patch(rng)
        assert not (valid & held[region]).any()
        assert valid.any()


def test_small_volumes_are_padded_like_the_in_memory_sampler(tmp_path):
    image, labels = blobs((3, 40, 40))
    state = Project(tmp_path / "p").create_chunked(labels=labels, chunks=(1, 16, 16))
    state.reviewed = {1}
    sampler = LazyPatchSampler(image, state, (4, 48, 48), label_values=(0, 1), value_range=RANGE)
    x, _y, valid = sampler.sample(2, np.random.default_rng(0), augment_patches=False)
    assert x.shape == (2, 1, 4, 48, 48)
    assert not valid[:, 3].any()
    assert not valid[:, :, 40:].any()
    assert valid[:, 1, :40, :40].all()


def test_unknown_classes_and_empty_projects_are_refused(tmp_path):
    image, state = _state(tmp_path)
    state.labels[4, 0, 0] = 5  # in a reviewed slice: it counts
    with pytest.raises(InputError, match="class 5"):
        LazyPatchSampler(image, state, (1, 32, 32), label_values=(0, 1), value_range=RANGE)
    assert labelled_values(state) == (0, 1, 5)
    empty = Project(tmp_path / "empty").create_chunked(shape=SHAPE, dtype=np.uint8)
    with pytest.raises(InputError, match="no labelled voxels"):
        LazyPatchSampler(image, empty, (1, 32, 32), label_values=(0, 1), value_range=RANGE)
    with pytest.raises(InputError, match="does not match"):
        LazyPatchSampler(image[:, :50], state, (1, 32, 32), label_values=(0, 1),
                         value_range=RANGE)  # fmt: skip
    with pytest.raises(InputError, match="patch_shape"):
        LazyPatchSampler(image, state, (32,), label_values=(0, 1), value_range=RANGE)


def test_iter_train_takes_the_lazy_sampler(tmp_path):
    """The training loop runs on it unchanged, and the loss falls."""
    image, labels = blobs((4, 96, 96))
    state = Project(tmp_path / "p").create_chunked(labels=labels, chunks=(1, 32, 32))
    state.reviewed = {0, 1, 2}
    model = tiny_model(2)
    lo, hi = np.percentile(image, [1, 99.8])
    sampler = LazyPatchSampler(image, state, (48, 48), label_values=(0, 1),
                               value_range=(np.array([lo]), np.array([hi])))  # fmt: skip
    cfg = TrainingConfig(patch_shape=(48, 48), batch_size=4, steps=40, steps_per_epoch=20,
                         learning_rate=1e-2, device="cpu")  # fmt: skip
    reports = [r for r in iter_train(model, sampler, config=cfg) if isinstance(r, EpochReport)]
    assert [r.epoch for r in reports] == [1, 2]
    assert reports[-1].train_loss < reports[0].train_loss


def test_class_counts_and_balanced_centres_as_the_in_memory_sampler(tmp_path):
    """A rare class in a project on disk: counted box by box, centred on as often as the
    commonest with class_balanced, and the box round plans from those counts."""
    from napari_segtool.config import FinetuneConfig, ModelConfig
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.model import SegmentationModel
    from napari_segtool.training.finetune import iter_finetune_boxes, split_labelled_boxes

    image, labels = blobs(SHAPE)
    labels = (labels > 0).astype(np.uint8)
    for z in (1, 3, 5):  # a rare class: 3 x 3 voxels in two chunks of each reviewed slice
        labels[z, 40:43, 40:43] = labels[z, 10:13, 70:73] = 2
    state = Project(tmp_path / "p").create_chunked(labels=labels, chunks=CHUNKS)
    state.reviewed = {1, 3, 5}
    sampler = LazyPatchSampler(image, state, (1, 1), label_values=(0, 1, 2),
                               value_range=RANGE, foreground_fraction=1.0)  # fmt: skip
    expected = np.bincount(labels[[1, 3, 5]].ravel(), minlength=3)
    assert sampler.class_counts.tolist() == expected.tolist()

    def centre_classes(balanced):
        sampler.class_balanced = balanced
        rng = np.random.default_rng(0)
        got = [int(sampler.patch(rng)[1].ravel()[0]) for _ in range(300)]
        return np.bincount(got, minlength=3)

    assert centre_classes(False)[2] < 15  # 54 of about 10,000 foreground voxels
    balanced = centre_classes(True)
    assert 110 < balanced[2] < 190
    assert 110 < balanced[1] < 190
    # the box round plans from these counts: longer, weighted, class-balanced
    model = SegmentationModel.new(ModelConfig(spatial_dims=2, depth=2, base_features=4,
                                              out_channels=3), tile_shape=(32, 32),
                                  label_values=(0, 1, 2))  # fmt: skip
    split = split_labelled_boxes(state, fraction=0.3, seed=0)
    cfg = FinetuneConfig(epochs=1, steps_per_epoch=2, device="cpu", balance="auto")
    result = run_to_end(iter_finetune_boxes(model, image, state, split, config=cfg))
    assert result.plan is not None
    assert result.plan["class_balanced"] is True
    assert result.plan["steps"] > 2
