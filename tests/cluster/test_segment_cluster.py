"""`segment --scheduler`: boxes as dask tasks on real clusters, resumable (issue 15)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from napari_segtool.cli import main
from napari_segtool.cluster.records import RunRecord
from napari_segtool.cluster.scheduler import parse_scheduler
from napari_segtool.errors import InputError
from napari_segtool.io import read_image, write_image
from napari_segtool.io.zarr_io import read_zarr, write_ome_zarr
from tests.cluster.conftest import done_count

ROOT_SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample_data"
SPACING = (50.0, 4.0, 4.0)
FP32 = ["--precision", "fp32", "--compile", "off", "--device", "cpu"]
BLOCK = ["--block-shape", "1,256,256"]


@pytest.fixture(scope="module")
def em():
    return read_image(ROOT_SAMPLE / "isbi2012_em.tif").data[:12]


@pytest.fixture(scope="module")
def volume(tmp_path_factory, em):
    """The EM slices as OME-Zarr, and the in-process labels of them (the reference)."""
    folder = tmp_path_factory.mktemp("vol")
    store = write_ome_zarr(folder / "em.zarr", em, spacing=SPACING, unit="nm",
                           chunks=(1, 256, 256))  # fmt: skip
    code = main(["segment", str(store), "-o", str(folder / "ref.zarr"), *FP32])
    assert code == 0
    return store, read_zarr(folder / "ref.zarr").data[...]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _one_line_error(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("napari-segtool segment: error:"), err
    return err


def test_local_cluster_equals_in_process_and_resumes(tmp_path, capsys, volume):
    store, ref = volume
    out = tmp_path / "out.zarr"
    got = _run(capsys, "segment", store, "-o", out, "--scheduler", "local:2", *BLOCK, *FP32)
    labels = read_zarr(out)
    np.testing.assert_array_equal(labels.data[...], ref)
    assert 0.1 < (ref == 1).mean() < 0.5  # membranes and cells: the comparison can fail
    assert (labels.spacing, labels.unit) == (SPACING, "nm")
    want = read_zarr(store.parent / "ref.zarr")
    for a, b in zip(labels.levels, want.levels, strict=True):  # the pyramid, level by level
        np.testing.assert_array_equal(a[...], b[...])
    assert got["blocks"] == {"total": 48, "computed": 48, "resumed": 0, "empty": 0,
                             "retried": 0}  # fmt: skip
    assert got["workers"] == 2
    assert got["engine"] == "cluster"
    assert sum(got["inputs"][0]["classes"].values()) == ref.size
    record = RunRecord.open(out)
    assert record.complete
    # the same command again: nothing to compute
    again = _run(capsys, "segment", store, "-o", out, "--scheduler", "local:1", *BLOCK, *FP32)
    assert again["blocks"]["computed"] == 0
    assert again["blocks"]["resumed"] == 48
    # other settings against the existing output: refused, unless --overwrite
    err = _one_line_error(capsys, "segment", store, "-o", out, "--scheduler", "local:1",
                          *BLOCK, *FP32, "--overlap", "0.5")  # fmt: skip
    assert "other settings (overlap)" in err
    assert "--overwrite" in err


def test_a_folder_of_tiff_stacks_equals_in_process_runs(tmp_path, capsys, em):
    folder = tmp_path / "stacks"
    folder.mkdir()
    for i in range(3):  # three stacks of different shapes
        write_image(folder / f"s{i}.tif", em[i : i + 2 + i, : 200 + 40 * i, :300],
                    spacing=SPACING, unit="nm")  # fmt: skip
    seq = _run(capsys, "segment", folder, "-o", tmp_path / "seq", *FP32)
    assert [r["engine"] for r in seq["inputs"]] == ["in-memory"] * 3
    par = _run(capsys, "segment", folder / "*.tif", "-o", tmp_path / "par", "--scheduler",
               "local:2", *FP32)  # fmt: skip
    assert par["blocks"]["computed"] == par["blocks"]["total"] >= 3
    for i in range(3):
        a = read_image(tmp_path / "seq" / f"s{i}.tif").data
        b = read_zarr(tmp_path / "par" / f"s{i}.zarr")
        np.testing.assert_array_equal(b.data[...], a)
        assert b.spacing == SPACING


def test_min_intensity_skips_empty_blocks(tmp_path, capsys, em):
    image = em[:4].copy()
    image[:, :256, :] = 0  # the top half of every slice is empty
    store = write_ome_zarr(tmp_path / "half.zarr", image, chunks=(1, 256, 256))
    got = _run(capsys, "segment", store, "-o", tmp_path / "o.zarr", "--scheduler", "local:1",
               *BLOCK, *FP32, "--min-intensity", "1")  # fmt: skip
    assert got["blocks"]["empty"] == 8
    assert got["blocks"]["computed"] == 8
    labels = read_zarr(tmp_path / "o.zarr").data[...]
    assert (labels[:, :256] == 0).all()
    assert (labels[:, 256:] == 1).mean() > 0.1


def test_a_coarse_foreground_mask_skips_the_blocks_without_tissue(tmp_path, capsys, volume):
    store, ref = volume  # 12 x 512 x 512, spacing (50, 4, 4) nm: 48 blocks of 1 x 256 x 256
    mask = np.zeros((3, 8, 8), np.uint8)  # 4 slices x 64 x 64 voxels per mask voxel
    mask[0, 3, 4] = 1  # one voxel: slices 0-3, rows 192-255, columns 256-319
    mask_path = write_image(tmp_path / "mask.tif", mask, spacing=(200.0, 256.0, 256.0))
    out = tmp_path / "o.zarr"
    got = _run(capsys, "segment", store, "-o", out, "--scheduler", "local:1", *BLOCK, *FP32,
               "--foreground-mask", mask_path)  # fmt: skip
    assert (got["blocks"]["computed"], got["blocks"]["empty"]) == (4, 44)
    labels = read_zarr(out).data[...]
    keep = (slice(0, 4), slice(0, 256), slice(256, 512))  # the blocks the voxel touches
    np.testing.assert_array_equal(labels[keep], ref[keep])
    outside = np.ones(labels.shape, bool)
    outside[keep] = False
    assert (labels[outside] == 0).all()
    assert (ref[outside] != 0).any()  # so the skip is visible
    # another mask is another run: refused without --overwrite
    mask[0, 0, 0] = 1
    write_image(mask_path, mask, spacing=(200.0, 256.0, 256.0))
    err = _one_line_error(capsys, "segment", store, "-o", out, "--scheduler", "local:1",
                          *BLOCK, *FP32, "--foreground-mask", mask_path)  # fmt: skip
    assert "--overwrite" in err


@pytest.mark.parametrize(
    ("shape", "spacing", "message"),
    [((3, 8, 8), (200.0, 128.0, 256.0), "must cover the same field of view"),
     ((8, 8), (256.0, 256.0), "spatial axes"),
     ((24, 8, 8), (25.0, 256.0, 256.0), "more voxels than the image")],
)  # fmt: skip
def test_a_mask_of_another_field_of_view_is_refused(tmp_path, capsys, volume, shape, spacing,
                                                    message):  # fmt: skip
    store, _ = volume
    mask = write_image(tmp_path / "m.tif", np.ones(shape, np.uint8), spacing=spacing)
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "o.zarr", "--scheduler",
                          "local:1", *FP32, "--foreground-mask", mask)  # fmt: skip
    assert message in err
    assert not (tmp_path / "o.zarr").exists()


def _segment_process(store, out, address):
    cmd = [sys.executable, "-m", "napari_segtool.cli", "segment", str(store), "-o", str(out),
           "--scheduler", address, *BLOCK, *FP32]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip


def _wait_done(out, n, proc, timeout=120):
    end = time.monotonic() + timeout
    while done_count(out) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run made no progress"
        time.sleep(0.05)


def test_client_killed_mid_run_and_the_rerun_computes_only_the_rest(tmp_path, capsys, volume,
                                                                     dask_cluster):  # fmt: skip
    store, ref = volume
    address, _ = dask_cluster
    out = tmp_path / "out.zarr"
    proc = _segment_process(store, out, address)
    _wait_done(out, 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    at_kill = done_count(out)
    assert 6 <= at_kill < 48
    time.sleep(2)  # boxes already running on the workers may still finish and be recorded
    got = _run(capsys, "segment", store, "-o", out, "--scheduler", address, *BLOCK, *FP32)
    blocks = got["blocks"]
    assert blocks["resumed"] >= at_kill
    assert blocks["computed"] == 48 - blocks["resumed"] > 0  # only what was missing
    np.testing.assert_array_equal(read_zarr(out).data[...], ref)


def test_a_worker_killed_mid_run_has_its_box_retried(tmp_path, capsys, volume, dask_cluster):
    from distributed import Client

    store, ref = volume
    address, _ = dask_cluster
    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=90)
        pids = list(client.run(os.getpid).values())
    out = tmp_path / "out.zarr"
    proc = _segment_process(store, out, address)
    _wait_done(out, 4, proc)
    os.kill(pids[0], signal.SIGKILL)  # its nanny starts a new worker
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    got = json.loads(stdout)
    assert got["blocks"]["computed"] == 48
    assert got["blocks"]["retried"] >= 1  # the box it was running started again elsewhere
    np.testing.assert_array_equal(read_zarr(out).data[...], ref)


def test_scheduler_values_are_checked():
    assert parse_scheduler("local:3") == ("local", 3)
    for bad in ("local:0", "local:x", "http://x:1", "nowhere"):
        with pytest.raises(InputError):
            parse_scheduler(bad)


def test_scheduler_outputs_must_be_zarr_and_flags_need_a_scheduler(tmp_path, capsys, volume):
    store, _ = volume
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "o.tif", "--scheduler",
                          "local:1", *FP32)  # fmt: skip
    assert "name a .zarr store" in err
    err = _one_line_error(capsys, "segment", store, "-o", tmp_path / "o.zarr", *BLOCK)
    assert "--scheduler" in err
    assert not (tmp_path / "o.zarr").exists()
