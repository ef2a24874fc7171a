"""Zarr arrays and OME-Zarr images: lazy reading and chunked, multiscale writing.

Reading (:func:`read_zarr`) follows the OME-NGFF spec's attributes (``multiscales`` at the
top of the group's attributes in 0.4, under ``ome`` in 0.5) through :mod:`zarr` itself, so
nothing is loaded: :attr:`ImageFile.data` is the level-0 ``zarr.Array`` and
:attr:`ImageFile.levels` holds every level for display. Writing goes through
:class:`OmeZarrWriter`: the caller fills level 0 block by block (:func:`write_ome_zarr` with
:func:`dask.array.store`; the block engine with its own blocks), then the writer builds the
pyramid chunk by chunk from the stored level and writes the metadata
(:func:`write_ngff_attrs`: the attributes ome-zarr's writer would write). :class:`RegionView`
is a lazy box of any array (numpy, zarr, dask): indexing it reads only the asked part of the
box.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.tiff import ImageFile

logger = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
NGFF_VERSION = "0.5"
"""The OME-NGFF version written (ome-zarr's default, zarr v3)."""
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


def _transforms_of(transforms: object, ndim: int) -> tuple[list[float], list[float] | None]:
    """``(scale, translation)`` of a list of coordinate transformations, applied in order
    (1s and None when absent): a point ``i`` of the array lies at ``scale * i + translation``.
    """
    scale, shift = [1.0] * ndim, None
    if transforms is None:
        return scale, shift
    if not isinstance(transforms, list):
        raise ValueError("coordinateTransformations must be a list")
    for t in transforms:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in ("scale", "translation"):
            continue
        values = t.get(kind)
        if not isinstance(values, list) or len(values) != ndim:
            raise ValueError(f"{kind} {values!r} must have one number per axis ({ndim})")
        numbers = [float(v) for v in values]
        if kind == "scale":
            scale = [a * b for a, b in zip(scale, numbers, strict=True)]
            shift = None if shift is None else [a * b for a, b in zip(shift, numbers, strict=True)]
        else:
            shift = (
                numbers if shift is None else [a + b for a, b in zip(shift, numbers, strict=True)]
            )
    return scale, shift


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
        with the multiscale's own scale if it has one; ``origin`` the position of voxel 0 when
        a ``translation`` says it (else None); ``unit`` the space axes' unit (short names:
        ``"mm"``, ``"um"``, ``"nm"``); a ``c`` axis is the channel axis.

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
        scale, shift = _transforms_of(datasets[0].get("coordinateTransformations"), level0.ndim)
        overall, overall_shift = _transforms_of(ms.get("coordinateTransformations"), level0.ndim)
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
    origin = None
    if shift is not None or overall_shift is not None:  # voxel 0's position: the translation
        t0 = shift or [0.0] * level0.ndim
        t1 = overall_shift or [0.0] * level0.ndim
        origin = tuple(float(overall[i] * t0[i] + t1[i]) for i in space)
        if not all(np.isfinite(origin)):
            raise InputError(f"{p}: level 0 has the translation {origin!r}")
    logger.info("%s: OME-Zarr %s, axes %s, %d levels", p, version, letters, len(levels))
    return ImageFile(level0, tuple(spacing), unit, p, letters, origin=origin,
                     levels=tuple(levels))  # fmt: skip


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
    translation: Sequence[float] | None = None,
    image_label: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` (numpy, zarr or dask) as a chunked, multiscale OME-Zarr image.

    The format is OME-NGFF 0.5 (zarr v3), the default of the installed ``ome-zarr`` writer,
    with the metadata its ``write_multiscales_metadata`` writes (:func:`write_ngff_attrs`).
    Level ``k`` takes every second voxel of level ``k - 1`` in y and x, and in z while the z
    spacing is no coarser than the y spacing (nearest-neighbour subsampling: exact for labels,
    and it never mixes values); each level's scale transform holds its spacing. Level 0 is
    stored block-wise by dask from ``data``, the other levels chunk by chunk from the stored
    level above (:class:`OmeZarrWriter`), so peak memory is a few chunks, not the volume.

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
    translation : sequence of float, optional
        Position of voxel 0 per spatial axis, in the units of ``spacing`` (a ``translation``
        transform on every level); default none.
    image_label : bool
        Mark the store as a label image (OME-NGFF ``image-label`` metadata), so viewers such
        as napari-ome-zarr open it as labels.
    overwrite : bool
        Replace an existing store (only once the new one is complete).

    Returns
    -------
    Path
        ``path``.
    """
    import dask.array as da

    ndim = len(data.shape)
    if axes is None:
        if ndim not in (2, 3, 4):
            raise InputError(f"a {ndim}-dimensional array needs axes, e.g. 'TCZYX'")
        axes = ("YX", "ZYX", "CZYX")[ndim - 2]
    if len(axes) != ndim:
        raise InputError(f"axes {axes!r} do not match the shape {tuple(data.shape)}")
    _check_array(data, Path(path), "the image")
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=_chunks_of(data))
    arr, axes = _canonical(arr, axes)
    with OmeZarrWriter(
        path, shape=arr.shape, dtype=arr.dtype, axes=axes, spacing=spacing, unit=unit,
        translation=translation, chunks=chunks, levels=levels, image_label=image_label,
        overwrite=overwrite,
    ) as writer:  # fmt: skip
        da.store(arr.rechunk(writer.array.chunks), writer.array, lock=False)  # block by block
        return writer.commit()


class OmeZarrWriter:
    """An OME-Zarr image (NGFF 0.5) written block by block: level 0 by the caller, then the
    pyramid and the metadata by :meth:`commit`.

    The store is built in a temporary folder beside ``path`` and renamed into place by
    :meth:`commit`; leaving the ``with`` block without it (or any error) removes the temporary
    folder and leaves ``path`` as it was.

    Parameters
    ----------
    path : str or PathLike
        The store to write, a folder ending in ``.zarr``.
    shape : sequence of int
        Shape of level 0, in the order of ``axes``.
    dtype : dtype
        Its dtype (numeric).
    axes : str, optional
        Axis letters in OME-NGFF order (``T``, ``C``, then ``Z``, ``Y``, ``X``); default
        ``YX``/``ZYX``/``CZYX`` by dimensions.
    spacing : sequence of float, optional
        One entry per spatial axis; default 1.
    unit : str, optional
        Length unit (``"mm"``, ``"um"``, ``"nm"`` or an OME-NGFF name).
    translation : sequence of float, optional
        Position of voxel 0 per spatial axis (units of ``spacing``). Every level gets the
        same translation: level ``k`` subsamples from voxel 0, so its voxel 0 is level 0's.
    chunks : sequence of int, optional
        Chunk shape of the spatial axes (or of every axis), as for :func:`write_ome_zarr`.
        Writes to :attr:`array` that cover whole chunks never read a chunk back.
    levels : int, optional
        Number of levels including level 0; default until y or x drops below 64.
    image_label : bool
        Add OME-NGFF ``image-label`` metadata (a label image).
    overwrite : bool
        Allow replacing an existing store (at :meth:`commit`, once the new one is complete).
    fill_value : int or float
        Value of the voxels of level 0 never written.

    Attributes
    ----------
    array : zarr.Array
        Level 0, to fill (``writer.array[a:b] = block``).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "labels.zarr"
    >>> with OmeZarrWriter(out, shape=(4, 128, 128), dtype="uint8", spacing=(2, 1, 1),
    ...                    chunks=(2, 64, 64), image_label=True) as w:
    ...     for z in range(0, 4, 2):
    ...         w.array[z : z + 2] = z
    ...     _ = w.commit()
    >>> [lv.shape for lv in read_zarr(out).levels]
    [(4, 128, 128), (4, 64, 64)]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shape: Sequence[int],
        dtype: Any,
        axes: str | None = None,
        spacing: Sequence[float] | None = None,
        unit: str | None = None,
        translation: Sequence[float] | None = None,
        chunks: Sequence[int] | None = None,
        levels: int | None = None,
        image_label: bool = False,
        overwrite: bool = False,
        fill_value: float = 0,
    ) -> None:
        import zarr

        p = Path(path)
        if not is_zarr_path(p):
            raise InputError(f"{p}: an OME-Zarr output must be a folder ending in .zarr")
        if p.exists() and not overwrite:
            raise InputError(f"{p}: exists; pass overwrite=True (--overwrite) to replace it")
        shape = tuple(int(n) for n in shape)
        axes, spacing, translation = _geometry(shape, axes, spacing, translation)
        self.path, self.axes, self.image_label = p, axes, image_label
        self._target = _target_chunks(shape, axes, chunks)
        y, x = axes.index("Y"), axes.index("X")
        n_levels = levels if levels is not None else _default_levels((shape[y], shape[x]))
        if n_levels < 1:
            raise InputError(f"levels {n_levels} must be at least 1")
        self._plan = _level_plan(shape, axes, spacing, n_levels)
        self._ome_axes = _ome_axes(axes, unit, p)
        self._shift = None
        if translation is not None:
            it = iter(translation)
            self._shift = [next(it) if a in "ZYX" else 0.0 for a in axes]
        p.parent.mkdir(parents=True, exist_ok=True)
        self._tmp: Path | None = Path(tempfile.mkdtemp(prefix=p.name + ".tmp-", dir=p.parent))
        self._rows: _RowSink | None = None
        try:
            self._group = zarr.open_group(self._tmp, mode="w")
            self._levels = []
            for k, (step, _) in enumerate(self._plan):
                shape = tuple(-(-n // s) for n, s in zip(shape, step, strict=True))
                self._levels.append(self._create(k, shape, dtype, fill_value))
            self.array = self._levels[0]
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> OmeZarrWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op after commit

    def _create(self, k: int, shape: tuple[int, ...], dtype: Any, fill_value: float) -> Any:
        chunks = tuple(min(c, n) for c, n in zip(self._target, shape, strict=True))
        return self._group.create_array(
            f"s{k}", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
            dimension_names=[e["name"] for e in self._ome_axes],
        )  # fmt: skip

    @property
    def rows(self) -> _RowSink:
        """Level 0 written in row order, filling every level as the rows come.

        ``writer.rows[a:b] = block`` (``[:, a:b]`` with a leading channel or time axis) takes
        rows ``[a, b)`` of the first spatial axis, whole planes, in increasing order from 0,
        each once. Each level keeps back fewer rows than one chunk deep until they make up
        whole chunks, so every chunk of every level is written once, whole, and :meth:`commit`
        reads nothing back. Use either ``rows`` or :attr:`array`, not both.
        """
        if self._rows is None:
            space = next(i for i, a in enumerate(self.axes) if a in "ZYX")
            self._rows = _RowSink(self._levels, [step for step, _ in self._plan], space)
        return self._rows

    def commit(self) -> Path:
        """Complete the levels, write the metadata and rename the store into place.

        After writes through :attr:`rows` the levels are complete already (the last rows are
        flushed). After writes to :attr:`array`, level ``k`` is written one chunk at a time,
        each read from the matching box of level ``k - 1`` (every second voxel where the level
        halves): memory stays a few chunks.

        Returns
        -------
        Path
            The store's path.
        """
        if self._tmp is None:
            raise InputError(f"{self.path}: this writer was already committed or aborted")
        if self._rows is not None:  # the levels were filled as the rows came
            self._rows.close()
        else:
            for k in range(1, len(self._levels)):
                _subsample_into(self._levels[k], self._levels[k - 1], self._plan[k][0])
        datasets = _datasets(self._plan, self._shift)
        write_ngff_attrs(self._group, datasets, axes=self._ome_axes, name=self.path.stem,
                         image_label=self.image_label)  # fmt: skip
        tmp, self._tmp = self._tmp, None
        try:
            if self.path.exists():  # overwrite: only now that the new store is complete
                shutil.rmtree(self.path)
            tmp.rename(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("wrote %s: %d levels, %s %s", self.path, len(datasets), self.array.shape,
                    self.array.dtype)  # fmt: skip
        return self.path

    def abort(self) -> None:
        """Remove the temporary store (nothing at ``path`` changes); a no-op after commit."""
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def create_ome_zarr(
    path: str | os.PathLike[str],
    *,
    shape: Sequence[int],
    dtype: Any,
    axes: str | None = None,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    translation: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    image_label: bool = False,
    fill_value: float = 0,
) -> tuple[Any, list[Any], list[tuple[int, ...]]]:
    """Create an empty OME-Zarr image (NGFF 0.5) in place, with every level and its metadata.

    For writers that fill a store from several processes and may stop and resume (a
    cluster's workers): the store is complete in structure at once, so it can be opened,
    viewed and written into box by box; unlike :class:`OmeZarrWriter` nothing is renamed.
    The arguments are those of :class:`OmeZarrWriter`; the path must not exist.

    Returns
    -------
    group : zarr.Group
    levels : list of zarr.Array
        Level 0 first.
    steps : list of tuple of int
        Each level's step from level 0 (``level_k == level_0[::steps[k]]``, per axis).
    """
    import zarr

    p = Path(path)
    if not is_zarr_path(p):
        raise InputError(f"{p}: an OME-Zarr output must be a folder ending in .zarr")
    if p.exists():
        raise InputError(f"{p}: exists; remove it or pass --overwrite")
    shape = tuple(int(n) for n in shape)
    axes, spacing, translation = _geometry(shape, axes, spacing, translation)
    target = _target_chunks(shape, axes, chunks)
    y, x = axes.index("Y"), axes.index("X")
    n_levels = levels if levels is not None else _default_levels((shape[y], shape[x]))
    if n_levels < 1:
        raise InputError(f"levels {n_levels} must be at least 1")
    plan = _level_plan(shape, axes, spacing, n_levels)
    ome_axes = _ome_axes(axes, unit, p)
    shift = None
    if translation is not None:
        it = iter(translation)
        shift = [next(it) if a in "ZYX" else 0.0 for a in axes]
    p.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(p, mode="w-")
    arrays, steps, total = [], [], (1,) * len(shape)
    level_shape = shape
    for k, (step, _) in enumerate(plan):
        total = tuple(a * b for a, b in zip(total, step, strict=True))
        level_shape = tuple(-(-n // s) for n, s in zip(level_shape, step, strict=True))
        arrays.append(group.create_array(
            f"s{k}", shape=level_shape, dtype=dtype, fill_value=fill_value,
            chunks=tuple(min(c, n) for c, n in zip(target, level_shape, strict=True)),
            dimension_names=[e["name"] for e in ome_axes],
        ))  # fmt: skip
        steps.append(total)
    write_ngff_attrs(group, _datasets(plan, shift), axes=ome_axes, name=p.stem,
                     image_label=image_label)  # fmt: skip
    return group, arrays, steps


def _datasets(
    plan: list[tuple[tuple[int, ...], list[float]]], shift: list[float] | None
) -> list[dict[str, Any]]:
    """The NGFF ``datasets`` entries of a level plan: path, scale, translation."""
    datasets = []
    for k, (_, scale) in enumerate(plan):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(scale)}]
        if shift is not None:
            transforms.append({"type": "translation", "translation": list(shift)})
        datasets.append({"path": f"s{k}", "coordinateTransformations": transforms})
    return datasets


def _geometry(
    shape: tuple[int, ...],
    axes: str | None,
    spacing: Sequence[float] | None,
    translation: Sequence[float] | None,
) -> tuple[str, tuple[float, ...], tuple[float, ...] | None]:
    """Axes (default by dimensions), spacing (default 1s) and translation, checked."""
    if axes is None:
        if len(shape) not in (2, 3, 4):
            raise InputError(f"a {len(shape)}-dimensional array needs axes, e.g. 'TCZYX'")
        axes = ("YX", "ZYX", "CZYX")[len(shape) - 2]
    if len(axes) != len(shape) or _canonical_order(axes) != axes:
        raise InputError(f"axes {axes!r} must name the {len(shape)} axes in t, c, z, y, x order")
    n_space = sum(a in "ZYX" for a in axes)
    sp = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * n_space))
    if len(sp) != n_space or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing {sp} must be {n_space} positive numbers")
    if translation is None:
        return axes, sp, None
    shift = tuple(float(t) for t in translation)
    if len(shift) != n_space or not all(np.isfinite(shift)):
        raise InputError(f"translation {shift} must be {n_space} finite numbers")
    return axes, sp, shift


def _ome_axes(axes: str, unit: str | None, p: Path) -> list[dict[str, str]]:
    """The OME-NGFF axes entries, with the unit on the space axes when it is an NGFF one."""
    ome_unit = _ome_unit(unit)
    if unit and ome_unit is None:
        logger.warning("%s: the unit %r is no OME-NGFF unit; it is left out", p, unit)
    out = []
    for a in axes:
        name, kind = _OME_AXES[a]
        entry = {"name": name, "type": kind}
        if kind == "space" and ome_unit:
            entry["unit"] = ome_unit
        out.append(entry)
    return out


def write_ngff_attrs(
    group: Any,
    datasets: list[dict[str, Any]],
    *,
    axes: list[dict[str, Any]],
    name: str,
    image_label: bool = False,
) -> None:
    """Write OME-NGFF 0.5 multiscales metadata (and ``image-label``) into a zarr v3 group.

    The attributes are exactly those ome-zarr's ``write_multiscales_metadata`` and
    ``add_metadata`` write for NGFF 0.5 (a test compares them on every kind of store this
    module writes); they are built here because importing ome-zarr's writer pulls in dask
    and xarray, about a second on every ``segment`` run.
    """
    ome = dict(group.attrs.get("ome") or {})
    ome["version"] = NGFF_VERSION
    ome["multiscales"] = [{"datasets": datasets, "name": name, "axes": axes}]
    if image_label:
        ome["image-label"] = {**ome.get("image-label", {}), "version": NGFF_VERSION}
    group.attrs["ome"] = ome


def _canonical_order(axes: str) -> str:
    return "".join(sorted(axes, key=lambda a: "TCZYX".index(a) if a in "TCZYX" else -1))


def _level_plan(
    shape: tuple[int, ...], axes: str, spacing: tuple[float, ...], n_levels: int
) -> list[tuple[tuple[int, ...], list[float]]]:
    """Per level: the step from the level above (1s for level 0) and the level's scale.

    y and x halve while they have 2 voxels or more; z too, while its scale is no coarser than
    y's. The pyramid stops early when no axis can halve.
    """
    ndim = len(shape)
    space = [i for i, a in enumerate(axes) if a in "ZYX"]
    y = axes.index("Y")
    scale = [1.0] * ndim
    for i, s in zip(space, spacing, strict=True):
        scale[i] = s
    plan = [((1,) * ndim, list(scale))]
    current = list(shape)
    for _ in range(1, n_levels):
        step = [1] * ndim
        for i in space:
            if current[i] >= 2 and (axes[i] != "Z" or scale[i] <= scale[y]):
                step[i] = 2
        if step == [1] * ndim:
            break
        current = [-(-n // s) for n, s in zip(current, step, strict=True)]
        scale = [a * b for a, b in zip(scale, step, strict=True)]
        plan.append((tuple(step), list(scale)))
    return plan


def _subsample_into(out: Any, prev: Any, step: tuple[int, ...]) -> None:
    """``out[...] = prev[::step]``, one chunk of ``out`` at a time (whole-chunk writes)."""
    grid = [range(0, n, c) for n, c in zip(out.shape, out.chunks, strict=True)]
    for corner in itertools.product(*grid):
        dst = tuple(slice(a, min(a + c, n)) for a, c, n in
                    zip(corner, out.chunks, out.shape, strict=True))  # fmt: skip
        src = tuple(slice(d.start * s, d.stop * s, s) for d, s in zip(dst, step, strict=True))
        out[dst] = prev[src]


class _LevelRows:
    """One level's rows along ``axis``, arriving in order, written in whole chunks."""

    def __init__(self, array: Any, axis: int) -> None:
        self.array, self.axis = array, axis
        self.depth, self.size = int(array.chunks[axis]), int(array.shape[axis])
        self.received = self.written = 0
        self.parts: list[NDArray] = []

    def add(self, block: NDArray) -> None:
        self.parts.append(block)
        self.received += block.shape[self.axis]
        end = self.received  # write up to the last whole chunk (or the level's end)
        if end < self.size:
            end -= end % self.depth
        data = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts, self.axis)
        n = end - self.written
        if n > 0:
            key = [slice(None)] * data.ndim
            key[self.axis] = slice(self.written, end)
            head = [slice(None)] * data.ndim
            head[self.axis] = slice(0, n)
            self.array[tuple(key)] = data[tuple(head)]
            self.written = end
            head[self.axis] = slice(n, None)
            data = data[tuple(head)]
        # keep only a copy of what is left (fewer rows than a chunk), never the caller's block
        self.parts = [np.array(data, copy=True)] if data.shape[self.axis] else []


class _RowSink:
    """``sink[a:b] = block`` for :attr:`OmeZarrWriter.rows`: level 0 and, subsampled, every
    level below it, row by row along the first spatial axis."""

    def __init__(self, levels: list[Any], steps: list[tuple[int, ...]], axis: int) -> None:
        self.levels = [_LevelRows(level, axis) for level in levels]
        self.steps, self.axis = steps, axis
        self.shape = tuple(int(n) for n in levels[0].shape)
        self.dtype = np.dtype(levels[0].dtype)

    def __setitem__(self, key: Any, value: Any) -> None:
        keys = list(key) if isinstance(key, tuple) else [key]
        if any(k is Ellipsis for k in keys):
            i = keys.index(Ellipsis)
            keys[i : i + 1] = [slice(None)] * (len(self.shape) - len(keys) + 1)
        keys += [slice(None)] * (len(self.shape) - len(keys))
        bounds = []
        for k, n in zip(keys, self.shape, strict=True):
            if not isinstance(k, slice) or k.indices(n)[2] != 1:
                raise IndexError(f"rows take slices of step 1 (got {key!r})")
            bounds.append(k.indices(n)[:2])
        a, b = bounds[self.axis]
        whole = [(0, n) for n in self.shape]
        if a != self.levels[0].received or any(
            bounds[i] != whole[i] for i in range(len(self.shape)) if i != self.axis
        ):
            raise IndexError(
                f"rows must be written whole and in order: expected rows from "
                f"{self.levels[0].received}, got {key!r}"
            )
        shape = list(self.shape)
        shape[self.axis] = b - a
        block = np.broadcast_to(np.asarray(value, self.dtype), shape)
        start = a
        for k, level in enumerate(self.levels):
            if k:
                step = self.steps[k]
                first = (-start) % step[self.axis]
                sub = [slice(None, None, s) for s in step]
                sub[self.axis] = slice(first, None, step[self.axis])
                block = block[tuple(sub)]
                start = (start + first) // step[self.axis]
                if block.shape[self.axis] == 0:
                    break
            level.add(block)

    def close(self) -> None:
        """Check that every row came (the levels flush their last rows on their last row)."""
        top = self.levels[0]
        if top.received != top.size:
            raise InputError(f"only {top.received} of {top.size} rows were written")


class RegionView:
    """A lazy box of an array: indexing reads only the asked part of the box.

    Parameters
    ----------
    array : array-like
        numpy, zarr, dask, or anything with ``shape``, ``dtype`` and basic indexing.
    region : sequence of slice or int
        One entry per axis of ``array``: a slice (step 1; open ends allowed) keeps the axis
        as that range, an int takes that index and drops the axis.

    Raises
    ------
    InputError
        If an entry is outside the array or a slice is empty or has a step.

    Examples
    --------
    >>> a = np.arange(60).reshape(3, 4, 5)
    >>> v = RegionView(a, (1, slice(1, 3), slice(2, None)))
    >>> v.shape
    (2, 3)
    >>> v[1, ::2].tolist() == a[1, 2, 2::2].tolist()
    True
    >>> v[-1].tolist()
    [32, 33, 34]
    """

    def __init__(self, array: Any, region: Sequence[slice | int]) -> None:
        shape = tuple(int(n) for n in array.shape)
        if len(region) != len(shape):
            raise InputError(f"region {tuple(region)} must have one entry per axis of {shape}")
        key: list[slice | int] = []
        for r, n in zip(region, shape, strict=True):
            if isinstance(r, slice):
                if r.step not in (None, 1):
                    raise InputError(f"region {r} must have no step")
                a = 0 if r.start is None else int(r.start)
                b = n if r.stop is None else int(r.stop)
                if not 0 <= a < b <= n:
                    raise InputError(f"region {a}:{b} is not a non-empty range inside 0:{n}")
                key.append(slice(a, b))
            else:
                i = int(r)
                if not 0 <= i < n:
                    raise InputError(f"region index {i} is outside 0:{n}")
                key.append(i)
        self.array = array
        self.region = tuple(key)
        self.shape = tuple(k.stop - k.start for k in key if isinstance(k, slice))
        self.dtype = np.dtype(array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def start(self) -> tuple[int, ...]:
        """The box's first voxel in ``array`` (along the axes the view keeps)."""
        return tuple(k.start for k in self.region if isinstance(k, slice))

    def __getitem__(self, key: Any) -> Any:
        keys = list(key) if isinstance(key, tuple) else [key]
        if any(k is Ellipsis for k in keys):
            i = keys.index(Ellipsis)
            keys[i : i + 1] = [slice(None)] * (self.ndim - len(keys) + 1)
        if len(keys) > self.ndim:
            raise IndexError(f"too many indices ({len(keys)}) for a {self.ndim}D view")
        keys += [slice(None)] * (self.ndim - len(keys))
        out: list[slice | int] = []
        it = iter(keys)
        for base in self.region:
            if not isinstance(base, slice):
                out.append(base)
                continue
            k, n = next(it), base.stop - base.start
            if isinstance(k, slice):
                a, b, s = k.indices(n)
                if s < 1:
                    raise IndexError("a region view takes positive steps only")
                out.append(slice(base.start + a, base.start + max(a, b), s))
            elif isinstance(k, int | np.integer):
                i = int(k) + (n if k < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of bounds for size {n}")
                out.append(base.start + i)
            else:
                raise TypeError(f"a region view takes ints and slices, not {type(k).__name__}")
        return self.array[tuple(out)]


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
