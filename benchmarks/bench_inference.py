"""Tiled inference: napari-segtool against MONAI's sliding_window_inference, side by side.

    python benchmarks/bench_inference.py [--rounds 3] [--repeats 2] [--device cpu|cuda]
                                         [--cases ...]

Prints one JSON object. For each case both tools run the same network (same weights), tile
shape, overlap (0.25), Gaussian blending and tile batch, and both go from the raw image to a
label image: napari-segtool through ``iter_segment`` (percentile normalisation, tiling,
softmax, argmax), MONAI through ``sliding_window_inference`` on the same normalised tensor
followed by argmax. Every measurement runs in a fresh subprocess, ``rounds`` subprocesses per
tool, alternating which tool goes first:

- ``seconds``: median wall time over all timed runs (``repeats`` per subprocess, each after
  one warm-up run);
- ``peak_mb``: median over the subprocesses of the largest rise of the process's resident
  memory (sampled every 2 ms from /proc) during the warm-up run over its level just before
  it, i.e. what the inference itself allocates on top of the model and the input; on CUDA
  also ``cuda_peak_mb`` from torch.

``ratio_seconds`` and ``ratio_peak`` are ours divided by MONAI's (below 1: ours is better).
The labels of both are compared (``label_agreement``) so a faster wrong answer would show.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

CASES = {
    "stack_64x256x256_2d_slicewise": {
        "shape": (64, 256, 256), "dims": 2, "tile": (256, 256), "batch": 8, "base": 16,
    },
    "stack_64x256x256_3d": {
        "shape": (64, 256, 256), "dims": 3, "tile": (32, 128, 128), "batch": 2, "base": 8,
    },
    "image_2048x2048_2d": {
        "shape": (2048, 2048), "dims": 2, "tile": (256, 256), "batch": 8, "base": 16,
    },
}  # fmt: skip
OVERLAP = 0.25


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples resident memory in a thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _image(shape: tuple[int, ...]) -> np.ndarray:
    """A reproducible EM-like uint8 test image (the ISBI stack tiled to the shape)."""
    from pathlib import Path

    import tifffile

    src = Path(__file__).resolve().parents[1] / "sample_data" / "isbi2012_em.tif"
    em = tifffile.imread(src)
    reps = [int(np.ceil(s / e)) for s, e in zip(shape, em.shape[-len(shape) :], strict=True)]
    base = em if len(shape) == 3 else em[0]
    return np.ascontiguousarray(np.tile(base, reps)[tuple(slice(0, s) for s in shape)])


def _worker(tool: str, case: dict, repeats: int, device: str, queue: mp.Queue) -> None:
    import torch

    from napari_segtool.config import InferenceConfig, ModelConfig
    from napari_segtool.inference import iter_segment
    from napari_segtool.inference.normalize import apply_range, percentile_range
    from napari_segtool.inference.predict import make_predictor, resolve_device
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.model import SegmentationModel

    dev = resolve_device(device)
    model = SegmentationModel.new(
        ModelConfig(spatial_dims=case["dims"], depth=4, base_features=case["base"]),
        tile_shape=case["tile"],
        seed=0,
    )
    model.network.eval()
    image = _image(case["shape"])
    cfg = InferenceConfig(
        tile_shape=case["tile"],
        overlap=OVERLAP,
        batch_size=case["batch"],
        device=device,
        amp=False,
    )

    if tool == "segtool":

        def run() -> np.ndarray:
            return run_to_end(iter_segment(image, model, config=cfg)).labels

    else:
        from monai.inferers import sliding_window_inference

        predict = make_predictor(model, dev, amp=False)
        lo, hi = percentile_range(image, model.normalization)
        slicewise = case["dims"] == 2 and len(case["shape"]) == 3
        roi = (1, *case["tile"]) if slicewise else case["tile"]

        def monai_predictor(x: torch.Tensor) -> torch.Tensor:
            if slicewise:  # (B, C, 1, Y, X) windows of the stack -> 2D network
                return predict(x[:, :, 0]).unsqueeze(2)
            return predict(x)

        def run() -> np.ndarray:
            norm = apply_range(image[None], lo, hi)  # (1, *S) float32, as ours normalises
            x = torch.from_numpy(norm[None])
            with torch.inference_mode():
                out = sliding_window_inference(
                    x,
                    roi_size=roi,
                    sw_batch_size=case["batch"],
                    predictor=monai_predictor,
                    overlap=OVERLAP,
                    mode="gaussian",
                    sw_device=dev,
                    device="cpu",
                )
            return out[0].argmax(0).to(torch.uint8).numpy()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    with PeakSampler() as sampler:
        first = run()
    peak = sampler.peak - base
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put({"seconds": statistics.median(times), "all_seconds": times, "peak_mb": peak,
               "cuda_peak_mb": cuda_peak, "labels": first})  # fmt: skip


def measure(tool: str, case: dict, repeats: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(tool, case, repeats, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _summarise(results: list[dict]) -> dict:
    """Median time over every timed run and median peak over the processes."""
    times = [t for r in results for t in r["all_seconds"]]
    out = {
        "seconds": statistics.median(times),
        "all_seconds": [round(t, 3) for t in times],
        "peak_mb": statistics.median(r["peak_mb"] for r in results),
        "all_peak_mb": [round(r["peak_mb"], 1) for r in results],
    }
    cuda = [r["cuda_peak_mb"] for r in results if r.get("cuda_peak_mb") is not None]
    if cuda:
        out["cuda_peak_mb"] = statistics.median(cuda)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tool")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    import monai
    import torch

    report: dict = {
        "benchmark": "tiled inference, napari-segtool vs MONAI sliding_window_inference",
        "device": args.device,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "overlap": OVERLAP,
        "blend": "gaussian",
        "repeats": args.repeats,
        "rounds": args.rounds,
        "cases": {},
    }
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    for name in args.cases:
        case = CASES[name]
        runs: dict[str, list[dict]] = {"segtool": [], "monai": []}
        # fresh processes, alternating which tool goes first, so a drift in machine speed
        # (other load, thermal) does not favour either
        for r in range(args.rounds):
            order = ("segtool", "monai") if r % 2 == 0 else ("monai", "segtool")
            for tool in order:
                runs[tool].append(measure(tool, case, args.repeats, args.device))
        agreement = float((runs["segtool"][0]["labels"] == runs["monai"][0]["labels"]).mean())
        summary = {tool: _summarise(results) for tool, results in runs.items()}
        ours, theirs = summary["segtool"], summary["monai"]
        entry = {
            "shape": list(case["shape"]),
            "model": f"{case['dims']}D U-Net, depth 4, base {case['base']}",
            "tile_shape": list(case["tile"]),
            "batch": case["batch"],
            "segtool": ours,
            "monai": theirs,
            "ratio_seconds": ours["seconds"] / theirs["seconds"],
            "ratio_peak": ours["peak_mb"] / theirs["peak_mb"] if theirs["peak_mb"] else None,
            "label_agreement": agreement,
        }
        report["cases"][name] = entry
        print(json.dumps({name: entry}), flush=True, file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
