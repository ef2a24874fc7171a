"""The architecture seam from the command line (issue 11 item 3)."""

import json

import numpy as np

from napari_segtool.cli import main
from napari_segtool.io import read_image, write_image
from napari_segtool.model import SegmentationModel
from tests.training.conftest import blobs


def test_train_arch_resunet_then_segment_with_it(tmp_path, capsys):
    image, labels = blobs((2, 48, 48))
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    out = tmp_path / "res.pt"
    args = ["train", str(img), str(lab), "-o", str(out), "--arch", "resunet", "--epochs", "1",
            "--steps-per-epoch", "1", "--patch-shape", "32,32", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    model = SegmentationModel.load(out)
    assert model.config.architecture == "resunet"
    assert type(model.network).__name__ == "ResUNet"
    seg = tmp_path / "seg.tif"
    assert main(["segment", str(img), "-o", str(seg), "--model", str(out)]) == 0
    assert read_image(seg).data.shape == labels.shape
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kinds = {row["name"]: row["architecture"] for row in rows}
    assert kinds["em-membranes-2d"] == "unet"
    assert kinds["new-resunet-2d"] == "resunet"
    assert np.isfinite([r["spatial_dims"] for r in rows]).all()
