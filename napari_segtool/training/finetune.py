"""Fine-tuning on a user's corrections: what counts as labelled, a validation split, one round.

A user corrects part of a prediction and marks some slices as reviewed. Only those voxels are
labelled; the rest of the image is ignored by the loss (an ignore mask), so a partly corrected
stack is usable. :func:`iter_finetune` trains a *copy* of the starting model on the labelled
voxels, validates on labelled voxels held out from training (whole slices of a stack, or
blocks of a 2D image), stops early when validation stops improving, and says whether the
result beats the starting model on the same held-out voxels (``promote``). Closing the
generator cancels the round; the starting model is never modified.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import FinetuneConfig, InferenceConfig, TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.normalize import apply_range, check_values, percentile_range
from napari_segtool.inference.predict import segment
from napari_segtool.inference.tiling import relay
from napari_segtool.io.labelled import labelled_mask
from napari_segtool.metrics.overlap import overlap_metrics
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.data import PatchSampler, labels_to_channels
from napari_segtool.training.loop import EpochReport, StepProgress, iter_train
from napari_segtool.training.split import split_validation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImage:
    """One image with its (partial) labels: ``labels`` count only where ``mask`` is True.

    ``image`` is ``(Y, X)``, ``(Z, Y, X)`` or an RGB ``(Y, X, C)``; ``labels`` and ``mask``
    have its spatial shape. ``mask=None`` means every voxel is labelled.
    """

    image: NDArray
    labels: NDArray
    mask: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        spatial = self.image.shape[: self.labels.ndim]
        if spatial != self.labels.shape:
            raise InputError(
                f"labels {self.labels.shape} do not match the image {self.image.shape}"
            )
        if self.mask is not None and self.mask.shape != self.labels.shape:
            raise InputError(f"mask {self.mask.shape} does not match labels {self.labels.shape}")
        if self.labels.dtype.kind not in "biu":
            raise InputError(f"labels must be integers, not {self.labels.dtype}")


@dataclass
class FinetuneResult:
    """What a round produced.

    ``model`` is the trained copy (best validation epoch); ``baseline_dice`` and ``best_dice``
    are the starting and trained model's Dice on the same held-out labelled voxels (None
    without validation data); ``promote`` is True when the trained model is at least as good.
    With nothing to validate on (labels too few to hold any out) ``promote`` is False and
    ``note`` says so: the previous model stays in use. With ``validation_fraction=0`` the
    caller chose not to validate, and the result is promoted unchecked (``note`` says that).
    """

    model: SegmentationModel
    baseline_dice: float | None
    best_dice: float | None
    epochs: int
    stopped_early: bool
    seconds: float
    promote: bool
    labelled_voxels: int
    validation_voxels: int
    reports: list[EpochReport] = field(default_factory=list)
    note: str | None = None

    def summary(self) -> dict[str, object]:
        extra = {} if self.note is None else {"note": self.note}
        return {
            **extra,
            "baseline_dice": self.baseline_dice,
            "best_dice": self.best_dice,
            "promote": self.promote,
            "epochs": self.epochs,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
            "labelled_voxels": self.labelled_voxels,
            "validation_voxels": self.validation_voxels,
        }


@dataclass
class _Prepared:
    raw: NDArray
    normalised: NDArray[np.float32]  # (C, *S)
    labels: NDArray  # channel indices (the model's label values mapped to 0 .. C-1)
    train: NDArray[np.bool_]
    val: NDArray[np.bool_]
    value_range: tuple[NDArray, NDArray]
    rgb: bool


def _prepare(item: LabelledImage, model: SegmentationModel, cfg: FinetuneConfig) -> _Prepared:
    image = np.asarray(item.image)
    rgb = image.ndim == item.labels.ndim + 1
    if rgb and image.shape[-1] != model.config.in_channels:
        raise InputError(
            f"the image has {image.shape[-1]} channels but the model takes "
            f"{model.config.in_channels}"
        )
    if not rgb and model.config.in_channels != 1:
        raise InputError(f"the model takes {model.config.in_channels} channels, the image has 1")
    if item.labels.ndim not in (2, 3):
        raise InputError(f"labels must be 2D or 3D, got {item.labels.ndim}D")
    check_values(image)
    mask = np.ones(item.labels.shape, bool) if item.mask is None else item.mask.astype(bool)
    channels = labels_to_channels(item.labels, model.label_values or (), mask=mask)
    train, val = split_validation(mask, fraction=cfg.validation_fraction, seed=cfg.seed)
    lo, hi = percentile_range(image, model.normalization, channel_axis=-1 if rgb else None)
    chans = np.moveaxis(image, -1, 0) if rgb else image[np.newaxis]
    return _Prepared(
        raw=image,
        normalised=apply_range(chans, lo, hi, channel_axis=0),
        labels=channels,
        train=train,
        val=val,
        value_range=(lo, hi),
        rgb=rgb,
    )


def _bbox(mask: NDArray[np.bool_], margin: Sequence[int]) -> tuple[slice, ...]:
    box = []
    for axis, m in enumerate(margin):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, int(hits[0]) - m), min(mask.shape[axis], int(hits[-1]) + 1 + m)))
    return tuple(box)


def masked_scores(
    model: SegmentationModel,
    items: Sequence[_Prepared],
    *,
    inference: InferenceConfig,
) -> tuple[float, float]:
    """Foreground Dice and pixel error of ``model`` on the validation voxels of ``items``.

    Only the region around the validation voxels is segmented: the held-out slices for a 2D
    model on a stack, their bounding box plus half a tile of context otherwise. Counts are
    pooled over all items before the Dice is taken.
    """
    k = model.config.out_channels
    cm = np.zeros((k, k), np.int64)
    for item in items:
        if not item.val.any():
            continue
        if model.spatial_dims == 2 and item.labels.ndim == 3:
            zs = np.flatnonzero(item.val.any(axis=(1, 2)))
            region: tuple = (zs,)
        else:
            tile = model.tile_shape[-item.labels.ndim :]
            region = _bbox(item.val, [t // 2 for t in tile])
        pred = segment(
            item.raw[region],
            model,
            config=inference,
            rgb=item.rgb,
            value_range=item.value_range,
        ).labels
        v = item.val[region]
        ref = item.labels[region][v].astype(np.intp)
        got = labels_to_channels(pred[v], model.label_values or ()).astype(np.intp)
        cm += np.bincount(ref * k + got, minlength=k * k).reshape(k, k)
    if int(cm.sum()) == 0:
        raise InputError("no validation voxels")
    scores = overlap_metrics(confusion=cm)  # same macro Dice as the Review widget shows
    return float(scores["dice"]), 1.0 - float(scores["pixel_accuracy"])  # type: ignore[arg-type]


def iter_finetune(
    model: SegmentationModel,
    data: Sequence[LabelledImage],
    *,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    progress_every: int | None = 1,
) -> Generator[EpochReport | StepProgress, None, FinetuneResult]:
    """Fine-tune a copy of ``model`` on the labelled voxels of ``data``, one report per epoch.

    Parameters
    ----------
    model : SegmentationModel
        The starting point (bundled, from a file, or new); it is not modified.
    data : sequence of LabelledImage
        Images with labels and masks of the voxels that count. Pass every round's corrections
        (the project keeps them all) so earlier corrections keep being replayed.
    config : FinetuneConfig
        Steps, patch, learning rate, validation fraction, patience, device and seed.
    resume : bool
        Continue the training run saved with ``model`` (its ``training_state``: optimizer,
        step, epoch) up to ``config.epochs`` epochs in all, instead of starting a new round.

    progress_every : int, optional
        Yield a :class:`StepProgress` every this many steps (progress bars; cancelling
        within an epoch); None for epoch reports only.

    Yields
    ------
    EpochReport or StepProgress
        An :class:`EpochReport` after each epoch (``val_dice`` measured on the held-out
        labelled voxels), step progress in between.

    Returns
    -------
    FinetuneResult
        The trained copy and whether it beats the starting model on the held-out voxels.

    Raises
    ------
    InputError
        No labelled voxels, labelled voxels holding a negative value or a value that is not
        one of the model's ``label_values``, channel mismatch, or a run that diverged (the
        loss or weights became NaN or infinite).
    """
    cfg = config or FinetuneConfig()
    t0 = time.perf_counter()
    prepared = _prepare_all(data, model, cfg)
    labelled = sum(int(p.train.sum() + p.val.sum()) for p in prepared)
    n_val = sum(int(p.val.sum()) for p in prepared)
    inference = InferenceConfig(
        device=cfg.device,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        memory_format=cfg.memory_format,
        compile="off",
    )
    sampler = _sampler(prepared, model, cfg)
    baseline = masked_scores(model, prepared, inference=inference)[0] if n_val else None
    work = _working_copy(model, resume=resume)
    tcfg = _training_config(cfg, sampler.patch_shape)

    def validate(m: SegmentationModel) -> tuple[float, float]:
        return masked_scores(m, prepared, inference=inference)

    reports: list[EpochReport] = []

    def keep(item: EpochReport | StepProgress) -> EpochReport | StepProgress:
        if isinstance(item, EpochReport):
            reports.append(item)
        return item

    gen = iter_train(
        work,
        sampler,
        config=tcfg,
        validate=validate if n_val else None,
        patience=cfg.patience if n_val else None,
        resume=resume,
        progress_every=progress_every,
    )
    # closing this generator closes iter_train, which restores the best epoch's weights
    yield from relay(gen, keep)
    scored = [r.val_dice for r in reports if r.val_dice is not None]
    best = max(scored) if scored else None
    promote, note = _decision(cfg, labelled=labelled, n_val=n_val, best=best, baseline=baseline)
    work.trained_on = {
        **{k: v for k, v in model.trained_on.items() if k != "finetune"},
        "finetune": {
            "labelled_voxels": labelled,
            "validation_voxels": n_val,
            "baseline_dice": baseline,
            "best_dice": best,
            "epochs": len(reports),
        },
    }
    result = FinetuneResult(
        model=work,
        baseline_dice=baseline,
        best_dice=best,
        epochs=len(reports),
        stopped_early=bool(reports) and reports[-1].step < tcfg.steps,
        seconds=time.perf_counter() - t0,
        promote=promote,
        labelled_voxels=labelled,
        validation_voxels=n_val,
        reports=reports,
        note=note,
    )
    logger.info("fine-tune: %s", result.summary())
    return result


def _prepare_all(
    data: Sequence[LabelledImage], model: SegmentationModel, cfg: FinetuneConfig
) -> list[_Prepared]:
    """Every image prepared and split; refuses a round with nothing labelled."""
    if not data:
        raise InputError("nothing to train on: give at least one labelled image")
    prepared = [_prepare(item, model, cfg) for item in data]
    if not any(p.train.any() or p.val.any() for p in prepared):
        raise InputError(
            "no labelled voxels: correct part of the prediction or mark slices as reviewed"
        )
    return prepared


def _working_copy(model: SegmentationModel, *, resume: bool) -> SegmentationModel:
    """The copy a round trains (the starting model is never modified)."""
    work = model.copy()
    if not resume:
        work.training_state = None
    elif work.training_state is None:
        raise InputError("this model holds no training run to resume")
    return work


def _training_config(cfg: FinetuneConfig, patch_shape: tuple[int, ...]) -> TrainingConfig:
    return TrainingConfig(
        patch_shape=patch_shape,
        batch_size=cfg.batch_size,
        steps=cfg.epochs * cfg.steps_per_epoch,
        learning_rate=cfg.learning_rate,
        steps_per_epoch=cfg.steps_per_epoch,
        seed=cfg.seed,
        device=cfg.device,
        precision=cfg.precision,
        memory_format=cfg.memory_format,
    )


def _decision(
    cfg: FinetuneConfig,
    *,
    labelled: int,
    n_val: int,
    best: float | None,
    baseline: float | None,
) -> tuple[bool, str | None]:
    """Whether to promote the trained copy, and the note that explains an unchecked choice."""
    if n_val == 0 and cfg.validation_fraction > 0:
        return False, (
            f"nothing to validate on: the {labelled} labelled voxels are too few to hold any "
            "out, so the previous model stays in use; label a larger area or more slices"
        )
    if n_val == 0:
        return True, "validation_fraction is 0: promoted without validation"
    return best is not None and baseline is not None and best >= baseline, None


def _sampler(
    prepared: Sequence[_Prepared], model: SegmentationModel, cfg: FinetuneConfig
) -> PatchSampler:
    """Patches from the training voxels; a 2D model on a stack gets the labelled slices."""
    images, labels, masks = [], [], []
    for p in prepared:
        if model.spatial_dims == 2 and p.labels.ndim == 3:
            for z in np.flatnonzero(p.train.any(axis=(1, 2))):
                images.append(p.normalised[:, z])
                labels.append(p.labels[z])
                masks.append(p.train[z])
        elif p.train.any():
            img, lab, msk = p.normalised, p.labels, p.train
            if model.spatial_dims == 3 and lab.ndim == 2:
                img, lab, msk = img[:, np.newaxis], lab[np.newaxis], msk[np.newaxis]
            images.append(img)
            labels.append(lab)
            masks.append(msk)
    if not images:
        raise InputError("all labelled voxels went to validation; label a little more")
    shape = cfg.patch_shape or model.tile_shape
    if len(shape) != model.spatial_dims:
        raise InputError(f"patch_shape {shape} does not fit a {model.spatial_dims}D model")
    # no bigger than the largest labelled image along each axis (rounded to the net's stride)
    stride = 2 ** (model.config.depth - 1)
    biggest = np.max([lab.shape for lab in labels], axis=0)
    shape = tuple(
        int(min(s, max(stride, math.ceil(b / stride) * stride)))
        for s, b in zip(shape, biggest, strict=True)
    )
    return PatchSampler(images, labels, masks, shape, foreground_fraction=0.5)


__all__ = [
    "FinetuneResult",
    "LabelledImage",
    "iter_finetune",
    "labelled_mask",
    "masked_scores",
    "split_validation",
]
