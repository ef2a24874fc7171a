"""Active learning: which strategy reaches a good model for the least correction effort?

    python benchmarks/bench_active_learning.py -o benchmarks/results/active_learning_cpu.json \
        --plot docs/active_learning.png [--seeds 5] [--only em_slices,ct_slices]

Runs the simulated correction loop (``napari_segtool.active_learning.iter_simulate``) for
every strategy with the same seeds, the same random initial units and the same held-out
units, on four problems:

- ``em_slices``: the ISBI 2012 EM stack (expert membrane labels), centre crop
  30 x 256 x 256 to keep a CPU run short; units are slices;
- ``em_patches``: the same stack, units are 128 x 128 patches within its slices (four per
  slice); the initial units and each round's batch are 8 patches, the area of 2 slices, so
  the effort scale matches ``em_slices``;
- ``em_tiles``: one 512 x 512 ISBI slice (slice 0) as a 2D image, units are 128 x 128 tiles;
- ``ct_slices``: the bundled CT crop, 30 x 101 x 122, five organs as classes (liver,
  kidneys, spleen, pancreas, gallbladder; TotalSegmentator's own labels, not expert ones):
  pancreas and gallbladder are under 0.4 % of the voxels and on 13-18 slices only.

Every run starts from a new, untrained 2D U-Net (depth 3, base 16) and fine-tunes it on
all revealed units each round (``--epochs`` x ``--steps-per-epoch`` steps, more for rare
classes: ``FinetuneConfig.balance="auto"``). Held-out Dice is the mean foreground Dice over
the classes on units never revealed.

Effort (``RoundPoint.effort``) is what the user pays: the voxels the shown prediction gets
wrong inside each revealed unit plus a review cost of 1 % of its voxels. Per problem and
strategy the JSON holds every seed's curves against units and against effort, their
means (``mean``, ``mean_effort``), and:

- ``auc_effort``: the mean held-out Dice over a common effort window, per seed (from the
  initial units' effort to the smallest final effort among the strategies of that seed,
  linear between rounds), and its mean;
- ``effort_to_95pct``: the mean effort at the first round whose mean Dice reaches 95 % of
  the ceiling (None: never within the budget), and ``effort_ratio_vs_random``;
- ``paired_vs_random`` and ``paired_vs_foreground_random``: the mean per-seed difference
  in ``auc_effort`` with a 95 % bootstrap interval over the seeds (10,000 resamples).

The ceiling is the held-out Dice of a model trained on every revealable unit, as long as a
whole campaign (mean of ``min(seeds, 3)`` seeds).

More seeds for some strategies, added to an earlier report (the comparison is then over the
strategies both runs hold, with windows recomputed over those)::

    python benchmarks/bench_active_learning.py --only ct_slices --first-seed 5 --seeds 5 \
        --strategies random,uncertainty,disagreement \
        --add-to benchmarks/results/active_learning_cpu.json -o more_seeds.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = (
    "random",
    "foreground-random",
    "uncertainty",
    "uncertainty-diverse",
    "disagreement",
    "class-balanced",
)
BASELINES = ("random", "foreground-random")
CT_CLASSES = ((5,), (2, 3), (1,), (7,), (4,))  # liver, kidneys, spleen, pancreas, gallbladder
BOOTSTRAP = 10_000


def problems() -> dict[str, dict]:
    """Image, labels and the campaign's shape for each problem."""
    import tifffile

    image = tifffile.imread(ROOT / "sample_data" / "isbi2012_em.tif")
    labels = tifffile.imread(ROOT / "sample_data" / "isbi2012_em_membranes.tif")
    crop = (slice(None), slice(128, 384), slice(128, 384))
    ct = tifffile.imread(ROOT / "sample_data" / "ct_small.tif")
    organs = tifffile.imread(ROOT / "sample_data" / "ct_small_organs.tif")
    ct_labels = np.zeros(organs.shape, np.uint8)
    for value, ids in enumerate(CT_CLASSES, start=1):
        ct_labels[np.isin(organs, ids)] = value
    slices = {"initial": 2, "per_round": 2, "tile": 128, "units": "slices"}
    return {
        "em_slices": {"image": image[crop], "labels": labels[crop], "model_tile": 256,
                      **slices},
        "em_patches": {"image": image[crop], "labels": labels[crop], "model_tile": 256,
                       "initial": 8, "per_round": 8, "tile": 128, "units": "patches"},
        "em_tiles": {"image": image[0], "labels": labels[0], "model_tile": 128,
                     "initial": 2, "per_round": 1, "tile": 128, "units": "slices"},
        "ct_slices": {"image": ct, "labels": ct_labels, "model_tile": 128, **slices},
    }  # fmt: skip


def _model(seed: int, tile: int, classes: int):
    from napari_segtool.config import ModelConfig
    from napari_segtool.model import SegmentationModel

    return SegmentationModel.new(
        ModelConfig(depth=3, base_features=16, out_channels=classes),
        tile_shape=(tile, tile),
        seed=seed,
        label_values=tuple(range(classes)),
    )


def window_auc(curve: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Mean Dice of a (effort, Dice) curve over [lo, hi], linear between its points.

    >>> window_auc([(0, 0.0), (10, 1.0)], 0, 10)
    0.5
    """
    x = np.array([c[0] for c in curve], float)
    y = np.array([c[1] for c in curve], float)
    if hi <= lo:
        return float(np.interp(lo, x, y))
    grid = np.linspace(lo, hi, 513)
    return float(np.trapezoid(np.interp(grid, x, y), grid) / (hi - lo))


def paired(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of a - b over paired seeds, with a 95 % bootstrap interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95": [float(low), float(high)], "per_seed": d.tolist()}


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The x of the first point whose Dice reaches ``target`` (None: never)."""
    return next((float(x) for x, dice in curve if dice >= target), None)


def run_problem(name: str, spec: dict, args: argparse.Namespace) -> dict:
    from napari_segtool.active_learning import SimulationConfig, iter_simulate, reference_dice
    from napari_segtool.config import FinetuneConfig

    image, labels = spec["image"], spec["labels"]
    classes = int(labels.max()) + 1
    ft = FinetuneConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=4,
                        patch_shape=(128, 128), learning_rate=2e-3, patience=args.epochs,
                        device=args.device)  # fmt: skip
    base = SimulationConfig(initial=spec["initial"], rounds=args.rounds,
                            per_round=spec["per_round"], tile=spec["tile"],
                            units=spec["units"], finetune=ft)  # fmt: skip
    t0 = time.perf_counter()
    total = args.epochs * (args.rounds + 1)
    long_ft = ft.replace(epochs=total, patience=total)
    ceiling_cfg = SimulationConfig(tile=spec["tile"], units=spec["units"], finetune=long_ft)
    ceilings = [reference_dice(image, labels, _model(s, spec["model_tile"], classes),
                               config=ceiling_cfg, seed=s)
                for s in range(min(args.seeds, 3))]  # fmt: skip
    ceiling = float(np.mean(ceilings))
    target = 0.95 * ceiling
    entry: dict = {
        "units": spec["units"] if image.ndim == 3 else f"{spec['tile']} x {spec['tile']} tiles",
        "tile": spec["tile"], "image_shape": list(image.shape), "classes": classes,
        "initial": spec["initial"], "per_round": spec["per_round"], "seeds": args.seeds,
        "rounds": args.rounds,
        "ceiling_dice": ceiling, "ceiling_per_seed": ceilings, "target_dice": target,
        "ceiling_seconds": round(time.perf_counter() - t0, 1), "strategies": {},
    }  # fmt: skip
    print(json.dumps({name: {"ceiling": ceiling}}), file=sys.stderr, flush=True)
    for strategy in args.strategies:
        cfg = dataclasses.replace(base, strategy=strategy)
        t0 = time.perf_counter()
        runs = []
        for s in range(args.first_seed, args.first_seed + args.seeds):
            model = _model(s, spec["model_tile"], classes)
            points = list(iter_simulate(image, labels, model, config=cfg, seed=s))
            runs.append({"curve": [[p.n_revealed, p.dice] for p in points],
                         "effort_curve": [[p.effort, p.dice] for p in points],
                         "revealed": list(points[-1].revealed)})  # fmt: skip
        entry["strategies"][strategy] = dict(
            _summary(runs, target), seconds=round(time.perf_counter() - t0, 1)
        )
        mean_effort = entry["strategies"][strategy]["mean_effort"]
        print(json.dumps({name: {strategy: mean_effort}}), file=sys.stderr, flush=True)
    _compare(entry, args.seeds)
    return entry


def _summary(runs: list[dict], target: float) -> dict:
    """Seeds' runs of one strategy with their mean curves on both axes (over the rounds all
    runs reached) and the units and effort at which the mean first reaches ``target``."""
    rounds = min(len(r["curve"]) for r in runs)
    mean = [[runs[0]["curve"][i][0], float(np.mean([r["curve"][i][1] for r in runs]))]
            for i in range(rounds)]  # fmt: skip
    mean_effort = [[float(np.mean([r["effort_curve"][i][0] for r in runs])), mean[i][1]]
                   for i in range(rounds)]  # fmt: skip
    return {"seeds": runs, "mean": mean, "mean_effort": mean_effort,
            "units_to_95pct": first_reach(mean, target),
            "effort_to_95pct": first_reach(mean_effort, target)}  # fmt: skip


def add_seeds(old: dict, new: dict) -> dict:
    """``old``'s problem entry with ``new``'s runs (later seeds) appended, for the strategies
    both hold; means, costs to 95 % and the paired comparison recomputed over all seeds."""
    merged = dict(old, strategies={})
    for strategy, v in new["strategies"].items():
        if strategy not in old["strategies"]:
            continue
        runs = old["strategies"][strategy]["seeds"] + v["seeds"]
        merged["strategies"][strategy] = _summary(runs, old["target_dice"])
    n = len(next(iter(merged["strategies"].values()))["seeds"])
    merged["seeds"] = n
    _compare(merged, n)
    return merged


def _compare(entry: dict, seeds: int) -> None:
    """AUC over a common effort window per seed, ratios and paired intervals."""
    table = entry["strategies"]
    for s in range(seeds):
        curves = {k: v["seeds"][s]["effort_curve"] for k, v in table.items()}
        lo = max(c[0][0] for c in curves.values())
        hi = min(c[-1][0] for c in curves.values())
        for k, c in curves.items():
            table[k].setdefault("auc_effort_per_seed", []).append(window_auc(c, lo, hi))
            table[k].setdefault("effort_window_per_seed", []).append([lo, hi])
    for v in table.values():
        v["auc_effort"] = float(np.mean(v["auc_effort_per_seed"]))
    for k, v in table.items():
        for ref in BASELINES:
            if ref in table and ref != k:
                key = "paired_vs_" + ref.replace("-", "_")
                v[key] = paired(v["auc_effort_per_seed"], table[ref]["auc_effort_per_seed"])
        mine, theirs = v["effort_to_95pct"], table.get("random", {}).get("effort_to_95pct")
        v["effort_ratio_vs_random"] = None if mine is None or not theirs else mine / theirs


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in ("em_slices", "em_patches", "em_tiles", "ct_slices") if k in report]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = report[name]
        for strategy, v in entry["strategies"].items():
            x, y = zip(*v["mean_effort"], strict=True)
            width = 2.4 if strategy == report.get("default") else 1.2
            ax.plot(np.array(x) / 1e3, y, marker="o", ms=3, lw=width,
                    label=f"{strategy} ({v['auc_effort']:.3f})")  # fmt: skip
        ax.axhline(entry["target_dice"], color="grey", ls=":", lw=1)
        ax.set_title(f"{name} ({entry['units']}, {len(v['seeds'])} seeds)")
        ax.set_xlabel("correction effort (thousand voxels)")
        ax.set_ylabel("held-out Dice")
        ax.legend(fontsize=7, title="strategy (AUC on effort)", title_fontsize=7)
    fig.suptitle("Held-out Dice against correction effort, mean over seeds "
                 "(dotted: 95 % of the full-data Dice)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run: first-seed .. first-seed + seeds - 1")  # fmt: skip
    parser.add_argument("--add-to", type=Path,
                        help="a report with earlier seeds: write --output with these runs "
                             "appended (strategies in both), compared over all seeds")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="comma-separated problems (default: all)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--default", default="uncertainty-diverse",
                        help="the strategy drawn bold in the plot")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, help="write the JSON here as it grows")
    parser.add_argument("--plot", type=Path, help="PNG of Dice against effort")
    parser.add_argument("--replot", action="store_true", help="only plot --output's JSON")
    args = parser.parse_args()
    args.strategies = args.strategies.split(",")
    if args.replot:
        report = json.loads(args.output.read_text())
        plot(report, args.plot)
        return
    import torch

    specs = problems()
    chosen = args.only.split(",") if args.only else list(specs)
    report: dict = {}
    if args.output is not None and args.output.exists():
        report = json.loads(args.output.read_text())  # add to the problems already run
    report.update({
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "device": args.device},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("output", "plot")},
        "default": args.default,
    })  # fmt: skip
    earlier = json.loads(args.add_to.read_text()) if args.add_to else {}
    for name in chosen:
        report[name] = run_problem(name, specs[name], args)
        if name in earlier:
            report[name] = add_seeds(earlier[name], report[name])
        if args.output is not None:
            args.output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
