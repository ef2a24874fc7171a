"""Live metrics: cost of one paint event for the tracker, and HD95 against MONAI.

    python benchmarks/bench_metrics.py [--size 512] [--events 40] [--repeats 3]

Prints one JSON object:

- ``tracker``: a real napari Labels layer of ``size^3`` voxels is painted with brush strokes
  whose areas span 10^2 to 10^5 voxels (one slice deep, as when correcting slice by slice),
  and the tracker's update inside the paint-event handler is timed: median and p99 per event,
  per stroke size, next to the time of one full recount of the volume;
- ``hd95``: HD95 of a 128 x 512 x 512 pair of overlapping, irregular objects with anisotropic
  spacing, ours against MONAI's ``compute_hausdorff_distance(percentile=95)`` on the same pair
  in the same run (median of ``repeats``), and the two values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_tracker(size: int, events: int, seed: int = 0) -> dict:
    from napari.layers import Labels

    from napari_segtool.metrics import ConfusionTracker, slice_confusion

    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    ref = np.zeros(shape, np.uint8)
    c = size // 2
    ref[:, c - size // 4 : c + size // 4, c - size // 4 : c + size // 4] = 1
    pred = np.roll(ref, size // 16, axis=2)
    edited = Labels(pred)
    tracker = ConfusionTracker(edited.data, ref)
    timings: list[float] = []
    changed: list[int] = []

    def on_paint(event: object) -> None:
        t0 = time.perf_counter()
        n = tracker.apply_atoms(event.value, which="pred")  # type: ignore[attr-defined]
        timings.append(time.perf_counter() - t0)
        changed.append(n)

    edited.events.paint.connect(on_paint)
    edited.n_edit_dimensions = 2
    results = {}
    for target in (10**2, 10**3, 10**4, 10**5):
        radius = max(1, round(np.sqrt(target / np.pi)))
        edited.brush_size = 2 * radius + 1
        timings.clear()
        changed.clear()
        for i in range(events):
            z = int(rng.integers(size))
            lo, hi = min(radius, size // 2), max(size - radius, size // 2 + 1)
            y, x = (int(v) for v in rng.integers(lo, hi, 2))
            # alternate labels so every stroke changes its voxels
            edited.paint((z, y, x), 1 if i % 2 == 0 else 0)
        ms = [t * 1e3 for t in timings if t > 0]
        results[f"{target:.0e}"] = {
            "brush_size": int(edited.brush_size),
            "median_voxels_changed": int(statistics.median(changed)) if changed else 0,
            "events": len(ms),
            "median_ms": statistics.median(ms),
            "p99_ms": _percentile(ms, 99),
            "max_ms": max(ms),
        }
    assert np.array_equal(tracker.confusion, slice_confusion(edited.data, ref, tracker.n_classes))
    recount = []
    for _ in range(3):
        t0 = time.perf_counter()
        slice_confusion(edited.data, ref, tracker.n_classes)
        recount.append(time.perf_counter() - t0)
    return {
        "volume": list(shape),
        "strokes": results,
        "full_recount_ms": statistics.median(recount) * 1e3,
        "exact": True,
    }


def _object(shape: tuple[int, ...], rng: np.random.Generator, shift: float) -> np.ndarray:
    from scipy import ndimage

    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = shape[0] / 2, shape[1] / 2 + shift, shape[2] / 2
    ell = (
        ((z - cz) / (shape[0] * 0.3)) ** 2
        + ((y - cy) / (shape[1] * 0.3)) ** 2
        + ((x - cx) / (shape[2] * 0.25)) ** 2
    )
    noise = ndimage.zoom(rng.normal(size=(8, 16, 16)), [s / n for s, n in
                                                          zip(shape, (8, 16, 16), strict=True)],
                         order=1)  # fmt: skip
    return ell + 0.15 * noise < 1.0


def bench_hd95(repeats: int, seed: int = 0) -> dict:
    import torch
    from monai.metrics import compute_hausdorff_distance

    from napari_segtool.metrics import hausdorff_distance

    rng = np.random.default_rng(seed)
    shape = (128, 512, 512)
    spacing = (2.0, 0.7, 0.7)
    ref = _object(shape, rng, 0.0)
    pred = _object(shape, rng, 6.0)

    def ours() -> float:
        return hausdorff_distance(pred, ref, spacing=spacing, percentile=95)

    def monai() -> float:
        # MONAI wants one-hot (B, C, ...) input; building it is part of using MONAI
        p = torch.from_numpy(np.stack([~pred, pred])[None])
        r = torch.from_numpy(np.stack([~ref, ref])[None])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compute_hausdorff_distance(p, r, percentile=95, spacing=spacing).item()

    out = {}
    for name, fn in (("segtool", ours), ("monai", monai)):
        times, value = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t0)
        out[name] = {"seconds": statistics.median(times), "all_seconds": times, "hd95": value}
    out["ratio_seconds"] = out["segtool"]["seconds"] / out["monai"]["seconds"]
    out["shape"] = list(shape)
    out["spacing"] = list(spacing)
    out["surface_voxels"] = int(
        sum(np.count_nonzero(m & ~__import__("scipy").ndimage.binary_erosion(m))
            for m in (pred, ref))
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import monai

    report = {
        "benchmark": "live metrics: tracker per paint event, HD95 vs MONAI",
        "monai": monai.__version__,
        "tracker": bench_tracker(args.size, args.events),
        "hd95": bench_hd95(args.repeats),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
