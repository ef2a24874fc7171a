"""TIFF input and output with voxel spacing, via tifffile."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import atomic_path

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


# Errors tifffile and the codecs it calls raise on damaged or foreign files (found by fuzzing
# truncated and corrupted TIFFs): reported as "not a readable TIFF", never as a traceback.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tifffile.TiffFileError,
    ValueError,
    OSError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    RuntimeError,
    NotImplementedError,
    AssertionError,
    OverflowError,
    MemoryError,
)

#: Axis letters of :attr:`ImageFile.axes`: spatial ``Z, Y, X``; ``C`` channels; ``S`` colour
#: samples (RGB or RGBA, always last); ``T`` time; ``Q`` anything else.
SPATIAL_AXES = "ZYX"


@dataclass(frozen=True)
class ImageFile:
    """An image read from disk with its voxel spacing and axes.

    ``spacing`` has one entry per spatial axis in napari order (``(Z, Y, X)`` or ``(Y, X)``);
    ``unit`` is the length unit when the file says it, else ``None``; ``axes`` names each axis
    of ``data`` (see :func:`read_image`), e.g. ``"ZYX"``, ``"YX"``, ``"YXS"`` (RGB) or
    ``"CZYX"``. Medical formats (:mod:`napari_segtool.io.medical`) also give ``origin`` (the
    physical position of voxel 0) and the ``direction`` matrix, both in ``(Z, Y, X)`` order;
    TIFFs have neither (None). Lazily read images (zarr, OME-Zarr, ``read_image(...,
    lazy=True)`` TIFFs) have a ``zarr.Array`` as ``data`` and every resolution level, finest
    first, in ``levels`` (empty for images read into memory).
    """

    data: NDArray
    spacing: tuple[float, ...]
    unit: str | None
    path: Path
    axes: str = ""
    origin: tuple[float, ...] | None = None
    direction: tuple[tuple[float, ...], ...] | None = None
    levels: tuple[Any, ...] = ()

    @property
    def rgb(self) -> bool:
        """Whether the last axis holds RGB(A) colour samples."""
        return self.axes.endswith("S")

    @property
    def channel_axis(self) -> int | None:
        """Index of the channel axis (``C``), if the file declares one."""
        i = self.axes.find("C")
        return i if i >= 0 else None

    def close(self) -> None:
        """Close the files a lazily read image keeps open (a TIFF's zarr store); a no-op else.

        Its ``data`` and ``levels`` cannot be read afterwards.
        """
        for level in self.levels:
            close = getattr(getattr(level, "store", None), "close", None)
            if callable(close):
                close()

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes (2 or 3 for the images this package handles)."""
        return sum(a in SPATIAL_AXES for a in self.axes)


def _error_name(exc: BaseException) -> str:
    """``struct.error``, ``zlib.error``, ``tifffile.TiffFileError``, ``ValueError``."""
    module = type(exc).__module__.split(".")[0]
    name = type(exc).__name__
    return name if module == "builtins" else f"{module}.{name}"


def _positive_spacing(values: list[float], path: object) -> list[float]:
    """Spacing entries that are not finite and positive become 1 (with a warning)."""
    out = []
    for v in values:
        if np.isfinite(v) and v > 0:
            out.append(float(v))
        else:
            logger.warning("%s: ignoring the voxel size %r in the file (using 1)", path, v)
            out.append(1.0)
    return out


def _spacing_from_tiff(tif: tifffile.TiffFile, ndim: int) -> tuple[tuple[float, ...], str | None]:
    page = tif.pages[0]
    # 1. tifffile's own JSON description: {"spacing": s | [..], "unit": "mm"}
    desc = page.description if hasattr(page, "description") else ""
    spacing, unit = _spacing_from_json(desc, ndim) if desc.startswith("{") else (None, None)
    if spacing is not None:
        return tuple(_positive_spacing(spacing, tif.filename)), unit
    # 2. ImageJ hyperstack: Z spacing in the description, Y/X from the resolution tags
    spacing = [1.0] * ndim
    ij = tif.imagej_metadata or {}
    _spacing_from_resolution(page, spacing, imagej=bool(ij))
    if ij:
        u = ij.get("unit", unit)
        unit = u if isinstance(u, str) else None
        if ndim >= 3 and "spacing" in ij:
            try:
                spacing[-3] = float(ij["spacing"])
            except (TypeError, ValueError):
                logger.warning("%s: ignoring the ImageJ spacing %r", tif.filename, ij["spacing"])
    return tuple(_positive_spacing(spacing, tif.filename)), unit


def _spacing_from_json(desc: str, ndim: int) -> tuple[list[float] | None, str | None]:
    """Spacing (None if absent or malformed) and unit from tifffile's JSON description."""
    try:
        meta = json.loads(desc)
    except json.JSONDecodeError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    u = meta.get("unit")
    unit = u if isinstance(u, str) else None
    sp = meta.get("spacing")

    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if number(sp):
        return [float(sp)] * ndim, unit
    if isinstance(sp, list) and len(sp) == ndim and all(number(v) for v in sp):
        return [float(v) for v in sp], unit
    return None, unit


def _spacing_from_resolution(page: Any, spacing: list[float], *, imagej: bool) -> None:
    """Y and X spacing from the resolution tags, in place (when the file means them)."""
    xres = page.tags.get("XResolution")
    yres = page.tags.get("YResolution")
    res_unit = page.tags.get("ResolutionUnit")
    has_res = xres is not None and (imagej or (res_unit is not None and res_unit.value != 1))
    if not has_res or len(spacing) < 2:
        return
    for axis, tag in ((-1, xres), (-2, yres)):
        if tag is not None:
            num, den = tag.value
            if num > 0 and den > 0:
                spacing[axis] = den / num


def reading_axes(file_axes: str, shape: tuple[int, ...], *, photometric_rgb: bool) -> str:
    """The axes :func:`read_image` gives an array whose TIFF series declares ``file_axes``.

    The one reading rule of every command and widget:

    - ``Y``, ``X``, ``Z``, ``C`` (channels) and ``T`` keep their meaning;
    - interleaved samples (``S`` last, as in ``YXS``) are colour (``S``) when there are 3 or 4
      and the file says RGB, else channels (``C``);
    - samples stored as separate planes (``SYX``) are what tifffile writes for any 3- or
      4-slice array saved without ``photometric=``; they are read as slices (``Z``) unless the
      file has a Z axis already (then channels);
    - one other axis (``Q`` unknown, ``I`` a plain sequence of pages, ...) with no Z is ``Z``:
      a plain multi-page stack; further unknown axes stay ``Q``.

    Examples
    --------
    >>> reading_axes("SYX", (3, 64, 64), photometric_rgb=True)
    'ZYX'
    >>> reading_axes("YXS", (64, 64, 3), photometric_rgb=True)
    'YXS'
    >>> reading_axes("IYX", (4, 64, 64), photometric_rgb=False)
    'ZYX'
    >>> reading_axes("QYXS", (5, 64, 64, 3), photometric_rgb=True)
    'ZYXS'
    """
    axes = list(file_axes.upper())
    if len(axes) != len(shape):
        raise ValueError(f"axes {file_axes!r} do not match the shape {shape}")
    for i, a in enumerate(axes):
        if a == "S":
            last = i == len(axes) - 1
            if last and photometric_rgb and shape[i] in (3, 4):
                axes[i] = "S"
            elif not last and "Z" not in axes:
                axes[i] = "Z"
            else:
                axes[i] = "C"
        elif a not in "ZYXCT":
            axes[i] = "Q"
    if "Z" not in axes and axes.count("Q") == 1:
        axes[axes.index("Q")] = "Z"
    return "".join(axes)


def read_image(path: str | os.PathLike[str], *, lazy: bool = False) -> ImageFile:
    """Read a TIFF, a medical volume (or, through scikit-image, a PNG/JPEG) with its spacing.

    Parameters
    ----------
    path : str or PathLike
        File to read: TIFF; NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``),
        MetaImage (``.mha``, ``.mhd``) or a folder of DICOM slices of one series
        (``FOLDER::SERIESUID`` picks one of several), with their origin and direction
        (:mod:`napari_segtool.io.medical`, needs the ``[medical]`` extra); a zarr array or
        OME-Zarr image (a folder ending in ``.zarr``, always lazy:
        :func:`napari_segtool.io.zarr_io.read_zarr`); PNG/JPEG.
    lazy : bool
        TIFFs only: give a ``zarr.Array`` over the file (tifffile's zarr store) instead of
        reading it, with no memory check; pyramid levels of the file land in ``levels``. The
        file stays open while the array is used. Other formats ignore it.

    Returns
    -------
    ImageFile
        The array in file order (napari's ``(Z, Y, X)``; RGB stays last), its spacing and
        axes.

    Raises
    ------
    InputError
        If the file does not exist, cannot be read as an image, or would need more memory
        than is available (checked from the header, before reading the pixels).

    Notes
    -----
    Axes come from the file's declaration (tifffile's series axes: ImageJ hyperstacks, the
    shaped JSON description, the photometric and planar-configuration tags), through
    :func:`reading_axes`, so every command reads a file the same way: a 3- or 4-slice stack
    is a stack however it was written, and colour is RGB stored interleaved.
    """
    from napari_segtool.io.medical import read_medical_path
    from napari_segtool.io.memory import check_allocation
    from napari_segtool.io.zarr_io import is_zarr_path, read_zarr

    if is_zarr_path(path):
        return read_zarr(path)
    medical = read_medical_path(path)  # NIfTI, NRRD, MetaImage, a DICOM folder; else None
    if medical is not None:
        return medical
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(p) as tif:
                if not tif.series:
                    raise InputError(f"{p}: the TIFF holds no image")
                series = tif.series[0]
                shape = tuple(int(n) for n in series.shape)
                dtype = np.dtype(series.dtype)
                photometric_rgb = series.keyframe.photometric in (
                    tifffile.PHOTOMETRIC.RGB,
                    tifffile.PHOTOMETRIC.YCBCR,
                )
                axes = reading_axes(series.axes, shape, photometric_rgb=photometric_rgb)
                if lazy:
                    spatial = sum(a in SPATIAL_AXES for a in axes)
                    spacing, unit = _spacing_from_tiff(tif, spatial)
                    return _lazy_tiff(p, shape, axes, spacing, unit)
                nbytes = math.prod(shape) * dtype.itemsize
                check_allocation(
                    nbytes,
                    what=f"{p}: a {' x '.join(map(str, shape))} {dtype} image ({axes})",
                    hint=(
                        "crop it or split it into tiles (smaller files) before opening it, or "
                        "convert it to a chunked format (zarr) for block-wise, larger-than-memory "
                        "processing"
                    ),
                )
                data = series.asarray()
                spatial = sum(a in SPATIAL_AXES for a in axes)
                spacing, unit = _spacing_from_tiff(tif, spatial)
        except InputError:
            raise
        except _READ_ERRORS as exc:
            raise InputError(
                f"{p}: not a readable TIFF image ({_error_name(exc)}: {exc}); the file is "
                "damaged, truncated or not a TIFF"
            ) from exc
        if data.shape != shape:
            raise InputError(f"{p}: the TIFF declares shape {shape} but holds {data.shape}")
        if axes != series.axes:
            logger.info("%s: axes %s in the file are read as %s", p, series.axes, axes)
        return ImageFile(np.asarray(data), spacing, unit, p, axes)
    try:
        from skimage.io import imread

        data = imread(p)
    except Exception as exc:  # skimage raises many types for foreign files
        raise InputError(f"{p}: cannot read as an image ({exc})") from exc
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4)
    axes = "YXS" if rgb else "ZYX"[-data.ndim :] if data.ndim <= 3 else "Q" * data.ndim
    spatial = sum(a in SPATIAL_AXES for a in axes)
    return ImageFile(np.asarray(data), (1.0,) * spatial, None, p, axes)


def _lazy_tiff(
    p: Path, shape: tuple[int, ...], axes: str, spacing: tuple[float, ...], unit: str | None
) -> ImageFile:
    """The first series of a TIFF as a ``zarr.Array`` (tifffile's store; nothing is read)."""
    import zarr

    node = zarr.open(tifffile.imread(p, aszarr=True, series=0), mode="r")
    if isinstance(node, zarr.Array):
        levels = (node,)
    else:  # a pyramidal TIFF: tifffile gives a group with one array per level, "0" first
        levels = tuple(node[k] for k in sorted(node.array_keys(), key=int))
    if tuple(levels[0].shape) != shape:
        raise InputError(f"{p}: the TIFF declares shape {shape} but holds {levels[0].shape}")
    return ImageFile(levels[0], spacing, unit, p, axes, levels=levels)


def write_image(
    path: str | os.PathLike[str],
    data: NDArray,
    *,
    spacing: tuple[float, ...] | None = None,
    unit: str | None = None,
    axes: str | None = None,
    compression: str | None = "zlib",
    origin: tuple[float, ...] | None = None,
    direction: object = None,
) -> Path:
    """Write an array as a TIFF (or a medical volume) atomically, with spacing and axes.

    The spacing and axes go into tifffile's JSON description (read back by
    :func:`read_image`) and, for Y and X, the resolution tags that other readers use. A path
    ending in ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` is written by
    :func:`napari_segtool.io.medical.write_medical` with the spacing, ``origin`` and
    ``direction`` (``(Z, Y, X)`` order, mm); a TIFF keeps the spacing only.

    Parameters
    ----------
    path : str or PathLike
        Destination; its folder is created if needed. An existing file is replaced only once the
        new one is complete.
    data : ndarray
        Array in ``(Z, Y, X)`` or ``(Y, X)`` order, or in the order ``axes`` names.
    spacing : tuple of float, optional
        One entry per spatial axis (``Z``, ``Y``, ``X``) of ``data``.
    unit : str, optional
        Length unit of the spacing.
    axes : str, optional
        One letter per axis of ``data`` (``Z, Y, X``, ``C`` channels, e.g. ``"CZYX"`` for
        class probabilities); default ``"ZYX"`` or ``"YX"`` by the number of axes.
    compression : str or None
        tifffile compression.
    origin : tuple of float, optional
        Physical position of voxel 0 (medical formats only).
    direction : array-like, optional
        Direction matrix in ``(Z, Y, X)`` order (medical formats only).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.tif"
    >>> probs = np.zeros((2, 3, 4, 5), np.float32)
    >>> _ = write_image(f, probs, spacing=(2.0, 0.5, 0.5), axes="CZYX")
    >>> back = read_image(f)
    >>> back.axes, back.spacing
    ('CZYX', (2.0, 0.5, 0.5))
    """
    from napari_segtool.io.medical import MEDICAL_SUFFIXES, UNIT, medical_suffix, write_medical

    p = Path(path)
    if medical_suffix(p) is not None:
        if unit and unit != UNIT:
            logger.warning("%s: the spacing is in %s; this format records mm", p, unit)
        return write_medical(
            p, data, spacing=spacing, origin=origin, direction=direction, axes=axes
        )
    if p.suffix.lower() not in TIFF_SUFFIXES:
        raise InputError(
            f"{p}: output must be a .tif or .tiff file, or {', '.join(MEDICAL_SUFFIXES)}"
        )
    moved = origin is not None and any(origin)
    d = None if direction is None else np.asarray(direction, dtype=float)
    turned = d is not None and not np.allclose(d, np.eye(len(d)))
    if moved or turned:
        logger.warning(
            "%s: a TIFF keeps the spacing only, not the origin and the direction of the source; "
            "write .nii.gz, .nrrd or .mha to keep them",
            p,
        )
    arr = np.ascontiguousarray(data)
    if axes is None and arr.ndim <= 3:
        axes = "ZYX"[-arr.ndim :]
    if axes is not None and (len(axes) != arr.ndim or set(axes) - set("ZYXCT")):
        raise InputError(
            f"axes {axes!r} must give one of Z, Y, X, C, T per axis of the {arr.shape} array"
        )
    meta: dict[str, object] = {"axes": axes} if axes else {}
    kwargs: dict[str, object] = {}
    if spacing is not None:
        n_spatial = sum(a in SPATIAL_AXES for a in axes) if axes else arr.ndim
        if len(spacing) != n_spatial:
            raise InputError(
                f"spacing {tuple(spacing)} has {len(spacing)} entries for {n_spatial} spatial "
                f"axes of a {arr.shape} array"
            )
        meta["spacing"] = [float(s) for s in spacing]
        if n_spatial >= 2 and all(s > 0 for s in spacing[-2:]):
            kwargs["resolution"] = (1.0 / spacing[-1], 1.0 / spacing[-2])
    if unit:
        meta["unit"] = unit
    with atomic_path(p) as tmp:
        tifffile.imwrite(
            tmp, arr, metadata=meta, compression=compression, photometric="minisblack", **kwargs
        )
    logger.info("wrote %s %s %s", p, arr.shape, arr.dtype)
    return p
