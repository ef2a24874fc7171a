"""The model plugin's torch threads on a worker dask's nanny left at OMP_NUM_THREADS=1."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from napari_segtool.cluster.tasks import ModelPlugin, workers_per_host
from napari_segtool.inference.execution import usable_cores


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("on_host", [1, 2])
def test_a_worker_takes_its_share_of_the_hosts_cores(keep_threads, monkeypatch, on_host):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    others = [f"tcp://10.0.0.9:{i}" for i in range(3)]
    ours = [f"tcp://127.0.0.1:{4000 + i}" for i in range(on_host)]
    per_host = workers_per_host([*others, *ours])
    assert per_host == {"10.0.0.9": 3, "127.0.0.1": on_host}
    plugin = ModelPlugin(b"", "m", None, addresses=[*others, *ours])
    plugin.setup(SimpleNamespace(address="tcp://127.0.0.1:4000"))
    assert torch.get_num_threads() == max(1, usable_cores() // on_host)


def test_a_local_clusters_explicit_share_wins(keep_threads):
    plugin = ModelPlugin(b"", "m", 1, addresses=["tcp://127.0.0.1:1"])
    plugin.setup(SimpleNamespace(address="tcp://127.0.0.1:1"))
    assert torch.get_num_threads() == 1


def test_workers_on_a_host_with_several_gpus_take_one_each(keep_threads, monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    addresses = [f"tcp://10.0.0.5:{p}" for p in (4003, 4001, 4002)] + ["tcp://10.0.0.6:4001"]
    for address in addresses:
        ModelPlugin(b"", "m", 1, addresses=addresses).setup(SimpleNamespace(address=address))
    # 10.0.0.5's workers by address: 4001 -> GPU 0, 4002 -> GPU 1, 4003 -> GPU 0
    assert chosen == [0, 0, 1, 0]
