"""Units to correct (slices of a stack or tiles of a 2D image) and their scores.

A *unit* is what the user is asked to correct in one go: a whole slice of a 3D stack, or a
square tile of a large 2D image. Its score is the mean per-voxel uncertainty inside it; its
foreground fraction (the share of voxels predicted as any class but background) lets a
strategy skip units with nothing to segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError


@dataclass(frozen=True)
class Unit:
    """One slice or tile.

    ``index`` is the slice number, or the tile's row-major number in the tile grid;
    ``grid`` its position (``(z,)`` or ``(row, col)``); ``region`` the index into the image.
    """

    index: int
    grid: tuple[int, ...]
    region: tuple[slice, ...]
    score: float = 0.0
    foreground: float = 0.0

    @property
    def label(self) -> str:
        if len(self.grid) == 1:
            return f"slice {self.grid[0]}"
        r = self.region
        return f"tile y {r[0].start}-{r[0].stop}, x {r[1].start}-{r[1].stop}"


def make_units(shape: tuple[int, ...], *, tile: int | None = None) -> list[Unit]:
    """Slices of a ``(Z, Y, X)`` stack, or ``tile`` x ``tile`` tiles of a ``(Y, X)`` image.

    Edge tiles are smaller when ``tile`` does not divide the image.

    >>> [u.label for u in make_units((2, 8, 8))]
    ['slice 0', 'slice 1']
    >>> [u.grid for u in make_units((5, 8), tile=4)]
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    """
    if len(shape) == 3 and tile is None:
        return [Unit(z, (z,), (slice(z, z + 1),)) for z in range(shape[0])]
    if len(shape) != 2:
        raise InputError(f"units are slices of a 3D stack or tiles of a 2D image, got {shape}")
    if tile is None or tile < 1:
        raise InputError("give the tile size for a 2D image")
    units = []
    rows, cols = -(-shape[0] // tile), -(-shape[1] // tile)
    for r in range(rows):
        for c in range(cols):
            region = (slice(r * tile, min((r + 1) * tile, shape[0])),
                      slice(c * tile, min((c + 1) * tile, shape[1])))  # fmt: skip
            units.append(Unit(r * cols + c, (r, c), region))
    return units


def score_units(
    units: list[Unit],
    uncertainty: NDArray,
    labels: NDArray | None = None,
    *,
    reduce: str = "mean",
    top_fraction: float = 0.05,
) -> list[Unit]:
    """The units with their ``score`` and ``foreground`` (share of labels > 0).

    ``uncertainty`` and ``labels`` have the image's spatial shape. ``reduce="mean"`` scores a
    unit by its mean uncertainty; ``"top"`` by the mean of its ``top_fraction`` most
    uncertain voxels, which favours units with a few confused regions over units whose
    object boundaries are all a little uncertain.

    >>> u = make_units((2, 2, 2))
    >>> unc = np.array([[[0, 0], [0, 0]], [[1, 1], [0, 0]]], float)
    >>> [(s.score, s.foreground) for s in score_units(u, unc, (unc > 0).astype(int))]
    [(0.0, 0.0), (0.5, 0.5)]
    """
    if reduce not in ("mean", "top"):
        raise InputError(f"reduce must be 'mean' or 'top', got {reduce!r}")
    out = []
    for u in units:
        values = uncertainty[u.region]
        if reduce == "top":
            flat = values.reshape(-1)
            k = max(1, round(top_fraction * flat.size))
            score = float(np.mean(np.partition(flat, flat.size - k)[flat.size - k :]))
        else:
            score = float(np.mean(values))
        fg = float(np.mean(labels[u.region] > 0)) if labels is not None else 0.0
        out.append(Unit(u.index, u.grid, u.region, score, fg))
    return out
