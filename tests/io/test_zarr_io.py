"""Zarr and OME-Zarr: lazy reading, multiscale writing, ``convert``, hostile stores."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_segtool.cli import main
from napari_segtool.errors import InputError
from napari_segtool.io import read_image, write_image
from napari_segtool.io.zarr_io import read_zarr, write_ome_zarr


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, shape).astype(np.uint8)


@pytest.mark.parametrize(
    ("shape", "axes", "spacing"),
    [((64, 96), "YX", (0.5, 0.25)), ((8, 64, 80), "ZYX", (2.0, 0.5, 0.5)),
     ((2, 8, 64, 64), "CZYX", (3.0, 0.7, 0.7))],
)  # fmt: skip
def test_round_trip_keeps_data_spacing_unit(tmp_path, shape, axes, spacing):
    data = _image(shape)
    out = write_ome_zarr(tmp_path / "a.zarr", data, spacing=spacing, unit="um", axes=axes)
    back = read_image(out)
    assert isinstance(back.data, zarr.Array)
    assert back.axes == axes
    assert back.spacing == spacing
    assert back.unit == "um"
    np.testing.assert_array_equal(back.data[...], data)
    assert back.channel_axis == (0 if "C" in axes else None)
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    assert attrs["ome"]["version"] == "0.5"


def test_levels_are_downsampled_with_their_spacing(tmp_path):
    data = _image((8, 256, 256))
    out = write_ome_zarr(tmp_path / "p.zarr", data, spacing=(1.0, 1.0, 1.0), levels=3,
                         chunks=(4, 64, 64))  # fmt: skip
    back = read_zarr(out)
    assert [lv.shape for lv in back.levels] == [(8, 256, 256), (4, 128, 128), (2, 64, 64)]
    np.testing.assert_array_equal(back.levels[2][...], data[::4, ::4, ::4])
    assert back.data.chunks == (4, 64, 64)
    ms = zarr.open_group(out, mode="r").attrs["ome"]["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1, 1, 1], [2, 2, 2], [4, 4, 4]]


def test_anisotropic_z_is_kept_until_isotropic(tmp_path):
    out = write_ome_zarr(tmp_path / "z.zarr", _image((6, 128, 128)), spacing=(4.0, 1.0, 1.0),
                         levels=3)  # fmt: skip
    assert [lv.shape for lv in read_zarr(out).levels] == [(6, 128, 128), (6, 64, 64),
                                                          (6, 32, 32)]  # fmt: skip


def test_reads_ome_zarr_04_written_by_ome_zarr(tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ome_write

    data = _image((4, 64, 64))
    group = zarr.open_group(tmp_path / "v4.zarr", mode="w", zarr_format=2)
    ome_write(data, group, scale_factors=(2,), fmt=FormatV04(), axes="zyx",
              scale={"z": 2.0, "y": 0.5, "x": 0.5},
              axes_units=dict.fromkeys("zyx", "micrometer"))  # fmt: skip
    assert "multiscales" in dict(group.attrs)  # 0.4 keeps it at the top level
    back = read_image(tmp_path / "v4.zarr")
    assert back.spacing == (2.0, 0.5, 0.5)
    assert back.unit == "um"
    assert len(back.levels) == 2
    assert back.levels[1].shape[-2:] == (32, 32)
    np.testing.assert_array_equal(back.data[...], data)


def test_plain_zarr_array_is_lazy(tmp_path):
    arr = zarr.create_array(tmp_path / "plain.zarr", shape=(3, 40, 50), chunks=(1, 20, 25),
                            dtype="uint16")  # fmt: skip
    arr[1, 2, 3] = 7
    back = read_image(tmp_path / "plain.zarr")
    assert isinstance(back.data, zarr.Array)
    assert (back.axes, back.spacing, back.unit) == ("ZYX", (1.0, 1.0, 1.0), None)
    assert back.data[1, 2, 3] == 7


def test_lazy_tiff(tmp_path):
    data = _image((5, 64, 64))
    write_image(tmp_path / "s.tif", data, spacing=(3.0, 0.5, 0.5), unit="um")
    lazy = read_image(tmp_path / "s.tif", lazy=True)
    assert isinstance(lazy.data, zarr.Array)
    assert (lazy.axes, lazy.spacing, lazy.unit) == ("ZYX", (3.0, 0.5, 0.5), "um")
    np.testing.assert_array_equal(lazy.data[...], data)
    lazy.close()
    assert isinstance(read_image(tmp_path / "s.tif").data, np.ndarray)  # default unchanged


def test_convert_tiff_keeps_spacing(tmp_path, capsys):
    data = _image((5, 64, 64))
    write_image(tmp_path / "s.tif", data, spacing=(3.0, 0.5, 0.5), unit="um")
    assert main(["convert", str(tmp_path / "s.tif"), str(tmp_path / "o.zarr"), "--levels", "2",
                 "--chunks", "1,32,32"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["spacing"] == [3.0, 0.5, 0.5]
    assert summary["levels"] == [[5, 64, 64], [5, 32, 32]]
    assert summary["chunks"] == [1, 32, 32]
    np.testing.assert_array_equal(read_image(tmp_path / "o.zarr").data[...], data)


def test_convert_nifti_keeps_spacing(tmp_path, capsys):
    import SimpleITK as sitk  # noqa: N813

    from tests.io.medical_data import SPACING, image, volume

    data = volume((6, 20, 24))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image(data), str(path))
    assert main(["convert", str(path), str(tmp_path / "ct.zarr")]) == 0
    capsys.readouterr()
    back = read_image(tmp_path / "ct.zarr")
    np.testing.assert_allclose(back.spacing, SPACING[::-1], rtol=1e-6)
    assert back.unit == "mm"
    np.testing.assert_array_equal(back.data[...], data)


def test_convert_refuses_existing_output_and_bad_input(tmp_path, capsys):
    write_image(tmp_path / "s.tif", _image((16, 16)))
    out = tmp_path / "o.zarr"
    assert main(["convert", str(tmp_path / "s.tif"), str(out)]) == 0
    assert main(["convert", str(tmp_path / "s.tif"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err
    assert len(err.splitlines()) == 1
    assert main(["convert", str(tmp_path / "s.tif"), str(out), "--overwrite"]) == 0
    assert main(["convert", str(tmp_path / "missing.tif"), str(tmp_path / "m.zarr")]) == 2
    assert main(["convert", str(tmp_path / "s.tif"), str(tmp_path / "o.tif")]) == 2
    assert not list(tmp_path.glob("*.tmp-*"))


def _garble(path: Path, text: str) -> None:
    (path / "zarr.json").write_text(text)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("json", "not a readable zarr store"),
        ("no-multiscales", "multiscales"),
        ("bad-axes", "broken OME-Zarr"),
        ("bad-scale", "broken OME-Zarr"),
        ("escape", "leaves the store"),
        ("absurd", "unusable shape"),
        ("text", "numeric"),
    ],
)
def test_hostile_stores_give_one_line(tmp_path, how, message):
    p = tmp_path / "h.zarr"
    if how == "absurd":
        zarr.create_array(p, shape=(2**40, 2**20, 2**20), chunks=(1, 64, 64), dtype="uint8")
    elif how == "text":
        zarr.create_array(p, shape=(4, 4), dtype=str)
    else:
        write_ome_zarr(p, _image((4, 32, 32)), levels=1)
        meta = json.loads((p / "zarr.json").read_text())
        ms = meta["attributes"]["ome"]["multiscales"][0]
        if how == "json":
            _garble(p, "{not json")
        elif how == "no-multiscales":
            meta["attributes"] = {}
        elif how == "bad-axes":
            ms["axes"] = [{"name": "q"}]
        elif how == "bad-scale":
            ms["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": "x"}]
        elif how == "escape":
            ms["datasets"][0]["path"] = "../elsewhere"
        if how != "json":
            _garble(p, json.dumps(meta))
    with pytest.raises(InputError, match=message) as info:
        read_image(p)
    assert str(p) in str(info.value)
    assert "\n" not in str(info.value)


def test_convert_memory_stays_bounded(tmp_path):
    """64 x 1024 x 1024 uint8 (64 MiB) converts with a peak of a few chunks, not the volume."""
    chunks = (8, 256, 256)  # 512 KiB
    src = zarr.create_array(tmp_path / "big.zarr", shape=(64, 1024, 1024), chunks=chunks,
                            dtype="uint8")  # fmt: skip
    plane = _image((1024, 1024))
    for z in range(0, 64, 8):  # sparse content keeps the test fast; every chunk is written
        src[z] = plane
    # the first call imports ome-zarr, dask's array stack and codecs (~60 MiB tracemalloc
    # counts as allocations): do it before measuring
    write_ome_zarr(tmp_path / "warm.zarr", _image((4, 8, 8)))
    volume_bytes = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        write_ome_zarr(tmp_path / "out.zarr", read_image(tmp_path / "big.zarr").data,
                       levels=3, chunks=chunks)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < volume_bytes / 8, f"peak {peak / 2**20:.1f} MiB"
    back = read_zarr(tmp_path / "out.zarr")
    assert [lv.shape for lv in back.levels] == [(64, 1024, 1024), (32, 512, 512),
                                                (16, 256, 256)]  # fmt: skip
    np.testing.assert_array_equal(back.data[8], plane)
    np.testing.assert_array_equal(back.levels[1][4], plane[::2, ::2])


# -- issue 14: block-by-block writing, translations, lazy boxes ----------------------------------
def test_writer_fills_level_0_by_blocks_and_builds_the_same_pyramid(tmp_path):
    from napari_segtool.io.zarr_io import OmeZarrWriter

    data = _image((6, 130, 150))
    whole = write_ome_zarr(tmp_path / "w.zarr", data, spacing=(1.0, 1.0, 1.0),
                           chunks=(2, 64, 64))  # fmt: skip
    with OmeZarrWriter(tmp_path / "b.zarr", shape=data.shape, dtype=data.dtype,
                       spacing=(1.0, 1.0, 1.0), chunks=(2, 64, 64)) as writer:  # fmt: skip
        for z in range(0, 6, 2):
            writer.array[z : z + 2] = data[z : z + 2]
        assert not (tmp_path / "b.zarr").exists()  # only a temporary store so far
        writer.commit()
    a, b = read_zarr(whole), read_zarr(tmp_path / "b.zarr")
    assert [lv.shape for lv in b.levels] == [lv.shape for lv in a.levels]
    assert [lv.chunks for lv in b.levels] == [lv.chunks for lv in a.levels]
    for la, lb in zip(a.levels, b.levels, strict=True):
        np.testing.assert_array_equal(la[...], lb[...])
    np.testing.assert_array_equal(b.levels[1][...], data[::2, ::2, ::2])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_writer_left_without_commit_or_failing_leaves_nothing(tmp_path):
    from napari_segtool.io.zarr_io import OmeZarrWriter

    out = write_ome_zarr(tmp_path / "keep.zarr", _image((2, 16, 16)))
    with OmeZarrWriter(out, shape=(4, 16, 16), dtype="u1", overwrite=True) as writer:
        writer.array[:2] = 1  # never committed
    assert read_zarr(out).data.shape == (2, 16, 16)

    def fail_half_way():
        with OmeZarrWriter(out, shape=(4, 16, 16), dtype="u1", overwrite=True) as writer:
            writer.array[:] = 3
            raise RuntimeError("a failure half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        fail_half_way()
    assert read_zarr(out).data.shape == (2, 16, 16)
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        OmeZarrWriter(out, shape=(4, 16, 16), dtype="u1")
    with pytest.raises(InputError, match="t, c, z, y, x order"):
        OmeZarrWriter(tmp_path / "o.zarr", shape=(16, 2, 16), dtype="u1", axes="YCX")
    assert not list(tmp_path.glob("*.tmp-*"))


def test_translation_is_written_on_every_level_and_read_as_the_origin(tmp_path):
    out = write_ome_zarr(tmp_path / "t.zarr", _image((4, 128, 128)), spacing=(2.0, 0.5, 0.5),
                         translation=(10.0, -3.0, 1.5), levels=2, image_label=True)  # fmt: skip
    back = read_zarr(out)
    assert back.origin == (10.0, -3.0, 1.5)
    attrs = zarr.open_group(out, mode="r").attrs["ome"]
    for ds in attrs["multiscales"][0]["datasets"]:
        assert ds["coordinateTransformations"][1] == {
            "type": "translation", "translation": [10.0, -3.0, 1.5]}  # fmt: skip
    assert attrs["image-label"] == {"version": "0.5"}
    assert read_zarr(write_ome_zarr(tmp_path / "n.zarr", _image((8, 8)))).origin is None


def test_translation_of_an_ome_zarr_04_with_an_overall_scale(tmp_path):
    group = zarr.open_group(tmp_path / "v4.zarr", mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 8, 8), dtype="u1")
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": ["z", "y", "x"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0]},
            {"type": "translation", "translation": [1.0, 2.0, 3.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}],
    }]  # fmt: skip
    back = read_zarr(tmp_path / "v4.zarr")
    assert back.spacing == (2.0, 2.0, 2.0)
    assert back.origin == (2.0, 4.0, 6.0)  # the overall scale applies after the translation


def test_region_view_reads_only_its_box_from_a_zarr_store(tmp_path):
    from napari_segtool.io.zarr_io import RegionView

    data = _image((2, 6, 20, 30))
    store = zarr.create_array(tmp_path / "c.zarr", shape=data.shape, chunks=(1, 2, 10, 10),
                              dtype=data.dtype)  # fmt: skip
    store[:] = data
    view = RegionView(store, (1, slice(2, 5), slice(None, 15), slice(7, None)))
    crop = data[1, 2:5, :15, 7:]
    assert view.shape == crop.shape
    assert view.ndim == 3
    assert view.start == (2, 0, 7)
    np.testing.assert_array_equal(view[...], crop)
    np.testing.assert_array_equal(view[1:], crop[1:])
    np.testing.assert_array_equal(view[-1, 3:9:2], crop[-1, 3:9:2])
    np.testing.assert_array_equal(view[:, :, 5], crop[:, :, 5])
    np.testing.assert_array_equal(RegionView(view, (slice(1, 3), 4, slice(None)))[...],
                                  crop[1:3, 4])  # fmt: skip
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(IndexError):
        view[::-1]
    with pytest.raises(InputError, match="not a non-empty range inside 0:6"):
        RegionView(store, (0, slice(4, 9), slice(None), slice(None)))
    with pytest.raises(InputError, match="one entry per axis"):
        RegionView(store, (slice(None),))


class _Recorder:
    """A zarr array that records the boxes written to it."""

    def __init__(self, array):
        self.array, self.chunks, self.shape, self.boxes = array, array.chunks, array.shape, []

    def __setitem__(self, key, value):
        self.boxes.append(tuple((k.start, k.stop) for k in key))
        self.array[key] = value


@pytest.mark.parametrize(
    ("shape", "axes", "spacing", "blocks"),
    [
        ((11, 70, 90), "ZYX", (1.0, 1.0, 1.0), [3, 3, 1, 4]),  # irregular, as a 3D model's end
        ((9, 64, 64), "ZYX", (4.0, 1.0, 1.0), [2, 5, 2]),  # z kept: anisotropic
        ((2, 7, 64, 80), "CZYX", (1.0, 1.0, 1.0), [4, 3]),  # probabilities: [:, a:b]
        ((70, 90), "YX", (1.0, 1.0), [70]),  # a 2D image in one write
        ((70, 90), "YX", (1.0, 1.0), [9, 9, 50, 2]),
    ],
)
def test_rows_written_in_order_fill_every_level_with_whole_chunks(
    tmp_path, shape, axes, spacing, blocks
):
    from napari_segtool.io.zarr_io import OmeZarrWriter

    data = _image(shape)
    chunks = (2, 32, 32) if "Z" in axes else (16, 32)
    want = read_zarr(write_ome_zarr(tmp_path / "w.zarr", data, spacing=spacing, axes=axes,
                                    chunks=chunks, levels=3))  # fmt: skip
    with OmeZarrWriter(tmp_path / "r.zarr", shape=shape, dtype=data.dtype, axes=axes,
                       spacing=spacing, chunks=chunks, levels=3) as writer:  # fmt: skip
        rows = writer.rows
        for level in rows.levels:
            level.array = _Recorder(level.array)
        recorders = [level.array for level in rows.levels]
        axis = axes.index(next(a for a in axes if a in "ZYX"))
        a = 0
        for n in blocks:
            key = (slice(None),) * axis + (slice(a, a + n),)
            rows[key] = data[key]
            a += n
        writer.commit()
    got = read_zarr(tmp_path / "r.zarr")
    assert [lv.shape for lv in got.levels] == [lv.shape for lv in want.levels]
    for lw, lg in zip(want.levels, got.levels, strict=True):
        np.testing.assert_array_equal(lg[...], lw[...])
    for rec in recorders:  # every write starts on a chunk boundary and covers whole chunks
        depth, size = rec.chunks[axis], rec.shape[axis]
        starts = [box[axis][0] for box in rec.boxes]
        stops = [box[axis][1] for box in rec.boxes]
        assert all(s % depth == 0 for s in starts)
        assert all(e % depth == 0 or e == size for e in stops)
        assert starts == [0, *stops[:-1]]
        assert stops[-1] == size


def test_rows_out_of_order_or_missing_are_refused(tmp_path):
    from napari_segtool.io.zarr_io import OmeZarrWriter

    with OmeZarrWriter(tmp_path / "r.zarr", shape=(6, 16, 16), dtype="u1") as writer:
        writer.rows[0:2] = 1
        with pytest.raises(IndexError, match="expected rows from 2"):
            writer.rows[3:4] = 1
        with pytest.raises(IndexError, match="whole"):
            writer.rows[2:4, :8] = 1
        with pytest.raises(InputError, match="only 2 of 6 rows were written"):
            writer.commit()
    assert not (tmp_path / "r.zarr").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize(
    ("shape", "axes", "spacing", "unit", "translation", "image_label"),
    [
        ((4, 40, 30), "ZYX", (50.0, 4.0, 4.0), "nm", None, False),
        ((4, 40, 30), "ZYX", (3.0, 1.0, 1.0), "mm", (3.0, 10.0, 5.0), True),
        ((40, 30), "YX", (0.5, 0.5), "um", (1.0, 2.0), True),
        ((2, 4, 40, 30), "CZYX", (2.0, 1.0, 1.0), None, None, False),
    ],
)
def test_ngff_attrs_are_what_ome_zarr_writes(
    tmp_path, shape, axes, spacing, unit, translation, image_label
):
    """write_ngff_attrs skips ome-zarr's slow import; its attributes must be ome-zarr's."""
    import warnings

    from napari_segtool.io.zarr_io import OmeZarrWriter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import add_metadata, write_multiscales_metadata

    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    with OmeZarrWriter(tmp_path / "ours.zarr", shape=shape, dtype=data.dtype, axes=axes,
                       spacing=spacing, unit=unit, translation=translation, chunks=None,
                       image_label=image_label) as writer:  # fmt: skip
        writer.array[...] = data
        axes_meta, name = writer._ome_axes, writer.path.stem
        writer.commit()
    ours = dict(zarr.open_group(tmp_path / "ours.zarr", mode="r").attrs)
    theirs = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3)
    datasets = ours["ome"]["multiscales"][0]["datasets"]
    write_multiscales_metadata(theirs, datasets, axes=axes_meta, name=name)
    if image_label:
        add_metadata(theirs, {"image-label": {"version": "0.5"}})
    assert ours == dict(theirs.attrs)
    # and a reader of the field opens what we wrote with its scale and translation
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    [node] = list(Reader(parse_url(str(tmp_path / "ours.zarr")))())[:1]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)
