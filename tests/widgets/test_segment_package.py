"""The Segment widget's "model file..." opens bioimage.io packages napari-segtool exported."""

import zipfile

import numpy as np
import pytest

from napari_segtool._widgets import segment as segment_module
from napari_segtool.config import InferenceConfig
from napari_segtool.inference import segment
from napari_segtool.workflows.sharing import export_bioimageio
from tests.training.conftest import blobs, tiny_model

pytest.importorskip("bioimageio.spec", reason="the [bioimageio] extra")


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(segment_module, "show_error", shown.append)
    return shown


def test_segments_with_a_package_and_refuses_a_foreign_one(
    make_napari_viewer, qtbot, tmp_path, errors
):
    image, _ = blobs((64, 64))
    model = tiny_model()
    package = export_bioimageio(model, tmp_path / "tiny.zip", test_image=image, check=False).path
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    assert "*.zip" in widget._model_file.filter
    widget._model.value = "model file..."
    widget._model_file.value = package
    widget._tile.value = "64, 64"
    widget._tta.value = False
    widget._precision.value = "fp32"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert errors == []
    config = InferenceConfig(tile_shape=(64, 64), device="cpu", precision="fp32", compile="off")
    expected = segment(image, model, config=config).labels
    assert np.array_equal(viewer.layers["cells prediction"].data, expected)

    not_ours = tmp_path / "other.zip"
    with zipfile.ZipFile(not_ours, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nformat_version: 0.5.4\nname: other\n")
    widget._model_file.value = not_ours
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "not a napari-segtool package" in errors[-1]
