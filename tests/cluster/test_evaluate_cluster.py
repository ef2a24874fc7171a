"""`evaluate` of cohorts (two folders) and `evaluate --scheduler` on real clusters (issue 15)."""

import csv
import json

import numpy as np
import pytest

from napari_segtool.cli import evaluate, main
from napari_segtool.io import write_image
from napari_segtool.io.zarr_io import write_ome_zarr
from napari_segtool.metrics import evaluate as evaluate_in_memory

SPACING = (3.0, 1.0, 1.0)


def _pair(seed, shape=(6, 40, 30)):
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    ref[1:5, 5:30, 4:20] = 1
    ref[2:6, 20:38, 15:28] = 2 + seed % 2  # the cases differ in their classes too
    pred = ref.copy()
    flip = rng.random(shape) < 0.03 * (seed + 1)
    pred[flip] = rng.choice([0, 1, 2], size=int(flip.sum()))
    return pred, ref


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Folders of predictions (.zarr and TIFF) and references (TIFF), three cases, and the
    label arrays by case."""
    root = tmp_path_factory.mktemp("cohort")
    preds, refs = root / "pred", root / "ref"
    preds.mkdir()
    refs.mkdir()
    arrays = {}
    for i, name in enumerate(("case_a", "case_b", "case_c")):
        pred, ref = _pair(i)
        arrays[name] = pred, ref
        if i == 1:
            write_image(preds / f"{name}.tif", pred, spacing=SPACING)
        else:
            write_ome_zarr(preds / f"{name}.zarr", pred, spacing=SPACING, chunks=(2, 16, 16))
        write_image(refs / f"{name}.tif", ref, spacing=SPACING)
    return preds, refs, arrays


def _run(capsys, *args, code=0):
    got = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert got == code, err
    return json.loads(out), err


def _same(a, b):
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_a_cohort_gives_each_cases_own_numbers_a_table_and_the_summary(tmp_path, capsys, cohort):
    preds, refs, arrays = cohort
    report_path = tmp_path / "out" / "report.json"
    report, _ = _run(capsys, "evaluate", preds, refs, "--json", "-o", report_path)
    names = [r["case"] for r in report["cases"]]
    assert names == ["case_a", "case_b", "case_c"]
    for row in report["cases"]:
        pred, ref = arrays[row["case"]]
        one, _ = _run(capsys, "evaluate", row["pred"], row["ref"], "--json")
        _same({k: row[k] for k in one}, one)  # the pair's own `evaluate`
        want = evaluate_in_memory(pred, ref, spacing=SPACING)
        assert row["dice"] == pytest.approx(want["dice"], abs=1e-12)
    dice = [r["dice"] for r in report["cases"]]
    s = report["summary"]
    assert (s["cases"], s["failed"], s["missing_predictions"]) == (3, 0, [])
    assert s["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-12)
    assert s["dice"]["median"] == pytest.approx(np.median(dice), abs=1e-12)
    assert s["dice"]["n"] == 3
    assert set(s["per_class_dice"]) == {"1", "2", "3"}
    assert s["per_class_dice"]["3"]["n"] == 1  # only case_b has class 3
    _same(json.loads(report_path.read_text()), report)
    with open(report_path.with_suffix(".csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["case"] for t in table] == names
    assert report["cases"][0]["hd95"] is not None
    for t, row in zip(table, report["cases"], strict=True):
        assert float(t["dice"]) == row["dice"]
        if row["hd95"] is None:  # a class missing from one side: infinite, an empty cell
            assert t["hd95"] == ""
        else:
            assert float(t["hd95"]) == row["hd95"]
        assert float(t["dice_class_1"]) == row["per_class"]["1"]["dice"]
        assert (t["dice_class_3"] == "") == ("3" not in row["per_class"])


def test_a_cohort_on_a_dask_scheduler_with_two_workers_equals_in_process(
    capsys, cohort, dask_cluster
):
    preds, refs, _ = cohort
    address, sfile = dask_cluster
    want, _ = _run(capsys, "evaluate", preds, refs, "--json", "--per-slice")
    got, err = _run(capsys, "evaluate", preds, refs, "--json", "--per-slice",
                    "--scheduler", address)  # fmt: skip
    _same(got, want)
    assert f"scheduler {address}" in err
    by_file, _ = _run(capsys, "evaluate", preds, refs, "--json", "--per-slice",
                      "--scheduler", sfile)  # fmt: skip
    _same(by_file, want)


def test_a_bad_case_is_reported_and_the_others_still_counted(tmp_path, capsys, cohort):
    _, _, arrays = cohort
    bad_p, bad_r = tmp_path / "pred", tmp_path / "ref"
    bad_p.mkdir()
    bad_r.mkdir()
    for name, (pred, ref) in arrays.items():
        write_image(bad_p / f"{name}.tif", pred[:, :-1] if name == "case_b" else pred)
        write_image(bad_r / f"{name}.tif", ref)
    write_image(bad_r / "case_d.tif", ref)  # a reference without its prediction
    report, err = _run(capsys, "evaluate", bad_p, bad_r, "--json", code=2)
    rows = {r["case"]: r for r in report["cases"]}
    assert "differ in shape" in rows["case_b"]["error"]
    assert "dice" in rows["case_a"]
    assert "dice" in rows["case_c"]
    summary = report["summary"]
    assert (summary["failed"], summary["dice"]["n"]) == (1, 2)
    assert summary["missing_predictions"] == ["case_d"]
    assert "case_b:" in err
    assert "case_d has no prediction" in err


def test_a_prediction_without_a_reference_or_a_folder_against_a_file_is_one_line(
    tmp_path, capsys, cohort
):
    preds, refs, _ = cohort
    lone = tmp_path / "lone"
    lone.mkdir()
    write_image(lone / "other.tif", np.zeros((4, 8, 8), np.uint8))
    cases = [((lone, refs), "no reference for the prediction(s) other"),
             ((preds, refs / "case_a.tif"), "must be a folder of label images")]  # fmt: skip
    for args, message in cases:
        code = main(["evaluate", *map(str, args)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2
        assert err.startswith("napari-segtool evaluate: error:"), err
        assert message in err


@pytest.mark.parametrize("flags", [["--no-distances", "--per-slice"], ["--per-slice"], []])
def test_one_zarr_pair_split_into_runs_of_slices_equals_in_process(
    tmp_path, capsys, monkeypatch, flags
):
    pred, ref = _pair(4, shape=(10, 40, 30))
    p = write_ome_zarr(tmp_path / "p.zarr", pred, spacing=SPACING, chunks=(2, 16, 16))
    r = write_ome_zarr(tmp_path / "r.zarr", ref, spacing=SPACING, chunks=(3, 40, 30))
    if flags == ["--per-slice"]:  # above the limit: each slice's distances, split too
        monkeypatch.setattr(evaluate, "DISTANCE_LIMIT", pred.size - 1)
    monkeypatch.setattr(evaluate, "TASK_VOXELS", 2 * 40 * 30)  # five tasks of two slices
    want, _ = _run(capsys, "evaluate", p, r, "--json", *flags)
    got, err = _run(capsys, "evaluate", p, r, "--json", *flags, "--scheduler", "local:2")
    _same(got, want)
    assert "scheduler tcp://127.0.0.1:" in err
    if flags == ["--per-slice"]:
        assert got["hd"] is None
        assert got["per_slice"][3]["hd95"] is not None
