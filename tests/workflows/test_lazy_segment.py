"""Segmenting a lazy volume into a chunked project: equal to in-memory, never over the user."""

import numpy as np
import pytest

from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.blocks import subsample_range
from napari_segtool.inference.normalize import percentile_range
from napari_segtool.inference.predict import segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.project import Project
from napari_segtool.model import SegmentationModel
from napari_segtool.workflows.lazy_segment import (
    BlockProgress,
    iter_segment_lazy,
    open_chunked,
    record_paint,
)

zarr = pytest.importorskip("zarr")

CONFIG = InferenceConfig(overlap=0.5, batch_size=2, precision="fp32", compile="off")


def tiny(dims, tile):
    config = ModelConfig(spatial_dims=dims, depth=2, base_features=4, out_channels=2)
    return SegmentationModel.new(config, tile_shape=tile, seed=0)


def volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(np.uint16)


def on_disk(tmp_path, image):
    src = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=image.shape,
                          chunks=(3, *image.shape[1:]), dtype=image.dtype)  # fmt: skip
    src[:] = image
    return src


def start(tmp_path, shape, model, chunks=(1, 16, 16)):
    project = Project(tmp_path / "p.segtool")
    state = project.create_chunked(shape=shape, dtype="u1", chunks=chunks[-len(shape) :])
    return project, state


def drain(gen):
    seen = []
    return seen, run_to_end(gen, seen.append)


def both_classes(model, image, config, value_range):
    """Shift the last bias so the untrained model predicts both classes (as test_blocks)."""
    import torch

    p = segment(image, model, config=config, value_range=value_range,
                return_probabilities=True).probabilities  # fmt: skip
    d = np.log(np.clip(p[1], 1e-12, 1)) - np.log(np.clip(p[0], 1e-12, 1))
    last = [m for m in model.network.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    with torch.no_grad():
        last[-1].bias[1] -= float(np.median(d))
    return segment(image, model, config=config, value_range=value_range)


@pytest.mark.parametrize(
    ("dims", "tile", "shape"), [(3, (8, 16, 16), (13, 30, 28)), (2, (16, 16), (5, 30, 28))]
)
def test_equals_in_memory_segment_and_saves_the_range(tmp_path, dims, tile, shape):
    model = tiny(dims, tile)
    image = volume(shape)
    value_range = percentile_range(image, model.normalization)
    ref = both_classes(model, image, CONFIG, value_range)
    project, state = start(tmp_path, shape, model)
    seen, result = drain(iter_segment_lazy(on_disk(tmp_path, image), model, state=state,
                                           project=project, config=CONFIG,
                                           value_range=value_range))  # fmt: skip
    np.testing.assert_array_equal(state.labels[:], ref.labels)
    np.testing.assert_array_equal(state.machine[:], ref.labels)
    assert 0.1 < ref.labels.mean() < 0.9  # both classes: the comparison means something
    assert all(isinstance(p, BlockProgress) for p in seen)
    assert seen[-1].done == seen[-1].total
    covered = np.zeros(shape[0], bool)
    for p in seen:
        covered[p.rows[0] : p.rows[1]] = True
    assert covered.all()  # every row was reported final once written
    assert result.value_range == pytest.approx((value_range[0][0], value_range[1][0]))
    loaded = Project(project.folder).load()
    assert loaded.image["value_range"] == pytest.approx(list(result.value_range))
    assert loaded.painted_voxels() == 0


def test_a_2d_image_with_uncertainty(tmp_path):
    model = tiny(2, (16, 16))
    image = volume((30, 28), seed=1)
    config = InferenceConfig(overlap=0.5, precision="fp32", compile="off", tta=True)
    value_range = percentile_range(image, model.normalization)
    ref = segment(image, model, config=config, value_range=value_range)
    project, state = start(tmp_path, image.shape, model)
    _, result = drain(iter_segment_lazy(image, model, state=state, project=project,
                                        config=config, value_range=value_range,
                                        uncertainty=True))  # fmt: skip
    np.testing.assert_array_equal(state.labels[:], ref.labels)
    assert result.uncertainty.store_path is not None
    np.testing.assert_allclose(result.uncertainty[:], ref.uncertainty, atol=1e-5)


def test_default_range_is_the_subsample_range(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = volume((6, 20, 20), seed=2)
    _project, state = start(tmp_path, image.shape, model)
    _, result = drain(iter_segment_lazy(image, model, state=state, config=CONFIG))
    lo, hi = percentile_range(image, model.normalization)  # whole volume within the budget
    assert result.value_range == pytest.approx((lo[0], hi[0]))
    assert state.image["value_range"] == pytest.approx([lo[0], hi[0]])


def test_painted_and_reviewed_voxels_survive_a_later_run(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = volume((10, 24, 24), seed=3)
    value_range = percentile_range(image, model.normalization)
    image2 = volume(image.shape, seed=4)  # the next run predicts differently
    ref = both_classes(model, image2, CONFIG, value_range).labels
    project, state = start(tmp_path, image.shape, model)
    drain(iter_segment_lazy(image, model, state=state, config=CONFIG, value_range=value_range))
    first = state.labels[:]
    machine_before = state.machine[:]
    # the user paints label 5 in a box (napari writes, then sends the event) and reviews z=7
    box = (slice(2, 4), slice(3, 9), slice(5, 11))
    region = state.labels[box]
    old = region.copy()
    region[...] = 5
    state.labels[box] = region
    atom = ((np.array([2]), np.array([3]), np.array([5])), old[0, 0, :1], 5)  # indices atom
    mask = np.ones(old.shape, bool)
    record_paint(state, [atom, _Masked(box, mask, old[mask], 5)])
    state.reviewed = {7}
    state.labels[7] = 3  # the reviewed slice as the user left it
    expected = state.labels[:]
    drain(iter_segment_lazy(image2, model, state=state, project=project, config=CONFIG,
                            value_range=value_range))  # fmt: skip
    labels = state.labels[:]
    assert (labels[box] == 5).all()
    assert (labels[7] == 3).all()
    free = np.ones(image.shape, bool)
    free[box] = False
    free[7] = False
    np.testing.assert_array_equal(labels[free], ref[free])
    machine = state.machine[:]
    np.testing.assert_array_equal(machine[box], ref[box])  # painted: the machine moves on
    # labelled only by differing from the machine (no paint record): the machine stays, so
    # the voxels still count as changed
    changed_only = expected[7] != machine_before[7]
    np.testing.assert_array_equal(machine[7][changed_only], machine_before[7][changed_only])
    np.testing.assert_array_equal(machine[free], ref[free])
    assert not np.array_equal(first[free], ref[free])  # the run did change something
    np.testing.assert_array_equal(labels[~free], expected[~free])


class _Masked:
    """napari's masked paint atom: slice_key, mask, old_values, new_value."""

    def __init__(self, slice_key, mask, old_values, new_value):
        self.slice_key, self.mask = slice_key, mask
        self.old_values, self.new_value = old_values, new_value


def test_a_stroke_painted_while_it_fills_survives(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = volume((24, 20, 20), seed=5)
    value_range = percentile_range(image, model.normalization)
    config = InferenceConfig(overlap=0.5, batch_size=1, precision="fp32", compile="off")
    ref = both_classes(model, image, config, value_range).labels
    project, state = start(tmp_path, image.shape, model)
    lock = __import__("threading").Lock()
    gen = iter_segment_lazy(image, model, state=state, project=project, config=config,
                            value_range=value_range, lock=lock)  # fmt: skip
    next(gen)
    # the user erases (label 0, the machine's value so far) rows not yet written: napari
    # writes the stroke at once but sends its paint event only when the stroke ends
    box = (slice(18, 20), slice(0, 20), slice(0, 20))
    assert (state.labels[box] == 0).all()
    assert (ref[box] == 1).any()
    _seen, _ = drain(gen_until(gen, rows_past=20))
    assert (state.labels[box] == ref[box]).all()  # the run wrote over the unrecorded stroke
    old = state.labels[box]
    record_paint(state, [_Masked(box, None, old, 0)], lock=lock, rewrite=True)  # stroke ends
    drain(gen)
    assert (state.labels[box] == 0).all()
    assert state.painted[box].all()
    rest = np.ones(image.shape, bool)
    rest[box] = False
    np.testing.assert_array_equal(state.labels[:][rest], ref[rest])


def gen_until(gen, *, rows_past):
    """Step ``gen`` until rows up to ``rows_past`` are reported written."""
    while True:
        p = next(gen)
        yield p
        if p.rows[1] >= rows_past:
            return


def test_cancel_leaves_a_loadable_project(tmp_path):
    model = tiny(3, (8, 16, 16))
    image = volume((30, 20, 20), seed=6)
    value_range = percentile_range(image, model.normalization)
    config = InferenceConfig(overlap=0.5, batch_size=1, precision="fp32", compile="off")
    ref = segment(image, model, config=config, value_range=value_range).labels
    project, state = start(tmp_path, image.shape, model)
    gen = iter_segment_lazy(image, model, state=state, project=project, config=config,
                            value_range=value_range)  # fmt: skip
    written = 0
    while written < 8:
        written = max(written, next(gen).rows[1])
    gen.close()
    loaded = Project(project.folder).load()
    assert loaded.image["value_range"] == pytest.approx([value_range[0][0], value_range[1][0]])
    labels = loaded.labels[:]
    np.testing.assert_array_equal(labels[:written], ref[:written])
    assert (loaded.machine[:] == labels).all()  # nothing half-written: no voxel "changed"
    assert loaded.painted_voxels() == 0


def test_open_chunked_reopens_a_match_and_refuses_others(tmp_path):
    model = tiny(3, (8, 16, 16))
    project = Project(tmp_path / "p.segtool")
    state = open_chunked(project, shape=(4, 8, 8), dtype="u1", image={"name": "x"})
    state.labels[0] = 1
    again = open_chunked(Project(project.folder), shape=(4, 8, 8), dtype="u1")
    assert (again.labels[0] == 1).all()
    with pytest.raises(InputError, match="shape"):
        open_chunked(Project(project.folder), shape=(5, 8, 8), dtype="u1")
    with pytest.raises(InputError, match="too narrow"):
        open_chunked(Project(project.folder), shape=(4, 8, 8), dtype="u2")
    with pytest.raises(InputError, match="does not match"):
        drain(iter_segment_lazy(np.zeros((3, 8, 8)), model, state=again))


@pytest.mark.parametrize(("dims", "tile"), [(3, (8, 16, 16)), (2, (16, 16))])
def test_a_region_writes_its_box_only_and_keeps_painted_voxels(tmp_path, dims, tile):
    model = tiny(dims, tile)
    image = volume((9, 30, 28), seed=6)
    value_range = percentile_range(image, model.normalization)  # the whole volume's
    box = (slice(2, 7), slice(5, 26), slice(3, 20))
    project, state = start(tmp_path, image.shape, model)
    state.labels[:] = 9  # e.g. an earlier run's labels: outside the box they must stay
    state.machine[:] = 9
    painted = (slice(3, 4), slice(6, 9), slice(4, 8))  # inside the box
    old = state.labels[painted]
    state.labels[painted] = 5
    record_paint(state, [_Masked(painted, np.ones(old.shape, bool), old.reshape(-1), 5)])
    ref = both_classes(model, image[box], CONFIG, value_range).labels
    seen, result = drain(iter_segment_lazy(on_disk(tmp_path, image), model, state=state,
                                           project=project, config=CONFIG,
                                           value_range=value_range, region=box))  # fmt: skip
    labels, machine = state.labels[:], state.machine[:]
    inside = np.zeros(image.shape, bool)
    inside[box] = True
    assert (labels[~inside] == 9).all()
    assert (machine[~inside] == 9).all()
    assert (labels[painted] == 5).all()
    keep = np.ones(ref.shape, bool)
    keep[1:2, 1:4, 1:5] = False  # the painted voxels, relative to the box
    np.testing.assert_array_equal(labels[box][keep], ref[keep])
    np.testing.assert_array_equal(machine[box], ref)  # painted: the machine moves on
    assert 0.1 < ref.mean() < 0.9
    rows = [p.rows for p in seen if p.rows[0] < p.rows[1]]
    assert min(a for a, _ in rows) == 2
    assert max(b for _, b in rows) == 7  # rows of the whole volume
    assert result.value_range == pytest.approx((value_range[0][0], value_range[1][0]))


def test_a_region_of_a_2d_image_with_the_whole_images_default_range(tmp_path):
    model = tiny(2, (16, 16))
    image = volume((30, 28), seed=7)
    image[:4] = 60000  # bright rows outside the box: the box's own range would differ
    config = InferenceConfig(overlap=0.5, precision="fp32", compile="off", tta=True)
    box = (slice(8, 30), slice(2, 19))
    project, state = start(tmp_path, image.shape, model)
    _, result = drain(iter_segment_lazy(image, model, state=state, project=project,
                                        config=config, uncertainty=True,
                                        region=box))  # fmt: skip
    whole = subsample_range(image, model.normalization)
    assert whole[1][0] != pytest.approx(percentile_range(image[box], model.normalization)[1][0])
    assert result.value_range == pytest.approx((whole[0][0], whole[1][0]))
    ref = segment(image[box], model, config=config, value_range=whole)
    labels = state.labels[:]
    np.testing.assert_array_equal(labels[box], ref.labels)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert (labels[outside] == 0).all()
    unc = result.uncertainty[:]
    np.testing.assert_allclose(unc[box], ref.uncertainty, atol=1e-5)
    assert (unc[outside] == 0).all()


@pytest.mark.parametrize(
    "region", [(slice(3, 3), slice(None), slice(None)), (slice(0, 2), slice(0, 4))]
)
def test_an_empty_or_short_region_is_refused(tmp_path, region):
    model = tiny(3, (8, 16, 16))
    image = volume((6, 20, 20))
    _project, state = start(tmp_path, image.shape, model)
    with pytest.raises(InputError, match="box"):
        drain(iter_segment_lazy(image, model, state=state, config=CONFIG, region=region))


def test_writes_that_finish_without_a_progress_report_still_reach_the_caller(
    tmp_path, monkeypatch
):
    """A block engine that writes and returns before its first report (one small block whose
    write finishes late) must still hand the written rows to the caller, not fail."""
    import napari_segtool.workflows.lazy_segment as lazy

    def silent(image, model, *, labels_out, **_):
        labels_out[0:2] = np.ones((2, *image.shape[1:]), np.uint8)
        return {"device": "cpu"}
        yield  # a generator that never yields

    monkeypatch.setattr(lazy, "iter_segment_blocks", silent)
    model = tiny(2, (16, 16))
    image = volume((4, 16, 16))
    _project, state = start(tmp_path, image.shape, model)
    seen, result = drain(iter_segment_lazy(image, model, state=state, config=CONFIG))
    assert [(b.done, b.total) for b in seen] == [(0, 0)]
    assert seen[0].rows == (0, 2)
    assert result.execution == {"device": "cpu"}
    assert (np.asarray(state.labels[0:2]) == 1).all()
