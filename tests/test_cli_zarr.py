"""`segment` and `evaluate` on OME-Zarr: the block engine from the command line (issue 14)."""

import json

import numpy as np
import pytest
import torch
import zarr

from napari_segtool.cli import evaluate, main, segment
from napari_segtool.config import InferenceConfig, ModelConfig
from napari_segtool.inference import predict
from napari_segtool.inference.normalize import percentile_range
from napari_segtool.inference.predict import segment as segment_in_memory
from napari_segtool.io import read_image, write_image
from napari_segtool.io.zarr_io import read_zarr, write_ome_zarr
from napari_segtool.model import SegmentationModel, load_model

ROOT_SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample_data"
SPACING = (50.0, 4.0, 4.0)
FP32 = ["--precision", "fp32", "--compile", "off", "--device", "cpu"]


@pytest.fixture(scope="module")
def em():
    """Five EM slices whose sides (150, 130) are no multiple of the 64 x 64 tile."""
    return read_image(ROOT_SAMPLE / "isbi2012_em.tif").data[20:25, :150, :130]


@pytest.fixture
def files(tmp_path, em):
    tif = write_image(tmp_path / "em.tif", em, spacing=SPACING, unit="nm")
    store = write_ome_zarr(tmp_path / "em.zarr", em, spacing=SPACING, unit="nm",
                           chunks=(2, 64, 64))  # fmt: skip
    return tif, store


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _one_line_error(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _no_leftovers(folder):
    assert not list(folder.glob("*.tmp-*"))


def _tiny_3d(tmp_path, image, tile=(4, 32, 32)):
    """A small 3D model whose class-1 bias is shifted so it predicts both classes here."""
    model = SegmentationModel.new(ModelConfig(spatial_dims=3, depth=2, base_features=4),
                                  tile_shape=tile, seed=0)  # fmt: skip
    config = InferenceConfig(overlap=0.5, precision="fp32", compile="off")
    p = segment_in_memory(image, model, config=config, return_probabilities=True).probabilities
    d = np.log(np.clip(p[1], 1e-12, 1)) - np.log(np.clip(p[0], 1e-12, 1))
    convs = [m for m in model.network.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        convs[-1].bias[1] -= float(np.median(d))
    return model.save(tmp_path / "tiny3d.pt")


def test_segment_zarr_equals_tiff_with_spacing_unit_and_pyramid(tmp_path, capsys, files,
                                                                monkeypatch):  # fmt: skip
    tif, store = files
    monkeypatch.setattr(predict, "CHUNK_VOXELS", 2 * 150 * 130)  # blocks of 2 slices, 5 in all
    want = _run(capsys, "segment", tif, "-o", tmp_path / "a.tif", "--tile-shape", "64,64", *FP32)
    got = _run(capsys, "segment", store, "-o", tmp_path / "b.zarr", "--tile-shape", "64,64",
               *FP32)  # fmt: skip
    ref = read_image(tmp_path / "a.tif").data
    out = read_zarr(tmp_path / "b.zarr")
    np.testing.assert_array_equal(out.data[...], ref)
    assert got["classes"] == want["classes"]
    assert 0.1 < got["classes"]["membrane"] / ref.size < 0.5
    assert (got["engine"], want["engine"]) == ("blocks", "in-memory")
    assert (out.spacing, out.unit, out.origin) == (SPACING, "nm", None)
    assert out.data.dtype == np.uint8
    assert out.data.chunks == (4, 150, 130)  # the engine's write blocks: written once each
    # an exact, subsampled pyramid, and labels metadata for napari-ome-zarr
    assert [lv.shape for lv in out.levels] == [(5, 150, 130), (5, 75, 65)]
    np.testing.assert_array_equal(out.levels[1][...], ref[:, ::2, ::2])
    attrs = dict(zarr.open_group(tmp_path / "b.zarr", mode="r").attrs)["ome"]
    assert attrs["version"] == "0.5"
    assert "image-label" in attrs
    # the normalisation came from the whole (small) volume: the JSON says so
    sampled = got["normalization"]["sampled"]
    assert sampled == {"slices": 5, "of": 5, "stride": 1, "voxels": 5 * 150 * 130}
    _no_leftovers(tmp_path)


def test_tiff_input_to_zarr_and_zarr_input_to_tiff(tmp_path, capsys, files):
    tif, store = files
    _run(capsys, "segment", tif, "-o", tmp_path / "a.tif", *FP32)
    want = read_image(tmp_path / "a.tif").data
    got = _run(capsys, "segment", tif, "-o", tmp_path / "t.zarr", *FP32)
    assert got["engine"] == "blocks"
    np.testing.assert_array_equal(read_zarr(tmp_path / "t.zarr").data[...], want)
    _run(capsys, "segment", store, "-o", tmp_path / "z.tif", *FP32)
    back = read_image(tmp_path / "z.tif")
    np.testing.assert_array_equal(back.data, want)
    assert back.spacing == SPACING


def test_a_lazy_input_with_a_tiff_output_too_large_is_refused_naming_zarr(
    tmp_path, capsys, files, monkeypatch
):
    _, store = files
    from napari_segtool.io import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "big.tif", *FP32)
    assert "big.tif" in err
    assert "write .zarr outputs instead" in err
    assert not (tmp_path / "big.tif").exists()


def test_tta_uncertainty_and_probabilities_as_zarr(tmp_path, capsys, files):
    tif, store = files
    tta = ["--tta", "--tile-shape", "64,64", *FP32]
    _run(capsys, "segment", tif, "-o", tmp_path / "l.tif", "--uncertainty", tmp_path / "u.tif",
         "--probabilities", tmp_path / "p.tif", *tta)  # fmt: skip
    _run(capsys, "segment", store, "-o", tmp_path / "l.zarr", "--uncertainty",
         tmp_path / "u.zarr", "--probabilities", tmp_path / "p.zarr", *tta)  # fmt: skip
    np.testing.assert_array_equal(read_zarr(tmp_path / "l.zarr").data[...],
                                  read_image(tmp_path / "l.tif").data)  # fmt: skip
    unc = read_zarr(tmp_path / "u.zarr")
    np.testing.assert_allclose(unc.data[...], read_image(tmp_path / "u.tif").data, atol=1e-6)
    probs = read_zarr(tmp_path / "p.zarr")
    assert (probs.axes, probs.spacing, probs.data.shape) == ("CZYX", SPACING, (2, 5, 150, 130))
    np.testing.assert_allclose(probs.data[...], read_image(tmp_path / "p.tif").data, atol=1e-6)
    assert [lv.shape for lv in probs.levels][1] == (2, 5, 75, 65)
    assert "image-label" not in dict(zarr.open_group(tmp_path / "p.zarr", mode="r").attrs)["ome"]


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("1:4,10:140,3:120", (slice(1, 4), slice(10, 140), slice(3, 120))),
        (":3,:,50:", (slice(0, 3), slice(None), slice(50, None))),
        ("4:,77:,:65", (slice(4, None), slice(77, None), slice(0, 65))),
    ],
)
def test_a_region_equals_segment_of_the_crop_and_overlays_the_image(
    tmp_path, capsys, files, em, text, box
):
    _, store = files
    got = _run(capsys, "segment", store, "-o", tmp_path / "r.zarr", "--region", text,
               "--tile-shape", "64,64", *FP32)  # fmt: skip
    model = load_model("em-membranes-2d")
    config = InferenceConfig(tile_shape=(64, 64), precision="fp32", compile="off")
    whole = percentile_range(em, model.normalization)  # the whole volume's range
    want = segment_in_memory(em[box], model, config=config, value_range=whole).labels
    out = read_zarr(tmp_path / "r.zarr")
    np.testing.assert_array_equal(out.data[...], want)
    start = [s.start or 0 for s in box]
    assert got["region"] == [[a, a + n] for a, n in zip(start, want.shape, strict=True)]
    assert got["normalization"]["range"] == [float(whole[0][0]), float(whole[1][0])]
    # the OME-Zarr translation puts the box where it lies in the image
    assert out.origin == tuple(a * s for a, s in zip(start, SPACING, strict=True))
    ms = dict(zarr.open_group(tmp_path / "r.zarr", mode="r").attrs)["ome"]["multiscales"][0]
    for ds in ms["datasets"]:
        shift = [a * s for a, s in zip(start, SPACING, strict=True)]
        assert ds["coordinateTransformations"][1] == {"type": "translation", "translation": shift}


def test_a_region_adds_to_the_inputs_own_translation_and_works_in_2d(tmp_path, capsys, em):
    plane = em[2]
    store = write_ome_zarr(tmp_path / "p.zarr", plane, spacing=(4.0, 4.0), unit="nm",
                           translation=(100.0, -8.0))  # fmt: skip
    _run(capsys, "segment", store, "-o", tmp_path / "r.zarr", "--region", "20:,:90", *FP32)
    out = read_zarr(tmp_path / "r.zarr")
    assert out.data.shape == (130, 90)
    assert out.origin == (100.0 + 20 * 4.0, -8.0)
    model = load_model("em-membranes-2d")
    config = InferenceConfig(precision="fp32", compile="off")
    whole = percentile_range(plane, model.normalization)
    want = segment_in_memory(plane[20:, :90], model, config=config, value_range=whole)
    np.testing.assert_array_equal(out.data[...], want.labels)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:2,3:4", "give 3 ranges (z0:z1,y0:y1,x0:x1) for the image of shape (5, 150, 130)"),
        ("a:b,:,:", "write each range as start:stop in voxels"),
        ("1:2:3,:,:", "write each range as start:stop in voxels"),
        ("3:3,:,:", "the Z range 3:3 is not a non-empty range inside 0:5"),
        (":,:,100:131", "the X range 100:131 is not a non-empty range inside 0:130"),
        ("-1:2,:,:", "the Z range -1:2 is not"),
    ],
)
def test_a_bad_region_is_one_line_and_exit_2(tmp_path, capsys, files, text, message):
    _, store = files
    # --region=TEXT: argparse would take "-1:2,..." for an option otherwise
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "r.zarr", f"--region={text}")
    assert f"--region {text!r}: {message}" in err
    assert not (tmp_path / "r.zarr").exists()
    _no_leftovers(tmp_path)


def test_a_3d_model_streams_zarr_to_zarr_like_tiff_to_tiff(tmp_path, capsys, monkeypatch):
    image = (np.random.default_rng(0).random((11, 40, 36)) * 1000).astype(np.uint16)
    tif = write_image(tmp_path / "v.tif", image, spacing=(2.0, 1.0, 1.0), unit="um")
    store = write_ome_zarr(tmp_path / "v.zarr", image, spacing=(2.0, 1.0, 1.0), unit="um",
                           chunks=(3, 16, 16))  # fmt: skip
    model = _tiny_3d(tmp_path, image)
    flags = ["-m", model, "--overlap", "0.5", *FP32]
    _run(capsys, "segment", tif, "-o", tmp_path / "a.tif", *flags)
    got = _run(capsys, "segment", store, "-o", tmp_path / "b.zarr", *flags)
    want = read_image(tmp_path / "a.tif").data
    out = read_zarr(tmp_path / "b.zarr")
    np.testing.assert_array_equal(out.data[...], want)
    assert 0.05 < want.mean() < 0.95  # both classes: the comparison means something
    assert out.data.chunks == (2, 40, 36)  # the stride between tiles along Z
    assert sum(got["classes"].values()) == image.size
    # a box of it, with the whole volume's normalisation
    _run(capsys, "segment", store, "-o", tmp_path / "c.zarr", "--region", "2:9,5:,:30", *flags)
    loaded = load_model(model)
    config = InferenceConfig(overlap=0.5, precision="fp32", compile="off")
    whole = percentile_range(image, loaded.normalization)
    crop = segment_in_memory(image[2:9, 5:, :30], loaded, config=config, value_range=whole)
    np.testing.assert_array_equal(read_zarr(tmp_path / "c.zarr").data[...], crop.labels)


def test_existing_zarr_outputs_need_overwrite_and_failures_keep_them(
    tmp_path, capsys, files, em, monkeypatch
):
    _, store = files
    out = tmp_path / "l.zarr"
    _run(capsys, "segment", store, "-o", out, *FP32)
    before = read_zarr(out).data[...]
    err = _one_line_error(capsys, "segment", store, "-o", out, *FP32)
    assert "exists; pass --overwrite to replace it" in err
    _run(capsys, "segment", store, "-o", out, "--overwrite", "--region", "0:2,:,:", *FP32)
    assert read_zarr(out).data.shape == (2, 150, 130)
    # a run that fails half-way leaves the existing store as it was, and no temporary store:
    # NaN in a slice the normalisation sample skips fails only when the engine reaches it
    monkeypatch.setattr(segment, "SAMPLE_VOXELS", 150 * 130)  # one slice sampled
    from napari_segtool.inference.blocks import subsample_slices

    (sampled,), _ = subsample_slices((5, 150, 130), max_voxels=150 * 130)
    bad = em.astype(np.float32)
    bad[4 if sampled != 4 else 3, 7, 9] = np.nan
    nan_store = write_ome_zarr(tmp_path / "nan.zarr", bad)
    err = _one_line_error(capsys, "segment", nan_store, "-o", out, "--overwrite", *FP32)
    assert "non-finite" in err
    bad[sampled, 0, 0] = np.inf  # in the sample: refused before any output is opened
    err = _one_line_error(capsys, "segment", write_ome_zarr(tmp_path / "inf.zarr", bad), "-o",
                          out, "--overwrite", *FP32)  # fmt: skip
    assert "in the slices" in err
    assert read_zarr(out).data.shape == (2, 150, 130)
    _no_leftovers(tmp_path)
    # never a folder that is not a zarr store, nor the input itself
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "other.zarr", "--overwrite")
    assert "exists and is not a zarr store" in err
    assert (tmp_path / "other.zarr" / "keep.txt").exists()
    err = _one_line_error(capsys, "segment", store, "-o", store, "--overwrite")
    assert "is the input image" in err
    assert read_zarr(store).data.shape == before.shape  # the input is untouched


def test_segment_help_says_what_is_sampled_and_where_a_region_goes(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "4,194,304 voxels in whole, evenly spaced slices" in text
    assert "OME-Zarr translation" in text
    assert "normalised with the whole volume's range" in text


# -- evaluate ---------------------------------------------------------------------------------
@pytest.fixture
def label_pair(tmp_path):
    rng = np.random.default_rng(3)
    ref = np.zeros((6, 40, 30), np.uint8)
    ref[1:5, 5:30, 4:20] = 1
    ref[2:6, 20:38, 15:28] = 5
    pred = ref.copy()
    flip = rng.random(ref.shape) < 0.05
    pred[flip] = rng.choice([0, 1, 5], size=int(flip.sum()))
    paths = {
        "pred.tif": write_image(tmp_path / "pred.tif", pred, spacing=(3.0, 1.0, 1.0)),
        "ref.tif": write_image(tmp_path / "ref.tif", ref, spacing=(3.0, 1.0, 1.0)),
        "pred.zarr": write_ome_zarr(tmp_path / "pred.zarr", pred, spacing=(3.0, 1.0, 1.0),
                                    chunks=(2, 16, 16)),
        "ref.zarr": write_ome_zarr(tmp_path / "ref.zarr", ref, spacing=(3.0, 1.0, 1.0)),
    }  # fmt: skip
    return paths, pred, ref


@pytest.mark.parametrize("flags", [[], ["--no-distances"], ["--per-slice"],
                                   ["--no-distances", "--per-slice"]])  # fmt: skip
@pytest.mark.parametrize("pair", [("pred.zarr", "ref.zarr"), ("pred.zarr", "ref.tif"),
                                  ("pred.tif", "ref.zarr")])  # fmt: skip
def test_evaluate_zarr_gives_the_in_memory_numbers(capsys, label_pair, flags, pair):
    paths, _, _ = label_pair
    want = _run(capsys, "evaluate", paths["pred.tif"], paths["ref.tif"], "--json", *flags)
    got = _run(capsys, "evaluate", paths[pair[0]], paths[pair[1]], "--json", *flags)
    assert got == want
    assert (got["hd"] is None) == ("--no-distances" in flags)


def test_evaluate_a_region_is_the_evaluation_of_the_crops(tmp_path, capsys, label_pair):
    paths, pred, ref = label_pair
    box = (slice(1, 4), slice(10, 40), slice(0, 25))
    p = write_image(tmp_path / "pc.tif", pred[box], spacing=(3.0, 1.0, 1.0))
    r = write_image(tmp_path / "rc.tif", ref[box], spacing=(3.0, 1.0, 1.0))
    want = _run(capsys, "evaluate", p, r, "--json", "--per-slice")
    got = _run(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"], "--json",
               "--per-slice", "--region", "1:4,10:,:25")  # fmt: skip
    assert got.pop("region") == [[1, 4], [10, 40], [0, 25]]
    assert got == want
    err = _one_line_error(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"],
                          "--region", "0:7,:,:")  # fmt: skip
    assert "the Z range 0:7 is not a non-empty range inside 0:6" in err


def test_evaluate_places_a_region_output_in_its_box_of_the_reference(tmp_path, capsys, label_pair):
    """A `segment --region` output (.zarr with a translation) is judged on its box only."""
    paths, pred, _ = label_pair
    box = (slice(1, 4), slice(10, 40), slice(5, 25))
    shift = [b.start * s for b, s in zip(box, (3.0, 1.0, 1.0), strict=True)]
    placed = write_ome_zarr(tmp_path / "box.zarr", pred[box], spacing=(3.0, 1.0, 1.0),
                            translation=shift)  # fmt: skip
    got = _run(capsys, "evaluate", placed, paths["ref.zarr"], "--json")
    assert got.pop("reference_box") == [[1, 4], [10, 40], [5, 25]]
    want = _run(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"], "--json",
                "--region", "1:4,10:40,5:25")  # fmt: skip
    want.pop("region")
    assert got == want
    # a box with no translation lies at the origin, as OME-Zarr has it
    at_origin = write_ome_zarr(tmp_path / "o.zarr", pred[:3, :20, :10], spacing=(3.0, 1.0, 1.0))
    assert _run(capsys, "evaluate", at_origin, paths["ref.zarr"], "--json",
                "--no-distances")["reference_box"] == [[0, 3], [0, 20], [0, 10]]  # fmt: skip
    # off the voxel grid, outside the reference, or a TIFF (no offset recorded): refused
    for name, data, t in (("half.zarr", pred[box], [3.0, 10.5, 5.0]),
                          ("out.zarr", pred[box], [12.0, 10.0, 5.0])):  # fmt: skip
        bad = write_ome_zarr(tmp_path / name, data, spacing=(3.0, 1.0, 1.0), translation=t)
        assert "differ in shape" in _one_line_error(capsys, "evaluate", bad, paths["ref.zarr"])
    tif = write_image(tmp_path / "box.tif", pred[box], spacing=(3.0, 1.0, 1.0))
    assert "differ in shape" in _one_line_error(capsys, "evaluate", tif, paths["ref.zarr"])


def test_evaluate_refuses_distances_above_the_limit_naming_the_ways_around(
    capsys, label_pair, monkeypatch
):
    from napari_segtool.metrics import DISTANCE_MAX_VOXELS

    assert evaluate.DISTANCE_LIMIT == DISTANCE_MAX_VOXELS  # the --help figure is the real one
    paths, pred, _ = label_pair
    monkeypatch.setattr(evaluate, "DISTANCE_LIMIT", pred.size - 1)
    err = _one_line_error(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"])
    assert f"only up to {pred.size - 1:,} voxels and these labels have {pred.size:,}" in err
    for flag in ("--no-distances", "--per-slice", "--region"):
        assert flag in err
    overlap = _run(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"], "--json",
                   "--no-distances")  # fmt: skip
    sliced = _run(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"], "--json",
                  "--per-slice")  # fmt: skip
    assert sliced["hd"] is None
    assert {k: v for k, v in sliced.items() if k != "per_slice"} == overlap
    assert all("hd95" in entry for entry in sliced["per_slice"])
    boxed = _run(capsys, "evaluate", paths["pred.zarr"], paths["ref.zarr"], "--json",
                 "--region", "1:5,:,:")  # fmt: skip
    assert boxed["hd"] is not None


def test_evaluate_help_states_the_distance_limit(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"only up to {DISTANCE_HELP:,} voxels" in text


DISTANCE_HELP = 512**3


def test_a_two_channel_image_to_zarr_goes_in_memory_and_refuses_a_region(tmp_path, capsys):
    config = ModelConfig(in_channels=2, depth=2, base_features=4)
    model = SegmentationModel.new(config, tile_shape=(32, 32), seed=0).save(tmp_path / "two.pt")
    image = (np.random.default_rng(4).random((2, 40, 36)) * 200).astype(np.uint8)
    src = write_image(tmp_path / "c.tif", image, axes="CYX", spacing=(0.5, 0.5), unit="um")
    got = _run(capsys, "segment", src, "-o", tmp_path / "l.zarr", "-m", model, *FP32)
    _run(capsys, "segment", src, "-o", tmp_path / "l.tif", "-m", model, *FP32)
    assert got["engine"] == "in-memory"
    out = read_zarr(tmp_path / "l.zarr")
    assert (out.data.shape, out.spacing, out.unit) == ((40, 36), (0.5, 0.5), "um")
    np.testing.assert_array_equal(out.data[...], read_image(tmp_path / "l.tif").data)
    err = _one_line_error(capsys, "segment", src, "-o", tmp_path / "r.zarr", "-m", model,
                          "--region", ":20,:")  # fmt: skip
    assert "--region segments one-channel images" in err


def test_a_region_of_a_medical_volume_gets_the_boxs_origin(tmp_path, capsys):
    sitk = pytest.importorskip("SimpleITK")
    from tests.io.medical_data import image, volume

    img = image(volume((6, 20, 24)))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    _run(capsys, "segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "r.nii.gz", "--region",
         "2:5,3:,4:", "-m", "new-2d", *FP32)  # fmt: skip
    back = read_image(tmp_path / "r.nii.gz")
    assert back.data.shape == (3, 17, 20)
    want = img.TransformIndexToPhysicalPoint((4, 3, 2))  # ITK's (x, y, z)
    np.testing.assert_allclose(back.origin, want[::-1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(back.direction, read_image(tmp_path / "ct.nii.gz").direction,
                               atol=1e-6)  # fmt: skip
