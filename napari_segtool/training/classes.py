"""Which classes a round trains: the model's, grown to the classes the corrections hold."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.model.classes import extend_classes, with_label_values
from napari_segtool.training.data import label_values_present
from napari_segtool.training.finetune import LabelledImage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassFit:
    """The model a round starts from, and what was done to its classes."""

    model: SegmentationModel
    added: tuple[int, ...] = ()  # classes added to a trained model's head
    rebuilt: bool = False  # an untrained starting point rebuilt with the labels' classes

    def describe(self) -> str:
        if self.rebuilt:
            values = self.model.label_values or ()
            return f"new model with {len(values)} classes from the labels: {list(values)}"
        if self.added:
            return f"added classes {list(self.added)} to the model"
        return ""


def fit_classes(
    model: SegmentationModel,
    data: Sequence[LabelledImage],
    *,
    untrained: bool,
    extend: bool = True,
    also: Sequence[NDArray] = (),
) -> ClassFit:
    """Make ``model`` able to learn every class the labelled voxels of ``data`` hold.

    Parameters
    ----------
    model : SegmentationModel
        The model in use.
    data : sequence of LabelledImage
        The round's training data; only voxels under each ``mask`` count.
    untrained : bool
        ``model`` is an untrained starting point (``new-2d``/``new-3d``): it is rebuilt with
        one channel per class present in the labels (and in ``also``).
    extend : bool
        For a trained model, add a channel for each class it does not know
        (:func:`~napari_segtool.model.classes.extend_classes`); False raises instead.
    also : sequence of ndarray
        Further label images whose classes a new model should know (e.g. a reference layer),
        even if no correction holds them yet.

    Raises
    ------
    InputError
        Labels with classes the model lacks and ``extend`` is False, negative labels, or
        more classes than a model may have.

    Examples
    --------
    >>> from napari_segtool.config import ModelConfig
    >>> m = SegmentationModel.new(ModelConfig(depth=2, base_features=4))
    >>> img = np.zeros((8, 8), np.uint8)
    >>> lab = np.zeros((8, 8), np.uint8); lab[2:4, 2:4] = 5
    >>> fit = fit_classes(m, [LabelledImage(img, lab)], untrained=True)
    >>> fit.model.label_values, fit.rebuilt
    ((0, 5), True)
    """
    present: set[int] = set()
    for item in data:
        present.update(label_values_present(item.labels, mask=item.mask))
    if untrained:
        for labels in also:
            present.update(label_values_present(np.asarray(labels)))
        values = tuple(sorted(present | {0}))
        if values == tuple(model.label_values or ()):
            return ClassFit(model)
        return ClassFit(with_label_values(model, values), rebuilt=True)
    known = set(model.label_values or ())
    # a labelled image with background only reports (0, 1): 1 is not a class it holds
    held = {v for item in data for v in _held(item)}
    missing = tuple(sorted(held - known))
    if not missing:
        return ClassFit(model)
    if not extend:
        raise InputError(
            f"the corrections hold classes {list(missing)} that the model does not have "
            f"(it has {sorted(known)[:12]}); allow adding classes to the model, or start "
            "from a new one"
        )
    logger.info("adding classes %s to the model's head", list(missing))
    return ClassFit(extend_classes(model, missing), added=missing)


def _held(item: LabelledImage) -> set[int]:
    labels = np.asarray(item.labels)
    counted = labels if item.mask is None else labels[np.asarray(item.mask, bool)]
    return {int(v) for v in np.unique(counted)}
