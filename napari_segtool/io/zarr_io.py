"""Zarr arrays and OME-Zarr images: lazy reading and chunked, multiscale writing.

Reading (:func:`read_zarr`) follows the OME-NGFF spec's attributes (``multiscales`` at the
top of the group's attributes in 0.4, under ``ome`` in 0.5) through :mod:`zarr` itself, so
nothing is loaded: :attr:`ImageFile.data` is the level-0 ``zarr.Array`` and
:attr:`ImageFile.levels` holds every level for display. Writing (:func:`write_ome_zarr`) goes
level by level with :func:`dask.array.store` (block-wise) and the metadata by
:func:`ome_zarr.writer.write_multiscales_metadata`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_segtool.errors import InputError
from napari_segtool.io.tiff import ImageFile

logger = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
#: More elements than this in a store's declared shape is refused as absurd (2**48: 256 TiB
#: of uint8), before anything is read.
MAX_ELEMENTS = 2**48
#: OME-NGFF unit names (UDUNITS) and the short names the rest of the package uses.
_UNITS = {
    "millimeter": "mm",
    "micrometer": "um",
    "nanometer": "nm",
    "centimeter": "cm",
    "meter": "m",
    "angstrom": "A",
}
_UNIT_ALIASES = {
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "\\u00B5m": "micrometer",
}
#: Our axis letters and the OME-NGFF axis (name, type) they become.
_OME_AXES = {"T": ("t", "time"), "C": ("c", "channel"), "Z": ("z", "space"),
             "Y": ("y", "space"), "X": ("x", "space")}  # fmt: skip


def is_zarr_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a zarr store (a folder ending in ``.zarr``)."""
    return Path(path).suffix.lower() == ZARR_SUFFIX


def _check_array(arr: Any, p: Path, what: str) -> None:
    shape = tuple(int(n) for n in arr.shape)
    if not shape or min(shape) < 1 or math.prod(shape) > MAX_ELEMENTS:
        raise InputError(f"{p}: {what} has an unusable shape {shape}")
    kind = np.dtype(arr.dtype).kind
    if kind not in "biuf":
        raise InputError(f"{p}: {what} has dtype {arr.dtype}; an image must be numeric")


def _short_unit(unit: object) -> str | None:
    if not isinstance(unit, str) or not unit:
        return None
    return _UNITS.get(unit, unit)


def _ome_unit(unit: str | None) -> str | None:
    """The OME-NGFF name of ``unit`` (``"mm"`` -> ``"millimeter"``); None if not one."""
    if not unit:
        return None
    long = _UNIT_ALIASES.get(unit, unit)
    by_short = {v: k for k, v in _UNITS.items()}
    long = by_short.get(long, long)
    return long if long in _UNITS else None


def _scale_of(transforms: object, ndim: int) -> list[float]:
    """The ``scale`` entry of a list of coordinate transformations (1s when absent)."""
    scale = [1.0] * ndim
    if transforms is None:
        return scale
    if not isinstance(transforms, list):
        raise ValueError("coordinateTransformations must be a list")
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == "scale":
            values = t.get("scale")
            if not isinstance(values, list) or len(values) != ndim:
                raise ValueError(f"scale {values!r} must have one number per axis ({ndim})")
            scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
    return scale


def _multiscale(attrs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first multiscale of a group's attributes and the spec version (0.4 or 0.5)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        ms, version = ome["multiscales"], str(ome.get("version", "0.5"))
    elif "multiscales" in attrs:
        ms = attrs["multiscales"]
        version = str(ms[0].get("version", "0.4")) if ms and isinstance(ms[0], dict) else "0.4"
    else:
        raise ValueError("a zarr group without OME-Zarr multiscales metadata")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise ValueError("multiscales must be a non-empty list")
    return ms[0], version


def _axes_letters(axes: object, ndim: int) -> tuple[str, list[str | None]]:
    if not isinstance(axes, list) or len(axes) != ndim:
        raise ValueError(f"axes {axes!r} must name each of the {ndim} axes")
    letters, units = "", []
    for a in axes:
        name = (a.get("name") if isinstance(a, dict) else a) or ""
        if not isinstance(name, str) or name.lower() not in "tczyx" or len(name) != 1:
            raise ValueError(f"axis {a!r} is none of t, c, z, y, x")
        letters += name.upper()
        units.append(_short_unit(a.get("unit")) if isinstance(a, dict) else None)
    if len(set(letters)) != len(letters) or not {"Y", "X"} <= set(letters):
        raise ValueError(f"axes {letters.lower()!r} must hold y and x once each")
    return letters, units


def read_zarr(path: str | os.PathLike[str]) -> ImageFile:
    """Open a zarr array or an OME-Zarr image (NGFF 0.4 or 0.5) lazily.

    Parameters
    ----------
    path : str or PathLike
        A zarr store folder: a plain array (axes ``YX``, ``ZYX`` or ``CZYX`` by its number of
        dimensions, spacing 1) or a group with OME-Zarr ``multiscales`` metadata.

    Returns
    -------
    ImageFile
        ``data`` is the level-0 ``zarr.Array`` (nothing is read); ``levels`` every level,
        finest first; ``spacing`` the level-0 scale of the space axes (``(Z, Y, X)``), combined
        with the multiscale's own scale if it has one; ``unit`` the space axes' unit (short
        names: ``"mm"``, ``"um"``, ``"nm"``); a ``c`` axis is the channel axis.

    Raises
    ------
    InputError
        One line naming the path: no store, missing or garbled metadata, an absurd shape, a
        dtype that is not numeric.
    """
    import zarr

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such zarr store")
    try:
        node = zarr.open(p, mode="r")
    except Exception as exc:  # zarr raises many types for damaged stores
        raise InputError(f"{p}: not a readable zarr store ({type(exc).__name__}: {exc})") from exc
    if isinstance(node, zarr.Array):
        _check_array(node, p, "the array")
        if node.ndim not in (2, 3, 4):
            raise InputError(
                f"{p}: a plain zarr array of {node.ndim} dimensions; write 2 (YX), 3 (ZYX) or "
                "4 (CZYX), or add OME-Zarr metadata naming the axes"
            )
        axes = ("YX", "ZYX", "CZYX")[node.ndim - 2]
        spatial = sum(a in "ZYX" for a in axes)
        return ImageFile(node, (1.0,) * spatial, None, p, axes, levels=(node,))
    return _read_ome(node, p)


def _levels(node: Any, datasets: object) -> list[Any]:
    """The arrays the multiscale's datasets name, each checked to stay inside the store."""
    import zarr

    if not isinstance(datasets, list) or not datasets:
        raise ValueError("multiscales has no datasets")
    levels = []
    for ds in datasets:
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
            raise ValueError(f"dataset {ds!r} has no path")
        rel = Path(ds["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"dataset path {ds['path']!r} leaves the store")
        level = node[ds["path"]]
        if not isinstance(level, zarr.Array):
            raise ValueError(f"dataset {ds['path']!r} is not an array")
        levels.append(level)
    return levels


def _read_ome(node: Any, p: Path) -> ImageFile:
    """An OME-Zarr group as an :class:`ImageFile` (see :func:`read_zarr`)."""
    try:
        ms, version = _multiscale(dict(node.attrs))
        datasets = ms.get("datasets")
        levels = _levels(node, datasets)
        level0 = levels[0]
        letters, units = _axes_letters(ms.get("axes"), level0.ndim)
        scale = _scale_of(datasets[0].get("coordinateTransformations"), level0.ndim)
        overall = _scale_of(ms.get("coordinateTransformations"), level0.ndim)
    except InputError:
        raise
    except Exception as exc:  # garbled JSON values of every kind
        raise InputError(f"{p}: broken OME-Zarr {version_or(node)} metadata ({exc})") from exc
    for i, level in enumerate(levels):
        _check_array(level, p, f"level {i}")
        if level.ndim != level0.ndim:
            raise InputError(f"{p}: level {i} has {level.ndim} axes, level 0 {level0.ndim}")
    space = [i for i, a in enumerate(letters) if a in "ZYX"]
    spacing = []
    for i in space:
        s = scale[i] * overall[i]
        if not (np.isfinite(s) and s > 0):
            raise InputError(f"{p}: level 0 has the scale {s!r} on axis {letters[i].lower()}")
        spacing.append(float(s))
    space_units = {units[i] for i in space}
    unit = space_units.pop() if len(space_units) == 1 else None
    logger.info("%s: OME-Zarr %s, axes %s, %d levels", p, version, letters, len(levels))
    return ImageFile(level0, tuple(spacing), unit, p, letters, levels=tuple(levels))


def version_or(node: Any) -> str:
    """The OME-Zarr version a group's attributes claim, for messages ('' if none)."""
    try:
        ome = node.attrs.get("ome")
        return str(ome.get("version", "")) if isinstance(ome, dict) else ""
    except Exception:
        return ""


def _canonical(data: Any, axes: str) -> tuple[Any, str]:
    """``data`` (dask) transposed to OME-NGFF order (t, c, z, y, x); RGB ``S`` becomes ``c``."""
    axes = axes.replace("S", "C")
    if set(axes) - set(_OME_AXES) or len(set(axes)) != len(axes):
        raise InputError(f"axes {axes!r} cannot be written as OME-Zarr (t, c, z, y, x once each)")
    order = sorted(range(len(axes)), key=lambda i: "TCZYX".index(axes[i]))
    if order != list(range(len(axes))):
        data = data.transpose(order)
    return data, "".join(axes[i] for i in order)


def _default_levels(yx: Sequence[int]) -> int:
    """Halve y and x until the smaller falls below 64 (at most 8 levels)."""
    n = 1
    while n < 8 and min(yx) // 2**n >= 64:
        n += 1
    return n


def write_ome_zarr(
    path: str | os.PathLike[str],
    data: Any,
    *,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    axes: str | None = None,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` (numpy, zarr or dask) as a chunked, multiscale OME-Zarr image.

    The format is OME-NGFF 0.5 (zarr v3), the default of the installed ``ome-zarr`` writer,
    whose :func:`~ome_zarr.writer.write_multiscales_metadata` writes the metadata.
    Level ``k`` takes every second voxel of level ``k - 1`` in y and x, and in z while the z
    spacing is no coarser than the y spacing (nearest-neighbour subsampling: exact for labels,
    and it never mixes values); each level's scale transform holds its spacing. Everything is
    computed block-wise by dask from ``data``, so peak memory is a few chunks, not the volume.

    Parameters
    ----------
    path : str or PathLike
        The store to write, a folder ending in ``.zarr``. It is written to a temporary folder
        beside it and renamed into place when complete.
    data : array-like
        In the order ``axes`` names (default ``YX``/``ZYX``/``CZYX`` by dimensions).
    spacing : sequence of float, optional
        One entry per spatial axis (``Z, Y, X``); default 1.
    unit : str, optional
        Length unit (``"mm"``, ``"um"``, ``"nm"`` or an OME-NGFF name such as
        ``"micrometer"``); an unknown unit is left out with a warning.
    axes : str, optional
        Axis letters of ``data`` (``T``, ``C``, ``Z``, ``Y``, ``X``; RGB ``S`` is written as
        ``c``); transposed to the ``t, c, z, y, x`` order the spec requires.
    chunks : sequence of int, optional
        Chunk shape of the spatial axes (or of every axis); default 1 x 256 x 256 for 3D,
        256 x 256 for 2D (one per channel/time point).
    levels : int, optional
        Number of levels including the full resolution; default until y or x drops below 64.
    overwrite : bool
        Replace an existing store (only once the new one is complete).

    Returns
    -------
    Path
        ``path``.
    """
    import dask.array as da

    p = Path(path)
    if not is_zarr_path(p):
        raise InputError(f"{p}: an OME-Zarr output must be a folder ending in .zarr")
    if p.exists() and not overwrite:
        raise InputError(f"{p}: exists; pass overwrite=True (--overwrite) to replace it")
    ndim = len(data.shape)
    if axes is None:
        if ndim not in (2, 3, 4):
            raise InputError(f"a {ndim}-dimensional array needs axes, e.g. 'TCZYX'")
        axes = ("YX", "ZYX", "CZYX")[ndim - 2]
    if len(axes) != ndim:
        raise InputError(f"axes {axes!r} do not match the shape {tuple(data.shape)}")
    _check_array(data, p, "the image")
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=_chunks_of(data))
    arr, axes = _canonical(arr, axes)
    space = [i for i, a in enumerate(axes) if a in "ZYX"]
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * len(space)))
    if len(spacing) != len(space) or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing {spacing} must be {len(space)} positive numbers")
    target = _target_chunks(arr.shape, axes, chunks)
    y, x = axes.index("Y"), axes.index("X")
    n_levels = levels if levels is not None else _default_levels((arr.shape[y], arr.shape[x]))
    if n_levels < 1:
        raise InputError(f"levels {n_levels} must be at least 1")
    ome_unit = _ome_unit(unit)
    if unit and ome_unit is None:
        logger.warning("%s: the unit %r is no OME-NGFF unit; it is left out", p, unit)
    pyramid, transforms = _pyramid(arr, axes, spacing, target, n_levels)
    ome_axes = []
    for a in axes:
        name, kind = _OME_AXES[a]
        entry = {"name": name, "type": kind}
        if kind == "space" and ome_unit:
            entry["unit"] = ome_unit
        ome_axes.append(entry)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=p.name + ".tmp-", dir=p.parent))
    try:
        _store(tmp, pyramid, transforms, ome_axes, name=p.stem)
        if p.exists():  # overwrite: only now that the new store is complete
            shutil.rmtree(p)
        tmp.rename(p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %d levels, %s %s", p, len(pyramid), tuple(arr.shape), arr.dtype)
    return p


def _pyramid(
    arr: Any, axes: str, spacing: tuple[float, ...], target: tuple[int, ...], n_levels: int
) -> tuple[list[Any], list[list[dict[str, Any]]]]:
    """The dask levels (rechunked to ``target``) and their scale transforms."""
    ndim = arr.ndim
    space = [i for i, a in enumerate(axes) if a in "ZYX"]
    y = axes.index("Y")
    pyramid, transforms = [], []
    scale = [1.0] * ndim
    for i, s in zip(space, spacing, strict=True):
        scale[i] = s
    level = arr
    for k in range(n_levels):
        if k:
            step = [1] * ndim
            for i in space:
                is_z = axes[i] == "Z"
                if level.shape[i] >= 2 and (not is_z or scale[i] <= scale[y]):
                    step[i] = 2
            if step == [1] * ndim:
                break
            level = level[tuple(slice(None, None, s) for s in step)]
            scale = [a * b for a, b in zip(scale, step, strict=True)]
        pyramid.append(
            level.rechunk(tuple(min(c, n) for c, n in zip(target, level.shape, strict=True)))
        )
        transforms.append([{"type": "scale", "scale": list(scale)}])
    return pyramid, transforms


def _store(
    tmp: Path,
    pyramid: list[Any],
    transforms: list[list[dict[str, Any]]],
    ome_axes: list[dict[str, str]],
    *,
    name: str,
) -> None:
    """Write the levels block by block, then the OME-Zarr metadata, into the group ``tmp``."""
    import dask.array as da
    import zarr

    with warnings.catch_warnings():  # importing ome-zarr 0.18's writer warns about itself
        warnings.filterwarnings("ignore", "Call to deprecated class Scaler", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(tmp, mode="w")
    datasets = []
    for k, (lv, tr) in enumerate(zip(pyramid, transforms, strict=True)):
        out = group.create_array(
            f"s{k}", shape=lv.shape, chunks=lv.chunksize, dtype=lv.dtype,
            dimension_names=[e["name"] for e in ome_axes],
        )  # fmt: skip
        da.store(lv, out, lock=False)  # block by block
        datasets.append({"path": f"s{k}", "coordinateTransformations": tr})
    write_multiscales_metadata(group, datasets, axes=ome_axes, name=name)


def _chunks_of(data: Any) -> Any:
    """Chunks to read ``data`` with: its own (zarr), else dask's automatic ones."""
    chunks = getattr(data, "chunks", None)
    if isinstance(chunks, tuple) and all(isinstance(c, int) for c in chunks):
        return chunks
    return "auto"


def _target_chunks(
    shape: Sequence[int], axes: str, chunks: Sequence[int] | None
) -> tuple[int, ...]:
    """Chunk shape over every axis from one over the spatial axes (or over all)."""
    n_space = sum(a in "ZYX" for a in axes)
    if chunks is None:
        chunks = (1, 256, 256)[-n_space:] if n_space == 3 else (256, 256)
    chunks = tuple(int(c) for c in chunks)
    if min(chunks, default=0) < 1:
        raise InputError(f"chunks {chunks} must be positive integers")
    if len(chunks) == len(shape):
        return chunks
    if len(chunks) == n_space:
        it = iter(chunks)
        return tuple(next(it) if a in "ZYX" else 1 for a in axes)
    if len(chunks) == 3 and n_space == 2:  # 1,256,256 given for a 2D image
        return _target_chunks(shape, axes, chunks[1:])
    raise InputError(f"chunks {chunks} must have one entry per spatial axis ({n_space})")
