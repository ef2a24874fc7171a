"""``segment`` in-process against ``--scheduler local:1`` and ``local:2`` on the same volume.

The volume is the ISBI 2012 EM sample tiled to (Z, 1024, 1024) uint8 OME-Zarr, chunks
1 x 256 x 256 (``bench_scale.tiled_em``; default 64 slices, 67 M voxels). Each run is a fresh
``napari-segtool segment VOLUME.zarr -o LABELS.zarr [--scheduler local:N]`` process, timed
from start to exit (imports, cluster start-up, pyramid and shutdown included); the paths
alternate, ``--repeats`` runs each, and the median is reported. The labels of every path are
compared voxel by voxel with the in-process labels.

Per cluster run the command's own summary gives the work seconds (``seconds``: from the
first task to the last pyramid level) and ``box_seconds`` (the sum of the box tasks' own
times). ``overhead_per_task_s`` is what the workers spent outside a box task, per task:
``(seconds x workers - box_seconds) / blocks``: scheduling, transfers of task results,
waiting at the end of the graph and the pyramid. A separate measure times 400 empty tasks on
a ``LocalCluster(2)`` (dask's own per-task cost, nothing of ours).

What this 2-core machine can show: that the cluster path gives the same labels, what it
costs per task and at start-up, and that local:2 uses both cores (each worker runs torch
with one thread; in-process and local:1 run one process with two). It cannot show scaling
beyond two cores: the in-process path already keeps both cores busy with torch's threads,
so local:2 can at best match it. Scaling is the cluster's business: more machines run more
boxes at once, and the per-task overhead measured here is what each box pays for that.

Run (about 5 minutes on 2 cores; keep the machine otherwise idle)::

    python benchmarks/bench_distributed.py -o benchmarks/results/distributed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import build

PATHS = {"in-process": [], "local:1": ["--scheduler", "local:1"],
         "local:2": ["--scheduler", "local:2"]}  # fmt: skip


def run_segment(image: Path, out: Path, flags: list[str], env: dict[str, str]) -> dict:
    """One fresh ``segment`` process: wall seconds and its JSON summary."""
    if out.exists():
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("napari-segtool")
    cmd = [str(exe), "segment", str(image), "-o", str(out), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_seconds": round(wall, 2), "summary": json.loads(proc.stdout)}


def empty_task_overhead(n: int = 400) -> dict[str, float]:
    """Seconds per empty task on a LocalCluster of two single-thread workers."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")  # fmt: skip
    with cluster, Client(cluster) as client:
        client.gather(client.map(int, range(20), pure=False))  # warm
        t0 = time.perf_counter()
        client.gather(client.map(int, range(n), pure=False))
        seconds = time.perf_counter() - t0
    return {"tasks": n, "seconds": round(seconds, 3), "per_task_ms": round(1e3 * seconds / n, 3)}


def labels_of(path: Path) -> np.ndarray:
    from napari_segtool.io.zarr_io import read_zarr

    return np.asarray(read_zarr(path).data[...])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--plane", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segtool-distributed"))
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NAPARI_SEGTOOL_CACHE_DIR=str(args.workdir / "cache"))
    t_start = time.perf_counter()
    warm = build(args.workdir / "warmup.zarr", 4, 512)
    for flags in PATHS.values():  # fills the speed cache; starts nothing cold later
        run_segment(warm, args.workdir / "warmup_labels.zarr", flags, env)
    image = build(args.workdir / f"em_{args.slices}x{args.plane}.zarr", args.slices, args.plane)
    voxels = args.slices * args.plane * args.plane

    runs: dict[str, list[dict]] = {name: [] for name in PATHS}
    for _ in range(args.repeats):
        for name, flags in PATHS.items():
            out = args.workdir / f"labels_{name.replace(':', '')}.zarr"
            runs[name].append(run_segment(image, out, flags, env))
    reference = labels_of(args.workdir / "labels_in-process.zarr")
    results = {}
    for name, got in runs.items():
        walls = [r["wall_seconds"] for r in got]
        wall = statistics.median(walls)
        entry: dict[str, object] = {"wall_seconds": wall, "all_wall_seconds": walls,
                                    "voxels_per_second": round(voxels / wall)}  # fmt: skip
        last = got[-1]["summary"]
        if name != "in-process":
            blocks = last["blocks"]["total"]
            work = statistics.median(r["summary"]["seconds"] for r in got)
            box = statistics.median(r["summary"]["box_seconds"] for r in got)
            workers = last["workers"]
            entry.update({
                "blocks": blocks, "block_shape": last["inputs"][0]["block_shape"],
                "workers": workers, "work_seconds": work, "box_seconds": box,
                "startup_and_shutdown_seconds": round(wall - work, 2),
                "blocks_per_second": round(blocks / work, 3),
                "overhead_per_task_s": round((work * workers - box) / blocks, 3),
            })  # fmt: skip
        labels = labels_of(args.workdir / f"labels_{name.replace(':', '')}.zarr")
        entry["voxels_differing_from_in_process"] = int(np.count_nonzero(labels != reference))
        results[name] = entry
    base = results["in-process"]["wall_seconds"]
    for entry in results.values():
        entry["speed_vs_in_process"] = round(base / entry["wall_seconds"], 3)
    report = {
        "benchmark": "segment in-process vs --scheduler local:1 vs local:2 on one volume",
        "command": "python benchmarks/bench_distributed.py -o "
        "benchmarks/results/distributed_cpu.json",
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.machine(),
            "usable_cores": len(os.sched_getaffinity(0)),
        },
        "data": f"ISBI 2012 EM tiled to ({args.slices}, {args.plane}, {args.plane}) uint8; "
        "OME-Zarr 0.5, chunks [1, 256, 256]",
        "model": "bundled em-membranes-2d, the command's defaults",
        "voxels": voxels,
        "repeats": args.repeats,
        "paths": results,
        "dask_empty_task": empty_task_overhead(),
        "note": (
            "2 cores: in-process and local:1 run torch with 2 threads in one process, local:2 "
            "two processes of 1 thread; none can go past the 2 cores, so this shows the cost "
            "of the cluster path (start-up, per task) and equal labels, not scaling."
        ),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
