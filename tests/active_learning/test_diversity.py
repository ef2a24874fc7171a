"""k-center greedy spreads a batch over the kinds of units (issue 16 item 3)."""

import numpy as np
import pytest

from napari_segtool.active_learning import SimulationConfig, iter_simulate, make_units
from napari_segtool.active_learning.diversity import diverse_uncertain, k_center_greedy
from napari_segtool.active_learning.scoring import Unit, score_units
from napari_segtool.active_learning.select import DEFAULT_STRATEGY, rank
from napari_segtool.active_learning.simulate import SIMULATION_STRATEGIES
from napari_segtool.cli.train import SIM_DEFAULT, SIM_STRATEGIES
from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import run_to_end
from tests.active_learning.test_uncertainty import FAST, easy_and_hard
from tests.training.conftest import tiny_model


def clusters(seed=0):
    """Three tight clusters of ten points in 5-D, far apart; cluster of row i is i // 10."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * 5, [10.0] * 5, [0.0, 0.0, 10.0, -10.0, 5.0]])
    return np.concatenate([c + rng.normal(0, 0.1, (10, 5)) for c in centres])


def test_k_center_takes_one_point_of_each_cluster():
    x = clusters()
    for first in (0, 13, 27):
        picked = k_center_greedy(x, 3, first=first)
        assert sorted(i // 10 for i in picked) == [0, 1, 2]


def test_k_center_starts_away_from_what_is_revealed():
    x = clusters()
    picked = k_center_greedy(x, 2, centres=x[:2])  # cluster 0 is known already
    assert sorted(i // 10 for i in picked) == [1, 2]
    assert k_center_greedy(x, 0) == []
    assert len(k_center_greedy(x[:2], 5)) == 2
    with pytest.raises(InputError):
        k_center_greedy(x, -1)


def test_a_diverse_batch_is_uncertain_and_spread_where_plain_ranking_repeats_itself():
    x = clusters()
    # cluster 0 is the most uncertain throughout: plain ranking would take four of it
    scores = np.concatenate([np.full(10, 0.9), np.full(10, 0.8), np.full(10, 0.1)])
    units = [Unit(i, (i,), (slice(i, i + 1),), score=float(s)) for i, s in enumerate(scores)]
    batch = diverse_uncertain(units, x, 2, pool_factor=10)  # pool: clusters 0 and 1
    assert sorted(u.index // 10 for u in batch) == [0, 1]
    narrow = diverse_uncertain(units, x, 2, pool_factor=15, revealed=[0],
                               revealed_features=x[:1])  # fmt: skip
    assert 0 not in [u.index for u in narrow]
    assert sorted(u.index // 10 for u in narrow) == [1, 2]
    top = diverse_uncertain(units, x, 2, pool_factor=1)
    assert [u.index // 10 for u in top] == [0, 0]  # a pool of the top 2 only


def test_unit_features_pool_the_foreground_and_the_score_while_scoring():
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, :2, :2] = 1
    unc = np.zeros((2, 4, 4), np.float32)
    unc[1, 2:, 2:] = 0.5
    units = score_units(make_units(labels.shape), unc, labels, features_grid=2)
    assert units[0].features == (1.0, 0.0, 0.0, 0.0) + (0.0,) * 4
    assert units[1].features == (0.0,) * 4 + (0.0, 0.0, 0.0, 0.5)
    assert score_units(make_units(labels.shape), unc, labels)[0].features == ()


def test_diverse_ranking_orders_every_unit_batch_by_batch():
    x = clusters()
    # cluster 0 is the most uncertain throughout: plain ranking takes three of it first
    scores = np.concatenate([np.full(10, 0.9), np.full(10, 0.8), np.full(10, 0.1)])
    scores[[10, 11]] = 0.95  # two of cluster 1 on top
    units = [Unit(i, (i,), (slice(i, i + 1),), score=float(s), features=tuple(x[i]))
             for i, s in enumerate(scores)]  # fmt: skip
    order = rank(units, strategy="uncertainty-diverse", batch=3, exclude=[5])
    assert sorted(u.index for u in order) == [i for i in range(30) if i != 5]
    # the 9 most uncertain: 10, 11 and cluster 0 but 5: one batch of 3 spans clusters 0 and 1
    assert {u.index // 10 for u in order[:3]} == {0, 1}
    assert [u.index // 10 for u in rank(units, strategy="uncertainty", min_gap=0)[:3]] == [1, 1, 0]
    away = rank(units, strategy="uncertainty-diverse", batch=1, revealed=units[10:12])
    assert away[0].index // 10 == 0  # cluster 1 is known: the first pick is not from it
    with pytest.raises(InputError, match="features"):
        rank([Unit(0, (0,), (slice(0, 1),))], strategy="uncertainty-diverse")


def test_simulate_runs_the_diverse_strategy_reproducibly():
    assert set(SIM_STRATEGIES) == set(SIMULATION_STRATEGIES)
    assert SIM_DEFAULT == DEFAULT_STRATEGY == SimulationConfig().strategy
    image, labels = easy_and_hard(n=10)
    cfg = SimulationConfig(strategy="uncertainty-diverse", initial=2, rounds=2, per_round=2,
                           finetune=FAST.replace(epochs=1, steps_per_epoch=4))  # fmt: skip
    curve = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=2))
    assert [p.n_revealed for p in curve] == [2, 4, 6]
    assert len(set(curve[-1].revealed)) == 6
    again = run_to_end(iter_simulate(image, labels, tiny_model(), config=cfg, seed=2))
    assert [p.revealed for p in again] == [p.revealed for p in curve]
