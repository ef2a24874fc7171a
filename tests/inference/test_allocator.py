"""The allocator tuning: freed inference buffers stay in the heap instead of costing page
faults again (measured in a fresh process, with a dask worker's trim threshold)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are glibc's",
)

PROBE = """
import json, resource, sys
import numpy as np
from napari_segtool.inference.execution import tune_allocator

def faults(n=40, size=4 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.empty(size, np.uint8)
        a[::4096] = 1  # touch every page
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
tuned = tune_allocator()
print(json.dumps({"default": default, "tuned": tuned, "after": faults(),
                  "again": tune_allocator()}))
"""


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.pop("NAPARI_SEGTOOL_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env},
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout)


def test_freed_buffers_are_reused_without_page_faults_under_a_dask_workers_trim_threshold():
    got = probe(MALLOC_TRIM_THRESHOLD_="65536")  # what dask's nanny sets in every worker
    assert got["tuned"] is True
    assert got["again"] is True
    pages = 40 * (4 << 20) // 4096  # 40 buffers of 4 MiB
    # measured: 20,521 faults before (each buffer mapped afresh), 481 after
    assert got["default"] > 0.25 * pages, got
    assert got["after"] < got["default"] / 10, got


def test_a_users_own_mmap_threshold_or_the_opt_out_is_left_alone():
    assert probe(MALLOC_MMAP_THRESHOLD_="131072")["tuned"] is False
    assert probe(NAPARI_SEGTOOL_MALLOC="default")["tuned"] is False
