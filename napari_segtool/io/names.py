"""Image file names: the image ending of a path and the name without it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["image_stem", "image_suffix"]


def image_suffix(path: Path) -> str | None:
    """The image ending of ``path`` (``.nii.gz`` counts as one), or None.

    >>> image_suffix(Path("brain.nii.gz")), image_suffix(Path("notes.txt"))
    ('.nii.gz', None)
    """
    from napari_segtool.io.medical import MEDICAL_SUFFIXES
    from napari_segtool.io.tiff import TIFF_SUFFIXES

    name = path.name.lower()
    for suffix in (".zarr", *TIFF_SUFFIXES, *MEDICAL_SUFFIXES):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def image_stem(path: Path) -> str | None:
    """The name of ``path`` without its image ending (``a.nii.gz``: ``a``), or None when it
    has none."""
    suffix = image_suffix(path)
    return None if suffix is None else path.name[: -len(suffix)]
