"""``finetune`` and ``project`` on a chunked project folder with a ``.zarr`` image."""

import json
from pathlib import Path

import numpy as np
import tifffile
import zarr

from napari_segtool.cli import main
from napari_segtool.io.project import ChunkedState, Project
from tests.training.conftest import tiny_model

SAMPLE = Path(__file__).parents[1] / "napari_segtool" / "sample_data"
ROUND = ["--epochs", "2", "--steps-per-epoch", "6", "--learning-rate", "0.01", "--device", "cpu"]


def _json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_finetune_a_chunked_project_with_a_zarr_image(tmp_path, capsys):
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:8, :128, :128]
    truth = tifffile.imread(SAMPLE / "isbi2012_em_membranes.tif")[:8, :128, :128]
    image = zarr.create_array(tmp_path / "em.zarr", shape=em.shape, dtype=em.dtype,
                              chunks=(2, 128, 128))  # fmt: skip
    image[:] = em
    start = tiny_model().save(tmp_path / "start.pt")
    project = Project(tmp_path / "em.segtool")
    machine = np.zeros(em.shape, np.uint8)
    record = {"name": "em", "path": str(tmp_path / "em.zarr")}
    state = project.create_chunked(labels=machine, machine=machine, chunks=(1, 64, 64),
                                   base_model=str(start), image=record)  # fmt: skip
    for z in (0, 3, 5, 7):
        state.labels[z] = truth[z]
    state.reviewed = {0, 3, 5, 7}
    project.save(state)
    protected = state.protected()
    before = np.asarray(state.labels[:])

    assert main(["finetune", str(project.folder), *ROUND]) == 0
    out = _json(capsys)
    assert out["version"] == 1
    assert out["validation_voxels"] > 0
    assert out["labelled_voxels"] == 4 * 128 * 128
    assert out["promoted"] == (out["val_dice"] >= out["baseline_dice"])
    assert (out["resegmented_voxels"] is not None) == out["promoted"]
    again = project.load()
    assert isinstance(again, ChunkedState)
    assert np.array_equal(np.asarray(again.labels[:])[protected], before[protected])
    assert (project.folder / "models" / "v0001.pt").is_file()

    assert main(["project", str(project.folder)]) == 0
    info = _json(capsys)
    assert info["storage"] == "chunked"
    assert [v["version"] for v in info["versions"]] == [1]
    assert info["labelled_voxels"] == 4 * 128 * 128


def test_project_create_from_zarr_is_chunked_and_counts_what_the_flags_say(tmp_path, capsys):
    em = tifffile.imread(SAMPLE / "isbi2012_em.tif")[:6, :96, :96]
    truth = tifffile.imread(SAMPLE / "isbi2012_em_membranes.tif")[:6, :96, :96]
    paths = {}
    for name, data in (("em", em), ("labels", truth), ("mask", np.zeros_like(truth))):
        arr = zarr.create_array(tmp_path / f"{name}.zarr", shape=data.shape, dtype=data.dtype,
                                chunks=(1, 48, 48))  # fmt: skip
        arr[:] = data
        paths[name] = tmp_path / f"{name}.zarr"
    mask = zarr.open_array(paths["mask"], mode="r+")
    mask[4, 10:20, 30:50] = 1  # 200 painted voxels outside the reviewed slices
    folder = tmp_path / "em.zarr.segtool"
    args = ["project", str(folder), "--create", str(paths["em"]), "--labels",
            str(paths["labels"]), "--mask", str(paths["mask"]), "--reviewed", "1,2",
            "--model", str(tiny_model().save(tmp_path / "start.pt"))]  # fmt: skip
    assert main(args) == 0
    info = _json(capsys)
    assert info["storage"] == "chunked"
    assert info["reviewed"] == [1, 2]
    assert info["painted_voxels"] == 200
    assert info["labelled_voxels"] == 2 * 96 * 96 + 200
    state = Project(folder).load()
    assert isinstance(state, ChunkedState)
    np.testing.assert_array_equal(np.asarray(state.labels[:]), truth)
    assert main(args) == 2  # the folder holds a project now: refused, not overwritten
    assert "already holds a project" in capsys.readouterr().err
    bad = ["project", str(tmp_path / "other.segtool"), "--create", str(paths["em"]),
           "--labels", str(paths["labels"]), "--reviewed", "6"]  # fmt: skip
    assert main(bad) == 2
    assert "outside the image's slices" in capsys.readouterr().err
    assert not (tmp_path / "other.segtool").exists()
