"""Active learning: which slices or tiles to correct next, and simulations to measure it."""

from napari_segtool.active_learning.scoring import Unit, make_units, score_units
from napari_segtool.active_learning.select import STRATEGIES, rank, select
from napari_segtool.active_learning.simulate import (
    RoundPoint,
    SimulationConfig,
    area_under_curve,
    held_out_units,
    iter_simulate,
    reference_dice,
    units_to_reach,
)
from napari_segtool.active_learning.uncertainty import mc_dropout, voxel_uncertainty

__all__ = [
    "STRATEGIES",
    "RoundPoint",
    "SimulationConfig",
    "Unit",
    "area_under_curve",
    "held_out_units",
    "iter_simulate",
    "make_units",
    "mc_dropout",
    "rank",
    "reference_dice",
    "score_units",
    "select",
    "units_to_reach",
    "voxel_uncertainty",
]
