"""napari reader and writer contributions for medical volumes (see ``napari.yaml``).

Plain functions over paths, arrays and dicts: no Qt and no napari import (import-linter
checks it), so they are tested without a viewer too.

- :func:`get_reader`: NIfTI, NRRD, MetaImage files and folders of DICOM slices become an
  Image layer with ``scale`` from the voxel spacing and ``translate`` from the origin (both
  ``(Z, Y, X)``, mm); the full geometry, direction included, is kept in the layer's
  ``metadata[GEOMETRY_KEY]``, and the Segment widget passes it on to its prediction.
- :func:`write_labels`: a Labels layer written as NIfTI, NRRD or MetaImage in the geometry of
  its source image (``metadata[GEOMETRY_KEY]``), or else with the layer's scale and translate
  and an identity direction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_segtool.errors import InputError
from napari_segtool.io.medical import (
    GEOMETRY_KEY,
    dicom_series,
    geometry_from_metadata,
    geometry_metadata,
    medical_suffix,
    split_series,
)
from napari_segtool.layer_roles import IMAGE, ROLE_KEY

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _is_dicom_folder(path: Path) -> bool:
    try:
        return bool(dicom_series(path))
    except InputError:  # SimpleITK missing: this reader cannot tell; others may read it
        logger.info("%s: SimpleITK is not installed; not looking for DICOM files", path)
        return False


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """The reader for ``path`` (one medical file or DICOM folder), or None if not ours.

    A folder without DICOM files gives None, so napari can offer it to other readers.
    """
    if not isinstance(path, str | os.PathLike):
        if len(path) != 1:
            return None
        path = path[0]
    folder, uid = split_series(path)
    p = Path(path)
    if (uid is not None and folder.is_dir()) or (p.is_dir() and _is_dicom_folder(p)):
        return read_layers
    if p.is_file() and medical_suffix(p) is not None:
        return read_layers
    return None


def _layer_name(path: Path) -> str:
    suffix = medical_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read one medical file or DICOM folder as napari layer data (an Image layer).

    Raises
    ------
    InputError
        For a damaged, truncated or foreign file, a folder mixing series, or missing
        SimpleITK (napari shows the one line).
    """
    from napari_segtool.io import read_image

    if not isinstance(path, str | os.PathLike):
        (path,) = path
    image = read_image(path)
    geometry = geometry_metadata(image)
    n = image.spatial_ndim
    kwargs: dict[str, Any] = {
        "name": _layer_name(image.path),
        "scale": tuple(image.spacing),
        "translate": tuple(image.origin or (0.0,) * n),
        "metadata": {ROLE_KEY: IMAGE, **({GEOMETRY_KEY: geometry} if geometry else {})},
    }
    if image.rgb:
        kwargs["rgb"] = True
    elif image.channel_axis is not None:
        kwargs["channel_axis"] = image.channel_axis
    return [(image.data, kwargs, "image")]


def _geometry(
    data: np.ndarray, meta: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray | None]:
    """``(spacing, origin, direction)`` for writing ``data`` of a layer with ``meta``."""
    ndim = data.ndim
    geometry = geometry_from_metadata((meta.get("metadata") or {}).get(GEOMETRY_KEY), ndim)
    if geometry is not None:
        spacing, origin, direction = geometry
        scale = meta.get("scale")
        if scale is not None and not np.allclose(np.asarray(scale)[-ndim:], spacing, rtol=1e-6):
            logger.warning(
                "the layer's scale %s differs from its source's spacing %s; writing the "
                "source's geometry, so the labels overlay the source image in other tools",
                tuple(scale), spacing,
            )  # fmt: skip
        return spacing, origin, direction
    scale = tuple(float(v) for v in (meta.get("scale") or (1.0,) * ndim))[-ndim:]
    translate = tuple(float(v) for v in (meta.get("translate") or (0.0,) * ndim))[-ndim:]
    return scale, translate, None


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer as NIfTI, NRRD or MetaImage; napari's single-layer writer.

    Parameters
    ----------
    path : str
        Destination ending in ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or
        ``.mhd``.
    data : array
        The layer's data (the first level of a multiscale layer).
    meta : dict
        The layer's attributes (napari's ``_get_state()``): ``metadata[GEOMETRY_KEY]`` gives
        spacing, origin and direction when the labels come from a medical image with the
        same number of axes; otherwise ``scale`` and ``translate`` with an identity direction.

    Returns
    -------
    list of str
        The path written.
    """
    from napari_segtool.io import write_image

    if isinstance(data, list):  # multiscale: the full-resolution level
        data = data[0]
    arr = np.asarray(data)
    if medical_suffix(path) is None:
        raise InputError(f"{path}: napari-segtool writes labels as .nii.gz, .nrrd or .mha")
    spacing, origin, direction = _geometry(arr, meta)
    write_image(path, arr, spacing=spacing, origin=origin, direction=direction)
    return [str(path)]
