"""The bundled EM model's held-out figures (ISBI 2012 slices 20-29) under each precision.

    python benchmarks/bench_precision.py [--device cpu|cuda]

Prints one JSON object: per precision the device runs (fp32 always; bf16 on CPUs with native
bfloat16 and on CUDA GPUs that support it; fp16 on CUDA), with and without flip TTA, the
membrane Dice and pixel error on slices 20-29, their difference from float32, the share of
voxels whose label differs from float32's, and the wall time of the segmentation (one run,
after a warm-up on the same slices). The precision ``auto`` chose is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import tifffile
    import torch

    from napari_segtool.config import InferenceConfig
    from napari_segtool.inference import segment
    from napari_segtool.inference.execution import supports
    from napari_segtool.model import load_model

    image = tifffile.imread(ROOT / "sample_data" / "isbi2012_em.tif")[20:30]
    ref = tifffile.imread(ROOT / "sample_data" / "isbi2012_em_membranes.tif")[20:30]
    model = load_model("em-membranes-2d")
    device = torch.device(args.device)
    precisions = ["fp32"] + [p for p in ("bf16", "fp16") if supports(p, device)]
    out: dict = {
        "benchmark": "bundled model, ISBI 2012 slices 20-29, per precision",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "results": {},
    }
    for tta in (False, True):
        base = None
        for precision in [*precisions, "auto"]:
            config = InferenceConfig(device=args.device, precision=precision, tta=tta,
                                     compile="off")  # fmt: skip
            segment(image[:2], model, config=config)  # warm-up (and auto's timing probe)
            t0 = time.perf_counter()
            result = segment(image, model, config=config)
            seconds = time.perf_counter() - t0
            pred = result.labels
            p, r = pred == 1, ref == 1
            dice = float(2 * np.count_nonzero(p & r) / (p.sum() + r.sum()))
            entry = {
                "ran": result.execution["precision"],
                "dice": round(dice, 5),
                "pixel_error": round(float(np.count_nonzero(pred != ref) / ref.size), 5),
                "seconds": round(seconds, 2),
            }
            if base is None:
                base = (dice, pred)
            entry["dice_minus_fp32"] = round(dice - base[0], 5)
            entry["labels_differing_from_fp32"] = float(np.mean(pred != base[1]))
            out["results"][f"{precision}{' tta' if tta else ''}"] = entry
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
