"""Models that ship with the package, plus untrained starting points."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from napari_segtool.config import ModelConfig
from napari_segtool.errors import CheckpointError
from napari_segtool.model.checkpoint import SegmentationModel

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    """One choice in a model picker."""

    name: str
    description: str
    path: Path | None  # None: an untrained model built from `config`
    config: ModelConfig | None = None


BUNDLED: tuple[ModelEntry, ...] = (
    ModelEntry(
        "em-membranes-2d",
        "2D U-Net for cell membranes in serial-section EM (ISBI 2012: trained on slices 0-17, "
        "selected on 18-19, held out 20-29)",
        WEIGHTS_DIR / "em_membranes_2d.pt",
    ),
    ModelEntry(
        "new-2d",
        "new, untrained 2D U-Net (1 channel, 2 classes): start from corrections",
        None,
        ModelConfig(spatial_dims=2),
    ),
    ModelEntry(
        "new-3d",
        "new, untrained 3D U-Net (1 channel, 2 classes): start from corrections",
        None,
        ModelConfig(spatial_dims=3, depth=4, base_features=8),
    ),
    ModelEntry(
        "new-resunet-2d",
        "new, untrained 2D residual U-Net (1 channel, 2 classes): start from corrections",
        None,
        ModelConfig(spatial_dims=2, architecture="resunet"),
    ),
    ModelEntry(
        "new-resunet-3d",
        "new, untrained 3D residual U-Net (1 channel, 2 classes): start from corrections",
        None,
        ModelConfig(spatial_dims=3, depth=4, base_features=8, architecture="resunet"),
    ),
)


def list_models() -> tuple[ModelEntry, ...]:
    """The bundled models and untrained starting points, in picker order."""
    return BUNDLED


def load_model(name_or_path: str | os.PathLike[str]) -> SegmentationModel:
    """Load a bundled model by name, build an untrained one, or load a model file.

    Parameters
    ----------
    name_or_path : str or PathLike
        A name from :func:`list_models` (``"em-membranes-2d"``, ``"new-2d"``, ``"new-3d"``,
        ``"new-resunet-2d"``, ``"new-resunet-3d"``), the path of a model file, or of a
        bioimage.io package (``.zip``) that napari-segtool exported
        (:func:`~napari_segtool.model.bioimageio_package.read_package`).

    Raises
    ------
    CheckpointError
        For an unknown name that is not an existing file, or a bad model file or package.
    """
    key = os.fspath(name_or_path)
    for entry in BUNDLED:
        if key == entry.name:
            if entry.path is None:
                assert entry.config is not None
                return SegmentationModel.new(entry.config, name=entry.name)
            model = SegmentationModel.load(entry.path)
            model.name = entry.name
            return model
    path = Path(key)
    if path.suffix.lower() == ".zip":  # a bioimage.io package: loaded from its weights alone
        from napari_segtool.model.bioimageio_package import read_package

        return read_package(path)
    if path.suffix or path.exists() or os.sep in key:
        return SegmentationModel.load(path)
    names = ", ".join(e.name for e in BUNDLED)
    raise CheckpointError(f"{key!r} is neither a bundled model ({names}) nor a model file")
