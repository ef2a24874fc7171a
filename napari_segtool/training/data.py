"""Training patches: foreground-aware sampling and augmentation; label values to channels.

Label images hold the user's label values (``0`` background, then any ids, e.g. the sparse
organ ids of TotalSegmentator); a model holds one output channel per value it knows
(:attr:`~napari_segtool.model.SegmentationModel.label_values`). Labels enter training through
:func:`labels_to_channels` only, and :func:`label_values_present` gives a new model its list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import MAX_CLASSES
from napari_segtool.errors import InputError


def label_values_present(
    labels: NDArray, *, mask: NDArray[np.bool_] | None = None
) -> tuple[int, ...]:
    """The label values a new model needs: background 0 and every value where ``mask`` holds.

    Parameters
    ----------
    labels : ndarray of integers
        The user's label image, any shape.
    mask : bool ndarray of the same shape, optional
        Voxels whose labels count (None: all).

    Returns
    -------
    tuple of int
        Sorted, starting with 0; at least two values (``(0, 1)`` when only background is
        labelled), so the model has a foreground channel.

    Raises
    ------
    InputError
        Negative values, non-integer labels, or more than ``MAX_CLASSES`` distinct values.

    Examples
    --------
    >>> label_values_present(np.array([[0, 117], [5, 5]], np.uint16))
    (0, 5, 117)
    >>> label_values_present(np.zeros((2, 2), np.uint8))
    (0, 1)
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise InputError(f"labels must be integers, not {labels.dtype}")
    counted = labels if mask is None else labels[np.asarray(mask, bool)]
    values = np.unique(counted)
    if values.size and values[0] < 0:
        raise InputError(
            f"labels hold the negative value {int(values[0])}; label values must be >= 0 "
            "(0 is background)"
        )
    found = sorted({0, *(int(v) for v in values)})
    if len(found) > MAX_CLASSES:
        raise InputError(
            f"labels hold {len(found)} distinct values ({found[:4]} ... {found[-1]}); a model "
            f"has at most {MAX_CLASSES} classes: are these instance ids rather than classes?"
        )
    return tuple(found) if len(found) >= 2 else (0, 1)


def labels_to_channels(
    labels: NDArray,
    label_values: Sequence[int],
    *,
    mask: NDArray[np.bool_] | None = None,
) -> NDArray:
    """Map label values to the model's channel indices (``label_values[i]`` becomes ``i``).

    Parameters
    ----------
    labels : ndarray of integers
        The user's label image.
    label_values : sequence of int
        The model's label value per output channel.
    mask : bool ndarray of the same shape, optional
        Voxels whose labels count; elsewhere any value is allowed (and never counts).

    Returns
    -------
    ndarray
        Channel indices, uint8 (or uint16), same shape, 0 outside ``mask``. When the values
        are already ``0 .. C-1`` the input is returned as it is (no copy).

    Raises
    ------
    InputError
        A counted voxel holds a negative value or one that is not in ``label_values``.

    Examples
    --------
    >>> labels_to_channels(np.array([0, 117, 5]), (0, 5, 117)).tolist()
    [0, 2, 1]
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu":
        raise InputError(f"labels must be integers, not {labels.dtype}")
    values = np.asarray(label_values, np.int64)
    counted = None if mask is None else np.asarray(mask, bool)
    where = labels if counted is None else labels[counted]
    if where.size and int(where.min()) < 0:
        raise InputError(
            f"labels hold the negative value {int(where.min())}; label values must be >= 0 "
            "(0 is background)"
        )
    n = values.size
    if np.array_equal(values, np.arange(n)):
        if where.size and int(where.max()) >= n:
            raise InputError(
                f"labels hold class {int(where.max())}, which the model does not have (its "
                f"label values are 0-{n - 1}); start from a model made for these classes or "
                "a new one"
            )
        return labels  # uncounted voxels may hold anything: the loss never sees them
    order = np.argsort(values)
    sorted_values = values[order]
    idx = np.clip(np.searchsorted(sorted_values, labels), 0, n - 1)
    known = sorted_values[idx] == labels
    if counted is not None:
        known |= ~counted
    if not known.all():
        unknown = np.unique(labels[~known])
        raise InputError(
            f"labels hold class {int(unknown[0])}"
            f"{f' (and {unknown.size - 1} more unknown values)' if unknown.size > 1 else ''}, "
            f"which the model does not have (its label values are {values.tolist()[:12]}); "
            "start from a model made for these classes or a new one"
        )
    channels = order[idx].astype(np.uint8 if n <= 256 else np.uint16)
    if counted is not None:
        channels[~counted] = 0
    return channels


def augment(
    image: NDArray[np.float32],
    labels: NDArray,
    valid: NDArray[np.bool_],
    rng: np.random.Generator,
    *,
    intensity: float = 0.1,
) -> tuple[NDArray[np.float32], NDArray, NDArray[np.bool_]]:
    """Random flips, 90-degree rotation in the (Y, X) plane and intensity jitter.

    ``image`` is ``(C, *S)``; ``labels`` and ``valid`` are ``(*S)``. Geometric changes apply to
    all three alike; the intensity jitter (scale ``1 +- intensity``, shift ``+- intensity``)
    only to the image. Inputs are not modified.
    """
    spatial = labels.ndim
    for axis in range(spatial):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            labels = np.flip(labels, axis)
            valid = np.flip(valid, axis)
    if labels.shape[-1] == labels.shape[-2]:
        k = int(rng.integers(4))
        if k:
            image = np.rot90(image, k, axes=(-2, -1))
            labels = np.rot90(labels, k, axes=(-2, -1))
            valid = np.rot90(valid, k, axes=(-2, -1))
    if intensity > 0:
        scale = 1.0 + rng.uniform(-intensity, intensity)
        shift = rng.uniform(-intensity, intensity)
        image = image * np.float32(scale) + np.float32(shift)
    return (
        np.ascontiguousarray(image, dtype=np.float32),
        np.ascontiguousarray(labels),
        np.ascontiguousarray(valid),
    )


@dataclass
class PatchSampler:
    """Draw random training patches from labelled images.

    Parameters
    ----------
    images : sequence of ndarray, each (C, *S), float32, already normalised
    labels : sequence of ndarray, each (*S), integer classes
        Channel indices ``0 .. C-1`` (map label values with :func:`labels_to_channels`).
    valid : sequence of bool ndarray or None
        Voxels whose labels count (None: all of them). Patches are only centred on valid voxels.
    patch_shape : tuple of int
        Spatial patch; images smaller than it are padded (padding is not valid).
    foreground_fraction : float
        Share of patches centred on a valid foreground voxel (class > 0); the rest are
        centred on any valid voxel.
    class_balanced : bool
        Draw a foreground centre's class uniformly among the labelled foreground classes
        (then an image in proportion to its voxels of that class), so a rare class is the
        centre as often as a common one. Off: any foreground voxel, uniformly per image.
    """

    images: Sequence[NDArray[np.float32]]
    labels: Sequence[NDArray]
    valid: Sequence[NDArray[np.bool_] | None]
    patch_shape: tuple[int, ...]
    foreground_fraction: float = 0.5
    class_balanced: bool = False

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.labels) == len(self.valid)) or not self.images:
            raise InputError("need the same, non-zero number of images, labels and masks")
        self._items = []
        for image, labels, val in zip(self.images, self.labels, self.valid, strict=True):
            img, lab = image, labels
            if img.shape[1:] != lab.shape:
                raise InputError(f"image {img.shape} and labels {lab.shape} do not match")
            if len(self.patch_shape) != lab.ndim:
                raise InputError(f"patch_shape {self.patch_shape} does not fit {lab.ndim}D labels")
            v = np.ones(lab.shape, bool) if val is None else val.astype(bool)
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch_shape, lab.shape, strict=True)]
            if any(p for _, p in pad):
                img = np.pad(img, [(0, 0), *pad], mode="reflect")
                lab = np.pad(lab, pad)
                v = np.pad(v, pad)
            fg = np.flatnonzero(v & (lab > 0))
            anyv = np.flatnonzero(v)
            if anyv.size:
                self._items.append((img, lab, v, fg, anyv))
        if not self._items:
            raise InputError("no labelled voxels to train on")
        # class -> (item indices, their voxels of it); only for class-balanced centres
        self._by_class: dict[int, tuple[list[int], list[NDArray[np.intp]]]] = {}
        if self.class_balanced:
            for k, (_, lab, _, fg, _) in enumerate(self._items):
                classes = lab.ravel()[fg]
                for c in np.unique(classes):
                    items, voxels = self._by_class.setdefault(int(c), ([], []))
                    items.append(k)
                    voxels.append(fg[classes == c])

    def _balanced_centre(self, rng: np.random.Generator) -> tuple[int, NDArray[np.intp]]:
        """An item and its voxels of a foreground class drawn uniformly."""
        classes = sorted(self._by_class)
        items, voxels = self._by_class[classes[int(rng.integers(len(classes)))]]
        sizes = np.array([v.size for v in voxels], float)
        j = int(rng.choice(len(items), p=sizes / sizes.sum()))
        return items[j], voxels[j]

    def sample(
        self, batch_size: int, rng: np.random.Generator, *, augment_patches: bool = True
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
        """A batch ``(B, C, *P)`` float32 images, ``(B, *P)`` int64 labels, bool valid mask."""
        xs, ys, vs = [], [], []
        for _ in range(batch_size):
            img, lab, v, fg, anyv = self._items[int(rng.integers(len(self._items)))]
            pool = fg if fg.size and rng.random() < self.foreground_fraction else anyv
            if self._by_class and pool is fg:
                k, pool = self._balanced_centre(rng)
                img, lab, v, fg, anyv = self._items[k]
            centre = np.unravel_index(int(pool[rng.integers(pool.size)]), lab.shape)
            start = [
                int(np.clip(c - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, s - p))
                for c, p, s in zip(centre, self.patch_shape, lab.shape, strict=True)
            ]
            region = tuple(slice(a, a + p) for a, p in zip(start, self.patch_shape, strict=True))
            x, y, m = img[(slice(None), *region)], lab[region], v[region]
            if augment_patches:
                x, y, m = augment(x, y, m, rng)
            xs.append(x)
            ys.append(y)
            vs.append(m)
        return np.stack(xs), np.stack(ys).astype(np.int64), np.stack(vs)
