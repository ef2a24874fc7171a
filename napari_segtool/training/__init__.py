"""Training: patch sampling with an ignore mask, Dice + cross-entropy, a generator loop."""

from napari_segtool.metrics.overlap import foreground_dice
from napari_segtool.training.data import PatchSampler, augment
from napari_segtool.training.finetune import (
    FinetuneResult,
    LabelledImage,
    iter_finetune,
    labelled_mask,
    split_validation,
)
from napari_segtool.training.loop import (
    EpochReport,
    StepProgress,
    iter_train,
    validation_scores,
)
from napari_segtool.training.losses import dice_ce_loss

__all__ = [
    "EpochReport",
    "FinetuneResult",
    "LabelledImage",
    "PatchSampler",
    "StepProgress",
    "augment",
    "dice_ce_loss",
    "foreground_dice",
    "iter_finetune",
    "iter_train",
    "labelled_mask",
    "split_validation",
    "validation_scores",
]
