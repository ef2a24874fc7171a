import json
import subprocess
import sys

import numpy as np
import pytest

from napari_segtool.cli import main
from napari_segtool.io import read_image, write_image

ROOT_SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample_data"


def test_segment_3d_tif_writes_labels_of_same_shape(tmp_path, capsys):
    em = read_image(ROOT_SAMPLE / "isbi2012_em.tif")
    src = write_image(
        tmp_path / "stack.tif", em.data[20:23, :300, :257], spacing=em.spacing, unit="nm"
    )
    out = tmp_path / "out" / "labels.tif"
    assert main(["segment", str(src), "-o", str(out), "--batch-size", "2"]) == 0
    labels = read_image(out)
    assert labels.data.shape == (3, 300, 257)
    assert labels.data.dtype == np.uint8
    assert labels.spacing == (50.0, 4.0, 4.0)
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [3, 300, 257]
    # the bundled model finds membranes: a real share of pixels, not all or none
    share = summary["classes"]["membrane"] / labels.data.size
    assert 0.1 < share < 0.4


def test_segment_with_tta_writes_uncertainty(tmp_path):
    src = write_image(
        tmp_path / "img.tif", (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    )
    out, unc = tmp_path / "l.tif", tmp_path / "u.tif"
    assert (
        main(
            [
                "segment",
                str(src),
                "-o",
                str(out),
                "--tta",
                "--uncertainty",
                str(unc),
                "--model",
                "new-2d",
            ]
        )
        == 0
    )
    u = read_image(unc).data
    assert u.shape == (64, 80)
    assert u.dtype == np.float32
    assert 0 <= u.min() <= u.max() <= 1


def test_models_lists_bundled(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    em = next(r for r in rows if r["name"] == "em-membranes-2d")
    assert em["held_out"]["held_out_membrane_dice"] >= 0.78
    assert main(["models"]) == 0
    assert "em-membranes-2d" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "nowhere.tif", "-o", "x.tif"], "nowhere.tif: no such file"),
        (["segment", "{img}", "-o", "x.tif", "--model", "nope.pt"], "nope.pt: no such model"),
        (["segment", "{img}", "-o", "x.tif", "--device", "cuda"], "cuda"),
        (["segment", "{img4d}", "-o", "x.tif"], "channel"),
        (["segment", "{img}", "-o", "x.tif", "--uncertainty", "u.tif"], "needs --tta"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, capsys):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so asking for it is not an error")
    img = write_image(tmp_path / "img.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    img4d = write_image(
        tmp_path / "img4d.tif", np.arange(4 * 2 * 8 * 8, dtype=np.uint16).reshape(4, 2, 8, 8)
    )
    args = [a.format(img=img, img4d=img4d) for a in args]
    args = [str(tmp_path / a) if a == "x.tif" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "napari_segtool.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for cmd in ("segment", "models", "demo"):
        assert cmd in out.stdout


def test_evaluate_json_keys_and_spacing_from_metadata(tmp_path, capsys):
    ref = np.zeros((4, 20, 20), np.uint8)
    ref[1:3, 5:15, 5:15] = 1
    pred = np.zeros_like(ref)
    pred[1:3, 6:16, 5:15] = 1
    r = write_image(tmp_path / "ref.tif", ref, spacing=(3.0, 0.5, 0.5), unit="mm")
    p = write_image(tmp_path / "pred.tif", pred, spacing=(3.0, 0.5, 0.5), unit="mm")
    assert main(["evaluate", str(p), str(r), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"dice", "iou", "pixel_accuracy", "mean_pixel_accuracy", "precision", "recall",
            "specificity", "voe", "rvd", "hd", "hd95", "assd", "per_class"}  # fmt: skip
    assert keys <= set(out)
    assert out["dice"] == 0.9  # 180 of 200 voxels shared on each side
    assert out["hd"] == 0.5  # one voxel along Y, 0.5 mm
    assert set(out["per_class"]["1"]) >= {"dice", "hd95"}
    assert main(["evaluate", str(p), str(r), "--json", "--spacing", "1,1,1"]) == 0
    assert json.loads(capsys.readouterr().out)["hd"] == 1.0


def test_evaluate_empty_prediction_gives_null_distances(tmp_path, capsys):
    ref = np.zeros((8, 8), np.uint8)
    ref[2:4, 2:4] = 1
    r = write_image(tmp_path / "ref.tif", ref)
    p = write_image(tmp_path / "pred.tif", np.zeros_like(ref))
    assert main(["evaluate", str(p), str(r), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dice"] == 0.0
    assert out["hd"] is None


def test_evaluate_shape_mismatch_is_an_error(tmp_path, capsys):
    a = write_image(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    b = write_image(tmp_path / "b.tif", np.zeros((4, 5), np.uint8))
    assert main(["evaluate", str(a), str(b)]) == 2
    assert "differ in shape" in capsys.readouterr().err


def test_train_then_segment_with_the_result(tmp_path, capsys):
    from tests.training.conftest import blobs

    image, labels = blobs((3, 64, 64))
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    mask = np.zeros(labels.shape, np.uint8)
    mask[:2] = 1  # only slices 0 and 1 count
    msk = write_image(tmp_path / "mask.tif", mask)
    model = tmp_path / "m.pt"
    common = ["--mask", str(msk), "--steps-per-epoch", "3", "--batch-size", "2",
              "--patch-shape", "64,64", "--device", "cpu"]  # fmt: skip
    assert main(["train", str(img), str(lab), "-o", str(model), "--epochs", "2", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled_voxels"] == 2 * 64 * 64
    assert summary["validation_voxels"] == 64 * 64
    assert summary["epochs"] == 2
    out = tmp_path / "seg.tif"
    assert main(["segment", str(img), "-o", str(out), "--model", str(model)]) == 0
    assert read_image(out).data.shape == labels.shape
    # resume continues the epoch count of the saved run
    more = tmp_path / "m2.pt"
    assert main(["train", str(img), str(lab), "-o", str(more), "--init", str(model),
                 "--resume", "--epochs", "3", *common]) == 0  # fmt: skip
    from napari_segtool.model import SegmentationModel

    history = SegmentationModel.load(more).history
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume"], "--resume needs --init"),
        (["--init", "nowhere.pt"], "nowhere.pt: no such model"),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, extra, message):
    img = write_image(tmp_path / "img.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    lab = write_image(tmp_path / "lab.tif", np.zeros((8, 8), np.uint8))
    assert main(["train", str(img), str(lab), "-o", str(tmp_path / "m.pt"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


# -- issue 10 item 9: hostile files and paths give one line and exit 2, never a traceback --------
def _one_line_error(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _hostile_model(path, **meta_changes):
    import hashlib

    import torch

    from napari_segtool.config import ModelConfig
    from napari_segtool.model import SegmentationModel

    SegmentationModel.new(ModelConfig(base_features=4, depth=2), seed=0).save(path)
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata"])
    meta.update(meta_changes)
    payload["metadata"] = json.dumps(meta)
    payload["metadata_sha256"] = hashlib.sha256(payload["metadata"].encode()).hexdigest()
    torch.save(payload, path)
    return path


def _image_of(tmp_path, data):
    return write_image(tmp_path / "img.tif", data)


def _six_bytes(tmp_path):
    path = tmp_path / "img.tif"
    path.write_bytes(b"II*\x00\x08\x00")
    return path


def _hostile_files():
    from tests.io.test_tiff import huge_header_tiff, truncated_zlib_tiff

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 40))
    outliers = (noise * 1.0).astype(np.float64)
    outliers[0, 0] = 1e300  # one voxel far beyond the percentile range
    near_2_64 = np.uint64(2**64 - 1000)
    return {
        "six-bytes": (_six_bytes, "not a readable TIFF image (struct.error"),
        "truncated-zlib": (lambda d: truncated_zlib_tiff(d / "img.tif"),
                           "not a readable TIFF image ("),
        "huge-header": (lambda d: huge_header_tiff(d / "img.tif", shape=(400_000, 400_000)),
                        "400000 x 400000 float64 image (YX) needs 1.2 TiB"),
        "uint64-near-2**64": (lambda d: _image_of(d, noise.astype(np.uint64) + near_2_64),
                              "differ by too little"),
        "int64-near--2**62": (lambda d: _image_of(d, (-(2**62) + noise).astype(np.int64)),
                              "differ by too little"),
        "float64-1e300": (lambda d: _image_of(d, outliers), "overflow float32"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_hostile_files()))
def test_hostile_images_are_one_line(tmp_path, capsys, case):
    make, message = _hostile_files()[case]
    src = make(tmp_path)
    out = tmp_path / "labels.tif"
    err = _one_line_error(capsys, "segment", src, "-o", out, "--model", "new-2d")
    assert message in err
    assert not out.exists()


def test_hostile_label_files_are_one_line_in_evaluate(tmp_path, capsys):
    import re

    from tests.io.test_tiff import ZLIB_REASON, truncated_zlib_tiff

    good = write_image(tmp_path / "good.tif", np.zeros((8, 8), np.uint8))
    bad = truncated_zlib_tiff(tmp_path / "bad.tif")
    assert re.search(ZLIB_REASON, _one_line_error(capsys, "evaluate", bad, good))
    (tmp_path / "six.tif").write_bytes(b"II*\x00\x08\x00")
    assert "struct.error" in _one_line_error(capsys, "evaluate", good, tmp_path / "six.tif")


def test_model_with_negative_tile_shape_is_one_line(tmp_path, capsys):
    model = _hostile_model(tmp_path / "m.pt", tile_shape=[-5, 0])
    src = _image_of(tmp_path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    err = _one_line_error(capsys, "segment", src, "-o", tmp_path / "o.tif", "--model", model)
    assert "m.pt" in err
    assert "tile_shape" in err


@pytest.mark.parametrize("command", ["segment", "evaluate", "simulate"])
@pytest.mark.parametrize("where", ["folder", "under-a-file", "wrong-suffix"])
def test_bad_output_path_is_refused_before_computing(tmp_path, capsys, command, where):
    img = write_image(tmp_path / "img.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    lab = write_image(tmp_path / "lab.tif", (np.arange(64) % 2).astype(np.uint8).reshape(8, 8))
    (tmp_path / "plain").write_text("a file")
    suffix = ".tif" if command == "segment" else ".json"
    out = {
        "folder": tmp_path,
        "under-a-file": tmp_path / "plain" / f"out{suffix}",
        "wrong-suffix": tmp_path / "out.txt",
    }[where]
    args = {
        "segment": ["segment", img, "--model", "new-2d"],
        "evaluate": ["evaluate", lab, lab],
        "simulate": ["simulate", img, lab, "--rounds", "1", "--epochs", "1"],
    }[command]
    err = _one_line_error(capsys, *args, "-o", out)
    assert f"-o {out}" in err
    assert {"folder": "is a folder", "under-a-file": "is a file, not a folder",
            "wrong-suffix": "must end in"}[where] in err  # fmt: skip


def test_unwritable_output_folder_is_refused(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so make this folder unwritable as far as the check can tell
    monkeypatch.setattr(os, "access", lambda p, m: False if p == locked else real_access(p, m))
    img = write_image(tmp_path / "img.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    err = _one_line_error(capsys, "segment", img, "-o", locked / "o.tif", "--model", "new-2d")
    assert "permission denied" in err


def test_evaluate_and_simulate_write_json_output(tmp_path, capsys):
    lab = write_image(tmp_path / "lab.tif", (np.arange(64) % 3).astype(np.uint8).reshape(8, 8))
    out = tmp_path / "new" / "m.json"
    assert main(["evaluate", str(lab), str(lab), "--no-distances", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["per_class"]["2"]["dice"] == 1.0


# -- issue 10 item 10: one reading rule for every command ----------------------------------------
def test_three_slice_stack_is_a_stack_for_evaluate_and_segment(tmp_path, capsys):
    import tifffile

    ref = np.zeros((3, 32, 32), np.uint8)
    ref[:, 8:20, 8:20] = 1
    path = tmp_path / "three.tif"
    with pytest.warns(DeprecationWarning, match="separate component planes"):
        tifffile.imwrite(path, ref)  # tifffile stores this as planar RGB by default
    assert main(["evaluate", str(path), str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dice"] == 1.0
    assert result["hd"] == 0.0
    out = tmp_path / "seg.tif"
    assert main(["segment", str(path), "-o", str(out), "--model", "new-2d"]) == 0
    assert read_image(out).data.shape == (3, 32, 32)


def test_labels_with_a_channel_axis_are_refused(tmp_path, capsys):
    import tifffile

    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 8), np.uint8), photometric="minisblack",
                     metadata={"axes": "CYX"})  # fmt: skip
    assert "declares axes CYX" in _one_line_error(capsys, "evaluate", path, path)


# -- issue 10 item 5: confusion counts over the ids that occur ------------------------------------
def test_evaluate_one_voxel_of_65535_stays_small(tmp_path, capsys):
    ref = np.zeros((4, 16, 16), np.uint16)
    ref[1:3, 4:12, 4:12] = 117
    pred = ref.copy()
    pred[0, 0, 0] = 65535
    a = write_image(tmp_path / "p.tif", pred)
    b = write_image(tmp_path / "r.tif", ref)
    assert main(["evaluate", str(a), str(b), "--json", "--per-slice"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) == {"117", "65535"}
    assert result["per_class"]["117"]["dice"] == 1.0
    assert result["per_class"]["65535"]["dice"] == 0.0
    assert len(result["per_slice"]) == 4


# -- issue 10 item 12 -----------------------------------------------------------------------------
def test_models_description_matches_the_training_split(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "trained on slices 0-17" in out
    assert "held out 20-29" in out
    assert "0-19" not in out


def test_segment_probabilities_keep_the_spacing(tmp_path):
    data = np.arange(2 * 24 * 24, dtype=np.uint16).reshape(2, 24, 24)
    src = write_image(tmp_path / "s.tif", data, spacing=(40.0, 4.0, 4.0), unit="nm")
    probs = tmp_path / "p.tif"
    assert main(["segment", str(src), "-o", str(tmp_path / "l.tif"), "--model", "new-2d",
                 "--probabilities", str(probs)]) == 0  # fmt: skip
    back = read_image(probs)
    assert back.data.shape == (2, 2, 24, 24)
    assert (back.axes, back.spacing, back.unit) == ("CZYX", (40.0, 4.0, 4.0), "nm")


def test_demo_without_a_display_says_xvfb_run(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    err = _one_line_error(capsys, "demo")
    assert "xvfb-run -a napari-segtool demo" in err


def test_imagej_default_channels_get_a_clear_message(tmp_path, capsys):
    import tifffile

    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16), imagej=True)
    err = _one_line_error(capsys, "segment", path, "-o", tmp_path / "o.tif", "--model", "new-2d")
    assert "declares axes CYX (3 channels)" in err
    assert "metadata={'axes': 'ZYX'}" in err
