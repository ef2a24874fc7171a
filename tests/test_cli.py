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
