"""The cluster run as a generator (the widget's path): progress, cancel, resume."""

import threading
from dataclasses import replace

import numpy as np
import pytest

from napari_segtool.cluster.background import CancelledError, iter_segment_on_cluster
from napari_segtool.cluster.inputs import cluster_input
from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.io.zarr_io import read_zarr
from napari_segtool.model import load_model
from tests.cluster.test_segment_cluster import (
    em,  # noqa: F401
    volume,  # noqa: F401  (module fixture)
)

CONFIG = replace(InferenceConfig(), precision="fp32", compile="off", device="cpu")


def drain(run):
    reports = []
    return reports, run_to_end(run, reports.append)


def test_progress_then_cancel_then_a_rerun_resumes_to_the_in_process_labels(tmp_path, volume):  # noqa: F811
    store, ref = volume
    model = load_model("em-membranes-2d")
    out = tmp_path / "out.zarr"
    inp = cluster_input(store, {"labels": out}, model)
    cancel = threading.Event()
    run = iter_segment_on_cluster("local:1", [inp], model, config=CONFIG, cancel=cancel,
                                  block_shape=(1, 512, 512))  # fmt: skip
    first = next(run)
    assert first == (0, 12)
    cancel.set()
    with pytest.raises(CancelledError):
        drain(run)
    reports, summary = drain(iter_segment_on_cluster("local:1", [inp], model, config=CONFIG,
                                                     block_shape=(1, 512, 512)))  # fmt: skip
    done_before = summary["blocks"]["resumed"]
    assert 1 <= done_before < 12  # the cancelled run kept what it finished
    assert summary["blocks"]["computed"] == 12 - done_before
    assert reports[0] == (0, 12 - done_before)
    assert reports[-1] == (12 - done_before, 12 - done_before)
    assert summary["scheduler"].startswith("tcp://127.0.0.1:")
    np.testing.assert_array_equal(read_zarr(out).data[...], ref)


def test_a_region_input_is_checked_and_carries_its_translation(volume):  # noqa: F811
    store, _ = volume
    model = load_model("em-membranes-2d")
    box = (slice(2, 5), slice(0, 256), slice(256, 512))
    inp = cluster_input(store, {"labels": "x.zarr"}, model, region=box)
    assert inp.shape == (3, 256, 256)
    assert inp.translation == (100.0, 0.0, 1024.0)  # spacing 50, 4, 4
    with pytest.raises(InputError, match="not a box inside the image"):
        cluster_input(store, {"labels": "x.zarr"}, model, region=(slice(0, 99),) * 3)
