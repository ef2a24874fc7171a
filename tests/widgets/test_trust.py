"""Regression tests for issue 10's GUI items: nothing the user made is overwritten, pickers
start on the right layers, the work stays visible, scrolling is not editing."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_segtool._sample_data import isbi_em
from napari_segtool._widgets import finetune as finetune_module
from napari_segtool._widgets import queue as queue_module
from napari_segtool._widgets import review as review_module
from napari_segtool._widgets.demo import correct_like_a_user
from napari_segtool._widgets.segment import ORIGINAL_KEY
from napari_segtool.io.project import Project
from napari_segtool.layer_roles import IMAGE, PREDICTION, REFERENCE, ROLE_KEY, UNCERTAINTY
from napari_segtool.metrics import ConfusionTracker
from tests.training.conftest import blobs, tiny_model

PLUGIN = "napari-segtool"


@pytest.fixture
def errors(monkeypatch):
    shown = []
    for module in (finetune_module, queue_module, review_module):
        monkeypatch.setattr(module, "show_error", shown.append)
    return shown


def _segment(viewer, qtbot, tmp_path, image_name="cells"):
    """Segment ``image_name`` with a tiny model through the Segment widget (TTA default)."""
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg._model.value = "model file..."
    seg._model_file.value = tiny_model().save(tmp_path / "start.pt")
    seg._tile.value = "64, 64"
    assert seg._tta.value is True  # item 20: the Queue's uncertainty comes by default
    assert seg.start() is not None
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60_000)
    return viewer.layers[f"{image_name} prediction"]


@pytest.fixture
def cells(make_napari_viewer, qtbot, tmp_path):
    """Image, reference (as the sample data marks it) and a Segment prediction."""
    viewer = make_napari_viewer()
    image, truth = blobs((4, 64, 64))
    viewer.add_image(image, name="cells", metadata={ROLE_KEY: IMAGE})
    viewer.add_labels(truth, name="cells reference", metadata={ROLE_KEY: REFERENCE})
    prediction = _segment(viewer, qtbot, tmp_path)
    return viewer, prediction, viewer.layers["cells reference"], truth


# -- items 1 and 19: a restore never writes into a layer the user did not open it on ---------
def test_closing_the_prediction_never_writes_into_the_reference(cells, tmp_path, errors):
    viewer, prediction, reference, truth = cells
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert widget._labels.value is prediction  # item 15: by role, not the first Labels layer
    widget._folder.value = tmp_path / "cells.segtool"
    assert widget.open_project()
    prediction.brush_size = 7
    prediction.paint((1, 30, 30), 2)
    painted = prediction.data.copy()
    viewer.layers.remove(prediction)  # the picker falls back to the reference...
    assert np.array_equal(reference.data, truth)  # ...which is left alone
    assert "before restore" not in " ".join(layer.name for layer in viewer.layers)
    saved = Project(tmp_path / "cells.segtool").load()  # closing saved the last edits
    assert np.array_equal(saved.labels, painted)
    widget._labels.value = reference  # picked by hand: still nothing written
    assert np.array_equal(reference.data, truth)
    assert not widget.open_project()  # and Open refuses to write into a reference
    assert "reference layer" in errors[-1]
    assert np.array_equal(reference.data, truth)


def test_picking_a_layer_never_restores(cells, tmp_path):
    viewer, prediction, _, _ = cells
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget._folder.value = tmp_path / "cells.segtool"
    assert widget.open_project()
    prediction.paint((0, 10, 10), 2)
    widget.save_now()
    scratch = viewer.add_labels(np.full(prediction.data.shape, 3, np.uint8), name="scratch")
    widget._labels.value = scratch
    assert (scratch.data == 3).all()
    assert "Open restores it" in widget._status.value
    assert widget._layer is prediction  # the project stays on the layer it was opened on


def test_a_script_that_ends_without_closing_saves_and_exits_cleanly(tmp_path):
    """Item 19: no abort from a parentless QTimer at exit, and the final save happens."""
    folder = tmp_path / "p.segtool"
    script = textwrap.dedent(f"""
        import numpy as np, napari
        from napari_segtool.layer_roles import ROLE_KEY
        viewer = napari.Viewer(show=False)
        viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="im")
        layer = viewer.add_labels(np.zeros((2, 32, 32), np.uint8), name="im prediction",
                                  metadata={{ROLE_KEY: "prediction"}})
        _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
        widget._model.value = "new-2d"
        widget._folder.value = {str(folder)!r}
        assert widget.open_project()
        layer.paint((1, 16, 16), 1)
        print("painted", int((layer.data == 1).sum()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    painted = int(out.stdout.split()[-1])
    assert painted > 0
    assert int((Project(folder).load().labels == 1).sum()) == painted


# -- items 2 and 15: defaults by role ---------------------------------------------------------
def test_pickers_start_on_roles_and_follow_new_layers(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    for data, meta, kind in isbi_em():
        crop = data[:3, :64, :64]
        (viewer.add_image if kind == "image" else viewer.add_labels)(crop, **meta)
    image, reference = viewer.layers
    assert reference.metadata[ROLE_KEY] == REFERENCE
    # item 3: the reference has a colour of its own, not the prediction's label 1 colour
    ref_colour = reference.colormap.map(1)
    assert np.allclose(ref_colour[:3], (0, 1, 1))
    _, review = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    _, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    _, queue = viewer.window.add_plugin_dock_widget(PLUGIN, "Queue")
    queue._strategy.value = "uncertainty"  # these tests rank by it
    assert review._reference.value is reference
    assert queue._uncertainty.value is not image  # never the raw image as "uncertainty"
    # the prediction and its uncertainty arrive: every picker moves to them
    pred = viewer.add_labels((crop > 100).astype(np.uint8), name="isbi2012 em prediction",
                             metadata={ROLE_KEY: PREDICTION})  # fmt: skip
    unc = viewer.add_image(np.full(crop.shape, 0.5, np.float32), name="isbi2012 em uncertainty",
                           metadata={ROLE_KEY: UNCERTAINTY})  # fmt: skip
    assert review._edited.value is pred
    assert review._reference.value is reference
    assert finetune._labels.value is pred
    assert finetune._image.value is image
    assert queue._labels.value is pred
    assert queue._uncertainty.value is unc
    assert queue.queue  # ranked from the uncertainty map
    errors.clear()
    queue._uncertainty.value = image  # picked by hand: refused, with the reason
    assert queue.refresh() == []
    assert "not an uncertainty map" in errors[-1]


# -- item 3: the uncertainty never covers the labels ------------------------------------------
def test_uncertainty_layer_sits_below_the_labels(cells):
    viewer, prediction, _, _ = cells
    names = [layer.name for layer in viewer.layers]
    unc = viewer.layers["cells uncertainty"]
    assert names.index("cells uncertainty") < names.index("cells reference")
    assert names.index("cells uncertainty") < names.index("cells prediction")
    assert unc.opacity < 1
    assert unc.metadata[ROLE_KEY] == UNCERTAINTY
    assert prediction.metadata[ROLE_KEY] == PREDICTION


# -- item 13: a Z-slider step is not an edit --------------------------------------------------
def test_slider_steps_do_not_recount_but_undo_does(make_napari_viewer, monkeypatch):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    ref = (rng.random((6, 40, 40)) < 0.3).astype(np.uint8)
    reference = viewer.add_labels(ref, name="ref")
    edited = viewer.add_labels(ref.copy(), name="pred")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    widget._edited.value, widget._reference.value = edited, reference
    recounts = []
    original = review_module.ReviewWidget.recount

    def counting(self):
        recounts.append(1)
        original(self)

    monkeypatch.setattr(review_module.ReviewWidget, "recount", counting)
    for z in (1, 2, 3, 4, 5, 0):
        viewer.dims.set_current_step(0, z)
    assert recounts == []
    edited.brush_size = 5
    edited.paint((2, 20, 20), 0)
    assert recounts == []  # a paint is counted from its event
    edited.undo()
    assert recounts == [1]
    assert widget.value("dice") == "1.0000"


def test_worker_recount_keeps_edits_made_meanwhile(make_napari_viewer, qtbot, monkeypatch):
    """Items 13/18 and issue 11's wrong number: big volumes recount in a worker; paints made
    while it counts are replayed on its counts, and the effort is recounted too."""
    monkeypatch.setattr(review_module, "RECOUNT_IN_WORKER", 100)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    ref = (rng.random((6, 48, 48)) < 0.4).astype(np.uint8)
    pred = ref.copy()
    pred[2, 10:20, 10:20] = 1 - pred[2, 10:20, 10:20]
    original = pred.copy()
    original.setflags(write=False)
    reference = viewer.add_labels(ref, name="ref")
    edited = viewer.add_labels(pred, name="pred", metadata={ORIGINAL_KEY: original})
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    widget._edited.value, widget._reference.value = edited, reference
    qtbot.waitUntil(lambda: widget.tracker is not None and not widget._recounting, timeout=10_000)
    edited.data_setitem((np.array([3, 3]), np.array([5, 6]), np.array([5, 6])), 2)
    edited.undo()  # starts a worker recount...
    assert widget._recounting
    edited.data_setitem((np.array([4, 4, 4]), np.array([7, 8, 9]), np.array([7, 8, 9])), 3)
    qtbot.waitUntil(lambda: not widget._recounting, timeout=10_000)  # ...with an edit meanwhile
    fresh = ConfusionTracker(edited.data, reference.data)
    np.testing.assert_array_equal(widget.tracker.totals(), fresh.totals())
    effort = ConfusionTracker(edited.data, original)
    changed = int(effort.totals().sum() - np.trace(effort.totals()))
    assert changed == 3
    widget.flush()
    assert widget._effort.value.startswith("3 voxels")


# -- item 14: painting does not redraw the plot every time ------------------------------------
def test_plot_redraws_are_throttled(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    ref = np.zeros((3, 64, 64), np.uint8)
    reference = viewer.add_labels(ref, name="ref")
    edited = viewer.add_labels(ref.copy(), name="pred")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    widget._edited.value, widget._reference.value = edited, reference
    qtbot.wait(600)
    draws = []
    monkeypatch.setattr(type(widget._canvas), "draw_idle", lambda _self: draws.append(1))
    edited.brush_size = 3
    for i in range(20):
        edited.paint((1, 5 + 2 * i, 30), 1)
    assert widget.value("dice") == "0.0000"  # the table follows every event...
    assert draws == []  # ...the plot waits
    qtbot.waitUntil(lambda: len(draws) == 1, timeout=3_000)
    qtbot.wait(2 * review_module.PLOT_EVERY_MS)
    assert len(draws) == 1


# -- item 18: re-segmenting is not the user's effort ------------------------------------------
def test_effort_counts_only_the_users_changes(cells, qtbot, tmp_path, errors):
    viewer, prediction, reference, _ = cells
    _, review = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    assert review._edited.value is prediction
    assert review._reference.value is reference
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget._folder.value = tmp_path / "cells.segtool"
    widget._device.value = "cpu"
    assert widget.open_project()
    before = prediction.data.copy()
    prediction.data_setitem((np.array([1, 1, 1]), np.array([3, 4, 5]), np.array([3, 3, 3])), 2)
    review.flush()
    assert review._effort.value.startswith("3 voxels")
    # a different model writes every untouched voxel
    widget._merge((1 - before, np.zeros(before.shape, np.float32)))
    assert (prediction.data != before).sum() > 1000
    review.flush()
    assert review._effort.value.startswith("3 voxels"), review._effort.value
    assert not errors


# -- item 20: the demo's scripted correction stays inside small slices ------------------------
def test_demo_correction_box_is_clipped_to_the_slice(make_napari_viewer):
    viewer = make_napari_viewer()
    ref = np.zeros((2, 21, 30), np.uint8)
    ref[1, 3:18, 4:26] = 5
    reference = viewer.add_labels(ref, name="ref")
    edited = viewer.add_labels(np.zeros_like(ref), name="pred")
    changed = correct_like_a_user(edited, reference, 1, box=64)
    assert changed == int((ref[1] != 0).sum())
    np.testing.assert_array_equal(edited.data, ref)


# -- item 8: one writer per project -----------------------------------------------------------
def test_a_second_window_on_the_same_project_is_refused(cells, make_napari_viewer, tmp_path,
                                                        errors):  # fmt: skip
    viewer, prediction, _, _ = cells
    folder = tmp_path / "cells.segtool"
    _, first = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    first._folder.value = folder
    assert first.open_project()
    other = make_napari_viewer()
    other.add_image(viewer.layers["cells"].data, name="cells")
    other.add_labels(prediction.data.copy(), name="cells prediction",
                     metadata={ROLE_KEY: PREDICTION})  # fmt: skip
    _, second = other.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    second._folder.value = folder
    assert not second.open_project()
    assert "held by napari-segtool Fine-tune" in errors[-1]
    viewer.layers.remove(prediction)  # closing the layer lets the project go
    assert second.open_project()


# -- item 11: a round saves the state as it is when the round ends ----------------------------
def test_edits_made_during_a_round_survive_its_save(cells, qtbot, tmp_path, errors):
    viewer, prediction, _, _ = cells
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget._folder.value = tmp_path / "cells.segtool"
    widget._epochs.value, widget._steps.value, widget._device.value = 1, 3, "cpu"
    assert widget.open_project()
    widget.state.reviewed = {0, 1, 2}
    assert widget.start() is not None
    prediction.data_setitem((np.array([3]), np.array([40]), np.array([40])), 7)  # meanwhile
    widget.save_now()  # as the autosave would
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    saved = Project(widget.project.folder).load()
    assert [v["version"] for v in saved.versions] == [1]
    assert saved.labels[3, 40, 40] == 7
    assert saved.painted[3, 40, 40]


# -- item 16: multi-class corrections from the GUI --------------------------------------------
def test_a_new_model_learns_a_ct_organ_id_from_the_gui(make_napari_viewer, qtbot, tmp_path,
                                                        errors):  # fmt: skip
    viewer = make_napari_viewer()
    image, truth = blobs((4, 64, 64))
    organs = (truth * 5).astype(np.uint8)  # an organ with TotalSegmentator-style id 5
    viewer.add_image(image, name="ct", metadata={ROLE_KEY: IMAGE})
    viewer.add_labels(organs, name="ct reference", metadata={ROLE_KEY: REFERENCE})
    layer = viewer.add_labels(np.zeros_like(organs), name="ct prediction",
                              metadata={ROLE_KEY: PREDICTION})  # fmt: skip
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget._model.value = "new-2d"
    widget._folder.value = tmp_path / "ct.segtool"
    widget._epochs.value, widget._steps.value, widget._device.value = 1, 2, "cpu"
    assert widget.open_project()
    for z in (0, 1, 2):  # corrected by hand, then marked reviewed
        ys, xs = np.nonzero(organs[z] == 5)
        layer.data_setitem((np.full(ys.size, z), ys, xs), 5)
        viewer.dims.set_current_step(0, z)
        widget.toggle_reviewed()
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert not errors, errors
    entry = widget.state.versions[0]
    from napari_segtool.model import SegmentationModel

    model = SegmentationModel.load(widget.project.folder / entry["file"])
    assert model.label_values == (0, 5)
    if entry["promoted"]:  # let its re-segmentation finish before the viewer closes
        qtbot.waitUntil(lambda: "re-segmented" in widget._status.value, timeout=60_000)
