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
    labels: NDArray | None = None,
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

    With ``labels`` (classes, 0 background), units holding labelled foreground and those
    without are split separately, each about ``fraction`` held out (at least one foreground
    unit when two or more hold foreground): a rare structure found on a few slices is then
    both trained on and validated, so promotion is judged on it rather than on background.

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
            for z in _pick(slices, _has_fg(labels, mask, slices), fraction, rng):
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
        fg = None
        if labels is not None:
            fore = (np.asarray(labels) > 0) & mask
            plane_fg = fore.any(axis=0) if fore.ndim == 3 else fore
            fg = np.array([bool(plane_fg[y : y + block, x : x + block].any()) for y, x in cells])
        for i in _pick(np.arange(len(cells)), fg, fraction, rng):
            y, x = cells[int(i)]
            val[..., y : y + block, x : x + block] = mask[..., y : y + block, x : x + block]
    return mask & ~val, val


def _has_fg(labels: NDArray | None, mask: NDArray[np.bool_],
            slices: NDArray[np.intp]) -> NDArray[np.bool_] | None:  # fmt: skip
    """Which of ``slices`` hold labelled foreground (None without labels)."""
    if labels is None:
        return None
    fore = (np.asarray(labels) > 0) & mask
    return fore.any(axis=(1, 2))[slices]


def _pick(units: NDArray[np.intp], fg: NDArray[np.bool_] | None, fraction: float,
          rng: np.random.Generator) -> list[int]:  # fmt: skip
    """About ``fraction`` of ``units`` (at least one, never all); with ``fg``, from the
    foreground and the background units separately."""
    n = len(units)
    if fg is None or not fg.any() or fg.all():
        n_val = min(n - 1, max(1, round(fraction * n)))
        return [int(u) for u in rng.choice(units, n_val, replace=False)]
    fore, back = units[fg], units[~fg]
    n_fore = min(len(fore) - 1, max(1, round(fraction * len(fore)))) if len(fore) >= 2 else 0
    n_back = min(len(back), round(fraction * len(back)))
    if n_fore + n_back == 0:  # one foreground unit and few others: hold out a background one
        n_back = 1
    picks = list(rng.choice(fore, n_fore, replace=False)) if n_fore else []
    picks += list(rng.choice(back, n_back, replace=False)) if n_back else []
    return [int(u) for u in picks]
