"""Which units to correct next: by a score (uncertainty, change between model versions, rare
classes), by uncertainty with diverse batches, at random, or random among units with
foreground.

Strategies (``select(..., strategy=...)``):

- ``uncertainty``: highest score first (the score is the unit's uncertainty), skipping units
  within ``min_gap`` of one already chosen (neighbouring slices look alike, so correcting
  both teaches little more than one), and preferring units with predicted foreground (at
  least ``min_foreground``);
- ``disagreement`` and ``class-balanced``: the same order, with the score computed from
  :func:`~napari_segtool.active_learning.signals.version_change` (where the current and
  previous model versions disagree) or
  :func:`~napari_segtool.active_learning.signals.class_rarity` (rare classes first);
- ``uncertainty-diverse``: each batch of ``batch`` units is picked by k-center greedy on the
  units' ``features`` among the ``3 * batch`` most uncertain, away from ``revealed``
  (:func:`~napari_segtool.active_learning.diversity.diverse_uncertain`); batch after batch
  until every unit is ordered;
- ``random``: uniformly at random;
- ``foreground-random``: uniformly at random among units with predicted foreground.

Units in ``exclude`` (reviewed or already revealed) are never proposed. When the preferred
units run out, the rest fill the quota in the same order, so ``k`` units come back while
enough remain. All randomness comes from ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from napari_segtool.active_learning.diversity import diverse_uncertain
from napari_segtool.active_learning.scoring import Unit
from napari_segtool.errors import InputError

STRATEGIES = (
    "uncertainty",
    "uncertainty-diverse",
    "disagreement",
    "class-balanced",
    "random",
    "foreground-random",
)
DEFAULT_STRATEGY = "disagreement"
"""What ``simulate`` runs without ``--strategy`` and what the Queue opens with: the strategy
``benchmarks/bench_active_learning.py`` supports best (README, Performance)."""
SCORED = ("uncertainty", "disagreement", "class-balanced")
"""Strategies that order units by their ``score`` (each from its own per-voxel map)."""


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
    batch: int = 10,
    revealed: Sequence[Unit] = (),
) -> list[Unit]:
    """All eligible units in the order the strategy proposes them.

    ``batch`` and ``revealed`` (units already labelled, with their ``features``) matter only
    to ``uncertainty-diverse``.

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
    if strategy == "uncertainty-diverse":
        return _diverse_order(pool, batch, revealed)
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


def _diverse_order(pool: list[Unit], batch: int, revealed: Sequence[Unit]) -> list[Unit]:
    """Batches of :func:`diverse_uncertain`, each away from the ones before it."""
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    if any(not u.features for u in pool):
        raise InputError("uncertainty-diverse needs units scored with features (features_grid)")
    centres = [u.features for u in revealed if u.features]
    order: list[Unit] = []
    left = list(pool)
    while left:
        feats = np.array([u.features for u in left], np.float64)
        known = np.array(centres) if centres else None
        picked = diverse_uncertain(left, feats, batch, revealed_features=known)
        order += picked
        centres += [u.features for u in picked]
        taken = {u.index for u in picked}
        left = [u for u in left if u.index not in taken]
    return order


def select(units: Sequence[Unit], k: int, **options: object) -> list[Unit]:
    """The first ``k`` units of :func:`rank` (fewer when fewer are eligible)."""
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    return rank(units, **options)[:k]  # type: ignore[arg-type]
