import numpy as np
import pytest

from napari_segtool.active_learning import (
    STRATEGIES,
    Unit,
    make_units,
    rank,
    score_units,
    select,
)
from napari_segtool.errors import InputError


def _units(n: int = 12, seed: int = 0) -> list[Unit]:
    rng = np.random.default_rng(seed)
    return [Unit(z, (z,), (slice(z, z + 1),), score=float(rng.random()),
                 foreground=float(rng.random() > 0.3),
                 features=tuple(rng.random(3).tolist())) for z in range(n)]  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranking_is_deterministic_for_a_seed(strategy):
    units = _units()
    assert rank(units, strategy=strategy, seed=3) == rank(units, strategy=strategy, seed=3)


def test_random_rankings_differ_between_seeds():
    units = _units()
    orders = {tuple(u.index for u in rank(units, strategy="random", seed=s)) for s in range(5)}
    assert len(orders) > 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reviewed_units_are_never_proposed(strategy):
    units = _units(20)
    reviewed = {0, 3, 4, 11, 19}
    for seed in range(5):
        order = rank(units, strategy=strategy, seed=seed, exclude=reviewed)
        assert reviewed.isdisjoint(u.index for u in order)
        assert len(order) == 20 - len(reviewed)  # everything else, once


def test_uncertainty_prefers_high_scores_without_neighbours():
    scores = [0.1, 0.95, 0.9, 0.2, 0.85, 0.3, 0.1, 0.8]
    units = [Unit(z, (z,), (slice(z, z + 1),), s, 0.5) for z, s in enumerate(scores)]
    picked = [u.index for u in select(units, 3, strategy="uncertainty", min_gap=1)]
    assert picked == [1, 4, 7]  # 2 is a near-duplicate of 1
    picked = [u.index for u in select(units, 3, strategy="uncertainty", min_gap=0)]
    assert picked == [1, 2, 4]


def test_foreground_awareness():
    units = [Unit(z, (z,), (slice(z, z + 1),), score=1.0 - z / 10, foreground=fg)
             for z, fg in enumerate([0.0, 0.0, 0.3, 0.0, 0.2, 0.5])]  # fmt: skip
    top = [u.index for u in select(units, 3, strategy="uncertainty", min_gap=0)]
    assert top == [2, 4, 5]  # empty slices only after those with something to segment
    for seed in range(5):
        fg = [u.index for u in select(units, 3, strategy="foreground-random", seed=seed)]
        assert sorted(fg) == [2, 4, 5]


def test_tiles_and_their_scores():
    units = make_units((300, 200), tile=128)
    assert [u.grid for u in units] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert units[-1].region == (slice(256, 300), slice(128, 200))
    unc = np.zeros((300, 200), np.float32)
    unc[256:, 128:] = 1.0
    labels = np.zeros((300, 200), np.uint8)
    labels[:128, :128] = 1
    scored = score_units(units, unc, labels)
    assert scored[-1].score == 1.0
    assert scored[0].foreground == 1.0
    # tiles next to a chosen one (also diagonally) wait their turn
    ranked = rank(scored, strategy="uncertainty", min_gap=1, min_foreground=0.0)
    assert ranked[0].grid == (2, 1)
    assert ranked[1].grid in {(0, 0), (0, 1)}


def test_bad_options():
    with pytest.raises(InputError, match="strategy must be one of"):
        rank(_units(), strategy="oracle")
    with pytest.raises(InputError, match="tile size"):
        make_units((10, 10))


def test_top_score_favours_a_few_confused_voxels():
    units = make_units((2, 10, 10))
    unc = np.zeros((2, 10, 10), np.float32)
    unc[0] = 0.3  # everything a little uncertain
    unc[1, :2, :3] = 1.0  # six very confused voxels
    mean = score_units(units, unc, reduce="mean")
    top = score_units(units, unc, reduce="top", top_fraction=0.05)
    assert mean[0].score > mean[1].score
    assert top[1].score == 1.0
    assert top[0].score == pytest.approx(0.3)
    with pytest.raises(InputError, match="reduce"):
        score_units(units, unc, reduce="max")
