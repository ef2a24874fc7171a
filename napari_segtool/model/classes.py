"""Fitting a model's classes to the labels it meets: new models, and heads that grow."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch

from napari_segtool.config import MAX_CLASSES
from napari_segtool.errors import InputError
from napari_segtool.model.checkpoint import SegmentationModel

NEW_CLASS_BIAS = -6.0  # below the background's logit: a new class starts out never predicted


def with_label_values(model: SegmentationModel, values: Sequence[int]) -> SegmentationModel:
    """An untrained model like ``model`` but with one output channel per value in ``values``.

    For starting points that have learnt nothing yet (``new-2d``, ``new-3d``): the classes
    come from the labels, so a CT organ labelled 5 trains as a class of its own.

    >>> from napari_segtool.config import ModelConfig
    >>> m = SegmentationModel.new(ModelConfig(depth=2, base_features=4))
    >>> with_label_values(m, (0, 5, 117)).label_values
    (0, 5, 117)
    """
    values = _checked(values)
    config = dataclasses.replace(model.config, out_channels=len(values))
    fresh = SegmentationModel.new(
        config,
        class_names=("background", *(f"class {v}" for v in values[1:])),
        label_values=values,
        tile_shape=model.tile_shape,
        name=model.name,
    )
    fresh.normalization = model.normalization
    return fresh


def extend_classes(model: SegmentationModel, new_values: Sequence[int]) -> SegmentationModel:
    """A copy of ``model`` with output channels added for ``new_values``.

    Everything the model learnt is kept: the body and the head's existing channels are copied
    unchanged, so its predictions for the classes it knows are the same as before. Each new
    channel starts with zero weights and a bias ``NEW_CLASS_BIAS`` below the background's, so
    it is not predicted until training on the corrections that hold it.

    Raises
    ------
    InputError
        A value the model already has, a negative one, or more than ``MAX_CLASSES`` classes.
    """
    added = tuple(int(v) for v in new_values)
    known = set(model.label_values or ())
    if not added:
        return model.copy()
    if known & set(added):
        raise InputError(f"the model already has classes {sorted(known & set(added))}")
    values = _checked((*tuple(model.label_values or ()), *added), keep_order=True)
    grown = model.copy()
    net = grown.network
    old = net.head
    head = type(old)(old.in_channels, len(values), kernel_size=old.kernel_size)
    with torch.no_grad():
        n = old.out_channels
        head.weight.zero_()
        head.weight[:n] = old.weight
        head.bias[:n] = old.bias
        head.bias[n:] = old.bias[0] + NEW_CLASS_BIAS
    head.to(device=old.weight.device, dtype=old.weight.dtype)
    net.head = head
    net.config = dataclasses.replace(net.config, out_channels=len(values))
    grown.label_values = values
    grown.class_names = (*grown.class_names, *(f"class {v}" for v in added))
    grown.training_state = None  # the optimizer's state no longer fits the head
    grown.history = [*copy.deepcopy(model.history), {"added_classes": list(added)}]
    return grown


def _checked(values: Sequence[int], *, keep_order: bool = False) -> tuple[int, ...]:
    out = [int(v) for v in values]
    if any(v < 0 for v in out):
        raise InputError(f"label values must be >= 0, got {out[:8]}")
    if len(set(out)) != len(out):
        raise InputError(f"label values repeat: {out[:8]}")
    if len(out) > MAX_CLASSES:
        raise InputError(f"{len(out)} classes: a model has at most {MAX_CLASSES}")
    if len(out) < 2:
        raise InputError(f"a model needs background and at least one class, got {out}")
    if not keep_order:
        out = sorted(out)
    if out[0] != 0:
        raise InputError(f"the first label value must be 0 (background), got {out[:8]}")
    return tuple(out)
