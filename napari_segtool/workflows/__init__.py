"""Operations that span the core packages, shared by the widgets and the command line.

A correction round (:mod:`napari_segtool.workflows.correction`) trains on a project's
corrections, records the version and re-segments what the user did not touch; the Fine-tune
widget and the ``finetune`` command both run it. :mod:`napari_segtool.workflows.projects`
creates and describes project folders without the GUI.
"""

from napari_segtool.workflows.correction import (
    Resegmentation,
    RoundResult,
    Trained,
    iter_correction_round,
    iter_resegment,
    iter_train_round,
    merge_resegmentation,
    record_version,
    round_data,
)
from napari_segtool.workflows.projects import create_project, describe_project

__all__ = [
    "Resegmentation",
    "RoundResult",
    "Trained",
    "create_project",
    "describe_project",
    "iter_correction_round",
    "iter_resegment",
    "iter_train_round",
    "merge_resegmentation",
    "record_version",
    "round_data",
]
