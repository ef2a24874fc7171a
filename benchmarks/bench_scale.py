"""Peak memory and time of ``napari-segtool segment`` on OME-Zarr volumes of growing size.

Three volumes whose voxel counts span 16x (default 64, 256 and 1024 slices of 1024 x 1024:
67 M, 268 M and 1.07 G voxels, uint8) are built by tiling the ISBI 2012 EM sample (30 x 512 x
512): 2 x 2 in each plane, mirrored at every seam, and along Z mirrored every 30 slices, so
every seam joins matching pixels. Each is written as OME-Zarr 0.5 with chunks 1 x 256 x 256
(``napari_segtool.io.zarr_io.write_ome_zarr``).

Each run is a fresh ``napari-segtool segment VOLUME.zarr -o LABELS.zarr`` process under
``/usr/bin/time -f '%M %e'``: its peak resident memory (the kernel's maximum RSS, which counts
torch, the model and every buffer) and its wall-clock time, imports and writing included.
The same command on the smaller volumes saved as TIFF runs the in-memory path (the whole
volume, its class scores and labels in memory): the reference for throughput, and a contrast
for memory. Both use the command's defaults (precision auto, which picks bf16 on CPUs with
native bfloat16; a warm-up run fills the speed cache first, so no run pays the probe).

Targets (issue 14): peak memory flat in the volume size, its growth from the smallest to the
largest volume at most 5 % of the data's growth (1 byte a voxel); throughput of the block
engine at least 0.9x the in-memory path's on the smallest volume (both paths run
``--repeats`` times there, alternating; the median wall time of each). The labels of the two paths
on the smallest volume are compared voxel by voxel.

Run (about 16 minutes on 2 cores; keep the machine otherwise idle)::

    python benchmarks/bench_scale.py -o benchmarks/results/scale_cpu.json --plot docs/scale.png

``--slices 8,16,32 --plane 512`` gives a quick check. Volumes are kept in ``--workdir`` for
reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EM = ROOT / "sample_data" / "isbi2012_em.tif"
CHUNKS = (1, 256, 256)


def tiled_em(z: int, plane: int):
    """A lazy (z, plane, plane) uint8 volume tiling the EM sample, mirrored at the seams."""
    import dask.array as da
    import tifffile

    em = tifffile.imread(EM)  # (30, 512, 512)
    reps = -(-plane // em.shape[1])
    rows = []
    for i in range(reps):
        row = []
        for j in range(reps):
            tile = em[:, ::-1] if i % 2 else em
            row.append(tile[:, :, ::-1] if j % 2 else tile)
        rows.append(np.concatenate(row, axis=2))
    block = np.concatenate(rows, axis=1)[:, :plane, :plane]  # (30, plane, plane), ~30 MB
    mirrored = np.concatenate([block, block[::-1]])  # period 60: slices 29 and 30 match
    index = np.arange(z) % mirrored.shape[0]
    lazy = da.from_array(mirrored, chunks=(1, plane, plane))
    return lazy[index]


def build(path: Path, z: int, plane: int) -> Path:
    """Write the tiled volume as OME-Zarr once (kept for reruns)."""
    from napari_segtool.io.zarr_io import write_ome_zarr

    if (path / "zarr.json").exists():
        return path
    t0 = time.perf_counter()
    write_ome_zarr(path, tiled_em(z, plane), spacing=(50.0, 4.0, 4.0), unit="nm",
                   chunks=CHUNKS, levels=1, overwrite=True)  # fmt: skip
    print(f"built {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def build_tiff(path: Path, z: int, plane: int) -> Path:
    import tifffile

    if not path.exists():
        data = np.asarray(tiled_em(z, plane))
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    return path


def run_segment(image: Path, out: Path, env: dict[str, str]) -> dict[str, object]:
    """One fresh ``segment`` process: peak RSS (MiB), wall seconds and its JSON summary."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    exe = Path(sys.executable).with_name("napari-segtool")
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", str(exe), "segment", str(image), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = [s for s in proc.stderr.splitlines() if s.startswith("TIME ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    _, kb, wall = line[-1].split()
    summary = json.loads(proc.stdout)
    return {"peak_mb": round(int(kb) / 1024, 1), "wall_seconds": float(wall),
            "command_seconds": summary.get("seconds"), "execution": summary.get("execution"),
            "summary": {k: v for k, v in summary.items() if k != "execution"}}  # fmt: skip


def labels_of(path: Path) -> np.ndarray:
    from napari_segtool.io import read_image

    return np.asarray(read_image(path).data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", default="64,256,1024", help="Z sizes of the volumes")
    parser.add_argument("--plane", type=int, default=1024, help="Y and X size")
    parser.add_argument("--in-memory", default="2", help="how many of the smallest volumes "
                        "also run in memory (as TIFF)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path on the "
                        "smallest volume (median time)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segtool-scale"))
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.slices.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NAPARI_SEGTOOL_CACHE_DIR=str(args.workdir / "cache"))
    t_start = time.perf_counter()

    warm = build(args.workdir / "warmup.zarr", 4, 512)
    run_segment(warm, args.workdir / "warmup_labels.zarr", env)  # fills the speed cache

    def measure(kind: str, z: int) -> dict[str, object]:
        if kind == "zarr":
            image = build(args.workdir / f"em_{z}x{args.plane}.zarr", z, args.plane)
        else:
            image = build_tiff(args.workdir / f"em_{z}x{args.plane}.tif", z, args.plane)
        suffix = ".zarr" if kind == "zarr" else ".tif"
        voxels = z * args.plane * args.plane
        r = run_segment(image, args.workdir / f"labels_{z}{suffix}", env)
        r.update(path="zarr" if kind == "zarr" else "in-memory", slices=z, voxels=voxels)
        print(json.dumps({k: r[k] for k in ("path", "voxels", "peak_mb", "wall_seconds")}),
              file=sys.stderr)  # fmt: skip
        return r

    def summarise(rs: list[dict[str, object]]) -> dict[str, object]:
        """One entry: the median wall time and the highest peak of the repeats."""
        walls = sorted(r["wall_seconds"] for r in rs)
        r = dict(rs[len(rs) // 2], wall_seconds=walls[len(walls) // 2],
                 peak_mb=max(r["peak_mb"] for r in rs))  # fmt: skip
        if len(rs) > 1:
            r["all_wall_seconds"] = [x["wall_seconds"] for x in rs]
            r["all_peak_mb"] = [x["peak_mb"] for x in rs]
        r["voxels_per_second"] = round(r["voxels"] / r["wall_seconds"])
        return r

    # the smallest pair, alternating, --repeats times: the throughput ratio is a ratio of
    # medians, each path run in the same conditions
    first: dict[str, list] = {"zarr": [], "tif": []}
    for _ in range(args.repeats):
        for kind in ("zarr", "tif"):
            first[kind].append(measure(kind, sizes[0]))
    runs = [summarise(first["zarr"])]
    runs += [summarise([measure("zarr", z)]) for z in sizes[1:]]
    runs.append(summarise(first["tif"]))
    runs += [summarise([measure("tif", z)]) for z in sizes[1 : int(args.in_memory)]]

    zarr_runs = [r for r in runs if r["path"] == "zarr"]
    small, large = zarr_runs[0], zarr_runs[-1]
    data_growth_mb = (large["voxels"] - small["voxels"]) / 2**20  # uint8: a byte a voxel
    peak_growth_mb = large["peak_mb"] - small["peak_mb"]
    mem_small = next(r for r in runs if r["path"] == "in-memory" and r["slices"] == sizes[0])
    a = labels_of(args.workdir / f"labels_{sizes[0]}.zarr")
    b = labels_of(args.workdir / f"labels_{sizes[0]}.tif")
    agreement = float(np.mean(a == b))
    result = {
        "benchmark": "segment on OME-Zarr volumes of growing size: peak memory and throughput",
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "usable_cores": len(os.sched_getaffinity(0)),
        },
        "data": f"ISBI 2012 EM tiled to (Z, {args.plane}, {args.plane}) uint8; OME-Zarr 0.5, "
        f"chunks {list(CHUNKS)}",
        "model": "bundled em-membranes-2d, the command's defaults",
        "runs": runs,
        "memory": {
            "data_growth_mb": round(data_growth_mb, 1),
            "peak_growth_mb": round(peak_growth_mb, 1),
            "growth_share": round(peak_growth_mb / data_growth_mb, 4),
            "target_share": 0.05,
            "met": peak_growth_mb <= 0.05 * data_growth_mb,
        },
        "throughput": {
            "zarr_smallest_vps": small["voxels_per_second"],
            "in_memory_smallest_vps": mem_small["voxels_per_second"],
            "ratio": round(small["voxels_per_second"] / mem_small["voxels_per_second"], 3),
            "zarr_largest_vps": large["voxels_per_second"],
            "ratio_largest": round(large["voxels_per_second"] / mem_small["voxels_per_second"], 3),
            "target_ratio": 0.9,
        },
        "label_agreement_smallest": agreement,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    result["throughput"]["met"] = result["throughput"]["ratio"] >= 0.9
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("zarr", "o-"), ("in-memory", "s--")):
        rs = [r for r in result["runs"] if r["path"] == kind]
        if not rs:
            continue
        gv = [r["voxels"] / 1e9 for r in rs]
        label = "block engine (OME-Zarr)" if kind == "zarr" else "in memory (TIFF)"
        ax1.plot(gv, [r["peak_mb"] for r in rs], style, label=label)
        ax2.plot(gv, [r["voxels_per_second"] / 1e6 for r in rs], style, label=label)
    ax1.set(xlabel="volume (Gvoxel)", ylabel="peak resident memory (MiB)",
            title="peak memory of `segment`")  # fmt: skip
    ax2.set(xlabel="volume (Gvoxel)", ylabel="Mvoxel / s (wall clock)",
            title="throughput")  # fmt: skip
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    m = result["memory"]
    fig.suptitle(f"peak grows {m['peak_growth_mb']:.0f} MiB while the data grow "
                 f"{m['data_growth_mb']:.0f} MiB ({100 * m['growth_share']:.1f} %); "
                 f"throughput {result['throughput']['ratio']:.2f}x in-memory")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
