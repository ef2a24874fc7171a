"""A real `dask scheduler` and two `dask worker` processes on 127.0.0.1, for the module."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DASK = [sys.executable, "-m", "dask"]


def _wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``(address, scheduler_file)`` of a scheduler with two single-thread workers (each
    under a nanny, which restarts it if it is killed); every process stopped afterwards."""
    folder = tmp_path_factory.mktemp("dask")
    sfile = folder / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([*DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sfile)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)]  # fmt: skip
    try:
        _wait_for(sfile.exists, 60, "the scheduler file")
        time.sleep(0.2)
        address = json.loads(sfile.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [*DASK, "worker", "--scheduler-file", str(sfile), "--nthreads", "1",
                 "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "4GiB"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True,
            ))  # fmt: skip
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=90)
        yield address, sfile
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def done_count(store: Path) -> int:
    """Boxes recorded done in a run's labels store (0 before the record exists)."""
    import numpy as np
    import zarr

    try:
        done = zarr.open_group(store, mode="r")["segtool_run"]["done"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0
    return int(np.count_nonzero(done[:]))
