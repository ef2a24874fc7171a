"""Train the bundled EM membrane model on ISBI 2012 slices 0-19; report slices 20-29.

Reproduce the shipped weights (about 25 minutes on a 2-core CPU):

    python scripts/train_em_model.py --data ../shared/data/isbi2012_em \
        -o napari_segtool/model/weights/em_membranes_2d.pt

Slices 0-17 train the network, slices 18-19 choose the best epoch, and slices 20-29 are
touched only once, at the end, to report the held-out membrane Dice and pixel error (the
fraction of misclassified pixels). The figures go into the model file's ``trained_on``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_segtool.config import InferenceConfig, ModelConfig, TrainingConfig
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training import PatchSampler, evaluate, iter_train

logger = logging.getLogger("train_em_model")

TRAIN = range(18)
SELECT = range(18, 20)
HELD_OUT = range(20, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/isbi2012_em"))
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    volume = tifffile.imread(args.data / "train-volume.tif")
    membranes = tifffile.imread(args.data / "train-membranes.tif").astype(np.uint8)
    model = SegmentationModel.new(
        ModelConfig(spatial_dims=2, depth=args.depth, base_features=args.base_features),
        class_names=("cell interior", "membrane"),
        tile_shape=(256, 256),
        seed=args.seed,
        name="em-membranes-2d",
    )
    model.description = (
        "2D U-Net for cell membranes in serial-section EM, trained on ISBI 2012 slices 0-19"
    )
    # normalise like inference does: percentiles of the stack the user segments
    train_stack = volume[: SELECT.stop]
    lo, hi = percentile_range(train_stack, model.normalization)
    images = [apply_range(volume[z][None], lo, hi) for z in TRAIN]
    sampler = PatchSampler(
        images=images,
        labels=[membranes[z] for z in TRAIN],
        valid=[None] * len(TRAIN),
        patch_shape=(256, 256),
        foreground_fraction=0.5,
    )
    config = TrainingConfig(
        patch_shape=(256, 256),
        batch_size=args.batch_size,
        steps=args.steps,
        steps_per_epoch=50,
        learning_rate=2e-3,
        seed=args.seed,
        device="auto",
    )
    select = [(volume[SELECT.start : SELECT.stop], membranes[SELECT.start : SELECT.stop])]
    t0 = time.perf_counter()
    for report in iter_train(model, sampler, config=config, validation=select):
        logger.info(
            "epoch %d step %d loss %.4f val dice %.4f err %.4f (%.0f s)",
            report.epoch,
            report.step,
            report.train_loss,
            report.val_dice,
            report.val_pixel_error,
            report.seconds,
        )
    train_seconds = time.perf_counter() - t0
    held = [(volume[HELD_OUT.start : HELD_OUT.stop], membranes[HELD_OUT.start : HELD_OUT.stop])]
    dice, err = evaluate(model, held, inference=InferenceConfig(device="auto"))
    tta_dice, tta_err = evaluate(model, held, inference=InferenceConfig(device="auto", tta=True))
    model.trained_on = {
        "dataset": "ISBI 2012 EM segmentation challenge, training stack (30 x 512 x 512)",
        "train_slices": [TRAIN.start, TRAIN.stop - 1],
        "selection_slices": [SELECT.start, SELECT.stop - 1],
        "held_out_slices": [HELD_OUT.start, HELD_OUT.stop - 1],
        "held_out_membrane_dice": round(dice, 4),
        "held_out_pixel_error": round(err, 4),
        "held_out_membrane_dice_tta": round(tta_dice, 4),
        "held_out_pixel_error_tta": round(tta_err, 4),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "seed": args.seed,
    }
    model.save(args.output)
    print(json.dumps(model.trained_on, indent=2))


if __name__ == "__main__":
    main()
