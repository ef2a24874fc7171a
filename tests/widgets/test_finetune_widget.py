import json

import numpy as np
import pytest

from napari_segtool._widgets import finetune as finetune_module
from napari_segtool._widgets import finetune_session
from napari_segtool._widgets.finetune import FinetuneWidget
from napari_segtool.io.project import Project
from tests.training.conftest import blobs, tiny_model


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(finetune_module, "show_error", shown.append)
    return shown


@pytest.fixture
def setup(make_napari_viewer, tmp_path, qtbot):
    """A viewer with an image, a Segment-widget prediction and the Fine-tune widget."""
    viewer = make_napari_viewer()
    image, truth = blobs((4, 64, 64))
    viewer.add_image(image, name="cells")
    model_file = tiny_model().save(tmp_path / "start.pt")
    _, seg = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    seg._model.value = "model file..."
    seg._model_file.value = model_file
    seg._tile.value = "64, 64"
    assert seg.start() is not None
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60_000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    assert isinstance(widget, FinetuneWidget)
    widget._labels.value = viewer.layers["cells prediction"]
    widget._folder.value = tmp_path / "cells.segtool"
    widget._epochs.value = 2
    widget._steps.value = 4
    widget._lr.value = 0.01
    widget._device.value = "cpu"
    return viewer, widget, truth


def test_correct_review_finetune_keeps_corrections(setup, qtbot, errors):
    viewer, widget, truth = setup
    layer = viewer.layers["cells prediction"]
    assert widget.open_project()
    # a correction on slice 1 through napari's brush
    layer.brush_size = 9
    layer.paint((1, 30, 30), 1)
    painted = layer.data[1].copy()
    # slice 2 fixed by hand and marked reviewed through the shortcut's handler
    wrong = truth[2] != layer.data[2]
    ys, xs = np.nonzero(wrong)
    for value in (0, 1):
        pick = truth[2][wrong] == value
        layer.data_setitem((np.full(int(pick.sum()), 2), ys[pick], xs[pick]), value)
    assert np.array_equal(layer.data[2], truth[2])
    viewer.dims.set_current_step(0, 2)
    widget._key_reviewed(viewer)
    assert widget.state.reviewed == {2}
    assert widget.state.painted[1].sum() > 0
    worker = widget.start()
    assert worker is not None
    assert widget._run.text == "Cancel"
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert not errors
    assert [v["version"] for v in widget.state.versions] == [1]
    assert (widget.project.folder / "models" / "v0001.pt").exists()
    # the learning curve: the round's val Dice at the voxels painted when it was recorded
    entry = widget.state.versions[0]
    assert entry["painted_voxels"] == int(widget.state.painted.sum()) > 0
    assert entry["val_dice"] is not None
    assert widget.learning.points == [
        (entry["painted_voxels"], entry["val_dice"], entry["promoted"])
    ]
    assert widget.versions.rowCount() == 2
    # promoted or not, re-segmenting keeps the painted slice region and the reviewed slice
    if widget.state.versions[0]["promoted"]:  # then it re-segments by itself first
        qtbot.waitUntil(lambda: "re-segmented" in widget._status.value, timeout=60_000)
    widget._status.value = ""
    assert widget.resegment() is not None
    qtbot.waitUntil(lambda: "re-segmented" in widget._status.value, timeout=60_000)
    assert np.array_equal(layer.data[2], truth[2])
    stroke = widget.state.painted[1]
    assert np.array_equal(layer.data[1][stroke], painted[stroke])
    # the project on disk has the same corrections and the reviewed slice
    widget.save_now()
    saved = Project(widget.project.folder).load()
    assert saved.reviewed == {2}
    assert np.array_equal(saved.labels, layer.data)


def test_cancel_keeps_the_model_in_use(setup, qtbot):
    _viewer, widget, _ = setup
    widget._epochs.value = 50
    widget._steps.value = 50
    assert widget.open_project()
    widget.state.reviewed = {0, 1, 3}
    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        qtbot.waitUntil(lambda: widget._progress.value > 0, timeout=30_000)
        widget.cancel()
    assert widget.state.versions == []
    assert not (widget.project.folder / "models").exists()
    assert widget._run.text == "Fine-tune"
    assert "cancelled" in widget._status.value


def test_reopening_restores_corrections(setup, qtbot, make_napari_viewer):
    viewer, widget, _ = setup
    layer = viewer.layers["cells prediction"]
    assert widget.open_project()
    layer.paint((3, 20, 20), 2)
    widget.toggle_reviewed()
    widget.save_now()
    edited = layer.data.copy()
    layer.data = np.zeros_like(edited)  # the user loses the layer's content
    assert widget.open_project()  # same folder: restored from disk
    assert np.array_equal(layer.data, edited)
    # and what the layer held just before is kept, not overwritten
    assert not viewer.layers["cells prediction before restore"].data.any()
    assert widget.state.painted.sum() > 0


def test_bad_setup_is_a_notification(make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="img")
    viewer.add_labels(np.zeros((2, 16, 16), np.uint8), name="other")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    widget._labels.value = viewer.layers["other"]
    assert not widget.open_project()
    assert "pick the prediction of this image" in errors[-1]
    assert widget.start() is None


def test_ground_truth_layer_trains_without_corrections(setup, qtbot, errors):
    viewer, widget, truth = setup
    viewer.add_labels(truth, name="cells truth")
    widget._truth.value = viewer.layers["cells truth"]
    assert widget.open_project()
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    if widget.state.versions[0]["promoted"]:  # then it re-segments the untouched voxels
        qtbot.waitUntil(lambda: "re-segmented" in widget._status.value, timeout=60_000)
    assert not errors
    entry = widget.state.versions[0]
    assert entry["labelled_voxels"] == truth.size
    assert entry["val_dice"] is not None


def test_closing_the_widget_gives_its_shortcut_back(make_napari_viewer, qtbot):
    """Issue 11: widgets unbind what they bind; an earlier binding of the key comes back."""
    from napari.utils.key_bindings import coerce_keybinding

    viewer = make_napari_viewer()
    key = coerce_keybinding(finetune_session.REVIEW_KEY)
    calls = []

    def earlier(_viewer):
        calls.append(1)

    viewer.bind_key(finetune_session.REVIEW_KEY, earlier)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    assert viewer.keymap[key] is widget._key_handler
    viewer.window.remove_dock_widget(dock)
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: widget._closed, timeout=5_000)
    assert viewer.keymap[key] is earlier
    # and without an earlier binding the key is free again
    viewer.bind_key(finetune_session.REVIEW_KEY, None)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
    assert viewer.keymap[key] is widget._key_handler
    viewer.window.remove_dock_widget(dock)
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: widget._closed, timeout=5_000)
    assert key not in viewer.keymap
    assert calls == []


def test_a_round_run_on_the_command_line_shows_when_the_project_is_reopened(
    setup, tmp_path, capsys, errors
):
    """Issue 11: annotate here, train headless, reopen: the new version is listed and used."""
    from napari_segtool.cli import main
    from napari_segtool.io import write_image
    from napari_segtool.workflows import create_project

    viewer, widget, truth = setup
    image = write_image(tmp_path / "cells.tif", viewer.layers["cells"].data)
    folder = tmp_path / "cells.segtool"
    create_project(Project(folder), labels=truth, image_shape=truth.shape, reviewed=[0, 1, 2],
                   base_model=str(tmp_path / "start.pt"))  # fmt: skip
    argv = ["finetune", str(folder), "--image", str(image), "--epochs", "2",
            "--steps-per-epoch", "6", "--learning-rate", "0.01", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    saved = Project(folder).load()
    assert widget.open_project()  # the command let the project go when its round ended
    assert not errors
    assert [v["version"] for v in widget.state.versions] == [1]
    assert widget.state.current_version == (1 if out["promoted"] else None)
    assert widget.versions.rowCount() == 2
    assert widget.versions.item(1, 0).text() == "1"
    assert widget.versions.item(1, 1).text() == f"{out['val_dice']:.4f}"
    assert widget.versions.item(1, 3).text() == ("yes" if out["promoted"] else "")
    assert np.array_equal(viewer.layers["cells prediction"].data, saved.labels)
