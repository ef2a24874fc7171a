"""Sample data contributions: each returns napari layer-data tuples, without importing napari."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_segtool.io import read_image

SAMPLE_DIR = Path(__file__).parent / "sample_data"

LayerData = tuple[Any, dict[str, Any], str]


def _pair(
    image_file: str, labels_file: str, name: str, contrast: tuple[float, float] | None
) -> list[LayerData]:
    image = read_image(SAMPLE_DIR / image_file)
    labels = read_image(SAMPLE_DIR / labels_file)
    image_kwargs: dict[str, Any] = {"name": name, "scale": image.spacing}
    if contrast is not None:
        image_kwargs["contrast_limits"] = contrast
    return [
        (image.data, image_kwargs, "image"),
        (
            labels.data,
            {"name": f"{name} reference", "scale": labels.spacing, "opacity": 0.4},
            "labels",
        ),
    ]


def isbi_em() -> list[LayerData]:
    """ISBI 2012 serial-section TEM stack (30 x 512 x 512) with expert membrane labels."""
    return _pair("isbi2012_em.tif", "isbi2012_em_membranes.tif", "isbi2012 em", None)


def ct_small() -> list[LayerData]:
    """Small CT crop (30 x 101 x 122, 3 mm voxels) with TotalSegmentator's organ labels."""
    return _pair("ct_small.tif", "ct_small_organs.tif", "ct small", (-200.0, 300.0))
