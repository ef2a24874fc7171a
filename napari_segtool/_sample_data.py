"""Sample data contributions: each returns napari layer-data tuples, without importing napari."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_segtool.io import read_image
from napari_segtool.layer_roles import IMAGE, REFERENCE, ROLE_KEY

SAMPLE_DIR = Path(__file__).parent / "sample_data"

LayerData = tuple[Any, dict[str, Any], str]
REFERENCE_COLORS: dict[int | None, str] = {0: "transparent", None: "cyan"}


def _pair(
    image_file: str, labels_file: str, name: str, contrast: tuple[float, float] | None
) -> list[LayerData]:
    image = read_image(SAMPLE_DIR / image_file)
    labels = read_image(SAMPLE_DIR / labels_file)
    image_kwargs: dict[str, Any] = {
        "name": name,
        "scale": image.spacing,
        "metadata": {ROLE_KEY: IMAGE},
    }
    if contrast is not None:
        image_kwargs["contrast_limits"] = contrast
    return [
        (image.data, image_kwargs, "image"),
        (
            labels.data,
            {
                "name": f"{name} reference",
                "scale": labels.spacing,
                # one colour of its own (cyan) for every class, so it never looks like the
                # prediction being corrected, whose label 1 has napari's usual colour
                "colormap": REFERENCE_COLORS,
                "opacity": 0.4,
                "metadata": {ROLE_KEY: REFERENCE},
            },
            "labels",
        ),
    ]


def isbi_em() -> list[LayerData]:
    """ISBI 2012 serial-section TEM stack (30 x 512 x 512) with expert membrane labels."""
    return _pair("isbi2012_em.tif", "isbi2012_em_membranes.tif", "isbi2012 em", None)


def ct_small() -> list[LayerData]:
    """Small CT crop (30 x 101 x 122, 3 mm voxels) with TotalSegmentator's organ labels."""
    return _pair("ct_small.tif", "ct_small_organs.tif", "ct small", (-200.0, 300.0))
