"""Active learning: does choosing by uncertainty need fewer corrected units than random?

    python benchmarks/bench_active_learning.py [--seeds 3] [--rounds 5] [--device cpu]

Runs the simulated correction loop (``napari_segtool.active_learning.iter_simulate``) with the
three strategies (and ``uncertainty-top``: units scored by their 5 % most uncertain
voxels), the same seeds and the same random initial units, on two problems:

- ``em_slices``: the ISBI 2012 EM stack, centre crop 30 x 256 x 256 (to keep a CPU run
  short), units = slices; 30 % of the slices (evenly spread) are held out for evaluation;
- ``em_tiles``: one 512 x 512 ISBI slice (slice 0) as a 2D image, units = 128 x 128 tiles,
  evaluated on held-out tiles.

Every run starts from a new, untrained 2D U-Net (depth 3, base 16); each round fine-tunes the
current model on all revealed units (``--epochs`` x ``--steps-per-epoch`` steps). The
ceiling is the held-out Dice of a model trained on every revealable unit with the same
total number of steps as the full campaign. Prints one JSON object: per problem and strategy
the mean curve (held-out Dice against revealed units), the units needed to reach 95 % of the
ceiling (None when never reached: then the ratio is a lower bound), and the normalised area
under the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (name, strategy, unit score): "uncertainty-top" scores a unit by its 5 % most uncertain
# voxels instead of the mean
STRATEGIES = (
    ("uncertainty", "uncertainty", "mean"),
    ("uncertainty-top", "uncertainty", "top"),
    ("foreground-random", "foreground-random", "mean"),
    ("random", "random", "mean"),
)


def _data() -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    import tifffile

    image = tifffile.imread(ROOT / "sample_data" / "isbi2012_em.tif")
    labels = tifffile.imread(ROOT / "sample_data" / "isbi2012_em_membranes.tif")
    crop = (slice(None), slice(128, 384), slice(128, 384))
    return {
        "em_slices": (image[crop], labels[crop], None),
        "em_tiles": (image[0], labels[0], 128),
    }


def _model(seed: int, tile: int):
    from napari_segtool.config import ModelConfig
    from napari_segtool.model import SegmentationModel

    return SegmentationModel.new(
        ModelConfig(depth=3, base_features=16), tile_shape=(tile, tile), seed=seed
    )


def _ratio(results: dict, a: str, b: str) -> float | None:
    ua, ub = results[a]["units_to_95pct"], results[b]["units_to_95pct"]
    return None if ua is None or ub is None else ua / ub


def run(args: argparse.Namespace) -> dict:
    from napari_segtool.active_learning import (
        SimulationConfig,
        area_under_curve,
        iter_simulate,
        reference_dice,
        units_to_reach,
    )
    from napari_segtool.config import FinetuneConfig

    out: dict = {}
    for problem, (image, labels, tile) in _data().items():
        ft = FinetuneConfig(
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=4,
            patch_shape=(128, 128),
            learning_rate=2e-3,
            patience=args.epochs,  # a short round: no early stop
            device=args.device,
        )
        base = SimulationConfig(
            initial=args.initial,
            rounds=args.rounds,
            per_round=args.per_round if tile is None else 1,  # 11 revealable tiles in all
            tile=tile or 128,
            finetune=ft,
        )
        # the ceiling: every revealable unit, trained as long as a whole campaign
        t0 = time.perf_counter()
        total_epochs = args.epochs * (args.rounds + 1)
        long_ft = ft.replace(epochs=total_epochs, patience=total_epochs)
        ceiling_cfg = SimulationConfig(tile=tile or 128, finetune=long_ft)
        size = 128 if tile else 256
        ceilings = [
            reference_dice(image, labels, _model(s, size), config=ceiling_cfg, seed=s)
            for s in range(args.seeds)
        ]
        ceiling = float(np.mean(ceilings))
        target = 0.95 * ceiling
        entry: dict = {
            "units": "slices" if tile is None else f"{tile} x {tile} tiles",
            "image_shape": list(image.shape),
            "ceiling_dice": ceiling,
            "ceiling_per_seed": ceilings,
            "target_dice": target,
            "ceiling_seconds": round(time.perf_counter() - t0, 1),
            "strategies": {},
        }
        for strategy, kind, score in STRATEGIES:
            cfg = SimulationConfig(**{**base.__dict__, "strategy": kind, "score": score})
            curves = []
            t0 = time.perf_counter()
            for s in range(args.seeds):
                model = _model(s, 128 if tile else 256)
                points = list(iter_simulate(image, labels, model, config=cfg, seed=s))
                curves.append([(p.n_revealed, p.dice) for p in points])
            mean = [
                (curves[0][i][0], float(np.mean([c[i][1] for c in curves])))
                for i in range(len(curves[0]))
            ]
            per_seed_units = [units_to_reach(c, target) for c in curves]
            entry["strategies"][strategy] = {
                "mean_curve": mean,
                "curves": curves,
                "units_to_95pct": units_to_reach(mean, target),
                "units_to_95pct_per_seed": per_seed_units,
                "auc": area_under_curve(mean),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            progress = {problem: {strategy: entry["strategies"][strategy]["mean_curve"]}}
            print(json.dumps(progress), flush=True, file=sys.stderr)
        entry["ratio_units_uncertainty_vs_foreground_random"] = _ratio(
            entry["strategies"], "uncertainty", "foreground-random"
        )
        entry["ratio_units_uncertainty_vs_random"] = _ratio(
            entry["strategies"], "uncertainty", "random"
        )
        entry["ratio_units_uncertainty_top_vs_foreground_random"] = _ratio(
            entry["strategies"], "uncertainty-top", "foreground-random"
        )
        entry["ratio_units_uncertainty_top_vs_random"] = _ratio(
            entry["strategies"], "uncertainty-top", "random"
        )
        out[problem] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--initial", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device": args.device,
    }
    report = {
        "machine": machine,
        "settings": vars(args),
        **run(args),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
