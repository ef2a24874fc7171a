"""Diverse batches: uncertain units that are not alike (k-center greedy on unit features).

Ranking by uncertainty alone fills a batch with near copies (five neighbouring slices of one
hard region). :func:`k_center_greedy` (Sener & Savarese, ICLR 2018) instead adds, one at a
time, the candidate farthest from everything chosen or already revealed, so a batch covers
the kinds of units the model sees. :func:`diverse_uncertain` applies it to the most
uncertain candidates only (``pool_factor`` times the batch), which keeps the batch
informative as well as spread out. Features come from
:func:`~napari_segtool.active_learning.scoring.pooled_features`, read while the units are
scored: each unit's predicted foreground and its uncertainty pooled onto a coarse grid, a
description of what the network makes of the unit (its output, not its bottleneck), which
the Queue has from its layers and ``simulate`` from its predictions alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from napari_segtool.active_learning.scoring import Unit
from napari_segtool.errors import InputError

__all__ = ["diverse_uncertain", "k_center_greedy"]


def k_center_greedy(
    features: NDArray, k: int, *, centres: NDArray | None = None, first: int | None = None
) -> list[int]:
    """Indices of ``k`` rows of ``features`` picked by greedy k-center.

    Each step takes the row whose distance to its nearest centre (a row picked so far, or a
    row of ``centres``: what is already revealed) is largest. Without ``centres`` the first
    pick is ``first`` (default row 0: pass the most uncertain).

    >>> f = np.array([[0.0], [0.1], [5.0], [5.1], [10.0]])
    >>> k_center_greedy(f, 3)
    [0, 4, 2]
    >>> k_center_greedy(f, 2, centres=np.array([[10.0]]))
    [0, 2]
    """
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    n = len(x)
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    k = min(k, n)
    if k == 0:
        return []
    nearest = np.full(n, np.inf)
    if centres is not None and len(centres):
        c = np.asarray(centres, np.float64).reshape(len(centres), -1)
        nearest = np.min(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        picked = [int(np.argmax(nearest))]
    else:
        picked = [0 if first is None else int(first)]
    while True:
        d = ((x - x[picked[-1]]) ** 2).sum(-1)
        nearest = np.minimum(nearest, d)
        if len(picked) == k:
            return picked
        nearest[picked] = -1.0
        picked.append(int(np.argmax(nearest)))


def diverse_uncertain(
    units: Sequence[Unit],
    features: NDArray,
    k: int,
    *,
    revealed: Sequence[int] = (),
    revealed_features: NDArray | None = None,
    pool_factor: int = 3,
) -> list[Unit]:
    """``k`` of the ``pool_factor * k`` most uncertain ``units`` (not in ``revealed``),
    spread out by :func:`k_center_greedy` from each other and from ``revealed_features``.

    ``features`` has one row per unit of ``units``. The most uncertain candidate is picked
    first when nothing is revealed yet.
    """
    if pool_factor < 1:
        raise InputError(f"pool_factor must be >= 1, got {pool_factor}")
    done = {int(i) for i in revealed}
    order = sorted((i for i, u in enumerate(units) if u.index not in done),
                   key=lambda i: -units[i].score)  # fmt: skip
    pool = order[: max(k, pool_factor * k)]
    if not pool:
        return []
    picks = k_center_greedy(np.asarray(features)[pool], k, centres=revealed_features)
    return [units[pool[j]] for j in picks]
