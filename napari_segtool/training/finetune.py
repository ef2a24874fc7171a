"""Fine-tuning on a user's corrections: what counts as labelled, a validation split, one round.

A user corrects part of a prediction and marks some slices as reviewed. Only those voxels are
labelled; the rest of the image is ignored by the loss (an ignore mask), so a partly corrected
stack is usable. :func:`iter_finetune` trains a *copy* of the starting model on the labelled
voxels, validates on labelled voxels held out from training (whole slices of a stack, or
blocks of a 2D image), stops early when validation stops improving, and says whether the
result beats the starting model on the same held-out voxels (``promote``). Closing the
generator cancels the round; the starting model is never modified.

For a volume larger than memory (a :class:`~napari_segtool.io.chunked_state.ChunkedState`
and a lazy image), :func:`iter_finetune_boxes` runs the same round box by box: whole labelled
boxes are held out for validation (:func:`split_labelled_boxes`), training patches are read
lazily (:class:`~napari_segtool.training.lazy_patches.LazyPatchSampler`) and validation
segments each held-out box with half a tile of context (:func:`box_scores`), so memory is
bounded by a box and a batch, never by the volume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import FinetuneConfig, InferenceConfig, TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.blocks import iter_segment_blocks, labels_dtype, subsample_range
from napari_segtool.inference.normalize import apply_range, check_values, percentile_range
from napari_segtool.inference.predict import segment
from napari_segtool.inference.tiling import relay, run_to_end
from napari_segtool.io.labelled import labelled_mask
from napari_segtool.metrics.overlap import overlap_metrics
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.balance import RoundPlan, class_counts, plan_round
from napari_segtool.training.data import PatchSampler, labels_to_channels
from napari_segtool.training.lazy_patches import LabelledBoxes, LazyPatchSampler
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
    plan: dict[str, object] | None = None  # what the round chose (training.balance)

    def summary(self) -> dict[str, object]:
        extra = {} if self.note is None else {"note": self.note}
        if self.plan is not None:
            extra["plan"] = self.plan
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
    train, val = split_validation(
        mask,
        fraction=cfg.validation_fraction,
        seed=cfg.seed,
        labels=channels if cfg.balance == "auto" else None,
    )
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
    inference = _inference_config(cfg)
    counts = class_counts([p.labels for p in prepared], [p.train for p in prepared],
                          model.config.out_channels)  # fmt: skip
    plan = plan_round(counts, steps_per_epoch=cfg.steps_per_epoch, balance=cfg.balance)
    logger.info("fine-tune plan: %s", plan.reason)
    sampler = _sampler(prepared, model, cfg, plan)

    def validate(m: SegmentationModel) -> tuple[float, float]:
        return masked_scores(m, prepared, inference=inference)

    return (yield from _run_round(model, sampler, validate, cfg=cfg, labelled=labelled,
                                  n_val=n_val, resume=resume, progress_every=progress_every,
                                  t0=t0, plan=plan))  # fmt: skip


def _run_round(
    model: SegmentationModel,
    sampler: PatchSampler | LazyPatchSampler,
    validate: Callable[[SegmentationModel], tuple[float, float]],
    *,
    cfg: FinetuneConfig,
    labelled: int,
    n_val: int,
    resume: bool,
    progress_every: int | None,
    t0: float,
    plan: RoundPlan | None = None,
) -> Generator[EpochReport | StepProgress, None, FinetuneResult]:
    """Train a copy of ``model``, validate and decide: the part both rounds share."""
    baseline = validate(model)[0] if n_val else None
    work = _working_copy(model, resume=resume)
    tcfg = _training_config(cfg, sampler.patch_shape, plan)
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
        plan=None
        if plan is None
        else {**plan.summary(), "patch_shape": list(tcfg.patch_shape), "steps": tcfg.steps},
    )
    logger.info("fine-tune: %s", result.summary())
    return result


def _inference_config(cfg: FinetuneConfig) -> InferenceConfig:
    """How validation segments: the round's device, batch and precision, never compiled."""
    return InferenceConfig(
        device=cfg.device,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        memory_format=cfg.memory_format,
        compile="off",
    )


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


def _training_config(cfg: FinetuneConfig, patch_shape: tuple[int, ...],
                     plan: RoundPlan | None = None) -> TrainingConfig:  # fmt: skip
    per_epoch = cfg.steps_per_epoch if plan is None else plan.steps_per_epoch
    return TrainingConfig(
        patch_shape=patch_shape,
        batch_size=cfg.batch_size,
        steps=cfg.epochs * per_epoch,
        learning_rate=cfg.learning_rate,
        steps_per_epoch=per_epoch,
        class_weights=None if plan is None else plan.class_weights,
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
    prepared: Sequence[_Prepared],
    model: SegmentationModel,
    cfg: FinetuneConfig,
    plan: RoundPlan,
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
    return PatchSampler(images, labels, masks, shape,
                        foreground_fraction=plan.foreground_fraction,
                        class_balanced=plan.class_balanced)  # fmt: skip


# -- larger than memory: box by box ----------------------------------------------------------

Box = tuple[slice, ...]


@dataclass(frozen=True)
class BoxSplit:
    """The labelled boxes of a project, split for a round (:func:`split_labelled_boxes`).

    Attributes
    ----------
    train, validation : list of Box
        Boxes that train and boxes held out whole for validation, in grid order.
    values : tuple of int
        The label values the labelled voxels hold (0 included).
    labelled_voxels, validation_voxels : int
        Labelled voxels in all boxes, and in the validation boxes.
    """

    train: list[Box]
    validation: list[Box]
    values: tuple[int, ...]
    labelled_voxels: int
    validation_voxels: int


def split_labelled_boxes(
    state: LabelledBoxes,
    *,
    fraction: float,
    seed: int = 0,
    boxes: Sequence[Box] | None = None,
) -> BoxSplit:
    """Hold out about ``fraction`` of the labelled boxes for validation, foreground first.

    Reads each labelled box once (its labels and labelled mask), never the volume.

    Parameters
    ----------
    state : ChunkedState or ProjectState
        The project's state (``labels``, ``labelled_boxes``, ``labelled_region``).
    fraction : float
        Share of the boxes to hold out (0: none).
    seed : int
        The draw is ``numpy.random.default_rng(seed)``.
    boxes : sequence of Box, optional
        The candidate boxes (default ``state.labelled_boxes()``).

    Returns
    -------
    BoxSplit

    Raises
    ------
    InputError
        A labelled voxel holding a negative value.

    Notes
    -----
    Boxes without a labelled voxel are dropped. With two or more boxes, ``n = round(fraction
    * boxes)`` (at least 1, at most all but one) are held out: first ``round(fraction *
    fg)`` (at least 1, at most ``fg - 1``) of the ``fg`` boxes holding labelled foreground
    (a value other than 0), when there are two or more of them, so validation scores a class
    and not only background where the labels allow; the rest from the boxes holding only
    background. One box alone trains (nothing to validate on).
    """
    kept: list[Box] = []
    counts: list[int] = []
    fore: list[bool] = []
    values: set[int] = {0}
    for candidate in state.labelled_boxes() if boxes is None else boxes:
        box = tuple(candidate)
        mask = state.labelled_region(box)
        n = int(np.count_nonzero(mask))
        if not n:
            continue
        held = np.unique(np.asarray(state.labels[box])[mask])
        values.update(int(v) for v in held)
        kept.append(box)
        counts.append(n)
        fore.append(bool((held != 0).any()))
    if min(values) < 0:
        raise InputError(
            f"labels hold the negative value {min(values)}; label values must be >= 0"
        )
    val: set[int] = set()
    if fraction > 0 and len(kept) >= 2:
        rng = np.random.default_rng(seed)
        n_val = min(len(kept) - 1, max(1, round(fraction * len(kept))))
        fg = [i for i, f in enumerate(fore) if f]
        bg = [i for i, f in enumerate(fore) if not f]
        n_fg = min(len(fg) - 1, max(1, round(fraction * len(fg)))) if len(fg) >= 2 else 0
        n_fg = min(n_fg, n_val)
        n_bg = min(len(bg), n_val - n_fg)
        for pool, n in ((fg, n_fg), (bg, n_bg)):
            if n:
                val.update(int(i) for i in rng.choice(pool, n, replace=False))
    return BoxSplit(
        train=[b for i, b in enumerate(kept) if i not in val],
        validation=[b for i, b in enumerate(kept) if i in val],
        values=tuple(sorted(values)),
        labelled_voxels=int(sum(counts)),
        validation_voxels=int(sum(c for i, c in enumerate(counts) if i in val)),
    )


def context_box(box: Sequence[slice], margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels on each side, clipped to ``shape``.

    >>> context_box((slice(2, 4), slice(0, 8)), (1, 3), (5, 10))
    (slice(1, 5, None), slice(0, 10, None))
    """
    return tuple(
        slice(max(0, s.start - m), min(int(n), s.stop + m))
        for s, m, n in zip(box, margin, shape, strict=True)
    )


def tile_context(model: SegmentationModel, ndim: int) -> tuple[int, ...]:
    """Half a tile of context per axis of an ``ndim`` volume (none along Z for a 2D model on a
    stack, whose slices are segmented one by one)."""
    tile = tuple(int(t) // 2 for t in model.tile_shape)
    if len(tile) < ndim:
        return (0,) * (ndim - len(tile)) + tile
    return tile[-ndim:]


def segment_box(
    image: Any,
    model: SegmentationModel,
    box: Sequence[slice],
    *,
    value_range: tuple[Any, Any],
    inference: InferenceConfig,
    shape: Sequence[int] | None = None,
    uncertainty_out: NDArray[np.float32] | None = None,
) -> NDArray:
    """The labels of ``box`` (model label values), segmented with half a tile of context.

    Reads ``image`` (numpy, zarr, dask; one channel) only in ``box`` grown by
    :func:`tile_context`; normalised with ``value_range`` (the whole volume's, e.g.
    :func:`~napari_segtool.inference.blocks.subsample_range`), so a box is segmented as it
    would be in the whole volume up to the tiles' placement.

    ``uncertainty_out`` (optional, the box's shape, written in place; needs
    ``inference.tta``) takes the normalised entropy of the flips in the box (float32 in
    ``[0, 1]``), from the same run as the labels: the
    :func:`~napari_segtool.inference.blocks.iter_segment_blocks` uncertainty of the grown
    box, cropped to ``box``.
    """
    shape = tuple(int(n) for n in (image.shape if shape is None else shape))
    box = tuple(box)
    region = context_box(box, tile_context(model, len(shape)), shape)
    inner = tuple(
        slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region, strict=True)
    )
    grown = tuple(s.stop - s.start for s in region)
    unc = None
    if uncertainty_out is not None:
        want = tuple(s.stop - s.start for s in box)
        if tuple(uncertainty_out.shape) != want:
            raise InputError(
                f"uncertainty_out has shape {tuple(uncertainty_out.shape)}, expected the "
                f"box's {want}"
            )
        unc = np.zeros(grown, np.float32)  # checked for flips by the block engine
    out = np.zeros(grown, labels_dtype(model))
    run_to_end(iter_segment_blocks(image, model, value_range=value_range, labels_out=out,
                                   config=inference, region=region,
                                   uncertainty_out=unc))  # fmt: skip
    if uncertainty_out is not None:
        uncertainty_out[...] = unc[inner]  # type: ignore[index]
    return out[inner]


def box_scores(
    model: SegmentationModel,
    image: Any,
    state: LabelledBoxes,
    boxes: Sequence[Box],
    *,
    value_range: tuple[Any, Any],
    inference: InferenceConfig,
) -> tuple[float, float]:
    """Foreground Dice and pixel error of ``model`` on the labelled voxels of ``boxes``.

    The box-wise :func:`masked_scores`: each box is segmented with half a tile of context
    (:func:`segment_box`) and scored where ``state.labelled_region(box)`` holds; counts are
    pooled over the boxes before the Dice is taken (the macro Dice the Review widget shows).

    Raises
    ------
    InputError
        When the boxes hold no labelled voxel.
    """
    k = model.config.out_channels
    values = model.label_values or ()
    cm = np.zeros((k, k), np.int64)
    for box in boxes:
        mask = state.labelled_region(box)
        if not mask.any():
            continue
        pred = segment_box(image, model, box, value_range=value_range, inference=inference,
                           shape=state.shape)  # fmt: skip
        ref = labels_to_channels(np.asarray(state.labels[box])[mask], values).astype(np.intp)
        got = labels_to_channels(pred[mask], values).astype(np.intp)
        cm += np.bincount(ref * k + got, minlength=k * k).reshape(k, k)
    if int(cm.sum()) == 0:
        raise InputError("no validation voxels")
    scores = overlap_metrics(confusion=cm)
    return float(scores["dice"]), 1.0 - float(scores["pixel_accuracy"])  # type: ignore[arg-type]


def _lazy_patch_shape(
    cfg: FinetuneConfig, model: SegmentationModel, shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The patch: the config's (or the tile), no bigger than the volume (rounded to the net's
    stride), as the in-memory round does."""
    patch = cfg.patch_shape or model.tile_shape
    if len(patch) != model.spatial_dims:
        raise InputError(f"patch_shape {patch} does not fit a {model.spatial_dims}D model")
    if model.spatial_dims > len(shape):
        raise InputError(
            f"a {model.spatial_dims}D model cannot train on {len(shape)}D labels; pick a 2D model"
        )
    stride = 2 ** (model.config.depth - 1)
    extent = shape[-model.spatial_dims :]
    return tuple(
        int(min(p, max(stride, math.ceil(b / stride) * stride)))
        for p, b in zip(patch, extent, strict=True)
    )


def iter_finetune_boxes(
    model: SegmentationModel,
    image: Any,
    state: LabelledBoxes,
    split: BoxSplit,
    *,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    progress_every: int | None = 1,
) -> Generator[EpochReport | StepProgress, None, FinetuneResult]:
    """:func:`iter_finetune` for a volume larger than memory: patches and validation by box.

    Parameters
    ----------
    model : SegmentationModel
        The starting point (one input channel); it is not modified. Its ``label_values``
        must cover the labelled values (fit them first, e.g.
        :func:`~napari_segtool.training.classes.fit_classes` on ``split.values``).
    image : array-like, shape of ``state.shape``
        numpy, zarr or dask; read patch by patch and box by box, never whole.
    state : ChunkedState or ProjectState
        The labels and labelled voxels, read by box; not modified.
    split : BoxSplit
        The boxes that train and those held out (:func:`split_labelled_boxes`).
    config, resume, progress_every
        As for :func:`iter_finetune`.

    Yields
    ------
    EpochReport or StepProgress

    Returns
    -------
    FinetuneResult
        Promoted on the same rule as :func:`iter_finetune`: the trained copy's Dice on the
        validation boxes is at least the starting model's on the same voxels.

    Raises
    ------
    InputError
        No labelled voxels, an image of another shape or with channels, values the model
        does not know, or a run that diverged.

    Notes
    -----
    The intensity range is :func:`~napari_segtool.inference.blocks.subsample_range` of the
    image (a sample of slices), where the in-memory round takes the percentiles of the whole
    image; memory is bounded by a box, a patch batch and the range's sample.
    """
    cfg = config or FinetuneConfig()
    t0 = time.perf_counter()
    if model.config.in_channels != 1 or tuple(image.shape) != tuple(state.shape):
        raise InputError(
            f"the image {tuple(image.shape)} must be one channel of the labels' shape "
            f"{tuple(state.shape)} (a {model.config.in_channels}-channel model was given); a "
            "project larger than memory trains one-channel images"
        )
    if not split.train:
        raise InputError(
            "no labelled voxels: correct part of the prediction or mark slices as reviewed"
        )
    value_range = subsample_range(image, model.normalization)
    inference = _inference_config(cfg)
    sampler = LazyPatchSampler(image, state, _lazy_patch_shape(cfg, model, tuple(state.shape)),
                               label_values=model.label_values or (), value_range=value_range,
                               boxes=split.train, holdout=split.validation)  # fmt: skip
    # the same plan as in memory, from the class counts the sampler read box by box
    plan = plan_round(sampler.class_counts, steps_per_epoch=cfg.steps_per_epoch,
                      balance=cfg.balance)  # fmt: skip
    logger.info("fine-tune plan (by box): %s", plan.reason)
    sampler.foreground_fraction = plan.foreground_fraction
    sampler.class_balanced = plan.class_balanced

    def validate(m: SegmentationModel) -> tuple[float, float]:
        return box_scores(m, image, state, split.validation, value_range=value_range,
                          inference=inference)  # fmt: skip

    return (yield from _run_round(model, sampler, validate, cfg=cfg,
                                  labelled=split.labelled_voxels,
                                  n_val=split.validation_voxels, resume=resume,
                                  progress_every=progress_every, t0=t0,
                                  plan=plan))  # fmt: skip


__all__ = [
    "BoxSplit",
    "FinetuneResult",
    "LabelledImage",
    "box_scores",
    "context_box",
    "iter_finetune",
    "iter_finetune_boxes",
    "labelled_mask",
    "masked_scores",
    "segment_box",
    "split_labelled_boxes",
    "split_validation",
    "tile_context",
]
