"""Training: patch sampling with an ignore mask, Dice + cross-entropy, a generator loop."""

from napari_segtool.training.data import PatchSampler, augment
from napari_segtool.training.loop import EpochReport, evaluate, foreground_dice, iter_train
from napari_segtool.training.losses import dice_ce_loss

__all__ = [
    "EpochReport",
    "PatchSampler",
    "augment",
    "dice_ce_loss",
    "evaluate",
    "foreground_dice",
    "iter_train",
]
