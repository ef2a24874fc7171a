"""Training patches read lazily from a project's labelled boxes, for volumes larger than memory.

:class:`LazyPatchSampler` is the lazy twin of :class:`~napari_segtool.training.data.
PatchSampler`: the same ``sample(batch_size, rng)`` and ``patch_shape``, so
:func:`~napari_segtool.training.loop.iter_train` takes either. It never holds the volume:
on construction it reads the project's labelled boxes once, one at a time
(:meth:`~napari_segtool.io.chunked_state.ChunkedState.labelled_boxes`), to count their
labelled and labelled-foreground voxels (and to check their label values against the model's);
each patch then reads only its own region of the image, the labels and the labelled mask,
plus the labelled mask of the box its centre is drawn from (a few boxes are cached).

The draw follows :class:`~napari_segtool.training.data.PatchSampler`: with probability
``foreground_fraction`` the centre is a labelled foreground voxel (class > 0), otherwise any
labelled voxel, each chosen uniformly over the whole volume (a box with probability
proportional to its count, then a voxel of it); with ``class_balanced`` a foreground centre's
class is drawn first, uniformly among the labelled foreground classes, so a rare class is
centred as often as the commonest (the round's plan, :mod:`~napari_segtool.training.balance`,
sets both from :attr:`LazyPatchSampler.class_counts`); the patch is placed around the centre with a
jitter of a quarter patch and clipped to the volume (a volume smaller than the patch is
padded: reflected image, unlabelled padding). Labels become channel indices
(:func:`~napari_segtool.training.data.labels_to_channels`) and the valid mask is the labelled
voxels (:meth:`~napari_segtool.io.chunked_state.ChunkedState.labelled_region`), less those
``holdout`` keeps for validation. Everything random comes from the ``rng`` passed in, so one
seed gives the same patches.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.inference.normalize import apply_range
from napari_segtool.training.data import augment, labels_to_channels

__all__ = ["LabelledBoxes", "LazyPatchSampler", "labelled_values", "split_boxes"]

Box = tuple[slice, ...]


class LabelledBoxes(Protocol):
    """What the sampler needs of a project state (:class:`~napari_segtool.io.chunked_state.
    ChunkedState` or :class:`~napari_segtool.io.project_state.ProjectState`)."""

    labels: Any

    @property
    def shape(self) -> tuple[int, ...]: ...

    def labelled_region(self, box: Sequence[slice]) -> NDArray[np.bool_]: ...

    def labelled_boxes(self, block: Sequence[int] | None = None) -> list[Box]: ...


def split_boxes(
    boxes: Sequence[Box], *, fraction: float, seed: int = 0
) -> tuple[list[Box], list[Box]]:
    """Hold out about ``fraction`` of ``boxes`` for validation: ``(train, validation)``.

    At least one box is held out when there are two or more and ``fraction > 0``, never all;
    one box alone trains. The order of each list is that of ``boxes``.

    >>> b = [(slice(i, i + 1),) for i in range(5)]
    >>> train, val = split_boxes(b, fraction=0.4, seed=0)
    >>> len(train), len(val), sorted(train + val) == sorted(b)
    (3, 2, True)
    """
    boxes = list(boxes)
    if fraction <= 0 or len(boxes) < 2:
        return boxes, []
    n_val = min(len(boxes) - 1, max(1, round(fraction * len(boxes))))
    chosen = set(np.random.default_rng(seed).choice(len(boxes), n_val, replace=False).tolist())
    train = [b for i, b in enumerate(boxes) if i not in chosen]
    return train, [b for i, b in enumerate(boxes) if i in chosen]


def labelled_values(state: LabelledBoxes, boxes: Sequence[Box] | None = None) -> tuple[int, ...]:
    """The label values of the labelled voxels, read box by box (background 0 included).

    The lazy :func:`~napari_segtool.training.data.label_values_present`, for a new model's
    classes; at least ``(0, 1)``.

    Raises
    ------
    InputError
        A negative label value.
    """
    found: set[int] = {0}
    for box in state.labelled_boxes() if boxes is None else boxes:
        mask = state.labelled_region(box)
        if mask.any():
            found.update(int(v) for v in np.unique(np.asarray(state.labels[box])[mask]))
    if min(found) < 0:
        raise InputError(f"labels hold the negative value {min(found)}; label values must be >= 0")
    values = tuple(sorted(found))
    return values if len(values) >= 2 else (0, 1)


class LazyPatchSampler:
    """Random training patches from the labelled boxes of a project, read as needed.

    Parameters
    ----------
    image : array-like
        The project's image, ``(*S)`` or, with ``rgb``, ``(*S, C)``: numpy, zarr or dask;
        only patches are read (``np.asarray(image[region])``).
    state : ChunkedState or ProjectState
        Labels and the labelled voxels (``labels``, ``shape``, ``labelled_region``,
        ``labelled_boxes``).
    patch_shape : tuple of int
        The spatial patch: as many axes as the volume, or ``(Y, X)`` patches of one slice of
        a stack (for a 2D model).
    label_values : sequence of int
        The model's label value per output channel; a labelled voxel holding any other value
        is refused on construction.
    value_range : (lo, hi)
        Normalisation per channel (e.g. from
        :func:`~napari_segtool.inference.blocks.subsample_range`): ``lo`` maps to 0 and
        ``hi`` to 1.
    rgb : bool
        The image has a trailing channel axis.
    boxes : sequence of Box, optional
        Where centres are drawn from (default ``state.labelled_boxes()``).
    holdout : sequence of Box
        Boxes kept for validation: their voxels are never valid in a training patch (they
        may appear, unlabelled, in its context).
    foreground_fraction : float
        Share of patches centred on a labelled foreground voxel.
    class_balanced : bool
        Draw a foreground centre's class uniformly among the labelled foreground classes.
    cache_boxes : int
        How many boxes' centre candidates are kept in memory.

    Attributes
    ----------
    labels, valid : tuple
        Empty: :func:`~napari_segtool.training.loop.iter_train` checks the classes of an
        in-memory sampler's labels through them; this sampler has checked them (against
        ``label_values``) on construction.
    boxes : list of Box
        The boxes holding labelled training voxels.
    counts, foreground_counts : ndarray of int64
        Their labelled (foreground) training voxels.
    class_counts : ndarray of int64
        Labelled training voxels per class (channel index), over all boxes: what
        :func:`~napari_segtool.training.balance.plan_round` plans the round from.

    Raises
    ------
    InputError
        A patch of the wrong number of axes, an image of another shape, no labelled voxel
        to train on, or labelled voxels holding values that are not in ``label_values``.
    """

    labels: tuple[()] = ()
    valid: tuple[()] = ()

    def __init__(
        self,
        image: Any,
        state: LabelledBoxes,
        patch_shape: Sequence[int],
        *,
        label_values: Sequence[int],
        value_range: tuple[Any, Any],
        rgb: bool = False,
        boxes: Sequence[Box] | None = None,
        holdout: Sequence[Box] = (),
        foreground_fraction: float = 0.5,
        class_balanced: bool = False,
        cache_boxes: int = 32,
    ) -> None:
        self.image = image
        self.state = state
        self.shape = tuple(int(n) for n in state.shape)
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.label_values = tuple(int(v) for v in label_values)
        self.value_range = value_range
        self.rgb = rgb
        self.foreground_fraction = foreground_fraction
        self.class_balanced = class_balanced
        self._check_shapes()
        # a (Y, X) patch of a (Z, Y, X) stack is read as (1, Y, X) and squeezed
        self._flat = len(self.patch_shape) == len(self.shape) - 1
        self._region = (1, *self.patch_shape) if self._flat else self.patch_shape
        self.holdout = [tuple(b) for b in holdout]
        self._cache: OrderedDict[tuple, tuple[NDArray[np.intp], NDArray[np.int64]]] = OrderedDict()
        self._cache_size = max(1, int(cache_boxes))
        n_classes = max(1, len(self.label_values))
        kept, per_class = [], []
        for box in state.labelled_boxes() if boxes is None else boxes:
            every, values = self._candidates(tuple(box))
            if every.size:
                kept.append(tuple(box))
                per_class.append(np.bincount(values, minlength=n_classes)[:n_classes])
        if not kept:
            raise InputError(
                "no labelled voxels to train on: correct part of the prediction or mark "
                "slices as reviewed"
            )
        self.boxes: list[Box] = kept
        self._box_class_counts = np.asarray(per_class, np.int64)  # (boxes, classes)
        self.counts = self._box_class_counts.sum(axis=1)
        self.foreground_counts = self._box_class_counts[:, 1:].sum(axis=1)
        self.class_counts = self._box_class_counts.sum(axis=0)
        self._cache.clear()  # filled box by box above; start sampling from an empty cache

    def _check_shapes(self) -> None:
        spatial = tuple(self.image.shape[:-1] if self.rgb else self.image.shape)
        if spatial != self.shape:
            raise InputError(f"the image {tuple(self.image.shape)} does not match the labels "
                             f"{self.shape}{' (RGB)' if self.rgb else ''}")  # fmt: skip
        n = len(self.patch_shape)
        if not (n == len(self.shape) or (n == 2 and len(self.shape) == 3)):
            raise InputError(
                f"patch_shape {self.patch_shape} does not fit {len(self.shape)}D labels: give "
                f"{len(self.shape)} sizes (or 2 for slices of a stack)"
            )
        if min(self.patch_shape) < 1:
            raise InputError(f"patch_shape {self.patch_shape} must be positive")

    # -- reading -------------------------------------------------------------------------------

    def _training_mask(self, box: Box) -> NDArray[np.bool_]:
        """Labelled voxels of ``box`` that train (not held out)."""
        mask = self.state.labelled_region(box)
        for held in self.holdout:
            part = tuple(
                slice(max(a.start, h.start) - a.start, min(a.stop, h.stop) - a.start)
                for a, h in zip(box, held, strict=True)
            )
            if all(p.start < p.stop for p in part):
                mask[part] = False
        return mask

    def _channels(self, box: Box, mask: NDArray[np.bool_]) -> NDArray:
        return labels_to_channels(np.asarray(self.state.labels[box]), self.label_values, mask=mask)

    def _candidates(self, box: Box) -> tuple[NDArray[np.intp], NDArray[np.int64]]:
        """Flat indices (in ``box``) of its training voxels, and their classes (channels)."""
        key = tuple((s.start, s.stop) for s in box)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        mask = self._training_mask(box)
        channels = self._channels(box, mask)
        every = np.flatnonzero(mask)
        values = np.asarray(channels).reshape(-1)[every].astype(np.int64)
        self._cache[key] = (every, values)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return every, values

    def _read_image(self, region: Box) -> NDArray[np.float32]:
        raw = np.asarray(self.image[region])
        chans = np.moveaxis(raw, -1, 0) if self.rgb else raw[np.newaxis]
        lo, hi = self.value_range
        return apply_range(chans, np.asarray(lo), np.asarray(hi), channel_axis=0)

    # -- drawing -------------------------------------------------------------------------------

    def _centre(self, rng: np.random.Generator) -> tuple[int, ...]:
        fg_total = int(self.foreground_counts.sum())
        use_fg = fg_total > 0 and rng.random() < self.foreground_fraction
        wanted: int | None = None  # a class to centre on (class_balanced)
        weights = self.foreground_counts if use_fg else self.counts
        if use_fg and self.class_balanced:
            present = np.flatnonzero(self.class_counts[1:]) + 1
            wanted = int(present[rng.integers(present.size)])
            weights = self._box_class_counts[:, wanted]
        cumulative = np.cumsum(weights)
        i = int(np.searchsorted(cumulative, rng.integers(int(cumulative[-1])), side="right"))
        box = self.boxes[i]
        every, values = self._candidates(box)
        if wanted is not None:
            pool = every[values == wanted]
        else:
            pool = every[values > 0] if use_fg else every
        flat = int(pool[rng.integers(pool.size)])
        local = np.unravel_index(flat, tuple(s.stop - s.start for s in box))
        return tuple(int(b.start + c) for b, c in zip(box, local, strict=True))

    def _patch_region(
        self, centre: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[Box, list[tuple[int, int]]]:
        """The region to read around ``centre`` and the padding after it per axis."""
        region, pad = [], []
        for c, p, s in zip(centre, self._region, self.shape, strict=True):
            if p >= s:
                region.append(slice(0, s))
                pad.append((0, p - s))
                continue
            jitter = int(rng.integers(-(p // 4), p // 4 + 1)) if p > 1 else 0
            start = int(np.clip(c - p // 2 + jitter, 0, s - p))
            region.append(slice(start, start + p))
            pad.append((0, 0))
        return tuple(region), pad

    def patch(
        self, rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_], Box]:
        """One patch: image ``(C, *P)``, channel labels ``(*P)``, valid mask, and the region
        read (before padding)."""
        region, pad = self._patch_region(self._centre(rng), rng)
        x = self._read_image(region)
        valid = self._training_mask(region)
        y = self._channels(region, valid).astype(np.int64)
        if any(after for _, after in pad):
            x = np.pad(x, [(0, 0), *pad], mode="reflect")
            y = np.pad(y, pad)
            valid = np.pad(valid, pad)
        if self._flat:
            x, y, valid = x[:, 0], y[0], valid[0]
        return x, y, valid, region

    def sample(
        self, batch_size: int, rng: np.random.Generator, *, augment_patches: bool = True
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
        """A batch ``(B, C, *P)`` float32 images, ``(B, *P)`` int64 labels, bool valid mask."""
        xs, ys, vs = [], [], []
        for _ in range(batch_size):
            x, y, v, _ = self.patch(rng)
            if augment_patches:
                x, y, v = augment(x, y, v, rng)
            xs.append(x)
            ys.append(y)
            vs.append(v)
        return np.stack(xs), np.stack(ys).astype(np.int64), np.stack(vs)

    @property
    def labelled_voxels(self) -> int:
        """Labelled training voxels over all boxes."""
        return int(self.counts.sum())

    def __repr__(self) -> str:
        return (
            f"LazyPatchSampler({len(self.boxes)} boxes, {self.labelled_voxels} labelled voxels, "
            f"patch {self.patch_shape}, volume {self.shape}, "
            f"{math.prod(self.shape):,} voxels)"
        )
