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
