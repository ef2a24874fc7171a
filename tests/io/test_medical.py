"""NIfTI, NRRD, MetaImage and DICOM series: geometry kept in (Z, Y, X), checked by SimpleITK."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from napari_segtool import _io_plugins
from napari_segtool.errors import InputError
from napari_segtool.inference import segment
from napari_segtool.io import medical, read_image, write_image
from napari_segtool.io.medical import (
    GEOMETRY_KEY,
    check_same_grid,
    geometry_from_metadata,
    geometry_metadata,
    geometry_mismatch,
)
from tests.io.medical_data import (
    DIRECTIONS,
    ORIGIN,
    PLANE,
    SPACING,
    image,
    physical,
    volume,
    write_dicom_series,
)
from tests.training.conftest import tiny_model

FORMATS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# NIfTI stores spacing and the orientation as float32 (and the direction as a quaternion)
TOL = {"rtol": 1e-6, "atol": 1e-5}


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), **TOL)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), **TOL)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), **TOL)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("suffix", FORMATS)
def test_geometry_is_read_in_zyx_order_as_the_library_places_voxels(tmp_path, suffix, direction):
    data = volume()
    src = image(data, DIRECTIONS[direction])
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(src, str(path))
    f = read_image(path)
    np.testing.assert_array_equal(f.data, data)
    assert f.data.dtype == np.int16
    assert (f.axes, f.unit, f.spatial_ndim) == ("ZYX", "mm", 3)
    np.testing.assert_allclose(f.spacing, SPACING[::-1], **TOL)
    np.testing.assert_allclose(f.origin, ORIGIN[::-1], **TOL)
    np.testing.assert_allclose(f.direction, DIRECTIONS[direction][::-1, ::-1], **TOL)
    # every voxel is where SimpleITK puts it: origin + direction @ (spacing * index), (z, y, x)
    for index in [(0, 0, 0), (4, 13, 6), (5, 19, 23), (2, 0, 17)]:
        ours = np.asarray(f.origin) + np.asarray(f.direction) @ (np.asarray(f.spacing) * index)
        np.testing.assert_allclose(ours[::-1], physical(src, index), atol=1e-4)


@pytest.mark.parametrize("suffix", FORMATS)
def test_labels_are_written_in_the_source_geometry(tmp_path, suffix):
    src = image(volume())
    sitk.WriteImage(src, str(tmp_path / f"ct{suffix}"))
    f = read_image(tmp_path / f"ct{suffix}")
    labels = (f.data > 500).astype(np.uint8) + (f.data > 1200)
    out = tmp_path / "out" / f"labels{suffix}"
    write_image(out, labels, spacing=f.spacing, origin=f.origin, direction=f.direction)
    back = sitk.ReadImage(str(out))
    _assert_same_geometry(back, src)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    assert back.GetPixelID() == sitk.sitkUInt8
    # the temporary folder is gone; a detached header has its data file beside it
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert len(list(out.parent.iterdir())) == (2 if suffix in (".nhdr", ".mhd") else 1)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_2d_images_keep_their_plane_geometry(tmp_path, suffix):
    data = volume((20, 24))
    src = image(data)
    path = tmp_path / f"slice{suffix}"
    sitk.WriteImage(src, str(path))
    f = read_image(path)
    assert f.axes == "YX"
    np.testing.assert_array_equal(f.data, data)
    np.testing.assert_allclose(f.spacing, SPACING[:2][::-1], **TOL)
    np.testing.assert_allclose(f.direction, PLANE[::-1, ::-1], **TOL)
    out = tmp_path / f"mask{suffix}"
    write_image(out, data > 0, spacing=f.spacing, origin=f.origin, direction=f.direction)
    back = sitk.ReadImage(str(out))
    _assert_same_geometry(back, src)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), (data > 0).astype(np.uint8))


def test_class_probabilities_are_vector_pixels(tmp_path):
    probs = np.random.default_rng(1).random((3, 4, 5, 6)).astype(np.float32)  # (C, Z, Y, X)
    out = write_image(tmp_path / "p.nrrd", probs, axes="CZYX", spacing=(2.5, 0.5, 0.5))
    back = sitk.ReadImage(str(out))
    assert back.GetNumberOfComponentsPerPixel() == 3
    assert back.GetSize() == (6, 5, 4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.moveaxis(probs, 0, -1))
    f = read_image(out)
    assert f.axes == "ZYXC"
    assert f.channel_axis == 3


def test_a_dicom_series_is_sorted_by_position_rescaled_and_placed(tmp_path):
    hu = volume((5, 20, 24))
    shuffled = ["b.dcm", "e.dcm", "a.dcm", "d.dcm", "c.dcm"]  # name order is not slice order
    paths = write_dicom_series(tmp_path / "ct", hu, names=shuffled)
    # on disk the slices hold hu + 1024 (unsigned); RescaleIntercept -1024 brings HU back
    raw = np.frombuffer(paths[1].read_bytes()[-hu[1].nbytes :], "<u2").reshape(20, 24)
    np.testing.assert_array_equal(raw, hu[1].astype(np.int32) + 1024)
    f = read_image(tmp_path / "ct")
    np.testing.assert_array_equal(f.data, hu)  # slice order by position, negative HU kept
    assert f.data.min() < 0
    assert f.path == tmp_path / "ct"
    np.testing.assert_allclose(f.spacing, SPACING[::-1], rtol=1e-5)
    np.testing.assert_allclose(f.origin, ORIGIN[::-1], atol=1e-4)
    np.testing.assert_allclose(f.direction, DIRECTIONS["rotation"][::-1, ::-1], atol=1e-6)
    src = image(hu)
    for index in [(0, 0, 0), (4, 13, 6), (3, 19, 1)]:
        ours = np.asarray(f.origin) + np.asarray(f.direction) @ (np.asarray(f.spacing) * index)
        np.testing.assert_allclose(ours[::-1], physical(src, index), atol=1e-3)


def test_a_folder_with_two_series_is_refused_and_one_can_be_picked(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, volume((3, 8, 10)), uid="1.2.3.1", names=["a1", "a2", "a3"])
    second = volume((4, 8, 10), seed=1)
    write_dicom_series(folder, second, uid="1.2.3.2", names=["b1", "b2", "b3", "b4"])
    with pytest.raises(InputError) as exc:
        read_image(folder)
    text = _one_line(exc)
    assert f"{folder}: holds 2 DICOM series" in text
    assert "1.2.3.1 (3 files)" in text
    assert "1.2.3.2 (4 files)" in text
    assert "::SERIESUID" in text
    np.testing.assert_array_equal(read_image(f"{folder}::1.2.3.2").data, second)
    with pytest.raises(InputError, match=r"no DICOM series 9\.9; it holds"):
        read_image(f"{folder}::9.9")


def test_a_damaged_dicom_slice_is_named_not_skipped(tmp_path):
    paths = write_dicom_series(tmp_path / "ct", volume((4, 8, 10)))
    paths[2].write_bytes(paths[2].read_bytes()[:-150])  # GDCM alone would drop it silently
    with pytest.raises(InputError) as exc:
        read_image(tmp_path / "ct")
    assert _one_line(exc).startswith(f"{paths[2]}: not a readable DICOM file")


def test_a_missing_or_doubled_dicom_slice_is_refused(tmp_path):
    paths = write_dicom_series(tmp_path / "gap", volume((5, 8, 10)))
    paths[2].unlink()
    with pytest.raises(InputError, match="not evenly spaced") as exc:
        read_image(tmp_path / "gap")
    _one_line(exc)
    paths = write_dicom_series(tmp_path / "twice", volume((3, 8, 10)))
    shutil.copy(paths[1], tmp_path / "twice" / "copy.dcm")
    with pytest.raises(InputError, match="at the same position"):
        read_image(tmp_path / "twice")


def test_a_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="is a folder without DICOM files"):
        read_image(tmp_path)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BAD_FILES = {
    # name: (how to damage the files SimpleITK wrote, expected message)
    "truncated.nii.gz": (_truncate, "gzip stream is damaged or truncated"),
    "truncated.nii": (_truncate, "truncated: the NIfTI header declares"),
    "truncated.nrrd": (_truncate, "cannot read the voxels"),
    "truncated.nhdr": (lambda p: _truncate(p.with_name("truncated.raw.gz")), "cannot read"),
    "truncated.mha": (_truncate, "cannot read the voxels"),
    "truncated.mhd": (lambda p: p.with_name("truncated.zraw").unlink(), "cannot read"),
    "header.nii.gz": (lambda p: p.write_bytes(b"\x1f\x8b" + bytes(300)), "not a readable NIfTI"),
    "header.nii": (lambda p: p.write_bytes(b"NIFTI?" * 100), "not a readable NIfTI file"),
    "header.nrrd": (lambda p: p.write_bytes(b"NRRD0004\ntype: what\n\n"), "not a readable NRRD"),
    "header.nhdr": (lambda p: p.write_bytes(b"garbage\n" * 9), "not a readable NRRD file"),
    "header.mha": (lambda p: p.write_bytes(b"NDims = 3\nDimSize = x\n"), "not a readable Meta"),
    "header.mhd": (lambda p: p.write_bytes(bytes(64)), "not a readable MetaImage file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_give_one_line_naming_the_file(tmp_path, capfd, name):
    path = tmp_path / name
    big = np.random.default_rng(0).integers(0, 4000, (20, 50, 60)).astype(np.int16)
    sitk.WriteImage(image(big), str(path), useCompression=True)
    damage, message = BAD_FILES[name]
    damage(path)
    capfd.readouterr()
    with pytest.raises(InputError) as exc:
        read_image(path)
    text = _one_line(exc)
    assert text.startswith(f"{path}: "), text
    assert message in text
    assert capfd.readouterr().err == ""  # what ITK printed is in the message, not on stderr


def test_without_simpleitk_the_message_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image(volume()), str(path))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK -> ImportError
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(exc.value) == (
        "reading .nii.gz needs SimpleITK: pip install 'napari-segtool[medical]'"
    )
    with pytest.raises(InputError, match=r"writing .* needs SimpleITK: pip install"):
        write_image(tmp_path / "l.nrrd", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(InputError, match=r"is a folder; reading it as a DICOM series needs"):
        read_image(tmp_path)


def test_the_header_size_is_checked_before_any_voxel_is_read(tmp_path, monkeypatch):
    path = tmp_path / "ct.mha"
    sitk.WriteImage(image(volume()), str(path))

    def never(self):
        raise AssertionError("voxels were read")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", never)
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 4000)
    with pytest.raises(InputError, match=r"ct\.mha: a 6 x 20 x 24 int16 image needs 5\.6 KiB"):
        read_image(path)


def test_4d_images_are_refused(tmp_path):
    vols = [sitk.GetImageFromArray(volume(seed=i)) for i in range(2)]
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    with pytest.raises(InputError, match=r"fmri\.nii\.gz: a 4D image \(2 x 6 x 20 x 24\)"):
        read_image(path)


def test_grids_that_differ_are_told_apart(tmp_path):
    sitk.WriteImage(image(volume()), str(tmp_path / "a.nrrd"))
    sitk.WriteImage(image(volume(), origin=(-120.5, 33.25, 82.5)), str(tmp_path / "b.nrrd"))
    sitk.WriteImage(image(volume(), spacing=(0.7, 0.55, 3.0)), str(tmp_path / "c.nrrd"))
    a, b, c = (read_image(tmp_path / f"{n}.nrrd") for n in "abc")
    assert geometry_mismatch(a, read_image(tmp_path / "a.nrrd")) is None
    assert geometry_mismatch(a, b).startswith("origin (80.0, 33.25, -120.5) against (82.5,")
    assert geometry_mismatch(a, c).startswith("spacing")
    with pytest.raises(InputError, match=r"b\.nrrd is not on the voxel grid of .*a\.nrrd"):
        check_same_grid(a, b)
    tif = write_image(tmp_path / "t.tif", volume(), spacing=(2.5, 0.55, 0.7))
    assert geometry_mismatch(a, read_image(tif)) is None  # a TIFF has no origin to compare


def test_geometry_metadata_round_trip_and_malformed_metadata(tmp_path):
    sitk.WriteImage(image(volume()), str(tmp_path / "a.mha"))
    f = read_image(tmp_path / "a.mha")
    meta = geometry_metadata(f)
    spacing, origin, direction = geometry_from_metadata(meta, 3)
    assert (spacing, origin) == (f.spacing, f.origin)
    np.testing.assert_array_equal(direction, f.direction)
    assert geometry_from_metadata(meta, 2) is None
    stretched = [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert geometry_from_metadata({**meta, "direction": stretched}, 3) is None
    assert geometry_from_metadata({**meta, "spacing": [1, 0, 1]}, 3) is None
    assert geometry_from_metadata("not a dict", 3) is None
    assert geometry_metadata(read_image(write_image(tmp_path / "t.tif", f.data))) is None


def test_plugin_reader_picks_only_medical_files_and_dicom_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    write_dicom_series(tmp_path / "ct", volume((3, 8, 10)))
    sitk.WriteImage(image(volume()), str(tmp_path / "ct.nii.gz"))
    assert _io_plugins.get_reader(str(tmp_path / "a.tif")) is None
    assert _io_plugins.get_reader(str(tmp_path / "empty")) is None  # other readers may try
    assert _io_plugins.get_reader(str(tmp_path / "ct")) is _io_plugins.read_layers
    assert _io_plugins.get_reader([str(tmp_path / "ct.nii.gz")]) is _io_plugins.read_layers
    ((data, kwargs, kind),) = _io_plugins.read_layers(str(tmp_path / "ct.nii.gz"))
    assert kind == "image"
    assert kwargs["name"] == "ct"
    np.testing.assert_allclose(kwargs["scale"], SPACING[::-1], **TOL)
    np.testing.assert_allclose(kwargs["translate"], ORIGIN[::-1], **TOL)
    geometry = kwargs["metadata"][GEOMETRY_KEY]
    np.testing.assert_allclose(geometry["direction"], DIRECTIONS["rotation"][::-1, ::-1], **TOL)
    assert data.shape == (6, 20, 24)


def test_plugin_writer_without_source_geometry_uses_scale_and_translate(tmp_path):
    labels = np.zeros((3, 4, 5), np.int32)
    labels[1, 2, 3] = 7
    meta = {"scale": (2.5, 0.5, 0.25), "translate": (10.0, 20.0, 30.0), "metadata": {}}
    (out,) = _io_plugins.write_labels(str(tmp_path / "l.nii.gz"), labels, meta)
    back = sitk.ReadImage(out)
    np.testing.assert_allclose(back.GetSpacing(), (0.25, 0.5, 2.5))
    np.testing.assert_allclose(back.GetOrigin(), (30.0, 20.0, 10.0))
    np.testing.assert_allclose(back.GetDirection(), np.eye(3).ravel())
    assert sitk.GetArrayFromImage(back)[1, 2, 3] == 7
    with pytest.raises(InputError, match="writes labels as"):
        _io_plugins.write_labels(str(tmp_path / "l.png"), labels, meta)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_orientation_survives_reading_segmenting_and_writing(tmp_path, suffix):
    """Issue 13 item 3: an oblique, anisotropic volume, read through the plugin's reader,
    segmented, written back through its writer: shape, spacing, origin and direction match
    the source (SimpleITK says so), and a marked voxel lands on the same physical point."""
    data = volume((6, 40, 48))
    marked = (4, 13, 6)  # (z, y, x) of the brightest voxel
    src = image(data)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(src, str(path))
    ((array, kwargs, _),) = _io_plugins.get_reader(str(path))(str(path))
    result = segment(array, tiny_model(), config=medical_config())
    labels = result.labels.copy()
    assert labels.shape == array.shape
    labels[np.unravel_index(np.argmax(array), array.shape)] = 9  # mark where it is in the array
    (out,) = _io_plugins.write_labels(str(tmp_path / f"labels{suffix}"), labels, kwargs)
    back = sitk.ReadImage(out)
    _assert_same_geometry(back, src)
    ((k, j, i),) = np.argwhere(sitk.GetArrayFromImage(back) == 9)
    np.testing.assert_allclose(
        back.TransformIndexToPhysicalPoint((int(i), int(j), int(k))),
        physical(src, marked),
        atol=1e-4,
    )


def medical_config():
    from napari_segtool.config import InferenceConfig

    return InferenceConfig(tile_shape=(32, 32), device="cpu", precision="fp32", compile="off")


def test_medical_suffixes_and_series_paths():
    assert medical.medical_suffix("A.NII.GZ") == ".nii.gz"
    assert medical.medical_suffix("a.gz") is None
    assert medical.split_series("ct::") == (Path("ct::"), None)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_nifti_is_not_taken_for_a_truncated_one(tmp_path, suffix):
    """ITK reports the type after scl_slope (float); the stored int16 voxels are complete."""
    import gzip
    import struct

    data = volume()
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(image(data), str(plain))
    header = bytearray(plain.read_bytes())
    header[112:120] = struct.pack("<ff", 0.5, -10.0)  # scl_slope, scl_inter
    path = tmp_path / f"scaled{suffix}"
    path.write_bytes(gzip.compress(bytes(header)) if suffix == ".nii.gz" else bytes(header))
    f = read_image(path)
    assert f.data.dtype.kind == "f"
    np.testing.assert_allclose(f.data, 0.5 * data - 10.0)
