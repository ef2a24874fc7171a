"""`napari-segtool train`: options checked before any work, models never replaced by worse."""

import json

import numpy as np
import pytest

from napari_segtool.cli import main
from napari_segtool.io import write_image
from napari_segtool.model import SegmentationModel
from tests.training.conftest import blobs

FAST = ["--steps-per-epoch", "3", "--batch-size", "2", "--patch-shape", "48,48",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture
def files(tmp_path):
    image, labels = blobs((3, 48, 48))
    return write_image(tmp_path / "img.tif", image), write_image(tmp_path / "lab.tif", labels)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning-rate", "nan"], "--learning-rate nan: give a positive finite number"),
        (["--learning-rate", "inf"], "--learning-rate inf: give a positive finite number"),
        (["--learning-rate=-1e-3"], "--learning-rate -0.001: give a positive finite"),
        (["--learning-rate", "0"], "--learning-rate 0.0: give a positive finite number"),
        (["--seed=-1"], "--seed -1: give a seed >= 0"),
        (["-o", "{tmp}"], "is a folder; name a file in it"),
        (["-o", "{tmp}/afile.txt/m.pt"], "afile.txt is a file, not a folder"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_is_read(tmp_path, capsys, extra, message):
    (tmp_path / "afile.txt").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    # the image does not exist: an option error must come first, before reading it
    argv = ["train", str(tmp_path / "missing.tif"), str(tmp_path / "missing_lab.tif"),
            "-o", str(tmp_path / "m.pt"), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_a_diverging_run_saves_nothing_and_keeps_the_existing_model(tmp_path, files, capsys):
    img, lab = files
    model = tmp_path / "m.pt"
    assert main(["train", str(img), str(lab), "-o", str(model), "--epochs", "1", *FAST]) == 0
    before = model.read_bytes()
    capsys.readouterr()
    argv = ["train", str(img), str(lab), "-o", str(model), "--init", str(model),
            "--learning-rate", "1e30", "--epochs", "2", *FAST]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "training diverged" in err
    assert len(err.splitlines()) == 1
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "lab.tif", "m.pt"]


def test_a_model_that_is_not_promoted_is_written_beside_not_over(
    tmp_path, files, capsys, caplog, monkeypatch
):
    img, lab = files
    model = tmp_path / "m.pt"
    assert main(["train", str(img), str(lab), "-o", str(model), "--epochs", "2", *FAST]) == 0
    before = model.read_bytes()
    capsys.readouterr()
    # a round that comes out worse than its start (on the same held-out voxels)
    from napari_segtool.training import finetune

    real = finetune.masked_scores
    calls = []

    def baseline_wins(m, items, *, inference):
        dice, err = real(m, items, inference=inference)
        calls.append(dice)
        return (1.0 if len(calls) == 1 else min(dice, 0.5)), err

    monkeypatch.setattr(finetune, "masked_scores", baseline_wins)
    argv = ["train", str(img), str(lab), "-o", str(model), "--init", str(model),
            "--epochs", "1", *FAST]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    rejected = tmp_path / "m.rejected.pt"
    assert summary["promote"] is False
    assert summary["output"] == str(rejected)
    assert summary["kept"] == str(model)
    assert summary["replaced"] is False
    assert f"kept {model} unchanged" in caplog.text  # a warning: on stderr from the shell
    assert model.read_bytes() == before
    assert SegmentationModel.load(rejected).history  # the new model is there to inspect


def test_sparse_label_ids_train_as_their_real_class_count(tmp_path, capsys):
    image, mask = blobs((3, 48, 48))
    labels = np.where(mask == 1, 117, 0).astype(np.uint16)
    labels[:, :, :24][mask[:, :, :24] == 1] = 5
    labels[0, 0, 0] = 65535  # one stray voxel must not make a 65536-class model
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    out = tmp_path / "m.pt"
    assert main(["train", str(img), str(lab), "-o", str(out), "--epochs", "1", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == 4
    assert summary["label_values"] == [0, 5, 117, 65535]
    model = SegmentationModel.load(out)
    assert model.config.out_channels == 4
    assert model.label_values == (0, 5, 117, 65535)


def test_negative_labels_are_one_line(tmp_path, capsys):
    image, mask = blobs((2, 32, 32))
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", mask.astype(np.int16) - 1)
    assert main(["train", str(img), str(lab), "-o", str(tmp_path / "m.pt"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "negative value -1" in err
    assert len(err.splitlines()) == 1


def test_train_and_simulate_read_zarr_inputs_like_tiffs(tmp_path, capsys):
    from napari_segtool.io.zarr_io import write_ome_zarr

    image, labels = blobs((3, 48, 48))
    img = write_ome_zarr(tmp_path / "img.zarr", image, chunks=(1, 16, 16))
    lab = write_ome_zarr(tmp_path / "lab.zarr", labels, chunks=(1, 16, 16))
    mask = write_ome_zarr(tmp_path / "mask.zarr", np.ones_like(labels))
    tif_img = write_image(tmp_path / "img.tif", image)
    tif_lab = write_image(tmp_path / "lab.tif", labels)
    tif_mask = write_image(tmp_path / "mask.tif", np.ones_like(labels))
    argv = ["--epochs", "1", "--seed", "3", "--precision", "fp32", *FAST]
    assert main(["train", str(img), str(lab), "--mask", str(mask), "-o",
                 str(tmp_path / "z.pt"), *argv]) == 0  # fmt: skip
    from_zarr = json.loads(capsys.readouterr().out)
    assert main(["train", str(tif_img), str(tif_lab), "--mask", str(tif_mask), "-o",
                 str(tmp_path / "t.pt"), *argv]) == 0  # fmt: skip
    from_tiff = json.loads(capsys.readouterr().out)
    assert from_zarr["label_values"] == from_tiff["label_values"] == [0, 1]
    same = ("best_dice", "baseline_dice", "labelled_voxels", "validation_voxels")
    assert {k: from_zarr[k] for k in same} == {k: from_tiff[k] for k in same}  # the same run
    assert main(["simulate", str(img), str(lab), "--rounds", "1", "--initial", "1",
                 "--per-round", "1", "--json", *FAST[:-2], "--epochs", "1"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["units"] == "slices"


def test_a_zarr_too_large_to_hold_is_one_line(tmp_path, capsys, monkeypatch):
    from napari_segtool.io import memory
    from napari_segtool.io.zarr_io import write_ome_zarr

    image, labels = blobs((2, 32, 32))
    img = write_ome_zarr(tmp_path / "img.zarr", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    assert main(["train", str(img), str(lab), "-o", str(tmp_path / "m.pt"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{img}: training reads the 2 x 32 x 32 uint8 array into memory" in err
    assert len(err.splitlines()) == 1
