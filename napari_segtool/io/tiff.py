"""TIFF input and output with voxel spacing, via tifffile."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_path

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ImageFile:
    """An image read from disk with its voxel spacing.

    ``spacing`` has one entry per spatial axis in napari order (``(Z, Y, X)`` or ``(Y, X)``);
    ``unit`` is the length unit when the file says it, else ``None``.
    """

    data: NDArray
    spacing: tuple[float, ...]
    unit: str | None
    path: Path


def _spacing_from_tiff(tif: tifffile.TiffFile, ndim: int) -> tuple[tuple[float, ...], str | None]:
    spacing = [1.0] * ndim
    unit: str | None = None
    page = tif.pages[0]
    # 1. tifffile's own JSON description: {"spacing": s | [..], "unit": "mm"}
    desc = page.description if hasattr(page, "description") else ""
    if desc.startswith("{"):
        try:
            meta = json.loads(desc)
        except json.JSONDecodeError:
            meta = {}
        sp = meta.get("spacing")
        if isinstance(sp, int | float):
            spacing = [float(sp)] * ndim
        elif isinstance(sp, list) and len(sp) == ndim:
            spacing = [float(v) for v in sp]
        unit = meta.get("unit", unit)
        if sp is not None:
            return tuple(spacing), unit
    # 2. ImageJ hyperstack: Z spacing in the description, Y/X from the resolution tags
    ij = tif.imagej_metadata or {}
    xres = page.tags.get("XResolution")
    yres = page.tags.get("YResolution")
    res_unit = page.tags.get("ResolutionUnit")
    has_res = xres is not None and (ij or (res_unit is not None and res_unit.value != 1))
    if has_res and ndim >= 2:
        for axis, tag in ((-1, xres), (-2, yres)):
            if tag is not None:
                num, den = tag.value
                if num > 0:
                    spacing[axis] = den / num
    if ij:
        unit = ij.get("unit", unit)
        if ndim >= 3 and "spacing" in ij:
            spacing[-3] = float(ij["spacing"])
    return tuple(spacing), unit


def read_image(path: str | os.PathLike[str]) -> ImageFile:
    """Read a TIFF (or, through scikit-image, a PNG/JPEG) image with its voxel spacing.

    Parameters
    ----------
    path : str or PathLike
        File to read.

    Returns
    -------
    ImageFile
        The array in file order (napari's ``(Z, Y, X)``; RGB stays last) and its spacing.

    Raises
    ------
    InputError
        If the file does not exist or cannot be read as an image.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected an image file")
    if p.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(p) as tif:
                data = tif.asarray()
                is_rgb = tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
                spatial = data.ndim - 1 if is_rgb else data.ndim
                spacing, unit = _spacing_from_tiff(tif, spatial)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise InputError(f"{p}: not a readable TIFF image ({exc})") from exc
        return ImageFile(np.asarray(data), spacing, unit, p)
    try:
        from skimage.io import imread

        data = imread(p)
    except Exception as exc:  # skimage raises many types for foreign files
        raise InputError(f"{p}: cannot read as an image ({exc})") from exc
    spatial = data.ndim - 1 if data.ndim == 3 and data.shape[-1] in (3, 4) else data.ndim
    return ImageFile(np.asarray(data), (1.0,) * spatial, None, p)


def write_image(
    path: str | os.PathLike[str],
    data: NDArray,
    *,
    spacing: tuple[float, ...] | None = None,
    unit: str | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write an array as a TIFF atomically, recording the spacing.

    The spacing goes into tifffile's JSON description (read back by :func:`read_image`) and,
    for Y and X, the resolution tags that other readers use.

    Parameters
    ----------
    path : str or PathLike
        Destination; its folder is created if needed. An existing file is replaced only once the
        new one is complete.
    data : ndarray
        Array in ``(Z, Y, X)`` or ``(Y, X)`` order.
    spacing : tuple of float, optional
        One entry per axis of ``data``.
    """
    p = Path(path)
    if p.suffix.lower() not in TIFF_SUFFIXES:
        raise InputError(f"{p}: output must be a .tif or .tiff file")
    arr = np.ascontiguousarray(data)
    meta: dict[str, object] = {"axes": "ZYX"[-arr.ndim :]} if arr.ndim <= 3 else {}
    kwargs: dict[str, object] = {}
    if spacing is not None:
        if len(spacing) != arr.ndim:
            raise InputError(
                f"spacing {tuple(spacing)} has {len(spacing)} entries for a {arr.ndim}D array"
            )
        meta["spacing"] = [float(s) for s in spacing]
        if arr.ndim >= 2 and all(s > 0 for s in spacing[-2:]):
            kwargs["resolution"] = (1.0 / spacing[-1], 1.0 / spacing[-2])
    if unit:
        meta["unit"] = unit
    with atomic_path(p) as tmp:
        tifffile.imwrite(
            tmp, arr, metadata=meta, compression=compression, photometric="minisblack", **kwargs
        )
    logger.info("wrote %s %s %s", p, arr.shape, arr.dtype)
    return p
