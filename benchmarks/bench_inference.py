"""Tiled inference: napari-segtool's execution variants against MONAI's sliding_window_inference.

    python benchmarks/bench_inference.py [--device cpu|cuda] [--rounds 3] [--repeats 2]
        [--compile-rounds 1] [--variants eager channels_last bf16 auto compiled]
        [--cases ...] [--quick] [--write]

Prints one JSON object on stdout (a line per case on stderr as it goes); with ``--write`` also
writes it to ``benchmarks/results/inference_<device>.json`` (``inference_<device>_quick.json``
with ``--quick``). ``benchmarks/plot_inference.py`` turns that file into
``docs/inference_speed.png``.

Cases (the image is the ISBI 2012 EM stack tiled to the shape; overlap 0.25, Gaussian
blending, both tools):

- ``stack_64x256x256_2d_slicewise`` and ``image_2048x2048_2d``: the bundled trained model
  ``em-membranes-2d`` (2D U-Net, depth 4, base 16, tile 256 x 256, batch 8). A trained model,
  so the labels are decided by clear margins and their agreement means something (a
  random-init network has near-tied logits, where any rounding flips labels);
- ``stack_64x256x256_3d``: a *random-init* 3D U-Net (depth 4, base 8, seed 0, tile
  32 x 128 x 128, batch 2): there is no trained 3D model; its label agreement is therefore a
  harsh test (near-tied logits), most of all in reduced precision.

Tools, each its own row, every measurement in a fresh subprocess (``rounds`` processes per
tool, ``compile_rounds`` for ``compiled``; the order of the tools is reversed every other
round, so a drift in machine speed favours none):

- ``monai``: the network *as given* (``model.network.eval()``, PyTorch's default contiguous
  layout, float32, batch norms not folded), softmax inside the predictor, through
  ``monai.inferers.sliding_window_inference`` on the same normalised tensor, then argmax;
- ``monai_bf16`` (``monai_fp16`` on CUDA): the same under ``torch.autocast`` in the reduced
  precision, the reference for our reduced-precision row; run only with that row;
- ours, ``napari_segtool.inference.iter_segment`` from the raw image to labels (percentile
  normalisation, tiling, softmax, argmax). Every variant runs the network through the
  package's inference copy, which folds batch norms into the convolutions:

  - ``eager``: fp32, contiguous layout, compile off;
  - ``channels_last``: fp32, channels-last, compile off;
  - ``bf16`` (``fp16`` on CUDA): that precision under autocast, channels-last, compile off;
  - ``auto``: the defaults (precision auto, compile auto, channels-last): what a user gets.
    The speed cache is a temporary folder shared by this run's processes, so only the first
    ``auto`` process's warm-up run pays the precision probe; ``execution`` says what it chose;
  - ``compiled``: compile on, fp32, channels-last; each process starts with a cold inductor
    cache (its own ``TORCHINDUCTOR_CACHE_DIR``).

Figures per tool: ``seconds`` is the median over every timed run (``repeats`` per process,
each after one untimed warm-up run, whose wall time is ``warmup_seconds``; for ``compiled``
``compile_warmup_seconds`` is the warm-up run minus a timed run: the compilation); ``peak_mb``
the median over processes of the largest rise of resident memory (sampled every 2 ms) during
the warm-up run over its level before it (for ``compiled`` this includes compiling;
``peak_mb_steady`` is the same for a run after the timed ones); on CUDA ``cuda_peak_mb`` from
torch. ``ratio_seconds`` / ``ratio_peak``: ours over MONAI's (below 1: ours is better).
``label_agreement``: share of voxels whose label equals MONAI's (fp32); the reduced-precision
row also has ``label_agreement_vs_monai_<p>`` against MONAI under the same autocast.

FLOPs (``torch.utils.flop_counter.FlopCounterMode``, a multiply-add counts 2, convolutions
and transposed convolutions): ``flops_per_voxel`` of the network's forward on one tile batch;
``tiles`` (from ``tiling.tile_grid``: tiles per item x items) and ``calls`` (tile batches the
run made, counted from its progress; MONAI's counted in its predictor); ``job_gflop`` =
tiles x FLOPs per tile (= calls x FLOPs per call when every batch is full); ``gflops`` =
job_gflop / seconds; ``matmul`` the machine's GFLOP/s for a square product (2048 on the CPU,
4096 on CUDA), best of 8, per precision, measured in a fresh process in the same run;
``matmul_ratio`` = gflops / the matmul rate in the tool's precision (on CUDA a float32 network
is compared with the TF32 rate when cuDNN allows TF32, torch's default).

``--quick`` shrinks every case (and the defaults to 1 round, 1 repeat): a smoke test only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _perf import (
    PeakSampler,
    count_flops,
    machine,
    matmul_precision,
    matmul_rates,
    rss_mb,
    set_threads,
    spawn,
    sync,
)

ROOT = Path(__file__).resolve().parents[1]
OVERLAP = 0.25
BUNDLED = "em-membranes-2d"

CASES = {
    "stack_64x256x256_2d_slicewise": {
        "shape": (64, 256, 256), "quick_shape": (8, 256, 256), "dims": 2, "tile": (256, 256),
        "batch": 8, "model": "bundled",
    },
    "stack_64x256x256_3d": {
        "shape": (64, 256, 256), "quick_shape": (32, 160, 160), "dims": 3,
        "tile": (32, 128, 128), "batch": 2, "model": "new3d",
    },
    "image_2048x2048_2d": {
        "shape": (2048, 2048), "quick_shape": (512, 512), "dims": 2, "tile": (256, 256),
        "batch": 8, "model": "bundled",
    },
}  # fmt: skip


def variants(device: str) -> dict[str, dict]:
    """Our rows: InferenceConfig fields beyond tile, overlap, batch and device."""
    reduced = "fp16" if device == "cuda" else "bf16"
    return {
        "eager": {"precision": "fp32", "memory_format": "contiguous", "compile": "off"},
        "channels_last": {"precision": "fp32", "memory_format": "channels_last",
                          "compile": "off"},
        reduced: {"precision": reduced, "memory_format": "channels_last", "compile": "off"},
        "auto": {},  # the defaults: precision auto, compile auto, channels-last
        "compiled": {"precision": "fp32", "memory_format": "channels_last", "compile": "on"},
    }  # fmt: skip


def _image(shape: tuple[int, ...]) -> np.ndarray:
    """A reproducible EM-like uint8 test image (the ISBI stack tiled to the shape)."""
    import tifffile

    em = tifffile.imread(ROOT / "sample_data" / "isbi2012_em.tif")
    reps = [int(np.ceil(s / e)) for s, e in zip(shape, em.shape[-len(shape) :], strict=True)]
    base = em if len(shape) == 3 else em[0]
    return np.ascontiguousarray(np.tile(base, reps)[tuple(slice(0, s) for s in shape)])


def _model(case: dict):
    from napari_segtool.config import ModelConfig
    from napari_segtool.model import SegmentationModel, load_model

    if case["model"] == "bundled":
        model = load_model(BUNDLED)
        assert tuple(model.tile_shape) == tuple(case["tile"]), model.tile_shape
        return model
    return SegmentationModel.new(
        ModelConfig(spatial_dims=3, depth=4, base_features=8), tile_shape=case["tile"], seed=0
    )


def _describe(case: dict) -> str:
    if case["model"] == "bundled":
        return f"bundled {BUNDLED}: 2D U-Net, depth 4, base 16 (trained)"
    return "3D U-Net, depth 4, base 8, random init (seed 0; no trained 3D model exists)"


def expected_tiles(case: dict) -> int:
    """Tiles ``iter_segment`` runs: tiles per item (``tile_grid``) times items (the slices
    of a stack for a 2D model, else one)."""
    from napari_segtool.inference.tiling import tile_grid

    shape, tile = tuple(case["shape"]), tuple(case["tile"])
    slicewise = case["dims"] == 2 and len(shape) == 3
    spatial, items = (shape[1:], shape[0]) if slicewise else (shape, 1)
    eff = tuple(min(t, s) for t, s in zip(tile, spatial, strict=True))
    return items * len(tile_grid(spatial, eff, OVERLAP))


def _flops_worker(case: dict, device: str, queue) -> None:
    """FLOPs of the network's forward on one tile batch (the network as given: eval mode)."""
    import torch

    set_threads()
    model = _model(case)
    net = model.network.eval().to(device)
    x = torch.zeros((case["batch"], model.config.in_channels, *case["tile"]), device=device)
    with torch.inference_mode():
        flops = count_flops(lambda: net(x))
    per_tile = flops / case["batch"]
    queue.put({
        "flops_per_batch": flops,
        "flops_per_tile": per_tile,
        "flops_per_voxel": per_tile / math.prod(case["tile"]),
        "parameters": sum(p.numel() for p in net.parameters()),
    })  # fmt: skip


def _worker(tool: str, case: dict, repeats: int, device: str, labels: bool, queue) -> None:
    if tool == "compiled":  # a cold compile cache, as on a machine's first compiled run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    import torch

    from napari_segtool.config import InferenceConfig
    from napari_segtool.inference import iter_segment
    from napari_segtool.inference.normalize import apply_range, percentile_range
    from napari_segtool.inference.tiling import run_to_end

    threads = set_threads()
    dev = torch.device(device)
    model = _model(case)
    image = _image(case["shape"])
    info: dict = {"calls": 0, "tiles": 0, "execution": None}
    ours = variants(device)

    if tool in ours:
        cfg = InferenceConfig(tile_shape=case["tile"], overlap=OVERLAP, batch_size=case["batch"],
                              device=device, **ours[tool])  # fmt: skip

        def run() -> np.ndarray:
            progress = []
            seg = run_to_end(iter_segment(image, model, config=cfg), progress.append)
            info.update(calls=len(progress), tiles=progress[-1].total, execution=seg.execution)
            return seg.labels

    else:
        from monai.inferers import sliding_window_inference

        reduced = {"monai_bf16": torch.bfloat16, "monai_fp16": torch.float16}.get(tool)
        # as given: PyTorch's default contiguous layout, fp32, batch norms not folded
        net = model.network.eval().to(dev, memory_format=torch.contiguous_format)
        lo, hi = percentile_range(image, model.normalization)
        slicewise = case["dims"] == 2 and len(case["shape"]) == 3
        roi = (1, *case["tile"]) if slicewise else case["tile"]
        count = {"calls": 0, "tiles": 0}

        def predictor(x: torch.Tensor) -> torch.Tensor:
            count["calls"] += 1
            count["tiles"] += x.shape[0]
            if slicewise:  # (B, C, 1, Y, X) windows of the stack -> the 2D network
                x = x[:, :, 0]
            if reduced is None:
                y = net(x)
            else:
                with torch.autocast(dev.type, dtype=reduced):
                    y = net(x)
            p = torch.softmax(y.float(), dim=1)
            return p.unsqueeze(2) if slicewise else p

        def run() -> np.ndarray:
            count.update(calls=0, tiles=0)
            norm = apply_range(image[None], lo, hi)  # (1, *S) float32, as ours normalises
            x = torch.from_numpy(norm[None])
            with torch.inference_mode():
                out = sliding_window_inference(
                    x,
                    roi_size=roi,
                    sw_batch_size=case["batch"],
                    predictor=predictor,
                    overlap=OVERLAP,
                    mode="gaussian",
                    sw_device=dev,
                    device="cpu",
                )
            info.update(count)
            return out[0].argmax(0).to(torch.uint8).numpy()

    def timed() -> float:
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        return time.perf_counter() - t0

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        first = run()
        sync(device)
    warmup = time.perf_counter() - t0
    peak = sampler.peak - base
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    times = [timed() for _ in range(repeats)]
    out = {"seconds": times, "warmup_seconds": warmup, "peak_mb": peak,
           "cuda_peak_mb": cuda_peak, "threads": threads, **info}  # fmt: skip
    if tool == "compiled":
        base = rss_mb()
        with PeakSampler() as sampler:
            run()
        out["peak_mb_steady"] = sampler.peak - base
    if labels:
        out["labels"] = first
    queue.put(out)


def _summarise(results: list[dict]) -> dict:
    """Median time over every timed run, median warm-up and peak over the processes."""
    times = [t for r in results for t in r["seconds"]]
    out = {
        "seconds": statistics.median(times),
        "all_seconds": [round(t, 3) for t in times],
        "warmup_seconds": statistics.median(r["warmup_seconds"] for r in results),
        "peak_mb": statistics.median(r["peak_mb"] for r in results),
        "all_peak_mb": [round(r["peak_mb"], 1) for r in results],
        "calls": results[0]["calls"],
        "tiles": results[0]["tiles"],
        "threads": results[0]["threads"],
    }
    if results[0].get("execution") is not None:
        out["execution"] = results[0]["execution"]
    cuda = [r["cuda_peak_mb"] for r in results if r.get("cuda_peak_mb") is not None]
    if cuda:
        out["cuda_peak_mb"] = statistics.median(cuda)
    steady = [r["peak_mb_steady"] for r in results if "peak_mb_steady" in r]
    if steady:
        out["peak_mb_steady"] = statistics.median(steady)
    return out


def _precision(tool: str, summary: dict) -> str:
    if "execution" in summary:
        return str(summary["execution"]["precision"])
    return tool.split("_", 1)[1] if tool.startswith("monai_") else "fp32"


def bench_case(name: str, case: dict, args: argparse.Namespace, matmul: dict) -> dict:
    ours = [v for v in variants(args.device) if v in args.variants]
    reduced = "fp16" if args.device == "cuda" else "bf16"
    refs = ["monai"] + ([f"monai_{reduced}"] if reduced in ours else [])
    tools = refs + ours
    flops = spawn(_flops_worker, case, args.device)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(max(args.rounds, args.compile_rounds if "compiled" in ours else 0)):
        order = [t for t in tools if r < (args.compile_rounds if t == "compiled" else args.rounds)]
        for tool in order if r % 2 == 0 else order[::-1]:
            result = spawn(_worker, tool, case, args.repeats, args.device, not runs[tool])
            runs[tool].append(result)
    labels = {t: res[0].pop("labels") for t, res in runs.items()}
    summary = {t: _summarise(res) for t, res in runs.items()}
    tiles = expected_tiles(case)
    monai = summary["monai"]
    for tool, s in summary.items():
        p = _precision(tool, s)
        mp_key = matmul_precision(p, args.device)
        s["precision"] = p
        s["job_gflop"] = s["tiles"] * flops["flops_per_tile"] / 1e9
        s["gflops"] = s["job_gflop"] / s["seconds"]
        s["matmul_precision"] = mp_key
        rate = matmul["gflops"].get(mp_key)
        s["matmul_gflops"] = rate
        s["matmul_ratio"] = s["gflops"] / rate if rate else None
        if tool == "monai":
            continue
        s["ratio_seconds"] = s["seconds"] / monai["seconds"]
        s["ratio_peak"] = s["peak_mb"] / monai["peak_mb"] if monai["peak_mb"] > 0 else None
        s["label_agreement"] = float((labels[tool] == labels["monai"]).mean())
        if tool == reduced and f"monai_{reduced}" in labels:
            ref = labels[f"monai_{reduced}"]
            s[f"label_agreement_vs_monai_{reduced}"] = float((labels[tool] == ref).mean())
        if tool == "compiled":
            per = [r["warmup_seconds"] - statistics.median(r["seconds"]) for r in runs[tool]]
            s["compile_warmup_seconds"] = statistics.median(per)
        if s["tiles"] != tiles and tool in ours:
            s["tiles_expected_from_tile_grid"] = tiles  # should not happen: flags a mismatch
    return {
        "shape": list(case["shape"]),
        "model": _describe(case),
        "tile_shape": list(case["tile"]),
        "batch": case["batch"],
        "tiles": tiles,
        "flops_per_voxel": flops["flops_per_voxel"],
        "flops_per_tile": flops["flops_per_tile"],
        "parameters": flops["parameters"],
        "processes": {t: len(r) for t, r in runs.items()},
        **summary,
        "checks": _checks(case, summary, ours),
    }


def _checks(case: dict, summary: dict, ours: list[str]) -> dict:
    """The issue's targets, per variant of ours: time ratio <= 0.6, labels equal on >= 99.99 %
    of voxels, and (2D cases) achieved GFLOP/s >= 40 % of the same-precision matmul rate."""
    out = {}
    for tool in ours:
        s = summary[tool]
        c = {"ratio_seconds_le_0.6": s["ratio_seconds"] <= 0.6,
             "label_agreement_ge_0.9999": s["label_agreement"] >= 0.9999}  # fmt: skip
        if case["dims"] == 2 and s["matmul_ratio"] is not None:
            c["matmul_ratio_ge_0.4"] = s["matmul_ratio"] >= 0.4
        out[tool] = c
    return out


def _round(obj: object) -> object:
    if isinstance(obj, float):
        return round(obj, 6) if abs(obj) < 10 else round(obj, 3)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=None, help="processes per tool (3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs a process (2)")
    parser.add_argument(
        "--compile-rounds",
        type=int,
        default=1,
        help="processes for the compiled variant (each compiles: ~20 s)",
    )
    parser.add_argument("--variants", nargs="*", default=None,
                        help="our rows (default: all): eager channels_last bf16|fp16 auto "
                        "compiled")  # fmt: skip
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, 1 round, 1 repeat: a smoke test, not a result",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="also write benchmarks/results/inference_<device>[_quick].json",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 2)
    known = variants(args.device)
    args.variants = list(known) if args.variants is None else args.variants
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        parser.error(f"unknown variants {unknown} on {args.device}; choose from {list(known)}")
    import monai
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    # one speed cache for this run's processes (auto's precision probe, compile timings),
    # never the user's own
    cache = tempfile.mkdtemp(prefix="bench-speed-cache-")
    os.environ["NAPARI_SEGTOOL_CACHE_DIR"] = cache
    t_start = time.perf_counter()
    matmul = matmul_rates(args.device)
    report: dict = {
        "benchmark": "tiled inference: napari-segtool variants vs MONAI sliding_window_inference",
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]),
        "machine": machine(args.device),
        "monai": monai.__version__,
        "overlap": OVERLAP,
        "blend": "gaussian",
        "rounds": args.rounds,
        "compile_rounds": args.compile_rounds,
        "repeats": args.repeats,
        "variants": {
            v: known[v] or "defaults (precision auto, compile auto)" for v in args.variants
        },
        "matmul": matmul,
        "cases": {},
    }
    for name in args.cases:
        case = dict(CASES[name])
        if args.quick:
            case["shape"] = case["quick_shape"]
        entry = _round(bench_case(name, case, args, matmul))
        report["cases"][name] = entry
        print(json.dumps({name: entry}), flush=True, file=sys.stderr)
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.write:
        suffix = "_quick" if args.quick else ""
        path = ROOT / "benchmarks" / "results" / f"inference_{args.device}{suffix}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
