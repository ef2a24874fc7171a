import numpy as np
import pytest

from napari_segtool._widgets import review as review_module
from napari_segtool._widgets.review import ReviewWidget
from napari_segtool.metrics import METRIC, evaluate, overlap_metrics


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(review_module, "show_error", shown.append)
    return shown


def make_pair(viewer, shape=(5, 40, 50)):
    rng = np.random.default_rng(0)
    ref = np.zeros(shape, np.uint8)
    ref[:, 10:30, 10:40] = 1
    pred = ref.copy()
    pred[:, 12:34, 8:40] = 1
    pred[rng.random(shape) < 0.02] = 0
    reference = viewer.add_labels(ref, name="reference", scale=(2.0, 1.0, 1.0))
    edited = viewer.add_labels(pred, name="edited", scale=(2.0, 1.0, 1.0))
    return edited, reference


def open_review(viewer, edited, reference):
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Review")
    assert isinstance(widget, ReviewWidget)
    widget._edited.value = edited
    widget._reference.value = reference
    return widget


def test_dice_follows_painting(make_napari_viewer):
    viewer = make_napari_viewer()
    edited, reference = make_pair(viewer)
    widget = open_review(viewer, edited, reference)
    before = overlap_metrics(edited.data, reference.data)["dice"]
    assert widget.value("dice") == f"{before:.4f}"
    viewer.dims.set_current_step(0, 2)
    edited.selected_label = 0
    edited.brush_size = 9
    edited.paint((2, 32, 20), 0)  # erase a false-positive band on slice 2
    edited.fill((3, 0, 0), 1)  # flood slice 3's background: many false positives
    after = overlap_metrics(edited.data, reference.data)
    assert after["dice"] != pytest.approx(before)
    assert widget.value("dice") == f"{after['dice']:.4f}"
    assert widget.value("iou") == f"{after['iou']:.4f}"
    slice2 = overlap_metrics(edited.data[2], reference.data[2])
    assert widget.value("dice", column=1) == f"{slice2['dice']:.4f}"
    widget.flush()
    assert widget.slices.item(3, 0).text() == (
        f"{overlap_metrics(edited.data[3], reference.data[3])['dice']:.4f}"
    )
    edited.undo()  # no paint event: a full recount
    assert widget.value("dice") == f"{overlap_metrics(edited.data, reference.data)['dice']:.4f}"


def test_reference_edits_count_and_rows_jump(make_napari_viewer):
    viewer = make_napari_viewer()
    edited, reference = make_pair(viewer)
    widget = open_review(viewer, edited, reference)
    reference.paint((1, 20, 20), 0)
    expected = overlap_metrics(edited.data, reference.data)["dice"]
    assert widget.value("dice") == f"{expected:.4f}"
    widget._jump_to_slice(4)
    assert viewer.dims.current_step[0] == 4


def test_distances_on_demand(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    edited, reference = make_pair(viewer)
    widget = open_review(viewer, edited, reference)
    assert widget.value("hd95") == ""
    assert widget.compute_distances() is not None
    qtbot.waitUntil(lambda: widget._distances.enabled, timeout=60_000)  # re-enabled when done
    full = evaluate(edited.data, reference.data, spacing=(2.0, 1.0, 1.0))
    assert widget.value("hd95") == f"{full['hd95']:.4f}"


def test_edit_effort_against_the_original_prediction(make_napari_viewer):
    viewer = make_napari_viewer()
    edited, reference = make_pair(viewer)
    original = edited.data.copy()
    edited.metadata["segtool_original"] = original
    widget = open_review(viewer, edited, reference)
    widget.flush()
    assert widget._effort.value.startswith("0 voxels changed")
    edited.data_setitem((np.array([0, 0]), np.array([0, 1]), np.array([0, 0])), 3)
    widget.flush()
    assert widget._effort.value.startswith("2 voxels changed")


def test_mismatched_layers_are_a_notification(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    a = viewer.add_labels(np.zeros((4, 10, 10), np.uint8), name="a")
    b = viewer.add_labels(np.zeros((4, 10, 12), np.uint8), name="b")
    widget = open_review(viewer, a, b)
    assert any("shape" in e for e in errors)
    assert widget.tracker is None
    c = viewer.add_labels(np.zeros((4, 10, 10), np.uint8), name="c", scale=(3, 1, 1))
    widget._reference.value = c
    assert "scale" in errors[-1]


def test_paint_during_a_real_worker_recount_matches_a_fresh_count(make_napari_viewer, qtbot):
    """Above the default recount size (no monkeypatch): edits while the worker counts."""
    from napari_segtool._widgets.segment import ORIGINAL_KEY
    from napari_segtool.metrics import ConfusionTracker

    shape = (5, 480, 480)  # 1.15 M voxels
    assert np.prod(shape) > review_module.RECOUNT_IN_WORKER
    viewer = make_napari_viewer()
    rng = np.random.default_rng(5)
    ref = (rng.random(shape) < 0.3).astype(np.uint8)
    pred = ref.copy()
    pred[1, 100:200, 100:200] = 1
    original = pred.copy()
    original.setflags(write=False)
    reference = viewer.add_labels(ref, name="ref")
    edited = viewer.add_labels(pred, name="pred", metadata={ORIGINAL_KEY: original})
    widget = open_review(viewer, edited, reference)
    assert widget._recounting  # the first count went to a worker
    edited.brush_size = 7
    edited.paint((2, 50, 50), 2)  # painted while the worker counts
    reference.paint((3, 60, 60), 1)
    qtbot.waitUntil(lambda: widget.tracker is not None and not widget._recounting,
                    timeout=30_000)  # fmt: skip
    edited.data_setitem((np.array([4, 4]), np.array([7, 8]), np.array([7, 8])), 3)
    edited.undo()  # a second worker recount...
    assert widget._recounting
    edited.paint((0, 300, 300), 2)  # ...with a paint meanwhile
    qtbot.waitUntil(lambda: not widget._recounting, timeout=30_000)
    fresh = ConfusionTracker(edited.data, reference.data)
    np.testing.assert_array_equal(widget.tracker.totals(), fresh.totals())
    np.testing.assert_array_equal(widget.tracker.confusion[:, :2, :2], fresh.confusion[:, :2, :2])
    for key in ("dice", "iou", "precision", "recall"):
        assert widget.value(key) == METRIC[key].format(fresh.metrics()[key])
    effort = ConfusionTracker(edited.data, original)
    changed = int(effort.totals().sum() - np.trace(effort.totals()))
    widget.flush()
    assert widget._effort.value.startswith(f"{changed} voxels")


def test_closing_disconnects_from_the_viewer_and_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    edited, reference = make_pair(viewer)
    steps = len(viewer.dims.events.current_step.callbacks)
    paints = len(edited.events.paint.callbacks)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Review")
    widget._edited.value, widget._reference.value = edited, reference
    assert len(viewer.dims.events.current_step.callbacks) == steps + 1
    assert len(edited.events.paint.callbacks) == paints + 1
    viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    assert len(viewer.dims.events.current_step.callbacks) == steps
    assert len(edited.events.paint.callbacks) == paints
    assert widget.tracker is None
    viewer.dims.set_current_step(0, 3)  # nothing left to call back into the closed widget
    edited.paint((1, 5, 5), 1)
