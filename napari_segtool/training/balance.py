"""How a round trains on rare foreground: oversampling, loss weights and length from the labels.

A fixed round drowns a class that covers a fraction of a percent of the labelled voxels: a
new 2D model fine-tuned for 90 steps on 8 CT slices whose pancreas covers 0.17 % of them
predicted no pancreas at all. :func:`plan_round` reads the class counts of the training
voxels and, with ``FinetuneConfig.balance="auto"``, sets

- **foreground oversampling**: the share of patches centred on a labelled foreground voxel
  grows from 0.5 (rarest class at :data:`RARE_SHARE` of the voxels or more) to 0.9 (at
  :data:`VERY_RARE_SHARE` or less), log-linearly in between; with several foreground classes
  the centre's class is drawn uniformly among those labelled, so the rarest is seen as often
  as the commonest;
- **loss weights**: cross-entropy weights ``sqrt(n_max / n_c)`` (1 for the commonest class,
  at most :data:`MAX_WEIGHT`); the Dice term is per class already;
- nothing of this when every labelled class has at least :data:`RARE_SHARE` of the voxels
  (membranes in EM, large organs): such a round is the plain one;
- **round length**: ``steps_per_epoch`` times ``1 + log2(RARE_SHARE / share)`` rounded,
  between 1 and :data:`MAX_STEP_FACTOR` (a class at 1 % of the voxels: 3x; at 0.17 %: 4x),
  so a rare class is seen in enough patches for the network to learn it in one round.

``balance="off"`` keeps the fixed round (half the patches on foreground, no weights, the
configured steps). The plan is part of the round's summary, so the user sees what was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["RoundPlan", "class_counts", "plan_round"]

RARE_SHARE = 0.05
"""A foreground class at or above this share of the labelled voxels is trained as usual."""

VERY_RARE_SHARE = 0.001
"""At or below this share, 90 % of patches are centred on foreground."""

MAX_WEIGHT = 10.0
"""Largest cross-entropy weight of a class."""

MAX_STEP_FACTOR = 4
"""A round on rare foreground runs at most this many times the configured steps."""


@dataclass(frozen=True)
class RoundPlan:
    """What a round runs with (see the module docstring)."""

    steps_per_epoch: int
    foreground_fraction: float
    class_weights: tuple[float, ...] | None
    class_balanced: bool
    rarest_share: float | None
    reason: str

    def summary(self) -> dict[str, object]:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "foreground_fraction": round(self.foreground_fraction, 3),
            "class_weights": None if self.class_weights is None
            else [round(w, 3) for w in self.class_weights],
            "class_balanced": self.class_balanced,
            "rarest_share": None if self.rarest_share is None
            else float(f"{self.rarest_share:.4g}"),
            "reason": self.reason,
        }  # fmt: skip


def class_counts(labels: Sequence[NDArray], masks: Sequence[NDArray[np.bool_]],
                 n_classes: int) -> NDArray[np.int64]:  # fmt: skip
    """Training voxels per class (channel indices ``0 .. n_classes-1``) where ``masks``."""
    counts = np.zeros(n_classes, np.int64)
    for lab, m in zip(labels, masks, strict=True):
        values = np.asarray(lab)[np.asarray(m, bool)]
        counts += np.bincount(values.astype(np.intp).ravel(), minlength=n_classes)[:n_classes]
    return counts


def plan_round(counts: NDArray[np.int64], *, steps_per_epoch: int, balance: str) -> RoundPlan:
    """The round's sampling, weights and length for training voxels with ``counts`` per class.

    Examples
    --------
    >>> p = plan_round(np.array([99_830, 170]), steps_per_epoch=15, balance="auto")
    >>> p.steps_per_epoch, round(p.foreground_fraction, 2), p.class_weights
    (60, 0.85, (1.0, 10.0))
    >>> plan_round(np.array([700, 300]), steps_per_epoch=15, balance="auto").steps_per_epoch
    15
    >>> plan_round(np.array([99_830, 170]), steps_per_epoch=15, balance="off").class_weights
    """
    fixed = RoundPlan(steps_per_epoch, 0.5, None, False, None, "fixed round (balance off)")
    total = int(counts.sum())
    present = [c for c in range(1, len(counts)) if counts[c] > 0]
    if balance == "off":
        return fixed
    if not present or total == 0:
        return RoundPlan(steps_per_epoch, 0.5, None, False, None,
                         "no labelled foreground: a plain round")  # fmt: skip
    share = min(int(counts[c]) for c in present) / total
    if share >= RARE_SHARE:
        return RoundPlan(steps_per_epoch, 0.5, None, False, share,
                         f"rarest labelled class {100 * share:.3g} % of the training voxels: "
                         "a plain round")  # fmt: skip
    t = math.log(RARE_SHARE / share) / math.log(RARE_SHARE / VERY_RARE_SHARE)
    fraction = 0.5 + 0.4 * min(1.0, max(0.0, t))
    biggest = int(counts.max())
    weights = tuple(
        float(min(MAX_WEIGHT, math.sqrt(biggest / int(n)))) if n > 0 else 1.0 for n in counts
    )
    factor = int(min(MAX_STEP_FACTOR, max(1, round(1 + math.log2(RARE_SHARE / share)))))
    reason = (f"rarest labelled class {100 * share:.3g} % of the training voxels: "
              f"{100 * fraction:.0f} % of patches on foreground, {factor}x the steps")  # fmt: skip
    return RoundPlan(steps_per_epoch * factor, fraction, weights, len(present) > 1, share,
                     reason)  # fmt: skip
