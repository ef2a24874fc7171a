"""Every command takes medical volumes; ``segment`` writes labels in the input's geometry."""

import json

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from napari_segtool.cli import main
from napari_segtool.metrics import evaluate
from tests.io.medical_data import image, write_dicom_series
from tests.training.conftest import blobs, tiny_model

FAST = ["--steps-per-epoch", "2", "--batch-size", "2", "--patch-shape", "32,32",
        "--device", "cpu"]  # fmt: skip
SPACING = (0.8, 0.6, 3.0)  # x, y, z (mm)


@pytest.fixture
def files(tmp_path):
    """An oblique CT-like stack and its labels as .nii.gz, and a tiny model."""
    img, labels = blobs((4, 48, 48))
    paths = {}
    for name, data in (("img", img), ("lab", labels)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image(data, spacing=SPACING), str(paths[name]))
    paths["model"] = tiny_model().save(tmp_path / "tiny.pt")
    return paths


def _one_line_error(capfd, *args):
    capfd.readouterr()
    code = main([str(a) for a in args])
    err = capfd.readouterr().err  # file-descriptor level: ITK's own prints would show here
    assert code == 2, err
    assert err.count("\n") == 1, err
    return err


def test_segment_writes_labels_in_the_inputs_geometry(files, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    argv = ["segment", files["img"], "-o", out, "--model", files["model"], "--tile-shape",
            "32,32", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [4, 48, 48]
    src, back = sitk.ReadImage(str(files["img"])), sitk.ReadImage(str(out))
    assert back.GetSize() == src.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), src.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), src.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), src.GetDirection(), atol=1e-6)
    assert back.GetPixelID() == sitk.sitkUInt8


def test_evaluate_uses_the_spacing_in_the_file(files, tmp_path, capsys):
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(files["lab"])))
    pred = np.roll(ref, 3, axis=2)  # shifted by 3 voxels along X
    pred_path = tmp_path / "pred.nrrd"
    sitk.WriteImage(image(pred, spacing=SPACING), str(pred_path))
    assert main(["evaluate", str(pred_path), str(files["lab"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = evaluate(pred, ref, spacing=SPACING[::-1])  # (z, y, x) in mm
    assert got["hd95"] == pytest.approx(expected["hd95"], rel=1e-5)
    assert got["assd"] == pytest.approx(expected["assd"], rel=1e-5)
    assert got["hd95"] != pytest.approx(evaluate(pred, ref, spacing=(1, 1, 1))["hd95"])


def test_evaluate_refuses_labels_on_another_grid(files, tmp_path, capfd):
    ref = sitk.ReadImage(str(files["lab"]))
    moved = sitk.Image(ref)
    moved.SetOrigin((ref.GetOrigin()[0] + 5.0, *ref.GetOrigin()[1:]))
    sitk.WriteImage(moved, str(tmp_path / "moved.mha"))
    err = _one_line_error(capfd, "evaluate", tmp_path / "moved.mha", files["lab"])
    assert "moved.mha is not on the voxel grid of" in err
    assert "origin" in err


def test_train_simulate_and_a_project_round_on_medical_files(files, tmp_path, capsys):
    img, lab = str(files["img"]), str(files["lab"])
    model = tmp_path / "m.pt"
    assert main(["train", img, lab, "-o", str(model), "--epochs", "1", *FAST]) == 0
    assert model.exists()
    argv = ["simulate", img, lab, "--init", str(files["model"]), "--strategy", "random",
            "--initial", "1", "--rounds", "1", "--per-round", "1", "--epochs", "1", *FAST,
            "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    folder = tmp_path / "img.segtool"
    argv = ["project", str(folder), "--create", img, "--labels", lab, "--reviewed", "0,1",
            "--model", str(files["model"])]  # fmt: skip
    assert main(argv) == 0
    argv = ["finetune", str(folder), "--epochs", "1", "--steps-per-epoch", "2", "--device",
            "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["project"] == str(folder)


def test_segment_reads_a_dicom_folder_and_refuses_a_mixed_one(files, tmp_path, capfd):
    hu = (blobs((3, 32, 32))[0].astype(np.int16) * 4) - 1000
    write_dicom_series(tmp_path / "ct", hu)
    out = tmp_path / "ct_labels.nrrd"
    argv = ["segment", tmp_path / "ct", "-o", out, "--model", files["model"], "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (32, 32, 3)
    write_dicom_series(tmp_path / "ct", hu, uid="1.2.3.99", names=["o1", "o2", "o3"])
    err = _one_line_error(capfd, "segment", tmp_path / "ct", "-o", out, "--model", "new-2d")
    assert f"{tmp_path / 'ct'}: holds 2 DICOM series" in err


@pytest.mark.parametrize(
    ("command", "bad"),
    [("segment", "img"), ("evaluate", "lab"), ("train", "lab"), ("simulate", "img")],
)
def test_bad_medical_files_end_each_command_in_one_line(files, tmp_path, capfd, command, bad):
    broken = tmp_path / "broken.mha"
    noise = np.random.default_rng(0).integers(0, 2**15, (4, 48, 48)).astype(np.int16)
    sitk.WriteImage(image(noise, spacing=SPACING), str(broken), useCompression=True)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated: ITK prints "not read" itself
    paths = {"img": files["img"], "lab": files["lab"], bad: broken}
    args = {
        "segment": ["segment", paths["img"], "-o", tmp_path / "o.nii.gz"],
        "evaluate": ["evaluate", paths["img"], paths["lab"]],
        "train": ["train", paths["img"], paths["lab"], "-o", tmp_path / "m.pt", *FAST],
        "simulate": ["simulate", paths["img"], paths["lab"], *FAST],
    }[command]
    err = _one_line_error(capfd, *args)
    assert f"{broken}: cannot read the voxels" in err
