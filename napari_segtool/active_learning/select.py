"""Which units to correct next: by uncertainty (with diversity), at random, or random among
units with foreground.

Strategies (``select(..., strategy=...)``):

- ``uncertainty``: highest mean uncertainty first, skipping units within ``min_gap`` of one
  already chosen (neighbouring slices look alike, so correcting both teaches little more than
  one), and preferring units with predicted foreground (at least ``min_foreground``);
- ``random``: uniformly at random;
- ``foreground-random``: uniformly at random among units with predicted foreground.

Units in ``exclude`` (reviewed or already revealed) are never proposed. When the preferred
units run out, the rest fill the quota in the same order, so ``k`` units come back while
enough remain. All randomness comes from ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from napari_segtool.active_learning.scoring import Unit
from napari_segtool.errors import InputError

STRATEGIES = ("uncertainty", "random", "foreground-random")


def _near(a: Unit, b: Unit, gap: int) -> bool:
    return max(abs(x - y) for x, y in zip(a.grid, b.grid, strict=True)) <= gap


def rank(
    units: Sequence[Unit],
    *,
    strategy: str = "uncertainty",
    seed: int = 0,
    exclude: Iterable[int] = (),
    min_gap: int = 1,
    min_foreground: float = 0.01,
) -> list[Unit]:
    """All eligible units in the order the strategy proposes them.

    Examples
    --------
    >>> from napari_segtool.active_learning.scoring import Unit
    >>> us = [Unit(z, (z,), (slice(z, z + 1),), score=s, foreground=0.2)
    ...       for z, s in enumerate([0.1, 0.9, 0.8, 0.2, 0.7])]
    >>> [u.index for u in rank(us, exclude=[4])]
    [1, 3, 2, 0]
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if min_gap < 0:
        raise InputError(f"min_gap must be >= 0, got {min_gap}")
    excluded = {int(i) for i in exclude}
    pool = [u for u in units if u.index not in excluded]
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return [pool[i] for i in rng.permutation(len(pool))]
    has_fg = [u for u in pool if u.foreground >= min_foreground]
    rest = [u for u in pool if u.foreground < min_foreground]
    if strategy == "foreground-random":
        return [has_fg[i] for i in rng.permutation(len(has_fg))] + [
            rest[i] for i in rng.permutation(len(rest))
        ]
    # uncertainty: ties broken at random (seeded) so equal scores do not favour low indices
    jitter = rng.random(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (-pool[i].score, jitter[i]))
    ordered = [pool[i] for i in order]
    preferred = [u for u in ordered if u.foreground >= min_foreground] + [
        u for u in ordered if u.foreground < min_foreground
    ]
    chosen: list[Unit] = []
    deferred: list[Unit] = []
    for u in preferred:
        if any(_near(u, c, min_gap) for c in chosen):
            deferred.append(u)
        else:
            chosen.append(u)
    return chosen + deferred


def select(units: Sequence[Unit], k: int, **options: object) -> list[Unit]:
    """The first ``k`` units of :func:`rank` (fewer when fewer are eligible)."""
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    return rank(units, **options)[:k]  # type: ignore[arg-type]
