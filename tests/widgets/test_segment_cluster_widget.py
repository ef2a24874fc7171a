"""The Segment widget sends an OME-Zarr image's file to a dask scheduler (issue 15)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_segtool._widgets import segment as segment_module
from napari_segtool._widgets.segment import SegmentWidget
from napari_segtool._widgets.segment_cluster import CLUSTER_OUTPUT_KEY
from napari_segtool.cli import main
from napari_segtool.io.zarr_io import read_zarr, write_ome_zarr

pytest.importorskip("napari_ome_zarr")

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
SPACING = (2.0, 0.5, 0.5)


@pytest.fixture
def on_cluster(make_napari_viewer, tmp_path, monkeypatch):
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:4, :256, :256]
    path = write_ome_zarr(tmp_path / "em.ome.zarr", em, spacing=SPACING, chunks=(1, 256, 256))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-ome-zarr")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    assert isinstance(widget, SegmentWidget)
    widget._image.value = layer
    widget._model.value = "em-membranes-2d"
    widget._precision.value = "fp32"
    widget._compile.value = "off"
    widget._device.value = "cpu"
    widget._scheduler.value = "local:1"
    errors: list[str] = []
    monkeypatch.setattr(segment_module, "show_error", errors.append)
    return viewer, widget, layer, path, errors


def run(qtbot, widget):
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=180_000)


def test_a_cluster_run_opens_the_in_process_labels_lazily_and_a_rerun_resumes(
    on_cluster, qtbot, tmp_path
):
    viewer, widget, layer, path, errors = on_cluster
    ref, ref_unc = tmp_path / "ref.zarr", tmp_path / "ref_unc.zarr"
    code = main(["segment", str(path), "-o", str(ref), "--tta", "--uncertainty", str(ref_unc),
                 "--precision", "fp32", "--compile", "off", "--device", "cpu"])  # fmt: skip
    assert code == 0
    run(qtbot, widget)
    assert errors == []
    out = tmp_path / "em_labels.zarr"
    assert "1 workers: " in widget._status.value
    assert str(out) in widget._status.value
    assert widget._progress.value == 100
    result = viewer.layers[-1]
    assert result.metadata[CLUSTER_OUTPUT_KEY] == str(out)
    assert result.multiscale  # a pyramid, read lazily
    np.testing.assert_array_equal(np.asarray(result.data[0]), read_zarr(ref).data[...])
    assert tuple(result.scale) == SPACING
    unc = viewer.layers[f"{layer.name} uncertainty"]  # flip TTA, the widget's default
    np.testing.assert_array_equal(np.asarray(unc.data), read_zarr(ref_unc).data[...])
    run(qtbot, widget)  # the same run again: everything was done
    assert errors == []
    assert "0 boxes computed" in widget._status.value


def test_bad_schedulers_and_layers_without_a_file_are_notifications(on_cluster):
    viewer, widget, _layer, _path, errors = on_cluster
    widget._scheduler.value = "local:many"
    assert widget.start() is None
    assert "local:N needs N workers" in errors[-1]
    widget._scheduler.value = "local:1"
    widget._image.value = viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="in memory")
    assert widget.start() is None
    assert "has no file" in errors[-1]
