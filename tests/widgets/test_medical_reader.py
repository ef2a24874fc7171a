"""The medical reader and writer through napari's own plugin machinery (npe2 manifest)."""

import numpy as np
import SimpleITK as sitk  # noqa: N813

from napari_segtool.io.medical import GEOMETRY_KEY
from tests.io.medical_data import (
    DIRECTIONS,
    ORIGIN,
    SPACING,
    image,
    physical,
    volume,
    write_dicom_series,
)

TOL = {"rtol": 1e-6, "atol": 1e-5}


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), **TOL)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), **TOL)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), **TOL)


def test_open_segment_and_save_keep_the_source_geometry(make_napari_viewer, qtbot, tmp_path):
    data = volume((4, 48, 40))
    src = image(data)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(src, str(path))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin="napari-segtool")
    assert layer.name == "ct"
    assert layer.data.shape == (4, 48, 40)
    np.testing.assert_allclose(layer.scale, SPACING[::-1], **TOL)
    np.testing.assert_allclose(layer.translate, ORIGIN[::-1], **TOL)
    direction = layer.metadata[GEOMETRY_KEY]["direction"]
    np.testing.assert_allclose(direction, DIRECTIONS["rotation"][::-1, ::-1], **TOL)

    _, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Segment")
    widget._image.value = layer
    widget._model.value = "new-2d"
    widget._tile.value = "32, 32"
    widget._tta.value = False
    widget._device.value = "cpu"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    prediction = viewer.layers["ct prediction"]
    assert prediction.metadata[GEOMETRY_KEY] == layer.metadata[GEOMETRY_KEY]

    prediction.data[2, 30, 7] = 5  # a marked voxel, in the array's (z, y, x)
    out = tmp_path / "ct_labels.nii.gz"
    prediction.save(str(out), plugin="napari-segtool")
    back = sitk.ReadImage(str(out))
    _same_geometry(back, src)
    arr = sitk.GetArrayFromImage(back)
    np.testing.assert_array_equal(arr, prediction.data)
    ((k, j, i),) = np.argwhere(arr == 5)
    np.testing.assert_allclose(
        back.TransformIndexToPhysicalPoint((int(i), int(j), int(k))),
        physical(src, (2, 30, 7)),
        atol=1e-4,
    )


def test_a_labels_layer_without_a_source_is_saved_with_its_scale(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((3, 8, 9), np.uint8)
    labels[1, 2:4, 5] = 2
    layer = viewer.add_labels(labels, scale=(3.0, 0.5, 0.25), translate=(1.0, 2.0, 4.0))
    out = tmp_path / "drawn.mha"
    layer.save(str(out), plugin="napari-segtool")
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetSpacing(), (0.25, 0.5, 3.0))
    np.testing.assert_allclose(back.GetOrigin(), (4.0, 2.0, 1.0))
    np.testing.assert_allclose(back.GetDirection(), np.eye(3).ravel())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


def test_a_dicom_folder_opens_as_one_volume(make_napari_viewer, tmp_path):
    hu = volume((3, 8, 10))
    write_dicom_series(tmp_path / "series", hu, names=["z.dcm", "x.dcm", "y.dcm"])
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "series", plugin="napari-segtool")
    assert layer.name == "series"
    np.testing.assert_array_equal(layer.data, hu)
    np.testing.assert_allclose(layer.scale, SPACING[::-1], rtol=1e-5)
    np.testing.assert_allclose(layer.translate, ORIGIN[::-1], atol=1e-4)
