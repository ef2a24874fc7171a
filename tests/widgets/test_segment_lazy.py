"""Segment on an OME-Zarr opened with napari-ome-zarr: a chunked project fills in a viewer."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from qtpy.QtCore import QTimer

from napari_segtool import config as segtool_config
from napari_segtool._widgets import segment as segment_module
from napari_segtool._widgets.segment import SegmentWidget
from napari_segtool._widgets.segment_lazy import PROJECT_KEY
from napari_segtool.config import InferenceConfig
from napari_segtool.inference import predict
from napari_segtool.inference.predict import segment
from napari_segtool.io.project import Project, default_project_dir
from napari_segtool.io.zarr_io import write_ome_zarr
from napari_segtool.model import load_model

pytest.importorskip("napari_ome_zarr")
logger = logging.getLogger(__name__)

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


@pytest.fixture
def lazy_image(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setattr(segtool_config, "LAZY_SEGMENT_VOXELS", 1000)
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 96 * 96)  # 2D model: 3 blocks of slices
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:6, 100:196, 200:296]
    path = write_ome_zarr(tmp_path / "em.ome.zarr", em, spacing=(2.0, 0.5, 0.5),
                          chunks=(1, 64, 64))  # fmt: skip
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-ome-zarr")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    assert isinstance(widget, SegmentWidget)
    widget._image.value = layer
    widget._model.value = "em-membranes-2d"
    widget._tile.value = "64, 64"
    widget._precision.value = "fp32"  # "auto" may pick bf16 by timing: not reproducible
    widget._compile.value = "off"
    return viewer, widget, layer, em, path


def run(qtbot, widget):
    worker = widget.start()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)
    return worker


class Heartbeat:
    """The longest gap between 5 ms timer ticks: how long the UI thread was held."""

    def __init__(self):
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.last = self.longest = 0.0

    def _tick(self):
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def __enter__(self):
        self.last = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()


def test_segments_into_a_chunked_project_and_keeps_painted_voxels(lazy_image, qtbot):
    viewer, widget, image_layer, em, path = lazy_image
    assert not isinstance(image_layer.data[0] if image_layer.multiscale else image_layer.data,
                          np.ndarray)  # fmt: skip
    with Heartbeat() as beat:
        run(qtbot, widget)
    logger.info("longest UI stall during a lazy Segment run: %.0f ms", 1000 * beat.longest)
    folder = default_project_dir(path)
    labels = viewer.layers[f"{image_layer.name} prediction"]
    assert isinstance(labels.data, zarr.Array)
    assert Path(str(labels.data.store.root)).resolve() == (folder / "state.zarr").resolve()
    assert labels.metadata[PROJECT_KEY] == str(folder)
    assert tuple(labels.scale) == tuple(image_layer.scale)
    state = Project(folder).load()
    lo, hi = state.image["value_range"]
    config = InferenceConfig(tile_shape=(64, 64), tta=True, precision="fp32", compile="off",
                             device=str(widget._device.value))  # fmt: skip
    ref = segment(em, load_model("em-membranes-2d"), config=config,
                  value_range=(np.array([lo]), np.array([hi])))  # fmt: skip
    np.testing.assert_array_equal(labels.data[:], ref.labels)
    assert 0.05 < ref.labels.mean() < 0.6  # EM: some membrane, mostly cell interior
    unc = viewer.layers[f"{image_layer.name} uncertainty"]
    np.testing.assert_allclose(np.asarray(unc.data), ref.uncertainty, atol=1e-4)
    assert widget._progress.value == 100

    # the user paints and fills (label 5 and 7 are no class of the model), then segments again
    viewer.dims.set_current_step(0, 2)
    labels.brush_size = 6
    labels.paint((2, 20, 20), 5)
    labels.fill((4, 50, 50), 7)
    painted = Project(folder).load().painted[:]
    assert painted[2].any()
    assert painted[4].any()
    before = labels.data[:]
    assert (before[2][painted[2]] == 5).all()
    assert (before[4][painted[4]] == 7).all()
    run(qtbot, widget)
    after = viewer.layers[f"{image_layer.name} prediction"].data[:]
    np.testing.assert_array_equal(after[painted], before[painted])
    np.testing.assert_array_equal(after[~painted], ref.labels[~painted])
    assert f"{image_layer.name} prediction [1]" not in viewer.layers  # the layer was reused


def test_cancel_leaves_a_loadable_project(lazy_image, qtbot):
    _viewer, widget, _image_layer, _, path = lazy_image
    widget._batch.value = 1
    worker = widget.start()
    qtbot.waitUntil(lambda: widget._progress.value > 0, timeout=120_000)
    widget._run.changed.emit(True)  # the Cancel click
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert worker is not None
    assert widget._status.value.startswith("cancelled")
    state = Project(default_project_dir(path)).load()
    assert "value_range" in state.image
    assert state.painted_voxels() == 0
    assert widget._run.text == "Segment"


def test_a_lazy_layer_without_a_file_is_refused(make_napari_viewer, monkeypatch):
    import dask.array as da

    shown = []
    monkeypatch.setattr(segment_module, "show_error", shown.append)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    viewer.add_image(da.zeros((4, 32, 32), chunks=(1, 32, 32)), name="lazy")
    assert widget.start() is None
    assert "open it from a file" in shown[-1]
    assert "napari-segtool convert" in shown[-1]
