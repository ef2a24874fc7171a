"""A correction round: train on a project's corrections, keep the version, re-segment the rest.

One round, in named steps that a front end may also run one by one:

1. :func:`iter_train_round`: the model in use (:func:`~napari_segtool.training.versions.
   current_model`), its classes fitted to the corrections (an untrained starting point takes
   the labels' classes, a trained model grows its head for new ones), then fine-tuned on the
   voxels the user changed, painted or reviewed. A generator: it yields
   :class:`~napari_segtool.training.StepProgress` and
   :class:`~napari_segtool.training.EpochReport`; closing it cancels, and nothing is written.
2. :func:`record_version`: the trained model becomes ``models/vNNNN.pt`` and a version in the
   project, promoted only when its validation Dice is not below the starting model's.
3. :func:`iter_resegment`: the model in use segments the image again with flip TTA, so the
   uncertainty map is fresh too (yields :class:`~napari_segtool.inference.Progress`).
4. :func:`merge_resegmentation`: the new prediction replaces the labels only where the user
   neither painted, changed nor reviewed anything.

:func:`iter_correction_round` runs them all on a saved state (the ``finetune`` command). The
Fine-tune widget trains and records on a snapshot (``save=False``) in a worker, then
re-segments in another worker and merges into its live state on the main thread.

A chunked project (:class:`~napari_segtool.io.chunked_state.ChunkedState`, for an image larger
than memory, with a numpy, zarr or dask image) takes the same steps box by box: training on
lazy patches with whole boxes held out for validation
(:func:`~napari_segtool.training.finetune.iter_finetune_boxes`), then
:func:`iter_resegment_boxes`, which segments only the boxes holding unlabelled voxels (with
half a tile of context) and merges each into the store before the next
(:meth:`~napari_segtool.io.chunked_state.ChunkedState.iter_merge_untouched`), with the new
model's uncertainty of those boxes when the flips are on. A merge must not race napari
painting the same chunk: the Fine-tune widget stops painting on the layer while it runs.

Every save is atomic (:meth:`~napari_segtool.io.project.Project.save`). A round cancelled
while it trains leaves the model files and ``state.npz`` byte-identical; one cancelled while
it re-segments has recorded its version (saved) and left the labels as they were.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import zarr
from numpy.typing import NDArray

from napari_segtool.active_learning import voxel_uncertainty
from napari_segtool.config import FinetuneConfig, InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import Progress, iter_segment
from napari_segtool.inference.blocks import subsample_range
from napari_segtool.inference.tiling import relay
from napari_segtool.io.project import ChunkedState, Project, ProjectState, merge_untouched
from napari_segtool.model import list_models
from napari_segtool.training import (
    EpochReport,
    FinetuneResult,
    LabelledImage,
    StepProgress,
    iter_finetune,
)
from napari_segtool.training.classes import ClassFit, fit_classes
from napari_segtool.training.finetune import (
    iter_finetune_boxes,
    segment_box,
    split_labelled_boxes,
)
from napari_segtool.training.versions import current_model, record_round, training_data
from napari_segtool.workflows.lazy_segment import UNCERTAINTY_STORE

logger = logging.getLogger(__name__)

#: Starting points that are untrained: a round rebuilds them with the labels' classes.
UNTRAINED = tuple(e.name for e in list_models() if e.path is None)

RoundItem = StepProgress | EpochReport | Progress
AnyState = ProjectState | ChunkedState

#: Voxels per box a chunked re-segmentation segments at once (plus its context).
RESEGMENT_BOX_VOXELS = 2**22


@dataclass(frozen=True)
class Trained:
    """A finished training step, not recorded yet: the result and what fitting its classes did."""

    result: FinetuneResult
    classes: ClassFit


class Resegmentation(NamedTuple):
    """A new machine prediction of the whole image and its per-voxel uncertainty (0..1)."""

    labels: NDArray
    uncertainty: NDArray[np.float32]


@dataclass(frozen=True)
class RoundResult:
    """What a round did.

    Attributes
    ----------
    version : int
        The new version's number (``models/vNNNN.pt``).
    promoted : bool
        Whether it is now the model in use.
    val_dice, baseline_dice : float or None
        Validation Dice of the new model and of the model it started from, on the same
        held-out corrections (None when nothing could be held out).
    entry : dict
        The version's record in the project.
    training : FinetuneResult
        The training figures and the trained model.
    classes : str
        What was done to the model's classes ("" when nothing).
    resegmented : int or None
        Untouched voxels whose label the new model changed; None when the round did not
        re-segment (not promoted, or ``save=False``).
    """

    version: int
    promoted: bool
    val_dice: float | None
    baseline_dice: float | None
    entry: dict[str, Any]
    training: FinetuneResult
    classes: str = ""
    resegmented: int | None = None

    def summary(self) -> dict[str, object]:
        """The figures as plain JSON values."""
        extra = {"note": self.training.note} if self.training.note else {}
        return {
            "version": self.version,
            "promoted": self.promoted,
            "val_dice": self.val_dice,
            "baseline_dice": self.baseline_dice,
            "resegmented_voxels": self.resegmented,
            "epochs": self.training.epochs,
            "labelled_voxels": self.training.labelled_voxels,
            "validation_voxels": self.training.validation_voxels,
            "seconds": round(self.training.seconds, 2),
            "classes": self.classes,
            **extra,
        }


def round_data(
    image: NDArray, state: ProjectState, *, truth: NDArray | None = None
) -> list[LabelledImage]:
    """The round's training data: the corrections, and a fully labelled ``truth`` if given.

    The project's labels count where the user changed, painted or reviewed; ``truth`` (e.g. a
    reference layer) counts everywhere. With ``truth`` and no corrections yet, only ``truth``
    trains.
    """
    data = [training_data(image, state)]
    if truth is not None:
        data.append(LabelledImage(data[0].image, np.asarray(truth), None))
        if data[0].mask is not None and not data[0].mask.any():
            data = data[1:]
    return data


def iter_train_round(
    project: Project,
    image: Any,
    state: AnyState,
    *,
    config: FinetuneConfig | None = None,
    truth: NDArray | None = None,
    references: Sequence[NDArray] = (),
    extend: bool = True,
) -> Generator[StepProgress | EpochReport, None, Trained]:
    """Fine-tune the model in use on the project's corrections; writes nothing.

    Parameters
    ----------
    project : Project
    image : ndarray
        The project's image, ``(Y, X)``, ``(Z, Y, X)`` or RGB ``(Y, X, C)``; for a
        :class:`~napari_segtool.io.chunked_state.ChunkedState`, one channel, numpy, zarr or
        dask (read by box).
    state : ProjectState or ChunkedState
        The saved state or a snapshot of the user's state; it is not modified. A chunked
        state trains box by box (:func:`~napari_segtool.training.finetune.
        iter_finetune_boxes`).
    config : FinetuneConfig, optional
        Epochs, steps, learning rate, device, seed.
    truth : ndarray, optional
        A fully labelled image of the same shape that trains everywhere.
    references : sequence of ndarray
        Label images whose classes an untrained starting point should know.
    extend : bool
        Classes the model lacks grow its head; False raises instead.

    Yields
    ------
    StepProgress or EpochReport

    Returns
    -------
    Trained
        Through ``StopIteration.value``; closing the generator cancels the round.

    Raises
    ------
    InputError
        No labelled voxels, classes the model lacks (``extend=False``), a missing model, a
        ``truth`` with a chunked state.
    """
    model = current_model(project, state)
    if isinstance(state, ChunkedState):
        return (yield from _train_boxes(model, image, state, config=config, truth=truth,
                                        references=references, extend=extend))  # fmt: skip
    data = round_data(image, state, truth=truth)
    untrained = state.current_version is None and state.base_model in UNTRAINED
    fit = fit_classes(model, data, untrained=untrained, extend=extend, also=references)
    if fit.describe():
        logger.info("fine-tune round: %s", fit.describe())
    result = yield from iter_finetune(fit.model, data, config=config)
    return Trained(result, fit)


def _train_boxes(
    model: Any,
    image: Any,
    state: ChunkedState,
    *,
    config: FinetuneConfig | None,
    truth: NDArray | None,
    references: Sequence[NDArray],
    extend: bool,
) -> Generator[StepProgress | EpochReport, None, Trained]:
    """:func:`iter_train_round` for a chunked state: boxes, lazy patches, box validation."""
    if truth is not None:
        raise InputError(
            "a project larger than memory trains on its corrections only, not on a ground-truth "
            "layer; leave 'ground truth' empty (or mark its slices reviewed in the project)"
        )
    cfg = config or FinetuneConfig()
    split = split_labelled_boxes(state, fraction=cfg.validation_fraction, seed=cfg.seed)
    # the labelled values stand in for the labels: fit_classes only asks which values occur
    values = np.asarray(split.values, np.int64)
    summary = LabelledImage(np.zeros(values.shape, np.float32), values, None)
    untrained = state.current_version is None and state.base_model in UNTRAINED
    fit = fit_classes(model, [summary], untrained=untrained, extend=extend, also=references)
    if fit.describe():
        logger.info("fine-tune round: %s", fit.describe())
    result = yield from iter_finetune_boxes(fit.model, image, state, split, config=cfg)
    return Trained(result, fit)


def record_version(
    project: Project, state: AnyState, trained: Trained, *, save: bool = True
) -> dict[str, Any]:
    """Save the trained model as the next version; promote it only if it is not worse.

    ``save=False``: ``state`` is a snapshot from the round's start, so only the version (and
    the version in use) is written into the state on disk; the caller saves its live state.
    Returns the version's entry; ``state.versions`` and ``state.current_version`` follow.
    """
    return record_round(project, state, trained.result, save=save)


def iter_resegment(
    project: Project,
    image: NDArray,
    state: ProjectState,
    *,
    device: str = "auto",
    precision: str = "auto",
) -> Generator[Progress, None, Resegmentation]:
    """Segment ``image`` with the model in use, with flip TTA for a fresh uncertainty map.

    Yields :class:`~napari_segtool.inference.Progress` per batch of tiles; returns a
    :class:`Resegmentation`. Nothing is written: :func:`merge_resegmentation` does that.
    """
    model = current_model(project, state)
    config = InferenceConfig(device=device, precision=precision, tta=True)
    result = yield from iter_segment(image, model, config=config)
    return Resegmentation(result.labels, voxel_uncertainty(result))


def resegment_block(state: ChunkedState, model: Any) -> tuple[int, ...]:
    """The boxes a chunked re-segmentation segments: whole chunks, at least a tile across in
    Y and X, stacked along Z up to about :data:`RESEGMENT_BOX_VOXELS` voxels."""
    shape, chunks, ndim = state.shape, state.chunks, state.ndim
    tile = tuple(model.tile_shape)[-2:]
    plane = tuple(
        min(n, c * max(1, math.ceil(t / c)))
        for n, c, t in zip(shape[-2:], chunks[-2:], tile, strict=True)
    )
    if ndim == 2:
        return plane
    deep = max(1, RESEGMENT_BOX_VOXELS // max(1, math.prod(plane)))
    return (min(shape[0], chunks[0] * max(1, deep // chunks[0])), *plane)


def iter_resegment_boxes(
    project: Project,
    image: Any,
    state: ChunkedState,
    *,
    device: str = "auto",
    precision: str = "auto",
    block: Sequence[int] | None = None,
) -> Generator[Progress, None, int]:
    """Re-segment a chunked project where it holds unlabelled voxels, merging box by box.

    Each box of :meth:`~napari_segtool.io.chunked_state.ChunkedState.unlabelled_boxes`
    (``block``, default :func:`resegment_block`) is segmented by the model in use with half a
    tile of context (:func:`~napari_segtool.training.finetune.segment_box`, normalised with
    the image's :func:`~napari_segtool.inference.blocks.subsample_range`) and written where
    the user has not worked before the next box is read; labelled voxels are never written,
    and boxes without an unlabelled voxel are neither segmented nor written.

    With flips (:func:`resegment_config`: as Segment recorded them, on when none are), the
    same run gives the normalised entropy of each box it segments, written whole into
    ``<project>/uncertainty.zarr`` (:func:`resegment_uncertainty`) right after the box's
    labels, so the Queue ranks by the model whose labels are shown. The boxes left out keep
    the map they had: the previous model's (the one the user corrected there), or 0 where
    this call made the store. Those boxes are fully labelled: their slices reviewed (the
    Queue leaves reviewed slices out, so a stale value there is never ranked) or their
    voxels painted; the Queue scores every voxel of a unit, labelled or not, so a painted
    box in a slice not reviewed (or a tile of a 2D image, where nothing is left out) still
    adds its old uncertainty to its unit's score. Without flips the map is left as it was:
    the recorded settings must be reused so the labels do not drift, and a run without flips
    has no uncertainty (any store there is from an earlier Segment run with flips).

    Yields
    ------
    Progress
        Boxes done out of the boxes to do; closing the generator stops after the current box
        (the boxes done stay merged, their uncertainty written, the rest as they were).

    Returns
    -------
    int
        The number of voxels whose label changed.

    Notes
    -----
    Not guarded against napari painting the same chunk meanwhile (both rewrite the chunk):
    stop painting while it runs. Nothing is saved; the caller saves the state.
    """
    model = current_model(project, state)
    if tuple(image.shape) != state.shape:
        raise InputError(
            f"the image {tuple(image.shape)} does not match the project's labels {state.shape}"
        )
    inference = resegment_config(state, device=device, precision=precision)
    recorded = state.image.get("value_range")
    if recorded is not None:
        value_range = (np.array([recorded[0]]), np.array([recorded[1]]))
    else:
        value_range = subsample_range(image, model.normalization)

    store = resegment_uncertainty(state) if inference.tta else None
    pending: list[tuple[tuple[slice, ...], NDArray[np.float32]]] = []

    def predict(box: tuple[slice, ...]) -> NDArray:
        unc = None
        if store is not None:
            unc = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
        labels = segment_box(image, model, box, value_range=value_range, inference=inference,
                             shape=state.shape, uncertainty_out=unc)  # fmt: skip
        if unc is not None:
            pending.append((box, unc))  # written once the box's labels are
        return labels

    def merged(step: tuple[int, int]) -> Progress:
        while pending:
            box, unc = pending.pop()
            store[box] = unc  # type: ignore[index]
        return Progress(*step)

    merge = state.iter_merge_untouched(predict, block=block or resegment_block(state, model))
    return (yield from relay(merge, merged))


def resegment_uncertainty(state: ChunkedState) -> zarr.Array:
    """The project's uncertainty store (``<project>/uncertainty.zarr``) to write boxes into.

    The store Segment wrote when it has the labels' shape and holds float32; otherwise (none,
    another shape or dtype, or unreadable: it is a map derived from the model, not the
    user's work) a new one of the labels' shape and chunks, float32, 0 where nothing wrote.
    """
    path = state.folder / UNCERTAINTY_STORE
    if path.exists():
        try:
            unc = zarr.open_array(path, mode="r+")
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("replacing the unreadable uncertainty map %s: %s", path, exc)
        else:
            if tuple(unc.shape) == state.shape and unc.dtype == np.float32:
                return unc
            logger.warning("replacing the uncertainty map %s: %s %s, not the labels' %s "
                           "float32", path, unc.shape, unc.dtype, state.shape)  # fmt: skip
    return zarr.open_array(path, mode="w", shape=state.shape, chunks=state.chunks, dtype="f4",
                           fill_value=0.0, zarr_format=3)  # fmt: skip


def resegment_config(state: ChunkedState, *, device: str, precision: str) -> InferenceConfig:
    """The tiling and flips the project was first segmented with (``state.image``), so a
    re-segmentation with the same model gives the same labels; flips on when none are
    recorded, as the in-memory round has them.

    >>> from types import SimpleNamespace
    >>> s = SimpleNamespace(image={"inference": {"tile_shape": [64, 64], "overlap": 0.5,
    ...                                          "blend": "gaussian", "tta": False}})
    >>> c = resegment_config(s, device="cpu", precision="fp32")
    >>> c.tile_shape, c.overlap, c.tta
    ((64, 64), 0.5, False)
    """
    rec = state.image.get("inference") or {}
    base = InferenceConfig()
    tile = rec.get("tile_shape")
    return InferenceConfig(
        device=device, precision=precision,
        tile_shape=tuple(int(t) for t in tile) if tile else None,
        overlap=float(rec.get("overlap", base.overlap)),
        blend=str(rec.get("blend", base.blend)),
        tta=bool(rec.get("tta", True)),
    )  # fmt: skip


def merge_resegmentation(state: ProjectState, segmentation: Resegmentation) -> int:
    """Write the new prediction into ``state`` where the user has not worked; returns the
    number of labels changed (:func:`~napari_segtool.io.project.merge_untouched`)."""
    return merge_untouched(state, segmentation.labels)


def iter_correction_round(
    project: Project,
    image: Any,
    state: AnyState,
    *,
    config: FinetuneConfig | None = None,
    truth: NDArray | None = None,
    references: Sequence[NDArray] = (),
    extend: bool = True,
    save: bool = True,
) -> Generator[RoundItem, None, RoundResult]:
    """One correction round: train, record the version and, when promoted, re-segment.

    Parameters
    ----------
    project, image, state, config, truth, references, extend
        As for :func:`iter_train_round`.
    save : bool, optional
        True (default): ``state`` is the project's state (as loaded); a promoted version
        re-segments the untouched voxels into it and it is saved. False: ``state`` is a
        snapshot of a live state the caller holds; only the version is recorded, and the
        caller re-segments (:func:`iter_resegment`) and merges into its live state. A
        chunked state re-segments its unlabelled boxes (:func:`iter_resegment_boxes`).

    Yields
    ------
    StepProgress, EpochReport or Progress
        Training steps and epochs, then re-segmentation tiles.

    Returns
    -------
    RoundResult
        Through ``StopIteration.value``. Closing the generator while it trains writes
        nothing; while it re-segments, the recorded version stays and the labels are kept.

    Raises
    ------
    InputError
        As :func:`iter_train_round`; also when another writer holds the project.
    """
    trained = yield from iter_train_round(project, image, state, config=config, truth=truth,
                                          references=references, extend=extend)  # fmt: skip
    entry = record_version(project, state, trained, save=save)
    changed = None
    if entry["promoted"] and save:
        cfg = config or FinetuneConfig()
        if isinstance(state, ChunkedState):
            changed = yield from iter_resegment_boxes(
                project, image, state, device=cfg.device, precision=cfg.precision
            )
        else:
            segmentation = yield from iter_resegment(
                project, image, state, device=cfg.device, precision=cfg.precision
            )
            changed = merge_resegmentation(state, segmentation)
        project.save(state)
    logger.info("correction round: version %d, promoted %s", entry["version"], entry["promoted"])
    return RoundResult(
        version=int(entry["version"]),
        promoted=bool(entry["promoted"]),
        val_dice=entry.get("val_dice"),
        baseline_dice=entry.get("baseline_dice"),
        entry=entry,
        training=trained.result,
        classes=trained.classes.describe(),
        resegmented=changed,
    )
