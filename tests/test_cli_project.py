"""``project`` and ``finetune``: a project made without the GUI, trained headless."""

import json

import numpy as np
import pytest

from napari_segtool.cli import main
from napari_segtool.io import read_image, write_image
from napari_segtool.io.project import Project
from tests.training.conftest import blobs, tiny_model

ROUND = ["--epochs", "2", "--steps-per-epoch", "6", "--learning-rate", "0.01", "--device", "cpu"]


@pytest.fixture
def files(tmp_path):
    """A 5-slice stack, labels on 3 slices (the rest 0) and a tiny starting model."""
    image, truth = blobs((5, 64, 64))
    labels = truth.copy()
    labels[3:] = 0
    img = write_image(tmp_path / "stack.tif", image)
    lab = write_image(tmp_path / "labels.tif", labels)
    start = tiny_model().save(tmp_path / "start.pt")
    return img, lab, start, truth


def _json(capsys):
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    return json.loads(lines[0])


def _create(files, folder, *extra):
    img, lab, start, _ = files
    argv = ["project", str(folder), "--create", str(img), "--labels", str(lab),
            "--reviewed", "0,1,2", "--model", str(start), *extra]  # fmt: skip
    return main(argv)


def test_create_finetune_twice_list_and_segment_with_a_version(files, tmp_path, capsys):
    folder = tmp_path / "stack.tif.segtool"
    assert _create(files, folder) == 0
    created = _json(capsys)
    assert created["versions"] == []
    assert created["reviewed"] == [0, 1, 2]
    assert created["labelled_voxels"] == 3 * 64 * 64
    assert created["image"]["path"] == str(files[0].resolve())
    rounds = []
    for _ in range(2):
        assert main(["finetune", str(folder), *ROUND]) == 0
        rounds.append(_json(capsys))
    assert [r["version"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["val_dice"] is not None
        assert r["baseline_dice"] is not None
        assert r["promoted"] == (r["val_dice"] >= r["baseline_dice"])
        assert (r["resegmented_voxels"] is not None) == r["promoted"]
    assert rounds[0]["promoted"]  # a trained model beats the random start
    assert main(["project", str(folder)]) == 0
    info = _json(capsys)
    assert [v["version"] for v in info["versions"]] == [1, 2]
    assert [v["val_dice"] for v in info["versions"]] == [r["val_dice"] for r in rounds]
    assert info["versions"][1]["parent"] == 1
    assert info["current_version"] == (2 if rounds[1]["promoted"] else 1)
    # re-segmenting wrote slices 3 and 4; the reviewed slices kept their labels
    saved = Project(folder).load()
    assert np.array_equal(saved.labels[:3], files[3][:3])
    assert saved.labels[3:].any()
    out = tmp_path / "seg.tif"
    model = folder / "models" / "v0001.pt"
    assert main(["segment", str(files[0]), "-o", str(out), "--model", str(model),
                 "--device", "cpu"]) == 0  # fmt: skip
    summary = _json(capsys)
    assert read_image(out).data.shape == (5, 64, 64)
    assert summary["shape"] == [5, 64, 64]


def test_a_project_open_in_napari_refuses_the_round_naming_it(files, tmp_path, capsys):
    folder = tmp_path / "p.segtool"
    assert _create(files, folder) == 0
    capsys.readouterr()
    before = (folder / "state.npz").read_bytes()
    gui = Project(folder, program="napari-segtool Fine-tune (napari)")
    with gui.lock():
        code = main(["finetune", str(folder), *ROUND])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert "held by napari-segtool Fine-tune (napari) (pid " in err
    assert (folder / "state.npz").read_bytes() == before
    assert not (folder / "models").exists()


def test_finetune_takes_the_image_from_the_flag_when_it_moved(files, tmp_path, capsys):
    folder = tmp_path / "p.segtool"
    assert _create(files, folder) == 0
    capsys.readouterr()
    moved = files[0].rename(tmp_path / "moved.tif")
    assert main(["finetune", str(folder), *ROUND]) == 2
    err = capsys.readouterr().err
    assert "is not there" in err
    assert "--image" in err
    assert main(["finetune", str(folder), "--image", str(moved), *ROUND]) == 0
    assert _json(capsys)["version"] == 1


NEW = ["project", "{tmp}/q.segtool", "--create", "{tmp}/stack.tif", "--labels", "{tmp}/labels.tif"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "{tmp}/none.segtool"], "no project here"),
        (["project", "{tmp}/none.segtool"], "no project here"),
        (
            ["project", "{tmp}/p.segtool", "--labels", "{tmp}/labels.tif"],
            "--labels needs --create",
        ),
        (NEW[:4], "--create needs --labels"),
        ([*NEW, "--reviewed", "2,9"], "outside 0..4"),
        ([*NEW, "--model", "nope"], "neither a bundled model"),
        ([*NEW, "--mask", "{tmp}/small.tif"], "does not match the labels"),
        ([*NEW[:1], "{tmp}/p.segtool", *NEW[2:]], "already holds a project"),
        (["finetune", "{tmp}/p.segtool", "--image", "{tmp}/small.tif"], "give the project's"),
        (["finetune", "{tmp}/p.segtool", "--learning-rate", "nan"], "--learning-rate nan"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, argv, message):
    assert _create(files, tmp_path / "p.segtool") == 0
    write_image(tmp_path / "small.tif", np.zeros((5, 8, 8), np.uint8))
    capsys.readouterr()
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "q.segtool" / "state.npz").exists()


def test_an_unexpected_error_is_one_line_and_exit_1_and_debug_shows_it(
    files, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "p.segtool"
    assert _create(files, folder) == 0
    capsys.readouterr()

    def broken(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Project, "load", broken)
    assert main(["project", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "napari-segtool project: error: unexpected RuntimeError: disk on fire "
        "(run with --debug for the traceback)\n"
    )
    for argv in (["--debug", "project", str(folder)], ["project", str(folder), "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):")
        assert "in broken" in err
        assert err.endswith(
            "napari-segtool project: error: unexpected RuntimeError: disk on fire\n"
        )


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--sample", "--screenshot", "--segment", "--review", "--finetune", "--project"):
        assert flag in out
    assert "isbi_em" in out
