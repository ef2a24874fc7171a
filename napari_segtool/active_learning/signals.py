"""Per-voxel maps that strategies rank units by, besides the flip-TTA uncertainty.

- :func:`version_change`: where the current model's labels differ from the previous model
  version's (query by committee with the two versions a project keeps anyway, free of any
  extra inference when both predictions are at hand);
- :func:`rarity_weights` and :func:`class_rarity`: each voxel weighted by how rare its
  predicted class is among the voxels labelled so far, so units showing a class the user has
  hardly corrected come first (class-balanced selection for multi-class data).

Each map is float32 in [0, 1] of the labels' shape, scored per unit as any uncertainty map
(:func:`~napari_segtool.active_learning.scoring.iter_score_units`). :class:`BlockMap` computes
one box by box from arrays on disk (zarr, dask), so a map of a volume larger than memory is
never held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

__all__ = ["BlockMap", "class_counts", "class_rarity", "rarity_weights", "version_change"]


def version_change(current: NDArray, previous: NDArray) -> NDArray[np.float32]:
    """1 where the two versions' labels differ, 0 where they agree.

    >>> version_change(np.array([0, 1, 2]), np.array([0, 2, 2])).tolist()
    [0.0, 1.0, 0.0]
    """
    a, b = np.asarray(current), np.asarray(previous)
    if a.shape != b.shape:
        raise InputError(f"the two versions' labels differ in shape: {a.shape} and {b.shape}")
    return (a != b).astype(np.float32)


def rarity_weights(counts: Mapping[int, int], classes: int | None = None) -> NDArray[np.float32]:
    """A weight per class id: ``1 / sqrt(n_c + 1)`` over labelled foreground counts, scaled
    so the rarest class weighs 1; background (0) weighs 0.

    ``counts`` maps class ids to labelled voxels (classes not in it count 0, the rarest of
    all); ``classes`` is the table's length (default: the largest id + 1). With nothing
    labelled yet every foreground class weighs 1.

    >>> [round(float(w), 2) for w in rarity_weights({0: 900, 1: 100, 2: 1}, 3)]
    [0.0, 0.14, 1.0]
    >>> [round(float(w), 2) for w in rarity_weights({1: 4}, 3)]  # class 2 never labelled
    [0.0, 0.45, 1.0]
    """
    n = int(classes if classes is not None else max(counts, default=0) + 1)
    if n < 1 or any(int(c) < 0 for c in counts):
        raise InputError(f"class ids must be >= 0 and classes >= 1, got {dict(counts)}, {n}")
    fg = np.zeros(n, np.float64)
    for c, v in counts.items():
        if 0 < int(c) < n:
            fg[int(c)] = float(v)
    weights = np.zeros(n, np.float32)
    if n == 1:
        return weights
    w = 1.0 / np.sqrt(np.maximum(fg[1:], 0.0) + 1.0)  # +1: a class never labelled is finite
    weights[1:] = w / w.max()
    return weights


def class_rarity(labels: NDArray, weights: NDArray) -> NDArray[np.float32]:
    """Each voxel's :func:`rarity_weights` weight by its label (ids beyond the table: 1).

    >>> class_rarity(np.array([[0, 1], [2, 7]]), np.array([0, 0.5, 1.0])).tolist()
    [[0.0, 0.5], [1.0, 1.0]]
    """
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iub":
        raise InputError(f"labels must be integers, got {lab.dtype}")
    table = np.asarray(weights, np.float32)
    idx = np.clip(lab.astype(np.int64, copy=False), 0, len(table))
    return np.append(table, np.float32(1.0))[idx]


def class_counts(labels: Any, regions: Sequence[tuple[slice, ...]]) -> dict[int, int]:
    """Voxels of each class id in ``regions`` of ``labels`` (numpy, zarr or dask: each region
    is read on its own), for :func:`rarity_weights`.

    >>> lab = np.array([[0, 1, 1], [2, 2, 2]])
    >>> class_counts(lab, [(slice(0, 1),), (slice(1, 2), slice(0, 1))])
    {0: 1, 1: 2, 2: 1}
    """
    counts: dict[int, int] = {}
    for region in regions:
        ids, n = np.unique(np.asarray(labels[region]), return_counts=True)
        for c, k in zip(ids.tolist(), n.tolist(), strict=True):
            counts[int(c)] = counts.get(int(c), 0) + int(k)
    return dict(sorted(counts.items()))


class BlockMap:
    """A per-voxel map computed box by box: ``fn(*(np.asarray(a[key]) for a in arrays))``.

    It has the ``shape``, ``ndim`` and ``dtype`` (float32) that scoring reads, and is indexed
    with a tuple of slices, so :func:`~napari_segtool.active_learning.scoring.iter_score_units`
    reads it as it reads a zarr array.

    >>> m = BlockMap(version_change, np.array([[0, 1], [2, 2]]), np.array([[0, 2], [2, 2]]))
    >>> m.shape, m[0:1, :].tolist()
    ((2, 2), [[0.0, 1.0]])
    """

    dtype = np.dtype(np.float32)

    def __init__(self, fn: Callable[..., NDArray], *arrays: Any):
        shapes = {tuple(int(n) for n in a.shape) for a in arrays}
        if len(shapes) != 1:
            raise InputError(f"the arrays of a map differ in shape: {sorted(shapes)}")
        self.shape = shapes.pop()
        self._fn, self._arrays = fn, arrays

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> NDArray[np.float32]:
        return np.asarray(self._fn(*(np.asarray(a[key]) for a in self._arrays)), np.float32)
