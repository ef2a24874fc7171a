"""Issue 14's whole loop in one real viewer, on zarr-backed layers, through the plugin's docks.

An OME-Zarr EM stack and its expert reference (a second OME-Zarr, a label image) are opened
with napari-ome-zarr; every size threshold of the widgets is lowered below the volume, so each
step takes its path for data larger than memory: Segment fills a chunked project beside the
image (flip TTA: an uncertainty store too), the user corrects the prediction with the layer's
paint and fill, Review counts the pair block by block in a worker and shows what a
from-scratch ``evaluate`` gives, a Fine-tune round trains on the corrections and re-segments
box by box where nobody painted, and the Queue ranks the zarr uncertainty in a worker exactly
as it ranks the same arrays held in memory.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from napari_segtool import config as segtool_config
from napari_segtool._widgets import _review_count as count_module
from napari_segtool._widgets import finetune as finetune_module
from napari_segtool._widgets import queue as queue_module
from napari_segtool._widgets import review as review_module
from napari_segtool._widgets.finetune_project import same_store
from napari_segtool._widgets.queue import REVIEWED_KEY
from napari_segtool._widgets.segment_lazy import PROJECT_KEY
from napari_segtool.inference import predict
from napari_segtool.io.project import ChunkedState, Project, default_project_dir
from napari_segtool.io.zarr_io import write_ome_zarr
from napari_segtool.layer_roles import ROLE_KEY, UNCERTAINTY
from napari_segtool.metrics import METRIC, ConfusionTracker, evaluate

pytest.importorskip("napari_ome_zarr")
logger = logging.getLogger(__name__)

PLUGIN = "napari-segtool"
SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
# held-out slices of the bundled model (trained on 0-19): 1 = membrane, 0 = cell interior,
# the model's label values (0, 1) too
CROP = (slice(20, 28), slice(0, 128), slice(0, 128))
SPACING = (2.0, 0.5, 0.5)
SMALL = 10_000  # voxels: every in-memory threshold, far below the 8 x 128 x 128 volume

DRIFT = (
    "re-segmenting with the unchanged model rewrote {} untouched voxels: the chunked "
    "re-segmentation must reuse the tiling and flips Segment recorded (state.image)"
)


@pytest.fixture
def errors(monkeypatch):
    """Every error notification of the four docks (none is expected)."""
    shown = []
    for module in (finetune_module, queue_module, review_module):
        monkeypatch.setattr(module, "show_error", shown.append)
    from napari_segtool._widgets import segment as segment_module

    monkeypatch.setattr(segment_module, "show_error", shown.append)
    return shown


def wait_idle(qtbot, widget, timeout=180_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def review_equals_a_fresh_count(review, edited, reference):
    """Review's tracker and shown numbers are those of a count from scratch of the layers."""
    pred = np.asarray(edited.data[...])
    ref = np.asarray(reference.data[0][...])
    fresh = ConfusionTracker(pred, ref)
    np.testing.assert_array_equal(review.tracker.confusion, fresh.confusion)
    full = evaluate(pred, ref, distances=False)
    for key in ("dice", "iou", "precision", "recall"):
        assert review.value(key) == METRIC[key].format(full[key]), key
    return full


def false_positive_component(pred, ref, *, skip):
    """A slice and the largest orthogonally connected membrane piece of ``pred`` there that
    lies wholly inside cells of ``ref`` (at least 10 voxels), in the first slice that has one."""
    for z in range(len(pred)):
        if z in skip:
            continue
        parts, n = ndimage.label(pred[z] == 1)
        index = range(1, n + 1)
        sizes = ndimage.sum_labels(np.ones_like(pred[z]), parts, index=index)
        wrong = ndimage.sum_labels(ref[z] == 0, parts, index=index)
        candidates = [i + 1 for i in range(n) if wrong[i] == sizes[i] >= 10]
        if candidates:
            return z, parts == max(candidates, key=lambda i: sizes[i - 1])
    raise AssertionError("the model predicts no membrane piece wholly inside a cell")


@dataclass
class Loop:
    """The viewer and what the loop has made so far."""

    viewer: Any
    qtbot: Any
    errors: list
    em: np.ndarray
    truth: np.ndarray
    image: Any
    reference: Any
    folder: Path
    labels: Any = None
    unc: Any = None
    review: Any = None
    pred0: Any = None  # Segment's prediction
    changed: Any = None  # voxels the user corrected
    reviewed: int = 6  # the slice marked reviewed in Fine-tune


@pytest.fixture
def loop(make_napari_viewer, qtbot, tmp_path, monkeypatch, errors):
    """An OME-Zarr EM stack and its reference opened with napari-ome-zarr, thresholds lowered."""
    monkeypatch.setattr(segtool_config, "LAZY_SEGMENT_VOXELS", SMALL)
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 128 * 128)  # 2D model: 4 blocks of slices
    monkeypatch.setattr(review_module, "RECOUNT_IN_WORKER", SMALL)
    monkeypatch.setattr(count_module, "BLOCK_VOXELS", 2 * 128 * 128)
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[CROP]
    truth = tifffile.imread(SAMPLE / "isbi2012_em_membranes.tif")[CROP]
    assert set(np.unique(truth)) == {0, 1}
    image_path = write_ome_zarr(tmp_path / "em.ome.zarr", em, spacing=SPACING, chunks=(1, 64, 64))
    ref_path = write_ome_zarr(tmp_path / "em_membranes.ome.zarr", truth, spacing=SPACING,
                              chunks=(1, 64, 64), image_label=True)  # fmt: skip
    viewer = make_napari_viewer()
    [image] = viewer.open(str(image_path), plugin="napari-ome-zarr")
    [reference] = viewer.open(str(ref_path), plugin="napari-ome-zarr")
    assert type(reference).__name__ == "Labels"
    assert not isinstance(image.data[0], np.ndarray)  # both lazy (dask over zarr)
    assert not isinstance(reference.data[0], np.ndarray)
    np.testing.assert_array_equal(np.asarray(reference.data[0]), truth)
    return Loop(viewer, qtbot, errors, em, truth, image, reference,
                default_project_dir(image_path))  # fmt: skip


def segment_step(loop):
    """Segment: the lazy path fills a chunked project; flip TTA writes the uncertainty."""
    viewer, image, folder = loop.viewer, loop.image, loop.folder
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert seg._image.value is image  # the role default, not the reference
    seg._model.value = "em-membranes-2d"
    seg._tile.value = "64, 64"
    seg._tta.value = True
    seg._precision.value = "fp32"
    seg._compile.value = "off"
    seg._device.value = "cpu"
    assert seg.start() is not None
    wait_idle(loop.qtbot, seg)
    assert not loop.errors
    loop.labels = labels = viewer.layers[f"{image.name} prediction"]
    name = f"{image.name} uncertainty"
    loop.qtbot.waitUntil(lambda: name in viewer.layers, timeout=10_000)
    loop.unc = viewer.layers[name]
    assert isinstance(labels.data, zarr.Array)
    assert labels.metadata[PROJECT_KEY] == str(folder)
    assert isinstance(loop.unc.data, zarr.Array)
    assert Path(str(loop.unc.data.store.root)).resolve().parent == folder.resolve()
    loop.pred0 = np.asarray(labels.data[...])
    assert set(np.unique(loop.pred0)) <= {0, 1}
    np.testing.assert_array_equal(loop.pred0, Project(folder).load().machine[...])
    first = evaluate(loop.pred0, loop.truth, distances=False)
    assert first["dice"] > 0.6, first  # the bundled model on its held-out slices
    u = np.asarray(loop.unc.data[...])
    assert u.dtype == np.float32
    assert u.min() >= 0.0
    assert u.max() <= 1.0
    assert u.std() > 0
    return first


def review_step(loop, first):
    """Review: the zarr pair is counted in a worker; its numbers are a fresh count's."""
    _, review = loop.viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    review._edited.value, review._reference.value = loop.labels, loop.reference
    assert review._recounting  # in a worker: zarr, and above RECOUNT_IN_WORKER
    loop.qtbot.waitUntil(lambda: not review._recounting, timeout=60_000)
    shown = review_equals_a_fresh_count(review, loop.labels, loop.reference)
    assert shown["dice"] == first["dice"]
    loop.review = review


def correct_step(loop, first):
    """A missed membrane painted in, a false one filled out; Review follows the events."""
    viewer, labels, pred0, truth = loop.viewer, loop.labels, loop.pred0, loop.truth
    z_paint = 2
    missed = (truth[z_paint] == 1) & (pred0[z_paint] == 0)
    depth = ndimage.distance_transform_edt(np.pad(missed, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    viewer.dims.set_current_step(0, z_paint)
    labels.brush_size = 3
    labels.paint((z_paint, y, x), 1)
    z_fill, blob = false_positive_component(pred0, truth, skip=(z_paint, loop.reviewed))
    viewer.dims.set_current_step(0, z_fill)
    fy, fx = np.argwhere(blob)[0]
    labels.fill((z_fill, fy, fx), 0)
    loop.changed = changed = np.asarray(labels.data[...]) != pred0
    assert changed[z_paint].any()
    np.testing.assert_array_equal(changed[z_fill], blob)  # the orthogonal component, exactly
    assert not changed[[z for z in range(len(pred0)) if z not in (z_paint, z_fill)]].any()
    painted = np.asarray(Project(loop.folder).load().painted[...])
    assert (painted >= changed).all()  # Segment's display recorded both events in the project
    review = loop.review
    shown = review_equals_a_fresh_count(review, labels, loop.reference)  # followed the events
    assert shown["dice"] > first["dice"]  # both corrections agree with the expert
    review._count_button.changed.emit(True)  # Recount: from scratch, in the worker again
    assert review._recounting
    loop.qtbot.waitUntil(lambda: not review._recounting, timeout=60_000)
    assert review_equals_a_fresh_count(review, labels, loop.reference)["dice"] == shown["dice"]


def check_saved(loop, entry):
    """The round's version, the reviewed slice and the painted voxels are in the project."""
    folder = loop.folder

    def saved() -> bool:
        on_disk = Project(folder).load()
        versions = [v["version"] for v in on_disk.versions]
        return versions == [1] and on_disk.reviewed == {loop.reviewed}

    loop.qtbot.waitUntil(saved, timeout=30_000)  # the save runs in a worker
    on_disk = Project(folder).load()
    assert Project(folder).file(on_disk.versions[0]["file"]).is_file()
    assert on_disk.current_version == (1 if entry["promoted"] else None)
    assert (np.asarray(on_disk.painted[...]) >= loop.changed).all()


def finetune_step(loop):
    """A round on the chunked project; painted and reviewed voxels survive re-segmenting."""
    viewer, labels, folder, qtbot = loop.viewer, loop.labels, loop.folder, loop.qtbot
    _, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert tune._image.value is loop.image
    assert tune._labels.value is labels
    assert Path(str(tune._folder.value)).resolve() == folder.resolve()  # Segment's project
    tune._epochs.value = 2
    tune._steps.value = 3
    tune._lr.value = 0.001
    tune._device.value = "cpu"
    tune._precision.value = "fp32"
    assert tune.open_project(), loop.errors
    assert isinstance(tune.state, ChunkedState)
    assert same_store(labels.data, tune.state.labels)
    assert f"{labels.name} before restore" not in viewer.layers  # nothing copied
    viewer.dims.set_current_step(0, loop.reviewed)
    tune.toggle_reviewed()  # the Mark button: this slice is fine as it is
    assert tune.state.reviewed == {loop.reviewed}
    protected = tune.state.protected()
    assert protected[loop.reviewed].all()
    assert (protected >= loop.changed).all()
    assert not protected[0].any()
    before = np.asarray(labels.data[...])
    assert tune.start() is not None
    wait_idle(qtbot, tune)
    assert not loop.errors
    [entry] = tune.state.versions
    assert entry["version"] == 1
    assert entry["labelled_voxels"] == int(protected.sum())  # the corrections and slice 6
    assert 0 < entry["validation_voxels"] < entry["labelled_voxels"]  # a box held out
    if not entry["promoted"]:
        assert tune.resegment() is not None  # as the user would: "Re-segment untouched"
    qtbot.waitUntil(lambda: "re-segmented" in tune._status.value, timeout=120_000)
    qtbot.waitUntil(lambda: labels.editable, timeout=10_000)
    assert not loop.errors
    after = np.asarray(labels.data[...])
    np.testing.assert_array_equal(after[protected], before[protected])  # corrections kept
    machine = np.asarray(tune.state.machine[...])
    np.testing.assert_array_equal(after[~protected], machine[~protected])
    # the same model again (not promoted) gives the same prediction where untouched: the
    # re-segmentation reuses the tiling and flips Segment recorded in the project
    untouched = ~protected
    drift = (
        0
        if entry["promoted"]
        else int(np.count_nonzero(after[untouched] != loop.pred0[untouched]))
    )

    check_saved(loop, entry)
    # Review follows the in-place rewrite (the plugin bumps the layer's data version)
    qtbot.waitUntil(lambda: not loop.review._recounting, timeout=60_000)
    review_equals_a_fresh_count(loop.review, labels, loop.reference)
    return after, drift


def queue_step(loop, after, monkeypatch):
    """The zarr uncertainty ranked in a worker, as the same arrays held in memory."""
    viewer, labels, unc = loop.viewer, loop.labels, loop.unc
    _, queue = viewer.window.add_plugin_dock_widget(PLUGIN, "Queue")
    queue._strategy.value = "uncertainty"  # these tests rank by it
    queue._gap.value = 0
    queue._length.value = 100
    reviewed = {REVIEWED_KEY: labels.metadata[REVIEWED_KEY]}  # set by Fine-tune
    assert reviewed[REVIEWED_KEY] == {loop.reviewed}
    in_memory_labels = viewer.add_labels(after, name="copy", scale=labels.scale,
                                         metadata=reviewed)  # fmt: skip
    in_memory_unc = viewer.add_image(np.asarray(unc.data[...]), name="copy u", scale=unc.scale,
                                     metadata={ROLE_KEY: UNCERTAINTY})  # fmt: skip
    queue._labels.value, queue._uncertainty.value = in_memory_labels, in_memory_unc
    assert not queue.ranking
    expected = queue.refresh()  # numpy, below SCORE_IN_WORKER: ranked on this thread
    assert loop.reviewed not in {unit.grid[0] for unit in expected}  # reviewed: out of the queue
    assert len(expected) == len(loop.em) - 1
    assert len({unit.score for unit in expected}) > 1
    monkeypatch.setattr(queue_module, "SCORE_IN_WORKER", SMALL)
    monkeypatch.setattr(queue_module, "BLOCK_VOXELS", 3 * 128 * 128)  # three blocks
    queue._labels.value = labels
    queue._uncertainty.value = unc
    assert queue.ranking  # zarr: scored block by block in a worker
    loop.qtbot.waitUntil(lambda: not queue.ranking, timeout=60_000)
    assert not loop.errors
    assert queue.queue == expected  # same units, same scores, same order
    assert queue.table.rowCount() == len(expected)


def test_segment_correct_review_finetune_queue_on_zarr(loop, monkeypatch):
    first = segment_step(loop)
    review_step(loop, first)
    correct_step(loop, first)
    after, drift = finetune_step(loop)
    queue_step(loop, after, monkeypatch)
    assert drift == 0, DRIFT.format(drift)
