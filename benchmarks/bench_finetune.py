"""Fine-tuning rounds: wall time, Dice before and after, and how long the GUI stalls meanwhile.

    python benchmarks/bench_finetune.py [--device cpu|cuda] [--skip-gui]

Prints one JSON object with three parts, all on the ISBI 2012 EM stack (30 x 512 x 512):

- ``bundled_4_slices``: the bundled EM model (trained on slices 0-19) is fine-tuned as a user
  would after correcting 4 of the held-out slices (20, 22, 24, 26: their reference labels
  replace the prediction and they are marked reviewed); Dice is measured on the 6 held-out
  slices never shown to it (21, 23, 25, 27, 28, 29), before and after one round with the
  default :class:`~napari_segtool.config.FinetuneConfig`;
- ``new_model_25pct``: a new, untrained 2D model is trained from the top-left quarter of
  slice 0's labels only (25 % of one 2D image) and evaluated on slices 20-29;
- ``gui_stall``: case 1 run through the Fine-tune widget in a real napari viewer (under a
  virtual X server when there is no display) while a 5 ms Qt timer records the gaps between
  its ticks; ``longest_stall_ms`` is the longest gap beyond the timer's own period.

Dice is membrane (class 1) Dice pooled over the evaluation slices; ``seconds`` is the wall
time of the round (training, per-epoch validation and early stopping included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data"
TRAIN = [20, 22, 24, 26]
EVAL = [21, 23, 25, 27, 28, 29]


def _load() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    return tifffile.imread(DATA / "isbi2012_em.tif"), tifffile.imread(
        DATA / "isbi2012_em_membranes.tif"
    )


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred == 1, ref == 1
    return float(2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r)))


def _round(model, item, config) -> tuple[object, float]:
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.training import iter_finetune

    t0 = time.perf_counter()
    result = run_to_end(iter_finetune(model, [item], config=config, progress_every=None))
    return result, time.perf_counter() - t0


def bench_bundled(device: str) -> dict:
    from napari_segtool.config import FinetuneConfig, InferenceConfig
    from napari_segtool.inference import segment
    from napari_segtool.model import load_model
    from napari_segtool.training import LabelledImage, labelled_mask

    image, ref = _load()
    model = load_model("em-membranes-2d")
    inf = InferenceConfig(device=device)
    pred = segment(image, model, config=inf).labels
    before = _dice(pred[EVAL], ref[EVAL])
    labels = pred.copy()
    labels[TRAIN] = ref[TRAIN]  # the user's corrections
    item = LabelledImage(image, labels, labelled_mask(labels.shape, reviewed=TRAIN))
    result, seconds = _round(model, item, FinetuneConfig(device=device))
    after = _dice(segment(image[EVAL], result.model, config=inf).labels, ref[EVAL])
    return {
        "corrected_slices": TRAIN,
        "eval_slices": EVAL,
        "seconds": round(seconds, 1),
        "dice_before": round(before, 4),
        "dice_after": round(after, 4),
        "promoted": result.promote,
        "epochs": result.epochs,
        "val_dice_start_vs_best": [result.baseline_dice, result.best_dice],
    }


def bench_new_model(device: str) -> dict:
    from napari_segtool.config import FinetuneConfig, InferenceConfig, ModelConfig
    from napari_segtool.inference import segment
    from napari_segtool.model import SegmentationModel
    from napari_segtool.training import LabelledImage

    image, ref = _load()
    model = SegmentationModel.new(ModelConfig(spatial_dims=2), tile_shape=(256, 256))
    mask = np.zeros(ref[0].shape, bool)
    mask[:256, :256] = True  # a quarter of one image
    inf = InferenceConfig(device=device)
    eval_slices = list(range(20, 30))
    before = _dice(segment(image[eval_slices], model, config=inf).labels, ref[eval_slices])
    config = FinetuneConfig(device=device, learning_rate=2e-3, patch_shape=(128, 128))
    result, seconds = _round(model, LabelledImage(image[0], ref[0], mask), config)
    after = _dice(segment(image[eval_slices], result.model, config=inf).labels, ref[eval_slices])
    return {
        "labelled_fraction": float(mask.mean()),
        "eval_slices": eval_slices,
        "seconds": round(seconds, 1),
        "dice_before": round(before, 4),
        "dice_after": round(after, 4),
        "epochs": result.epochs,
    }


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
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", GUI_SCRIPT, str(Path(__file__).parent), device,
               str(Path(tmp) / "em.segtool")]  # fmt: skip
        if not os.environ.get("DISPLAY"):
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-gui", action="store_true")
    args = parser.parse_args()
    import torch

    out = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
        },
        "bundled_4_slices": bench_bundled(args.device),
        "new_model_25pct": bench_new_model(args.device),
    }
    if not args.skip_gui:
        out["gui_stall"] = bench_gui(args.device)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
