from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_segtool._widgets import segment as segment_module
from napari_segtool._widgets.segment import SegmentWidget, parse_tile_shape
from napari_segtool.errors import InputError

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    assert isinstance(widget, SegmentWidget)
    return viewer, widget


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(segment_module, "show_error", shown.append)
    return shown


def run(qtbot, widget):
    worker = widget.start()
    assert worker is not None
    # not waitSignal: a worker that fails at once can finish before a late connection
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    return worker


def test_segments_a_stack_into_a_scaled_labels_layer(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[20:23, 100:196, 200:280]
    viewer.add_image(
        em,
        name="cells",
        scale=(2.0, 0.5, 0.5),
        translate=(1.0, 0.0, 3.0),
    )
    widget._model.value = "em-membranes-2d"
    widget._tile.value = "64, 64"
    widget._tta.value = True
    run(qtbot, widget)
    labels = viewer.layers["cells prediction"]
    assert labels.data.shape == (3, 96, 80)
    assert labels.data.dtype == np.uint8
    assert tuple(labels.scale) == (2.0, 0.5, 0.5)
    assert tuple(labels.translate) == (1.0, 0.0, 3.0)
    assert 0.05 < labels.data.mean() < 0.6  # EM: some membrane, mostly cell interior
    unc = viewer.layers["cells uncertainty"]
    assert unc.data.shape == (3, 96, 80)
    assert widget._run.text == "Segment"
    assert widget._progress.value == 100


def test_cancel_stops_the_worker(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    viewer.add_image(np.random.default_rng(1).random((40, 256, 256), dtype=np.float32), name="big")
    widget._model.value = "new-2d"
    widget._tile.value = "32, 32"
    widget._batch.value = 1
    worker = widget.start()
    assert widget._run.text == "Cancel"
    with qtbot.waitSignal(worker.yielded, timeout=60_000):
        pass
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        widget._run.changed.emit(True)  # the Cancel click
    assert worker.abort_requested
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5_000)
    assert "big prediction" not in viewer.layers
    assert widget._run.text == "Segment"
    assert widget._status.value == "cancelled"
    assert widget.worker is None


def test_rerun_keeps_an_edited_prediction(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    viewer.add_image(np.random.default_rng(2).random((64, 64), dtype=np.float32), name="im")
    widget._model.value = "new-2d"
    run(qtbot, widget)
    first = viewer.layers["im prediction"]
    run(qtbot, widget)  # unedited: updated in place, no new layer
    # flip TTA is on by default: the uncertainty sits under the labels, never over them
    assert [la.name for la in viewer.layers] == ["im", "im uncertainty", "im prediction"]
    first.data_setitem((np.array([5, 6]), np.array([5, 6])), 7)  # the user corrects it
    edited = first.data.copy()
    run(qtbot, widget)
    names = [la.name for la in viewer.layers]
    assert len(names) == 4
    np.testing.assert_array_equal(viewer.layers["im prediction"].data, edited)


@pytest.mark.parametrize(
    ("data", "rgb", "message"),
    [
        (np.full((32, 32), 3, np.uint8), False, "constant"),
        (
            np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8),
            True,
            "input channel",
        ),
    ],
)
def test_bad_input_becomes_a_notification(viewer_and_widget, qtbot, errors, data, rgb, message):
    viewer, widget = viewer_and_widget
    viewer.add_image(data, name="bad", rgb=rgb)
    widget._model.value = "new-2d"
    run(qtbot, widget)
    assert len(errors) == 1
    assert message in errors[0]
    assert "bad prediction" not in viewer.layers
    assert widget._status.value == "failed"


def test_no_image_and_bad_tile_are_notifications(viewer_and_widget, errors):
    viewer, widget = viewer_and_widget
    assert widget.start() is None
    assert "no image layer" in errors[-1]
    viewer.add_image(np.arange(64.0).reshape(8, 8), name="x")
    widget._tile.value = "big"
    assert widget.start() is None
    assert "not a list of integers" in errors[-1]


def test_parse_tile_shape():
    assert parse_tile_shape("256, 256") == (256, 256)
    assert parse_tile_shape("32x128x128") == (32, 128, 128)
    assert parse_tile_shape("model default") is None
    with pytest.raises(InputError):
        parse_tile_shape("0, 5")


def test_missing_model_file_is_a_notification(viewer_and_widget, qtbot, errors, tmp_path):
    viewer, widget = viewer_and_widget
    viewer.add_image(np.random.default_rng(3).random((32, 32)), name="im")
    widget._model.value = "model file..."
    assert not widget._model_file.native.isHidden()
    widget._model_file.value = tmp_path / "gone.pt"
    run(qtbot, widget)
    assert "gone.pt: no such model file" in errors[-1]
    assert "im prediction" not in viewer.layers
