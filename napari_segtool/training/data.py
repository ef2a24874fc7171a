"""Training patches: foreground-aware sampling and augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError


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
    valid : sequence of bool ndarray or None
        Voxels whose labels count (None: all of them). Patches are only centred on valid voxels.
    patch_shape : tuple of int
        Spatial patch; images smaller than it are padded (padding is not valid).
    foreground_fraction : float
        Share of patches centred on a valid foreground voxel (class > 0); the rest are
        centred on any valid voxel.
    """

    images: Sequence[NDArray[np.float32]]
    labels: Sequence[NDArray]
    valid: Sequence[NDArray[np.bool_] | None]
    patch_shape: tuple[int, ...]
    foreground_fraction: float = 0.5

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

    def sample(
        self, batch_size: int, rng: np.random.Generator, *, augment_patches: bool = True
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.bool_]]:
        """A batch ``(B, C, *P)`` float32 images, ``(B, *P)`` int64 labels, bool valid mask."""
        xs, ys, vs = [], [], []
        for _ in range(batch_size):
            img, lab, v, fg, anyv = self._items[int(rng.integers(len(self._items)))]
            pool = fg if fg.size and rng.random() < self.foreground_fraction else anyv
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
