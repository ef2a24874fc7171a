"""The Queue's patch units, strategies and effort column, and reviewed patches round-tripping
through the Fine-tune widget's project and back into the Queue."""

import numpy as np
import pytest

from napari_segtool._widgets import finetune as finetune_module
from napari_segtool._widgets import queue as queue_module
from napari_segtool._widgets.finetune import FinetuneWidget
from napari_segtool._widgets.queue import (
    FOCUS_KEY,
    PREVIOUS_KEY,
    QUEUE_STRATEGIES,
    REVIEWED_PATCHES_KEY,
    QueueWidget,
)
from napari_segtool._widgets.segment_layers import ORIGINAL_KEY
from napari_segtool.active_learning.select import STRATEGIES
from napari_segtool.io.project import Project


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(queue_module, "show_error", shown.append)
    return shown


def _viewer(make_napari_viewer, labels, unc):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros(labels.shape, np.float32), name="raw")
    viewer.add_labels(labels, name="pred")
    viewer.add_image(unc, name="unc")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Queue")
    widget._strategy.value = "uncertainty"  # these tests rank by it
    assert isinstance(widget, QueueWidget)
    widget._labels.value = viewer.layers["pred"]
    widget._uncertainty.value = viewer.layers["unc"]
    widget._gap.value = 0
    return viewer, widget


def _stack():
    """4 slices of 64 x 64, foreground everywhere; one hot 32 x 32 patch per slice."""
    labels = np.ones((4, 64, 64), np.uint8)
    unc = np.full((4, 64, 64), 0.01, np.float32)
    unc[2, 32:64, 0:32] = 0.9  # slice 2, bottom left: the most uncertain patch
    unc[1, 0:32, 32:64] = 0.5
    return labels, unc


def test_the_queue_offers_every_strategy_simulate_measures():
    assert QUEUE_STRATEGIES == STRATEGIES


def test_patches_rank_show_their_effort_and_zoom(make_napari_viewer, errors):
    viewer, widget = _viewer(make_napari_viewer, *_stack())
    errors.clear()  # picking the prediction before its uncertainty
    widget._tile.value = 32
    widget._units.value = "patches"
    assert not errors
    assert len(widget.queue) == 10
    assert widget.table.rowCount() == 10
    top = widget.queue[0]
    assert top.label == "slice 2, y 32-64, x 0-32"
    assert widget.queue[1].label == "slice 1, y 0-32, x 32-64"
    # expected effort: the unit's uncertainty summed (32 * 32 voxels at 0.9)
    assert top.effort == pytest.approx(0.9 * 32 * 32, rel=1e-5)
    assert widget.table.item(0, 2).text() == f"{0.9 * 32 * 32:,.0f}"
    widget.jump_to(0)
    assert viewer.dims.current_step[0] == 2
    assert viewer.layers["pred"].metadata[FOCUS_KEY] == (2, 32, 64, 0, 32)
    centre = viewer.scene.camera.center[-2:]
    assert centre == pytest.approx((48.0, 16.0), abs=0.5)
    # a slice unit clears the focus: 'Mark patch reviewed' must not mark a stale patch
    widget._units.value = "slices"
    assert [u.label for u in widget.queue[:2]] == ["slice 2", "slice 1"]
    widget.jump_to(0)
    assert FOCUS_KEY not in viewer.layers["pred"].metadata


def test_reviewed_patches_and_slices_leave_the_patch_queue(make_napari_viewer):
    viewer, widget = _viewer(make_napari_viewer, *_stack())
    widget._tile.value = 32
    widget._units.value = "patches"
    widget._length.value = 100
    layer = viewer.layers["pred"]
    layer.metadata[REVIEWED_PATCHES_KEY] = {(2, 32, 64, 0, 32)}
    layer.metadata[queue_module.REVIEWED_KEY] = {1}
    widget.refresh()
    labels = [u.label for u in widget.queue]
    assert len(labels) == 16 - 1 - 4
    assert "slice 2, y 32-64, x 0-32" not in labels
    assert not any(lab.startswith("slice 1,") for lab in labels)
    assert "1 slice and 1 patch reviewed" in widget._status.value


def test_class_balanced_puts_classes_rare_among_the_reviewed_first(make_napari_viewer, errors):
    labels = np.ones((6, 32, 32), np.uint8)
    labels[4, :4, :4] = 2  # a little of class 2 on slice 4 only
    viewer, widget = _viewer(make_napari_viewer, labels, np.zeros(labels.shape, np.float32))
    errors.clear()
    viewer.layers["pred"].metadata[queue_module.REVIEWED_KEY] = {0}  # class 1 seen there
    widget._score.value = "mean"
    widget._strategy.value = "class-balanced"
    assert not errors
    assert widget.queue[0].label == "slice 4"
    assert all(u.index != 0 for u in widget.queue)


def test_disagreement_is_random_with_one_version_then_ranks_the_changes(
    make_napari_viewer, errors
):
    labels, unc = _stack()
    viewer, widget = _viewer(make_napari_viewer, labels, unc)
    errors.clear()
    widget._strategy.value = "disagreement"
    assert not errors  # one version so far: every unit scores 0, as in simulate's first round
    assert len(widget.queue) == 4
    assert {u.score for u in widget.queue} == {0.0}
    assert "ranks at random until a round" in widget._status.value
    current = labels.copy()
    previous = labels.copy()
    previous[3, :20] = 0  # the two versions differ most on slice 3, then on slice 0
    previous[0, :5] = 0
    layer = viewer.layers["pred"]
    layer.metadata[ORIGINAL_KEY] = current
    layer.metadata[PREVIOUS_KEY] = previous
    widget._score.value = "mean"
    widget.refresh()
    assert [u.label for u in widget.queue[:2]] == ["slice 3", "slice 0"]


def test_uncertainty_diverse_spreads_a_batch(make_napari_viewer, errors):
    labels = np.zeros((8, 32, 32), np.uint8)
    unc = np.zeros((8, 32, 32), np.float32)
    for z in range(8):  # two looks: foreground on the left (even z) or on the right (odd z)
        labels[z, :, :16] = 1 if z % 2 == 0 else 0
        labels[z, :, 16:] = 1 if z % 2 else 0
        unc[z] = 0.9 - 0.01 * z
    _, widget = _viewer(make_napari_viewer, labels, unc)
    errors.clear()
    widget._length.value = 2
    widget._strategy.value = "uncertainty-diverse"
    assert not errors
    assert len(widget.queue) == 2
    assert {u.index % 2 for u in widget.queue} == {0, 1}  # one of each look, not 0 and 1...
    widget._strategy.value = "uncertainty"
    assert [u.index for u in widget.queue] == [0, 1]  # ...which plain uncertainty picks


def test_reviewed_patch_round_trips_through_the_project_and_the_queue(
    make_napari_viewer, tmp_path, monkeypatch
):
    shown = []
    monkeypatch.setattr(FinetuneWidget, "_error", lambda self, text: shown.append(text))
    monkeypatch.setattr(finetune_module, "show_error", shown.append)
    labels, unc = _stack()
    viewer, queue = _viewer(make_napari_viewer, labels, unc)
    queue._tile.value = 32
    queue._units.value = "patches"
    _, ft = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    assert isinstance(ft, FinetuneWidget)
    ft._image.value = viewer.layers["raw"]
    ft._labels.value = viewer.layers["pred"]
    ft._model.value = "new-2d"
    ft._folder.value = tmp_path / "stack.segtool"
    assert not ft.toggle_patch()  # nothing shown by the Queue yet: a notification
    assert shown
    assert "click a patch in the Queue" in shown[-1]
    queue.jump_to(0)
    viewer.dims.set_current_step(0, 0)  # scrolled away: the Queue's patch is not in view
    assert not ft.toggle_patch()
    assert "on slice 2, this is slice 0" in shown[-1]
    queue.jump_to(0)
    assert ft.toggle_patch()
    assert ft.state.reviewed_patches == {(2, 32, 64, 0, 32)}
    assert "1 patch" in ft._reviewed.value
    # the Queue ranks again by itself: no refresh() here
    assert all(u.label != "slice 2, y 32-64, x 0-32" for u in queue.queue)
    assert queue.queue[0].label == "slice 1, y 0-32, x 32-64"
    labelled = ft.state.labelled()
    assert labelled[2, 32:64, 0:32].all()
    assert labelled.sum() == 32 * 32
    ft.save_now()
    on_disk = Project(tmp_path / "stack.segtool").load()
    assert on_disk.reviewed_patches == {(2, 32, 64, 0, 32)}
    assert on_disk.labelled()[2, 32:64, 0:32].all()
    # reopened in a fresh viewer: the patch stays out of the queue
    viewer.layers.remove("pred")  # closing the layer saves its project and lets go of it
    viewer2, queue2 = _viewer(make_napari_viewer, labels, unc)
    queue2._tile.value = 32
    queue2._units.value = "patches"
    _, ft2 = viewer2.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    ft2._image.value = viewer2.layers["raw"]
    ft2._labels.value = viewer2.layers["pred"]
    ft2._folder.value = tmp_path / "stack.segtool"
    assert ft2.open_project(), shown
    assert viewer2.layers["pred"].metadata[REVIEWED_PATCHES_KEY] == {(2, 32, 64, 0, 32)}
    queue2.refresh()
    assert queue2.queue[0].label == "slice 1, y 0-32, x 32-64"
    # toggling again unmarks it, and it is back at the top
    queue2.jump_to(0)
    assert ft2.toggle_patch(box=(2, 32, 64, 0, 32))
    queue2.refresh()
    assert queue2.queue[0].label == "slice 2, y 32-64, x 0-32"


def test_learning_curve_plots_rounds_against_painted_voxels(qtbot):
    from napari_segtool._widgets.finetune_display import LearningCurve
    from napari_segtool.io.project_state import ProjectState

    state = ProjectState.start(np.zeros((2, 8, 8), np.uint8))
    state.versions = [
        {"version": 1, "val_dice": 0.5, "painted_voxels": 100, "promoted": True},
        {"version": 2, "val_dice": 0.4, "painted_voxels": 250, "promoted": False},
        {"version": 3, "val_dice": None, "painted_voxels": 300, "promoted": False},
        {"version": 4, "val_dice": 0.7, "painted_voxels": 400, "promoted": True},
        {"version": 5, "val_dice": 0.6, "promoted": True},  # an older project: no effort
    ]
    curve = LearningCurve()
    qtbot.addWidget(curve.canvas)
    curve.show_state(state)
    assert curve.points == [(100, 0.5, True), (250, 0.4, False), (400, 0.7, True)]
    assert list(curve._used.get_xdata()) == [100, 400]
    assert list(curve._kept.get_ydata()) == [0.4]


def test_a_resegmentation_gives_disagreement_both_versions_before_the_queue_reranks(
    make_napari_viewer, tmp_path
):
    """Fine-tune's merge writes the labels and both predictions, then the uncertainty layer
    whose data event re-ranks the Queue: the ranking sees the new pair of versions."""
    labels, unc = _stack()
    viewer, queue = _viewer(make_napari_viewer, labels, unc)
    _, ft = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    ft._image.value = viewer.layers["raw"]
    ft._labels.value = viewer.layers["pred"]
    ft._model.value = "new-2d"
    ft._folder.value = tmp_path / "stack.segtool"
    assert ft.open_project()
    first = labels.copy()
    first[1, :10] = 0  # version 1 differs from the start on slice 1
    ft._merge((first, unc))
    queue._uncertainty.value = viewer.layers["raw uncertainty"]
    queue._score.value = "mean"
    queue._strategy.value = "disagreement"
    assert [u.label for u in queue.queue[:1]] == ["slice 1"]
    second = first.copy()
    second[3, :30] = 0  # version 2 differs from version 1 on slice 3 only
    ft._merge((second, unc))  # no refresh() here: the uncertainty layer's data event
    assert queue.queue[0].label == "slice 3"
    assert queue.queue[0].score == pytest.approx(30 / 64)
    assert {u.score for u in queue.queue[1:]} == {0.0}


def test_a_layer_that_is_not_an_uncertainty_map_is_refused_for_effort_too(
    make_napari_viewer, errors
):
    labels, unc = _stack()
    unc[0, 0, 0] = 7.5  # a raw intensity, not an uncertainty: its sum would be no effort
    _, widget = _viewer(make_napari_viewer, labels, unc)
    errors.clear()
    widget._strategy.value = "random"
    assert widget.queue == []
    assert errors
    assert "not an uncertainty map in [0, 1]" in errors[-1]
