"""Holding labelled voxels out for validation: whole slices of a stack, or blocks of a plane."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["split_validation"]


def split_validation(
    mask: NDArray[np.bool_],
    *,
    fraction: float,
    seed: int = 0,
    block: int = 128,
    min_block: int = 16,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Hold out part of the labelled voxels for validation: ``(train, validation)`` masks.

    Units are whole slices of a stack when at least two slices hold labels, otherwise blocks
    of ``block`` x ``block`` in the (Y, X) plane. When the labels fit in one block (one
    101 x 122 slice, a corrected patch), the block is halved until at least two blocks hold
    labels, down to ``min_block``. About ``fraction`` of the units (at least one, and never
    all) go to validation, chosen by ``seed``. Labels on a single slice that fit in one
    ``min_block`` x ``min_block`` block, or fewer than ``2 * min_block ** 2`` labelled
    voxels there, give no validation (an all-False mask): everything trains, and
    :func:`iter_finetune` then does not promote the result.

    Examples
    --------
    >>> m = np.zeros((4, 8, 8), bool); m[[0, 1, 3]] = True
    >>> train, val = split_validation(m, fraction=0.3)
    >>> int(val.any(axis=(1, 2)).sum()), bool((train & val).any()), bool((train | val == m).all())
    (1, False, True)
    """
    rng = np.random.default_rng(seed)
    val = np.zeros_like(mask, dtype=bool)
    if fraction <= 0:
        return mask.copy(), val
    if mask.ndim == 3:
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        if slices.size >= 2:
            n_val = min(slices.size - 1, max(1, round(fraction * slices.size)))
            for z in rng.choice(slices, n_val, replace=False):
                val[z] = mask[z]
            return mask & ~val, val
    if int(np.count_nonzero(mask)) < 2 * min_block * min_block:
        return mask.copy(), val  # too few labels to hold any out
    h, w = mask.shape[-2:]
    plane = mask.any(axis=0) if mask.ndim == 3 else mask
    cells: list[tuple[int, int]] = []
    while True:
        cells = [
            (y, x)
            for y in range(0, h, block)
            for x in range(0, w, block)
            if plane[y : y + block, x : x + block].any()
        ]
        if len(cells) >= 2 or block // 2 < min_block:
            break
        block //= 2
    if len(cells) >= 2:
        n_val = min(len(cells) - 1, max(1, round(fraction * len(cells))))
        for i in rng.choice(len(cells), n_val, replace=False):
            y, x = cells[int(i)]
            val[..., y : y + block, x : x + block] = mask[..., y : y + block, x : x + block]
    return mask & ~val, val
