"""Simulated human-in-the-loop rounds, to measure selection strategies on labelled data.

Each round picks ``per_round`` units by the strategy, reveals their reference labels as if a
user had corrected them, fine-tunes the current model on everything revealed so far (only
those voxels count), and measures the Dice on a fixed held-out set of units that are never
revealed. The first ``initial`` units are drawn at random (the same draw for every strategy
with the same seed), so strategies differ only in what they choose afterwards.

**Effort** is counted as the user pays it (Cellpose 2.0's point: correcting a prediction
costs far less than drawing from scratch): for each revealed unit, the voxels where the
model shown at that moment (the starting model for the initial units, the current one
afterwards) differs from the reference, plus a fixed review cost per unit of
``review_fraction`` of the unit's voxels (looking a unit over and confirming it; 1 % by
default, an assumption: a slice checked without a change still costs the user something).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from napari_segtool.active_learning.scoring import Unit, make_units, score_units
from napari_segtool.active_learning.select import DEFAULT_STRATEGY, STRATEGIES, rank
from napari_segtool.active_learning.signals import (
    class_counts,
    class_rarity,
    rarity_weights,
    version_change,
)
from napari_segtool.active_learning.uncertainty import voxel_uncertainty
from napari_segtool.config import FinetuneConfig, InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.predict import segment
from napari_segtool.inference.tiling import run_to_end
from napari_segtool.metrics.overlap import foreground_dice
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.data import labels_to_channels
from napari_segtool.training.finetune import LabelledImage, iter_finetune

logger = logging.getLogger(__name__)

SIMULATION_STRATEGIES = STRATEGIES
"""What ``simulate`` can measure: the Queue's strategies
(:mod:`~napari_segtool.active_learning.select`)."""
UNIT_KINDS = ("slices", "patches")
"""Units of a stack: whole slices, or ``tile`` x ``tile`` patches within its slices."""
FEATURES_GRID = 8
"""Grid of the pooled unit features that ``uncertainty-diverse`` spreads batches on."""


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of a simulated annotation campaign (see the module docstring)."""

    # the default the benchmark supports best (README, Performance: Active learning): highest
    # mean area under the Dice-against-effort curve over its four problems, never below
    # random with an interval excluding zero
    strategy: str = DEFAULT_STRATEGY
    initial: int = 2
    rounds: int = 4
    per_round: int = 2
    held_out_fraction: float = 0.3
    tile: int = 128
    units: str = "slices"
    min_gap: int = 1
    score: str = "top"
    review_fraction: float = 0.01
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if self.strategy not in SIMULATION_STRATEGIES:
            raise InputError(f"strategy must be one of {SIMULATION_STRATEGIES}, "
                             f"got {self.strategy!r}")  # fmt: skip
        if self.initial < 1 or self.per_round < 1 or self.rounds < 0:
            raise InputError("initial and per_round must be >= 1 and rounds >= 0")
        if not 0 < self.held_out_fraction < 1:
            raise InputError("held_out_fraction must be in (0, 1)")
        if self.units not in UNIT_KINDS:
            raise InputError(f"units must be one of {UNIT_KINDS}, got {self.units!r}")
        if self.tile < 1:
            raise InputError(f"tile must be >= 1, got {self.tile}")
        if not 0 <= self.review_fraction <= 1:
            raise InputError("review_fraction must be in [0, 1]")


@dataclass(frozen=True)
class RoundPoint:
    """Held-out Dice after training on ``revealed`` units (in the order they were revealed);
    ``effort`` the voxels a user changed or reviewed to correct them (module docstring)."""

    round: int
    revealed: tuple[int, ...]
    dice: float
    seconds: float
    effort: int = 0

    @property
    def n_revealed(self) -> int:
        return len(self.revealed)


def held_out_units(units: list[Unit], fraction: float) -> list[int]:
    """Evenly spread units kept for evaluation only (the same for every seed and strategy).

    >>> held_out_units(make_units((10, 4, 4)), 0.3)
    [2, 4, 7]
    """
    n = max(1, round(fraction * len(units)))
    if n >= len(units):
        raise InputError("no units left to reveal: lower held_out_fraction or add data")
    picks = np.linspace(0, len(units) - 1, n + 2)[1:-1]
    return sorted({units[round(p)].index for p in picks})


def _mask(shape: tuple[int, ...], units: list[Unit], chosen: set[int]) -> NDArray[np.bool_]:
    mask = np.zeros(shape, bool)
    for u in units:
        if u.index in chosen:
            mask[u.region] = True
    return mask


def unit_effort(units: list[Unit], shown: NDArray, labels: NDArray,
                review_fraction: float) -> int:  # fmt: skip
    """Voxels to correct in ``units`` when ``shown`` is on screen, plus their review cost.

    >>> from napari_segtool.active_learning.scoring import make_units
    >>> truth = np.zeros((2, 10, 10), np.uint8); truth[0, :3] = 1
    >>> shown = np.zeros_like(truth); shown[0, :2] = 1
    >>> unit_effort(make_units(truth.shape)[:1], shown, truth, 0.01)  # 10 wrong + 1 review
    11
    """
    total = 0
    for u in units:
        wrong = int(np.count_nonzero(shown[u.region] != labels[u.region]))
        total += wrong + round(review_fraction * int(np.prod(labels[u.region].shape)))
    return total


def _train(model: SegmentationModel, image, labels, mask, cfg: FinetuneConfig):
    items = [LabelledImage(image, labels, mask)]
    return run_to_end(iter_finetune(model, items, config=cfg, progress_every=None))


def _dice(
    pred: NDArray, ref: NDArray, where: NDArray[np.bool_], model: SegmentationModel
) -> float:
    """Held-out foreground Dice, over the model's classes (sparse label ids mapped first)."""
    values = model.label_values or ()
    return foreground_dice(labels_to_channels(pred[where], values),
                           labels_to_channels(ref[where], values),
                           model.config.out_channels)  # fmt: skip


def iter_simulate(
    image: NDArray,
    labels: NDArray,
    model: SegmentationModel,
    *,
    config: SimulationConfig | None = None,
    seed: int = 0,
) -> Generator[RoundPoint, None, list[RoundPoint]]:
    """Run the simulated rounds, yielding the held-out Dice after each; returns the curve.

    ``image`` is a ``(Z, Y, X)`` stack (units are slices, or ``config.tile`` patches within
    them with ``config.units="patches"``) or a ``(Y, X)`` image (units are ``config.tile``
    tiles); ``labels`` the full reference. ``model`` is not modified.
    """
    cfg = config or SimulationConfig()
    if image.shape[: labels.ndim] != labels.shape:
        raise InputError(f"image {image.shape} and labels {labels.shape} do not match")
    units = simulation_units(labels.shape, cfg)
    held = held_out_units(units, cfg.held_out_fraction)
    pool = [u for u in units if u.index not in held]
    if cfg.initial > len(pool):
        raise InputError(f"initial={cfg.initial} but only {len(pool)} units can be revealed")
    rng = np.random.default_rng(seed)
    revealed = [pool[i].index for i in rng.choice(len(pool), cfg.initial, replace=False)]
    held_mask = _mask(labels.shape, units, set(held))
    ft = cfg.finetune.replace(seed=seed)
    # every strategy is judged on the same plain prediction; only the uncertainty strategy
    # pays for a flip-TTA run, to score the units
    plain = InferenceConfig(device=ft.device, batch_size=ft.batch_size, precision=ft.precision)
    with_tta = plain.with_(tta=True)
    current = model
    curve: list[RoundPoint] = []
    by_index = {u.index: u for u in units}
    shown = segment(image, model, config=plain).labels  # what the user starts correcting
    effort = unit_effort([by_index[i] for i in revealed], shown, labels, cfg.review_fraction)
    previous = latest = shown  # predictions of the previous and the current model version
    for r in range(cfg.rounds + 1):
        t0 = time.perf_counter()
        mask = _mask(labels.shape, units, set(revealed))
        result = _train(current, image, labels, mask, ft)
        seg = None
        if result.promote:
            current = result.model
            seg = segment(image, current, config=plain)
            previous, latest = latest, seg.labels
        if seg is None:
            seg = segment(image, current, config=plain)
        point = RoundPoint(r, tuple(revealed), _dice(seg.labels, labels, held_mask, current),
                           time.perf_counter() - t0, effort)  # fmt: skip
        logger.info("%s seed %d round %d: %d units, %d voxels of effort, Dice %.4f",
                    cfg.strategy, seed, r, point.n_revealed, effort, point.dice)  # fmt: skip
        curve.append(point)
        yield point
        if r == cfg.rounds:
            break
        shown = seg.labels  # the prediction the user corrects next
        picked = _choose(image, current, units, set(held), revealed, seg.labels, previous,
                         np.asarray(labels)[mask], cfg=cfg, tta=with_tta,
                         seed=seed * 1000 + r)  # fmt: skip
        if not picked:
            break
        effort += unit_effort(picked, shown, labels, cfg.review_fraction)
        revealed.extend(u.index for u in picked)
    return curve


def simulation_units(shape: tuple[int, ...], cfg: SimulationConfig) -> list[Unit]:
    """The units of an image of ``shape`` under ``cfg`` (slices, patches or 2D tiles)."""
    patches = len(shape) == 2 or cfg.units == "patches"
    return make_units(shape, tile=cfg.tile if patches else None)


def _choose(image: NDArray, model: SegmentationModel, units: list[Unit], held: set[int],
            revealed: list[int], labels: NDArray, previous: NDArray, truth: NDArray, *,
            cfg: SimulationConfig, tta: InferenceConfig, seed: int) -> list[Unit]:  # fmt: skip
    """The next ``cfg.per_round`` units by the strategy.

    ``labels`` is the current model's prediction, ``previous`` the previous version's,
    ``truth`` the reference labels of the revealed voxels (for the class counts).
    """
    score_map: NDArray | None = None
    if cfg.strategy.startswith("uncertainty"):
        seg = segment(image, model, config=tta)
        score_map, labels = voxel_uncertainty(seg), seg.labels
    elif cfg.strategy == "disagreement":
        score_map = version_change(labels, previous)
    elif cfg.strategy == "class-balanced":
        classes = model.config.out_channels
        values = model.label_values or tuple(range(classes))
        by_value = class_counts(truth, [(slice(None),)])
        counts_by_class = {c: by_value.get(v, 0) for c, v in enumerate(values)}
        weights = rarity_weights(counts_by_class, classes)
        table = np.zeros(int(max(values)) + 1, np.float32)  # by label value, not channel
        table[list(values)] = weights
        score_map = class_rarity(labels, table)
    if score_map is None:
        score_map = np.zeros(labels.shape, np.float32)
    grid = FEATURES_GRID if cfg.strategy == "uncertainty-diverse" else None
    candidates = [u for u in units if u.index not in held]
    # a class's share counts for class-balanced: the top 5 % of a unit is all one class
    reduce = "mean" if cfg.strategy == "class-balanced" else cfg.score
    scored = score_units(candidates, score_map, labels, reduce=reduce, features_grid=grid)
    done = set(revealed)
    order = rank(scored, strategy=cfg.strategy, seed=seed, exclude=done, min_gap=cfg.min_gap,
                 batch=cfg.per_round, revealed=[u for u in scored if u.index in done])  # fmt: skip
    return order[: cfg.per_round]


def reference_dice(
    image: NDArray,
    labels: NDArray,
    model: SegmentationModel,
    *,
    config: SimulationConfig | None = None,
    seed: int = 0,
) -> float:
    """Held-out Dice after training on every unit that can be revealed (the ceiling)."""
    cfg = config or SimulationConfig()
    units = simulation_units(labels.shape, cfg)
    held = set(held_out_units(units, cfg.held_out_fraction))
    mask = _mask(labels.shape, units, {u.index for u in units if u.index not in held})
    result = _train(model, image, labels, mask, cfg.finetune.replace(seed=seed))
    inference = InferenceConfig(device=cfg.finetune.device, precision=cfg.finetune.precision)
    pred = segment(image, result.model, config=inference).labels
    return _dice(pred, labels, _mask(labels.shape, units, held), result.model)


def units_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Fewest revealed units whose Dice is at least ``target`` (None if never).

    >>> units_to_reach([(2, 0.5), (4, 0.8), (6, 0.79)], 0.78)
    4
    """
    for n, dice in curve:
        if dice >= target:
            return n
    return None


def area_under_curve(curve: list[tuple[int, float]]) -> float:
    """Trapezoidal area under Dice against revealed units, divided by the units spanned.

    >>> area_under_curve([(2, 0.5), (4, 0.7)])
    0.6
    """
    if len(curve) < 2:
        return float(curve[0][1]) if curve else 0.0
    n = np.array([c[0] for c in curve], float)
    d = np.array([c[1] for c in curve], float)
    return float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(n)) / (n[-1] - n[0]))
