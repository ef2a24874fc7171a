"""Fine-tuning rounds: wall time today vs the new defaults, Dice, a training step's FLOP rate,
and how long the GUI stalls meanwhile.

    python benchmarks/bench_finetune.py [--device cpu|cuda] [--seeds 0 1 2] [--skip-gui]
                                        [--quick] [--write]

Prints one JSON object (with ``--write`` also ``benchmarks/results/finetune_<device>.json``,
``finetune_<device>_quick.json`` with ``--quick``). On the ISBI 2012 EM stack (30 x 512 x 512):

- ``bundled_4_slices``: the bundled EM model (trained on slices 0-19) is fine-tuned as a user
  would after correcting 4 of the held-out slices (20, 22, 24, 26: their reference labels
  replace the prediction and they are marked reviewed). The same round (same data, same
  seed, same steps) runs once per seed with each of two settings, each round in a fresh
  process with an empty speed cache (so the new defaults pay their precision probe), the
  order of the two settings swapped every other seed:

  - ``today``: ``FinetuneConfig(precision="fp32", memory_format="contiguous")``, what the
    code did before the execution change (float32, PyTorch's default layout) except that its
    validation inference now folds batch norms into the convolutions (the same function to
    float tolerance);
  - ``new``: ``FinetuneConfig()``, the defaults (precision auto, which measures and on a CPU
    with native bfloat16 picks bf16; channels-last).

  Per round: ``seconds`` (wall time of the round: training, per-epoch validation, early
  stopping), ``baseline_dice`` / ``best_dice`` (``FinetuneResult``: the starting and trained
  model's validation Dice on the held-out labelled voxels), ``dice_after`` (membrane Dice on
  the 6 held-out slices never shown to it, 21, 23, 25, 27, 28, 29, segmented in float32
  with the trained model) and the precision training ran in. ``speedup`` is today's median
  seconds over the new median; ``dice_noise`` the spread of today's figures over the seeds
  (the seed changes the validation split, the patches and the augmentation), the yardstick
  for "the same Dice within noise". ``dice_before`` is the starting model's held-out Dice
  (from the whole-stack prediction, as before; ``dice_before_eval_only`` segments the 6
  slices alone, as ``dice_after`` does).
- ``training_step``: one optimiser step of the fine-tune code path (``training.loop._Run``:
  sampling, augmentation, forward, Dice + cross-entropy loss, backward, AdamW, schedule) on a
  batch of 4 x 256 x 256 patches of the bundled model, in contiguous fp32, channels-last
  fp32 and channels-last bf16 (fp16 on CUDA), each in a fresh process: ``flops`` of the step
  (``torch.utils.flop_counter``: forward and backward convolutions, a multiply-add is 2),
  ``seconds`` (median of the timed steps after warm-up), ``sample_seconds`` (drawing and
  augmenting the batch alone, part of the step), ``gflops`` = flops / seconds and
  ``matmul_ratio`` against the machine's matmul rate in the same precision (``matmul``,
  measured in a fresh process in the same run: a 2048-square product on the CPU).
- ``new_model_25pct``: a new, untrained 2D model is trained from the top-left quarter of
  slice 0's labels only (25 % of one 2D image) and evaluated on slices 20-29 (defaults);
- ``gui_stall``: the bundled round run through the Fine-tune widget in a real napari viewer
  (under a virtual X server when there is no display) while a 5 ms Qt timer records the gaps
  between its ticks; ``longest_stall_ms`` is the longest gap beyond the timer's own period.

Dice is membrane (class 1) Dice pooled over the evaluation slices. ``--quick`` runs 1 seed,
short rounds, 3 timed steps and no GUI: a smoke test only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _perf import count_flops, machine, matmul_precision, matmul_rates, set_threads, spawn, sync

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data"
TRAIN = [20, 22, 24, 26]
EVAL = [21, 23, 25, 27, 28, 29]
SETTINGS = {
    "today": {"precision": "fp32", "memory_format": "contiguous"},
    "new": {},  # FinetuneConfig() defaults
}
QUICK_ROUND = {"epochs": 2, "steps_per_epoch": 3}


def _load() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return tifffile.imread(DATA / "isbi2012_em.tif"), tifffile.imread(
        DATA / "isbi2012_em_membranes.tif"
    )


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred == 1, ref == 1
    return float(2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r)))


def _eval_config(device: str):
    """Inference for every Dice here: float32, contiguous, eager, so the figures compare the
    trained weights only."""
    from napari_segtool.config import InferenceConfig

    return InferenceConfig(device=device, precision="fp32", memory_format="contiguous",
                           compile="off")  # fmt: skip


def _fresh_cache() -> None:
    os.environ["NAPARI_SEGTOOL_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-speed-cache-")


class _Precision(logging.Handler):
    """Catches the training loop's "training on <device> in <precision>, <layout>" line."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("training on") and record.args:
            self.seen.append(tuple(str(a) for a in record.args))


# ----------------------------------------------------------------------------- bundled round


def _prepare_worker(device: str, path: str, queue) -> None:
    """The starting prediction (the labels a user corrects), saved to ``path``, and the
    starting model's held-out Dice."""
    set_threads()
    _fresh_cache()
    from napari_segtool.inference import segment
    from napari_segtool.model import load_model

    image, ref = _load()
    model = load_model("em-membranes-2d")
    inf = _eval_config(device)
    pred = segment(image, model, config=inf).labels
    np.save(path, pred)
    eval_only = segment(image[EVAL], model, config=inf).labels
    queue.put({"dice_before": _dice(pred[EVAL], ref[EVAL]),
               "dice_before_eval_only": _dice(eval_only, ref[EVAL])})  # fmt: skip


def _round_worker(setting: str, seed: int, device: str, pred_path: str, quick: bool,
                  queue) -> None:  # fmt: skip
    set_threads()
    _fresh_cache()
    from napari_segtool.config import FinetuneConfig
    from napari_segtool.inference import segment
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.model import load_model
    from napari_segtool.training import LabelledImage, iter_finetune, labelled_mask

    catch = _Precision()
    loop_log = logging.getLogger("napari_segtool.training.loop")
    loop_log.addHandler(catch)
    loop_log.setLevel(logging.INFO)
    image, ref = _load()
    model = load_model("em-membranes-2d")
    labels = np.load(pred_path)
    labels[TRAIN] = ref[TRAIN]  # the user's corrections
    item = LabelledImage(image, labels, labelled_mask(labels.shape, reviewed=TRAIN))
    extra = QUICK_ROUND if quick else {}
    cfg = FinetuneConfig(device=device, seed=seed, **SETTINGS[setting], **extra)
    sync(device)
    t0 = time.perf_counter()
    result = run_to_end(iter_finetune(model, [item], config=cfg, progress_every=None))
    sync(device)
    seconds = time.perf_counter() - t0
    after = _dice(segment(image[EVAL], result.model, config=_eval_config(device)).labels,
                  ref[EVAL])  # fmt: skip
    ran = catch.seen[0] if catch.seen else ("?", "?", "?")
    queue.put({
        "seconds": seconds,
        "baseline_dice": result.baseline_dice,
        "best_dice": result.best_dice,
        "dice_after": after,
        "promoted": result.promote,
        "epochs": result.epochs,
        "stopped_early": result.stopped_early,
        "epoch_val_dice": [r.val_dice for r in result.reports],
        "epoch_seconds": [round(r.seconds, 2) for r in result.reports],
        "precision": ran[1],
        "memory_format": ran[2],
    })  # fmt: skip


def bench_bundled(device: str, seeds: list[int], quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = str(Path(tmp) / "pred.npy")
        before = spawn(_prepare_worker, device, pred_path)
        rounds: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for i, seed in enumerate(seeds):
            order = list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]
            for setting in order:
                r = spawn(_round_worker, setting, seed, device, pred_path, quick)
                r["seed"] = seed
                rounds[setting].append(r)
                print(json.dumps({setting: r}), file=sys.stderr, flush=True)
    out: dict = {
        "corrected_slices": TRAIN,
        "eval_slices": EVAL,
        "round": {**({} if not quick else QUICK_ROUND), "seeds": seeds},
        **before,
        "settings": {
            "today": "FinetuneConfig(precision='fp32', memory_format='contiguous'): as before "
            "the execution change, but validation folds batch norms",
            "new": "FinetuneConfig(): the defaults (precision auto, channels-last)",
        },
    }
    for setting, rs in rounds.items():
        out[setting] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "best_dice_mean": statistics.fmean(r["best_dice"] for r in rs),
            "dice_after_mean": statistics.fmean(r["dice_after"] for r in rs),
            "rounds": rs,
        }
    today, new = out["today"], out["new"]
    out["speedup"] = today["seconds"] / new["seconds"]
    out["dice_noise"] = {
        k: max(r[k] for r in today["rounds"]) - min(r[k] for r in today["rounds"])
        for k in ("best_dice", "dice_after")
    }
    out["dice_difference_new_minus_today"] = {
        k: [n[k] - t[k] for t, n in zip(today["rounds"], new["rounds"], strict=True)]
        for k in ("best_dice", "dice_after")
    }
    return out


# ----------------------------------------------------------------------------- training step

STEP_CONFIGS = {
    "contiguous_fp32": {"memory_format": "contiguous", "precision": "fp32"},
    "channels_last_fp32": {"memory_format": "channels_last", "precision": "fp32"},
    "channels_last_reduced": {"memory_format": "channels_last", "precision": None},
}
STEP_BATCH, STEP_PATCH = 4, (256, 256)


def _step_worker(name: str, device: str, warmup: int, steps: int, queue) -> None:
    """Time ``_Run.train_step`` (the loop's own step) on patches of the corrected slices."""
    import torch

    threads = set_threads()
    _fresh_cache()
    from napari_segtool.config import TrainingConfig
    from napari_segtool.inference.normalize import apply_range, percentile_range
    from napari_segtool.model import load_model
    from napari_segtool.training import PatchSampler
    from napari_segtool.training.data import labels_to_channels
    from napari_segtool.training.loop import _Run

    image, ref = _load()
    model = load_model("em-membranes-2d").copy()
    lo, hi = percentile_range(image, model.normalization)
    norm = apply_range(image[None], lo, hi)  # (1, Z, Y, X), as fine-tuning normalises
    chan = labels_to_channels(ref, model.label_values or ())
    sampler = PatchSampler([norm[:, z] for z in TRAIN], [chan[z] for z in TRAIN],
                           [None] * len(TRAIN), STEP_PATCH, foreground_fraction=0.5)  # fmt: skip
    setting = dict(STEP_CONFIGS[name])
    setting["precision"] = setting["precision"] or ("fp16" if device == "cuda" else "bf16")
    cfg = TrainingConfig(patch_shape=STEP_PATCH, batch_size=STEP_BATCH, steps=10_000,
                         device=device, **setting)  # fmt: skip
    run = _Run.start(model, cfg, resume=False)
    run.net.train()
    for _ in range(warmup):
        run.train_step(sampler, 1)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        run.train_step(sampler, 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = count_flops(lambda: run.train_step(sampler, 1))
    rng = np.random.default_rng(0)
    sample = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sampler.sample(STEP_BATCH, rng)
        sample.append(time.perf_counter() - t0)
    fwd = torch.zeros((STEP_BATCH, 1, *STEP_PATCH), device=device)
    with torch.no_grad():
        forward = count_flops(lambda: run.net(fwd))
    queue.put({**setting, "threads": threads, "flops": flops, "forward_flops": forward,
               "seconds": statistics.median(times), "all_seconds": [round(t, 4) for t in times],
               "sample_seconds": statistics.median(sample)})  # fmt: skip


def bench_training_step(device: str, matmul: dict, quick: bool) -> dict:
    warmup, steps = (1, 3) if quick else (3, 10)
    out: dict = {"batch": STEP_BATCH, "patch": list(STEP_PATCH), "warmup_steps": warmup,
                 "timed_steps": steps, "model": "bundled em-membranes-2d (2D U-Net, depth 4, "
                 "base 16)"}  # fmt: skip
    for name in STEP_CONFIGS:
        r = spawn(_step_worker, name, device, warmup, steps)
        key = matmul_precision(r["precision"], device)
        rate = matmul["gflops"].get(key)
        r["gflops"] = r["flops"] / r["seconds"] / 1e9
        r["gflops_without_sampling"] = r["flops"] / (r["seconds"] - r["sample_seconds"]) / 1e9
        r["matmul_precision"] = key
        r["matmul_gflops"] = rate
        r["matmul_ratio"] = r["gflops"] / rate if rate else None
        r["matmul_ratio_without_sampling"] = r["gflops_without_sampling"] / rate if rate else None
        out[name] = r
        print(json.dumps({name: r}), file=sys.stderr, flush=True)
    base = out["contiguous_fp32"]["seconds"]
    for name in STEP_CONFIGS:
        out[name]["speedup_vs_contiguous_fp32"] = base / out[name]["seconds"]
    return out


# ----------------------------------------------------------------------------- new model


def _new_model_worker(device: str, quick: bool, queue) -> None:
    set_threads()
    _fresh_cache()
    from napari_segtool.config import FinetuneConfig, InferenceConfig, ModelConfig
    from napari_segtool.inference import segment
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.model import SegmentationModel
    from napari_segtool.training import LabelledImage, iter_finetune

    image, ref = _load()
    model = SegmentationModel.new(ModelConfig(spatial_dims=2), tile_shape=(256, 256))
    mask = np.zeros(ref[0].shape, bool)
    mask[:256, :256] = True  # a quarter of one image
    inf = InferenceConfig(device=device)
    eval_slices = list(range(20, 30))
    before = _dice(segment(image[eval_slices], model, config=inf).labels, ref[eval_slices])
    extra = QUICK_ROUND if quick else {}
    config = FinetuneConfig(device=device, learning_rate=2e-3, patch_shape=(128, 128), **extra)
    t0 = time.perf_counter()
    item = LabelledImage(image[0], ref[0], mask)
    result = run_to_end(iter_finetune(model, [item], config=config, progress_every=None))
    seconds = time.perf_counter() - t0
    after = _dice(segment(image[eval_slices], result.model, config=inf).labels, ref[eval_slices])
    queue.put({
        "labelled_fraction": float(mask.mean()),
        "eval_slices": eval_slices,
        "seconds": round(seconds, 1),
        "dice_before": round(before, 4),
        "dice_after": round(after, 4),
        "epochs": result.epochs,
    })  # fmt: skip


# ----------------------------------------------------------------------------- GUI

GUI_SCRIPT = r"""
import json, sys, time
import numpy as np
import napari
from qtpy.QtCore import QTimer
from napari_segtool.config import InferenceConfig
from napari_segtool.inference import segment
from napari_segtool.model import load_model
sys.path.insert(0, sys.argv[1])
from bench_finetune import TRAIN, _load

image, ref = _load()
model = load_model("em-membranes-2d")
pred = segment(image, model, config=InferenceConfig(device=sys.argv[2])).labels
viewer = napari.Viewer(show=True)
viewer.add_image(image, name="em")
meta = {"segtool_source": "em-membranes-2d"}
layer = viewer.add_labels(pred, name="em prediction", metadata=meta)
_, widget = viewer.window.add_plugin_dock_widget("napari-segtool", "Fine-tune")
widget._labels.value = layer
widget._folder.value = sys.argv[3]
widget._device.value = sys.argv[2]
assert widget.open_project()
layer.data[TRAIN] = ref[TRAIN]
widget.state.reviewed.update(TRAIN)
gaps, last = [], [time.perf_counter()]
def tick():
    now = time.perf_counter(); gaps.append(now - last[0]); last[0] = now
timer = QTimer(); timer.setInterval(5); timer.timeout.connect(tick)
out = {}
def begin():
    timer.start(); last[0] = time.perf_counter(); out["t0"] = time.perf_counter()
    worker = widget.start()
    worker.finished.connect(lambda: QTimer.singleShot(200, done))
def done():
    timer.stop()
    g = np.asarray(gaps[5:]) * 1e3
    out.update(seconds=round(time.perf_counter() - out.pop("t0"), 1),
               ticks=int(g.size), longest_stall_ms=round(float(g.max() - 5), 1),
               p99_gap_ms=round(float(np.percentile(g, 99)), 1),
               versions=len(widget.state.versions))
    print("RESULT " + json.dumps(out), flush=True)
    viewer.close()
QTimer.singleShot(500, begin)
napari.run()
"""


def bench_gui(device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NAPARI_SEGTOOL_CACHE_DIR": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-c", GUI_SCRIPT, str(Path(__file__).parent), device,
               str(Path(tmp) / "em.segtool")]  # fmt: skip
        if not os.environ.get("DISPLAY"):
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


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
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=None,
        help="one today/new pair of rounds per seed (default 0 1 2)",
    )
    parser.add_argument("--skip-gui", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 2 x 3-step rounds, 3 timed steps, no GUI: a smoke test",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="also write benchmarks/results/finetune_<device>[_quick].json",
    )
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    t_start = time.perf_counter()
    matmul = matmul_rates(args.device)
    out: dict = {
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/bench_finetune.py", *sys.argv[1:]]),
        "machine": machine(args.device),
        "matmul": matmul,
        "bundled_4_slices": bench_bundled(args.device, seeds, args.quick),
        "training_step": bench_training_step(args.device, matmul, args.quick),
        "new_model_25pct": spawn(_new_model_worker, args.device, args.quick),
    }
    if not (args.skip_gui or args.quick):
        out["gui_stall"] = bench_gui(args.device)
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(_round(out), indent=2)
    print(text)
    if args.write:
        suffix = "_quick" if args.quick else ""
        path = ROOT / "benchmarks" / "results" / f"finetune_{args.device}{suffix}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
