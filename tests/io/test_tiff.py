import numpy as np
import pytest
import tifffile

from napari_segtool.errors import InputError
from napari_segtool.io import atomic_write, read_image, write_image


def test_round_trip_keeps_spacing_and_unit(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    path = write_image(tmp_path / "a.tif", data, spacing=(50.0, 4.0, 2.5), unit="nm")
    back = read_image(path)
    np.testing.assert_array_equal(back.data, data)
    assert back.spacing == (50.0, 4.0, 2.5)
    assert back.unit == "nm"


def test_imagej_spacing_is_read(tmp_path):
    path = tmp_path / "ij.tif"
    data = np.zeros((3, 8, 8), np.uint8)
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    back = read_image(path)
    assert back.spacing == pytest.approx((2.0, 0.25, 0.5))
    assert back.unit == "um"


def test_plain_tiff_has_unit_spacing(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((5, 6), np.uint8))
    assert read_image(path).spacing == (1.0, 1.0)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InputError, match=r"missing\.tif: no such file"):
        read_image(tmp_path / "missing.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match=r"bad\.tif: not a readable TIFF"):
        read_image(bad)
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_write_rejects_other_suffixes_and_bad_spacing(tmp_path):
    with pytest.raises(InputError, match=r"\.tif or \.tiff"):
        write_image(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match="spacing"):
        write_image(tmp_path / "a.tif", np.zeros((2, 2), np.uint8), spacing=(1.0, 1.0, 1.0))


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def fail(fh):
        fh.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new"
