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


# -- issue 10 item 10: one reading rule, with the axes the file declares ---------------------
def _write_planar_guess(path, data):
    # tifffile's own guess for a 3- or 4-slice array without photometric: planar RGB
    with pytest.warns(DeprecationWarning, match="RGB with separate component planes"):
        tifffile.imwrite(path, data)


def _write_imagej_stack(path, data):
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0})


def _write_plain_pages(path, data):
    with tifffile.TiffWriter(path) as tw:
        for plane in data:
            tw.write(plane, photometric="minisblack", metadata=None)


@pytest.mark.parametrize("n_slices", [3, 4])
@pytest.mark.parametrize(
    "writer",
    [
        lambda p, d: write_image(p, d, spacing=(2.0, 1.0, 1.0)),
        _write_planar_guess,
        _write_imagej_stack,
        _write_plain_pages,
    ],
    ids=["write_image", "tifffile-default", "imagej-stack", "plain-pages"],
)
def test_3_and_4_slice_stacks_are_read_as_stacks(tmp_path, writer, n_slices):
    data = np.arange(n_slices * 16 * 16, dtype=np.uint16).reshape(n_slices, 16, 16)
    path = tmp_path / "stack.tif"
    writer(path, data)
    back = read_image(path)
    assert back.axes == "ZYX"
    assert not back.rgb
    assert back.channel_axis is None
    np.testing.assert_array_equal(back.data, data)
    assert len(back.spacing) == 3  # one per spatial axis, so evaluate and segment agree


def test_interleaved_rgb_is_colour(tmp_path):
    data = np.zeros((16, 20, 3), np.uint8)
    data[..., 1] = 200
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    back = read_image(path)
    assert back.axes == "YXS"
    assert back.rgb
    assert back.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(back.data, data)


def test_declared_channel_axis_is_kept(tmp_path):
    path = tmp_path / "czyx.tif"
    data = np.zeros((2, 5, 8, 8), np.uint8)
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "CZYX"})
    back = read_image(path)
    assert back.axes == "CZYX"
    assert back.channel_axis == 0
    assert len(back.spacing) == 3


def test_probabilities_round_trip_with_spacing_and_channel_axis(tmp_path):
    probs = np.random.default_rng(0).random((3, 2, 6, 7)).astype(np.float32)
    path = write_image(tmp_path / "p.tif", probs, spacing=(3.0, 0.5, 0.25), unit="um", axes="CZYX")
    back = read_image(path)
    assert (back.axes, back.spacing, back.unit) == ("CZYX", (3.0, 0.5, 0.25), "um")
    np.testing.assert_array_equal(back.data, probs)
    with pytest.raises(InputError, match="one of Z, Y, X, C, T per axis"):
        write_image(tmp_path / "q.tif", probs, axes="ZYX")


# -- issue 10 items 5 and 9: hostile files are refused before allocating, in one message -------
def huge_header_tiff(path, shape=(50_000, 50_000), dtype=np.float64):
    """A 200-byte TIFF whose header claims ``shape``: the tags are rewritten after writing."""
    tifffile.imwrite(path, np.zeros((8, 8), dtype), metadata=None, photometric="minisblack",
                     compression="zlib")  # fmt: skip
    with tifffile.TiffFile(path, mode="r+") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(shape[1])
        tags["ImageLength"].overwrite(shape[0])
    return path


# tifffile inflates with imagecodecs where it is installed (bioimageio.core brings it), else
# with zlib: the reason in the message names whichever failed
ZLIB_REASON = r"(zlib\.error|imagecodecs\.DeflateError)"


def truncated_zlib_tiff(path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (128, 128), dtype=np.uint8),
                     compression="zlib", photometric="minisblack")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        end = tif.pages[0].dataoffsets[0] + tif.pages[0].databytecounts[0] // 2
    path.write_bytes(path.read_bytes()[:end])
    return path


def test_huge_header_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 8 << 30)
    path = huge_header_tiff(tmp_path / "huge.tif")
    assert path.stat().st_size < 1000
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert "50000 x 50000 float64" in message
    assert "18.6 GiB" in message
    assert "8.0 GiB" in message
    assert "tiles" in message
    assert "larger-than-memory" in message


def test_small_image_passes_the_memory_check(tmp_path, monkeypatch):
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 8 << 30)
    path = write_image(tmp_path / "ok.tif", np.ones((64, 64), np.uint8))
    assert read_image(path).data.shape == (64, 64)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b"II*\x00\x08\x00"), "struct.error"),
        (truncated_zlib_tiff, ZLIB_REASON),
    ],
    ids=["six-bytes", "truncated-zlib"],
)
def test_damaged_tiffs_are_input_errors(tmp_path, make, reason):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(InputError, match=rf"bad\.tif: not a readable TIFF image \({reason}"):
        read_image(path)


def test_check_allocation_names_both_sizes(monkeypatch):
    from napari_segtool.io import check_allocation
    from napari_segtool.io.memory import available_memory, format_bytes

    assert available_memory() > 0
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    monkeypatch.setattr("napari_segtool.io.memory.available_memory", lambda: 1 << 30)
    check_allocation(100 << 20, what="a table")
    with pytest.raises(InputError, match=r"a table needs 2\.0 GiB but only 1\.0 GiB .*; crop"):
        check_allocation(2 << 30, what="a table", hint="crop")


def test_available_memory_respects_a_container_limit(tmp_path, monkeypatch):
    from napari_segtool.io import memory

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(str(2 << 30))
    usage.write_text(str(1 << 30))
    monkeypatch.setattr(memory, "_CGROUP_FILES", ((limit, usage),))
    assert memory.available_memory() <= 1 << 30
    limit.write_text("max")
    assert memory.available_memory() > 0
