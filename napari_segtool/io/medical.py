"""Medical volumes with their geometry: NIfTI, NRRD, MetaImage and DICOM series, via SimpleITK.

SimpleITK is an optional dependency (``pip install 'napari-segtool[medical]'``) imported only
inside the functions that need it; without it they raise :class:`InputError` naming the extra.

Geometry, in napari's ``(Z, Y, X)`` order
-----------------------------------------
ITK describes an image by ``spacing`` ``s``, ``origin`` ``o`` and a direction matrix ``D``
(columns: the physical direction of each index axis), all in ``(x, y, z)`` order: the
physical point of the voxel with index ``(i, j, k)`` is ``o + D @ (s * (i, j, k))``. The array
:func:`SimpleITK.GetArrayFromImage` gives is indexed ``[k, j, i]``. With ``P`` the reversal of
the axes, ``n = (k, j, i) = P (i, j, k)``, the same point in reversed physical coordinates is

``P o + (P D P) @ (P s * n)``

so the ``(Z, Y, X)`` geometry this module reports is the spacing and the origin reversed and
the direction matrix reversed along both its rows and its columns (``D[::-1, ::-1]``; no
transpose). Physical coordinates are ITK's (LPS, in mm: NIfTI's RAS is converted by ITK), in
``(z, y, x)`` order like everything else in the package.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import fsync_directory
from napari_segtool.io.tiff import ImageFile

if TYPE_CHECKING:
    import SimpleITK

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: File endings read and written here, longest first (``.nii.gz`` before ``.nii``).
MEDICAL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FORMAT_NAMES = {
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
#: ``folder::SERIESUID`` picks one series of a DICOM folder that holds several.
SERIES_SEPARATOR = "::"
#: Layer metadata key of the source geometry (spacing, origin, direction; ``(Z, Y, X)``).
GEOMETRY_KEY = "segtool_geometry"
EXTRA = "pip install 'napari-segtool[medical]'"

#: The length unit of every format here (ITK's convention).
UNIT = "mm"

_READ_HINT = (
    "crop or resample it before opening it, or convert it to a chunked format (zarr) for "
    "block-wise, larger-than-memory processing"
)


def medical_suffix(path: str | os.PathLike[str]) -> str | None:
    """The medical file ending of ``path`` (lower case), or None.

    >>> medical_suffix("scan.NII.GZ"), medical_suffix("a.nrrd"), medical_suffix("a.tif")
    ('.nii.gz', '.nrrd', None)
    """
    name = Path(path).name.lower()
    return next((s for s in MEDICAL_SUFFIXES if name.endswith(s)), None)


def split_series(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``"ct::1.2.3"`` -> ``(Path("ct"), "1.2.3")``; a plain path -> ``(path, None)``.

    >>> split_series("scans/ct::1.2.840.1")
    (PosixPath('scans/ct'), '1.2.840.1')
    >>> split_series("scans/ct.nii.gz")
    (PosixPath('scans/ct.nii.gz'), None)
    """
    text = os.fspath(path)
    if SERIES_SEPARATOR in text:
        folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
        if folder and uid:
            return Path(folder), uid
    return Path(text), None


def _sitk(what: str) -> Any:
    """The SimpleITK module, or an :class:`InputError` naming the extra that installs it."""
    try:
        import SimpleITK as sitk  # noqa: N813 - the library's own spelling
    except ImportError as exc:
        raise InputError(f"{what} needs SimpleITK: {EXTRA}") from exc
    return sitk


@contextlib.contextmanager
def _itk_output() -> Iterator[list[str]]:
    """Capture what ITK prints on the C++ side (``std::cerr``) while the block runs.

    ITK's readers print warnings and the reason of some failures ("data not read completely")
    straight to file descriptor 2; the block's list receives that text, so a failure becomes
    one line that includes it, and a success logs it as a warning instead of raw output.
    """
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no file descriptor 2 to redirect
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                captured.append(text)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _itk_reason(exc: BaseException, output: Sequence[str]) -> str:
    """The useful part of an ITK exception (and of what ITK printed), on one line."""
    message = str(exc)
    # "Exception thrown in SimpleITK ...: /path/file.cxx:99:\nsitk::ERROR: the reason"
    match = re.search(r"(?:ITK|sitk)::?\s*ERROR:\s*(?:\w+\(0x[0-9a-f]+\):\s*)?(.*)", message, re.S)
    reason = match.group(1) if match else message
    printed = " ".join(output)
    if printed:
        reason = f"{printed}; {reason}"
    return _one_line(reason)


def _itk_run(call: Callable[[], T], failure: str, *, log_as: Path | None = None) -> T:
    """Run an ITK call with its C++ output captured (:func:`_itk_output`).

    A ``RuntimeError`` becomes one :class:`InputError` line, ``failure`` with ``{reason}``
    filled by :func:`_itk_reason`. On success what ITK printed is logged for ``log_as``
    (not at all without it) and the call's result is returned.
    """
    with _itk_output() as out:
        try:
            result = call()
        except RuntimeError as exc:
            failed: RuntimeError | None = exc
        else:
            failed = None
    if failed is not None:
        raise InputError(failure.replace("{reason}", _itk_reason(failed, out))) from failed
    if log_as is not None:
        _log_output(log_as, out)
    return result


def _log_output(path: Path, output: Sequence[str]) -> None:
    for text in output:
        logger.warning("%s: ITK: %s", path, _one_line(text))


def _numpy_dtype(sitk: Any, reader: Any, path: Path) -> np.dtype:
    """The numpy type of one component of the pixels ``reader`` (header read) describes."""
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    table = {
        "8-bit unsigned integer": np.uint8,
        "8-bit signed integer": np.int8,
        "16-bit unsigned integer": np.uint16,
        "16-bit signed integer": np.int16,
        "32-bit unsigned integer": np.uint32,
        "32-bit signed integer": np.int32,
        "64-bit unsigned integer": np.uint64,
        "64-bit signed integer": np.int64,
        "32-bit float": np.float32,
        "64-bit float": np.float64,
    }
    base = name.replace("vector of ", "")
    if base not in table:
        raise InputError(
            f"{path}: pixels of type {name!r} are not supported; convert the image to an "
            "integer or real type"
        )
    return np.dtype(table[base])


def _geometry(img: Any) -> tuple[tuple[float, ...], tuple[float, ...], NDArray[np.float64]]:
    """``(spacing, origin, direction)`` of a SimpleITK image in ``(Z, Y, X)`` order."""
    dim = img.GetDimension()
    spacing = tuple(float(v) for v in reversed(img.GetSpacing()))
    origin = tuple(float(v) for v in reversed(img.GetOrigin()))
    direction = np.asarray(img.GetDirection(), float).reshape(dim, dim)[::-1, ::-1]
    return spacing, origin, direction


def _image_file(img: Any, data: NDArray, path: Path, components: int) -> ImageFile:
    spacing, origin, direction = _geometry(img)
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"{path}: voxel spacing {spacing} (Z, Y, X) must be finite and positive")
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()):
        raise InputError(f"{path}: the origin or the direction in the header is not finite")
    axes = "ZYX"[-img.GetDimension() :]
    if components > 1:
        rgb = components in (3, 4) and data.dtype == np.uint8
        axes += "S" if rgb else "C"
    return ImageFile(
        data,
        spacing,
        UNIT,
        path,
        axes,
        origin=origin,
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )


def _check_size(
    path: Path, dim: int, size: Sequence[int], components: int, dtype: np.dtype
) -> tuple[int, ...]:
    """The array shape of a header's image, refused when 4D or too large for the memory."""
    from napari_segtool.io.memory import check_allocation

    if dim not in (2, 3):
        raise InputError(
            f"{path}: a {dim}D image ({' x '.join(map(str, reversed(size)))}); 2D and 3D images "
            "are supported: extract one volume first (e.g. SimpleITK's Extract)"
        )
    shape = tuple(int(n) for n in reversed(size)) + ((components,) if components > 1 else ())
    if min(shape) < 1:
        raise InputError(f"{path}: the header declares an empty image {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    check_allocation(
        nbytes, what=f"{path}: a {' x '.join(map(str, shape))} {dtype} image", hint=_READ_HINT
    )
    return shape


def _nifti_layout(header: bytes) -> tuple[int, int] | None:
    """``(voxel offset, voxel bytes)`` a NIfTI-1 or NIfTI-2 header declares (None if neither).

    From the header itself (dims, bitpix, vox_offset), not from ITK: ITK reports the type
    after ``scl_slope`` scaling, not the one stored.
    """
    for order in "<>":
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = int(struct.unpack(f"{order}f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:
            bitpix = struct.unpack(f"{order}h", header[14:16])[0]
            dims = struct.unpack(f"{order}8q", header[16:80])
            offset = int(struct.unpack(f"{order}q", header[168:176])[0])
        else:
            continue
        n = int(dims[0])
        if not 1 <= n <= 7 or min(dims[1 : n + 1]) < 1 or bitpix < 1:
            return None
        return offset, math.prod(int(d) for d in dims[1 : n + 1]) * int(bitpix) // 8
    return None


def _check_nifti_complete(path: Path, suffix: str) -> None:
    """Refuse a truncated NIfTI file: ITK reads one as zeros without a word.

    ``.nii``: the file size against the header's voxel offset and size. ``.nii.gz``: the gzip
    stream is decompressed once in 1 MiB pieces (its length and checksum are checked; nothing
    is kept).
    """
    if suffix == ".nii":
        with open(path, "rb") as fh:
            layout = _nifti_layout(fh.read(540))
        size = path.stat().st_size
    else:
        size, layout, head = 0, None, b""
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    if len(head) < 540:
                        head += chunk[:540]
                        layout = _nifti_layout(head)
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"{path}: the gzip stream is damaged or truncated ({exc})") from exc
    if layout is not None and size < sum(layout):
        offset, nbytes = layout
        raise InputError(
            f"{path}: truncated: the NIfTI header declares {nbytes} bytes of voxels from byte "
            f"{offset}, but the {'data' if suffix == '.nii.gz' else 'file'} has {size} bytes"
        )


def read_medical(path: str | os.PathLike[str]) -> ImageFile:
    """Read a NIfTI, NRRD or MetaImage file with its spacing, origin and direction.

    Parameters
    ----------
    path : str or PathLike
        A ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file.

    Returns
    -------
    ImageFile
        ``data`` indexed ``(Z, Y, X)`` (or ``(Y, X)``; vector pixels add a last ``C`` axis,
        or ``S`` for 3 or 4 uint8 components), ``spacing`` and ``origin`` in mm and the
        direction matrix, all in ``(Z, Y, X)`` order (module notes), ``unit`` ``"mm"``.

    Raises
    ------
    InputError
        Without SimpleITK (naming the extra), for a damaged, truncated or foreign file (one
        line naming it), a 4D image, or one too large for the memory (from the header,
        before any voxel is read).
    """
    p = Path(path)
    suffix = medical_suffix(p)
    if suffix is None:
        raise InputError(f"{p}: not a medical image file (expected {', '.join(MEDICAL_SUFFIXES)})")
    fmt = FORMAT_NAMES[suffix]
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    sitk = _sitk(f"reading {suffix}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    _itk_run(
        reader.ReadImageInformation,
        f"{p}: not a readable {fmt} file ({{reason}}); the file is damaged, truncated or not "
        f"{fmt}",
    )
    components = int(reader.GetNumberOfComponents())
    dtype = _numpy_dtype(sitk, reader, p)
    shape = _check_size(p, reader.GetDimension(), reader.GetSize(), components, dtype)
    if fmt == "NIfTI":
        _check_nifti_complete(p, suffix)
    img = _itk_run(
        reader.Execute,
        f"{p}: cannot read the voxels ({{reason}}); the file (or the data file its header "
        "names) is damaged, truncated or missing",
        log_as=p,
    )
    data = sitk.GetArrayFromImage(img)
    if data.shape != shape:
        raise InputError(f"{p}: the header declares shape {shape} but the file holds {data.shape}")
    return _image_file(img, data, p, components)


# -- DICOM ----------------------------------------------------------------------------------


def dicom_series(folder: str | os.PathLike[str]) -> dict[str, tuple[str, ...]]:
    """The DICOM series in ``folder`` (not its subfolders): UID -> files sorted by position.

    Needs SimpleITK (GDCM sorts the files by their position along the slice normal). An empty
    dict when the folder holds no DICOM file.
    """
    sitk = _sitk(f"{folder}: is a folder; reading it as a DICOM series")
    series_reader = sitk.ImageSeriesReader
    with _itk_output():
        ids = series_reader.GetGDCMSeriesIDs(str(folder))
        return {uid: tuple(series_reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}


def _describe(series: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())


def _looks_like_dicom(path: Path) -> bool:
    """A ``.dcm`` name or the ``DICM`` mark at byte 128 (the DICOM file preamble)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _check_left_out(folder: Path, series: Mapping[str, Sequence[str]]) -> None:
    """Refuse a folder with DICOM files that GDCM left out of every series.

    GDCM skips a damaged or truncated slice without a word, and the volume would then come
    out a slice short with a wrong spacing; other files (a README) are ignored.
    """
    used = {os.path.realpath(f) for files in series.values() for f in files}
    for f in sorted(folder.iterdir()):
        if f.is_file() and os.path.realpath(f) not in used and _looks_like_dicom(f):
            raise InputError(
                f"{f}: not a readable DICOM file (damaged or truncated); it is left out of "
                f"the series in {folder}: replace it or move it away"
            )


def _floats(text: str) -> NDArray[np.float64] | None:
    try:
        return np.array([float(v) for v in text.strip().split("\\")])
    except ValueError:
        return None


def _check_slices(sitk: Any, folder: Path, files: Sequence[str]) -> tuple[int, np.dtype]:
    """Read every slice's header: same size, readable, one orientation, even spacing.

    Returns the number of voxels per slice and the pixel type (after rescaling).
    """
    sizes, normals, positions = set(), [], []
    dtype = np.dtype(np.uint8)
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        _itk_run(
            reader.ReadImageInformation,
            f"{name}: not a readable DICOM slice ({{reason}}); the file is damaged or truncated "
            f"(series in {folder})",
        )
        size = tuple(reader.GetSize())
        sizes.add(size[:2])
        if len(files) > 1 and len(size) > 2 and size[2] != 1:
            raise InputError(
                f"{name}: a multi-frame file ({size[2]} frames) inside a series of "
                f"{len(files)} files in {folder}; open the file's own folder with it alone"
            )
        dtype = max(dtype, _numpy_dtype(sitk, reader, Path(name)), key=lambda t: t.itemsize)
        keys = set(reader.GetMetaDataKeys())
        if {"0020|0032", "0020|0037"} <= keys:
            ipp = _floats(reader.GetMetaData("0020|0032"))
            iop = _floats(reader.GetMetaData("0020|0037"))
            if ipp is not None and iop is not None and ipp.size == 3 and iop.size == 6:
                normals.append(np.cross(iop[:3], iop[3:]))
                positions.append(ipp)
    if len(sizes) > 1:
        raise InputError(
            f"{folder}: the slices of the series have different sizes {sorted(sizes)}; it mixes "
            "acquisitions: keep one in the folder"
        )
    if len(positions) == len(files) > 1:
        _check_positions(folder, files, np.array(normals), np.array(positions))
    return math.prod(size[:2]), dtype


def _check_positions(
    folder: Path, files: Sequence[str], normals: NDArray, positions: NDArray
) -> None:
    """Refuse duplicate slices, tilted ones and gaps: the volume's spacing would be wrong."""
    if np.abs(normals - normals[0]).max() > 1e-4:
        raise InputError(
            f"{folder}: the slices have different orientations (ImageOrientationPatient); it "
            "mixes acquisitions: keep one in the folder"
        )
    depth = positions @ normals[0]
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    twice = np.flatnonzero(gaps < 1e-3)  # mm
    if twice.size:
        i = int(twice[0])
        raise InputError(
            f"{folder}: {Path(files[order[i]]).name} and {Path(files[order[i + 1]]).name} are "
            "at the same position: the folder holds a slice twice or two acquisitions"
        )
    steps = np.diff(depth)  # in the order the volume is stacked
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise InputError(f"{folder}: the slices could not be sorted by their position")
    step = float(np.median(np.abs(steps)))
    if np.abs(np.abs(steps) - step).max() > max(0.01 * step, 1e-3):
        raise InputError(
            f"{folder}: the slices are not evenly spaced (steps from {np.abs(steps).min():.4g} to "
            f"{np.abs(steps).max():.4g} mm): a slice is missing or the series mixes "
            "acquisitions; the volume's spacing would be wrong"
        )


def read_dicom_series(
    folder: str | os.PathLike[str], *, series_uid: str | None = None
) -> ImageFile:
    """Read a folder of DICOM slices of one series as a volume, with its geometry.

    The slices are sorted by their position along the slice normal (not by file name), and
    each slice's RescaleSlope/RescaleIntercept is applied (CT comes out in Hounsfield units).

    Parameters
    ----------
    folder : str or PathLike
        The folder; only its own files are read (not subfolders).
    series_uid : str, optional
        The SeriesInstanceUID to read when the folder holds several series (on the command
        line, ``FOLDER::UID``).

    Returns
    -------
    ImageFile
        As :func:`read_medical`; ``path`` is the folder.

    Raises
    ------
    InputError
        No DICOM files, several series and no ``series_uid`` (naming them), a damaged slice
        (naming the file), slices of different sizes or orientations, duplicate or unevenly
        spaced slices, or a volume too large for the memory (from the headers).
    """
    p = Path(folder)
    sitk = _sitk(f"{p}: is a folder; reading it as a DICOM series")
    series = dicom_series(p)
    if not series:
        raise InputError(
            f"{p}: is a folder without DICOM files; give an image file or a folder of the "
            "DICOM slices of one series"
        )
    if series_uid is None:
        if len(series) > 1:
            raise InputError(
                f"{p}: holds {len(series)} DICOM series ({_describe(series)}); open one as "
                f"'{p}{SERIES_SEPARATOR}SERIESUID', or move each series to its own folder"
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise InputError(f"{p}: no DICOM series {series_uid}; it holds {_describe(series)}")
    _check_left_out(p, series)
    files = series[series_uid]
    per_slice, dtype = _check_slices(sitk, p, files)
    from napari_segtool.io.memory import check_allocation

    check_allocation(
        per_slice * len(files) * dtype.itemsize,
        what=f"{p}: a DICOM series of {len(files)} slices of {per_slice} {dtype} voxels",
        hint=_READ_HINT,
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    img = _itk_run(
        reader.Execute,
        f"{p}: cannot read the DICOM series {series_uid} ({{reason}}); a slice is damaged or "
        "truncated",
        log_as=p,
    )
    data = sitk.GetArrayFromImage(img)
    if data.ndim == 3 and data.shape[0] == 1 and len(files) == 1:
        logger.info("%s: one DICOM slice, read as a 1-slice volume", p)
    return _image_file(img, data, p, int(img.GetNumberOfComponentsPerPixel()))


def read_medical_path(path: str | os.PathLike[str]) -> ImageFile | None:
    """Read ``path`` if it is a medical file, a DICOM folder or ``FOLDER::UID``; else None."""
    p, uid = split_series(path)
    if uid is not None and p.is_dir():
        return read_dicom_series(p, series_uid=uid)
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p)
    if medical_suffix(p) is not None:
        return read_medical(p)
    return None


# -- writing --------------------------------------------------------------------------------


def _as_matrix(direction: object, ndim: int, what: str) -> NDArray[np.float64]:
    d = np.asarray(direction, dtype=float)
    if d.shape != (ndim, ndim) or not np.isfinite(d).all():
        raise InputError(f"{what}: direction {d.tolist()} must be a finite {ndim} x {ndim} matrix")
    if abs(abs(np.linalg.det(d)) - 1) > 1e-3:
        raise InputError(f"{what}: direction {d.tolist()} is not a rotation (|det| != 1)")
    return d


def to_sitk_image(
    data: NDArray,
    *,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: object = None,
    axes: str | None = None,
    what: str = "image",
) -> SimpleITK.Image:
    """A SimpleITK image of ``data`` with a ``(Z, Y, X)`` geometry (reversed for ITK).

    ``axes`` is ``"ZYX"``/``"YX"`` by default; one ``C`` axis (e.g. ``"CZYX"`` class
    probabilities) becomes vector pixels.
    """
    sitk = _sitk(f"writing {what}")
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{what}: cannot write {arr.dtype} voxels; use integers or floats")
    axes = axes or "ZYX"[-arr.ndim :]
    if len(axes) != arr.ndim or set(axes) - set("ZYXC") or axes.count("C") > 1:
        raise InputError(
            f"{what}: axes {axes!r} must name Z, Y, X and at most one C for the {arr.shape} array"
        )
    vector = "C" in axes
    if vector:
        arr = np.moveaxis(arr, axes.index("C"), -1)
    ndim = arr.ndim - vector
    if ndim not in (2, 3):
        raise InputError(f"{what}: {ndim} spatial axes; 2D and 3D images can be written")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=vector)
    _set_geometry(img, ndim, spacing, origin, direction, what)
    return img


def _set_geometry(
    img: Any,
    ndim: int,
    spacing: Sequence[float] | None,
    origin: Sequence[float] | None,
    direction: object,
    what: str,
) -> None:
    """Give ``img`` a ``(Z, Y, X)`` geometry (checked), reversed into ITK's ``(x, y, z)``."""
    for name, values in (("spacing", spacing), ("origin", origin)):
        if values is not None and len(values) != ndim:
            raise InputError(f"{what}: {name} {tuple(values)} needs {ndim} entries (Z, Y, X)")
    if spacing is not None:
        if not all(math.isfinite(v) and v > 0 for v in spacing):
            raise InputError(f"{what}: spacing {tuple(spacing)} must be finite and positive")
        img.SetSpacing([float(v) for v in reversed(spacing)])
    if origin is not None:
        if not all(math.isfinite(v) for v in origin):
            raise InputError(f"{what}: origin {tuple(origin)} must be finite")
        img.SetOrigin([float(v) for v in reversed(origin)])
    if direction is not None:
        d = _as_matrix(direction, ndim, what)
        img.SetDirection(d[::-1, ::-1].ravel().tolist())


def write_medical(
    path: str | os.PathLike[str],
    data: NDArray,
    *,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: object = None,
    axes: str | None = None,
) -> Path:
    """Write an array as NIfTI, NRRD or MetaImage with a geometry given in ``(Z, Y, X)`` order.

    Parameters
    ----------
    path : str or PathLike
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` (the last two
        headers get a data file beside them); its folder is created if needed.
    data : ndarray
        ``(Z, Y, X)`` or ``(Y, X)``, or in the order ``axes`` names (one ``C`` axis: vector
        pixels). bool is written as uint8, float16 as float32.
    spacing, origin : sequence of float, optional
        In mm, ``(Z, Y, X)`` order (default 1 and 0).
    direction : array-like, optional
        ``ndim x ndim`` direction matrix in ``(Z, Y, X)`` order, as :func:`read_medical`
        gives it (default identity).
    axes : str, optional
        Axis letters of ``data``.

    Notes
    -----
    The file is written in a temporary folder beside ``path`` and moved into place (data file
    first, then its header), so a reader never sees a half-written file; NRRD and MetaImage
    are compressed, NIfTI when the name ends in ``.gz``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "labels.nrrd"
    >>> flip = [[1, 0, 0], [0, -1, 0], [0, 0, 1]]
    >>> _ = write_medical(f, np.ones((2, 3, 4), np.uint8), spacing=(2.5, 0.7, 0.7),
    ...                   origin=(10, 20, 30), direction=flip)
    >>> back = read_medical(f)
    >>> back.data.shape, back.spacing, back.origin, back.direction[1]
    ((2, 3, 4), (2.5, 0.7, 0.7), (10.0, 20.0, 30.0), (0.0, -1.0, 0.0))
    """
    p = Path(path)
    suffix = medical_suffix(p)
    if suffix is None:
        raise InputError(f"{p}: a medical image must end in {', '.join(MEDICAL_SUFFIXES)}")
    sitk = _sitk(f"writing {suffix}")
    img = to_sitk_image(
        data, spacing=spacing, origin=origin, direction=direction, axes=axes, what=str(p)
    )
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    try:
        _itk_run(
            lambda: sitk.WriteImage(img, str(tmp / p.name), useCompression=suffix != ".nii"),
            f"{p}: cannot write ({{reason}})",
            log_as=p,
        )
        written = sorted(tmp.iterdir(), key=lambda f: f.name == p.name)  # the header last
        for f in written:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        for f in written:
            os.replace(f, p.parent / f.name)
        fsync_directory(p.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s %s %s", p, np.shape(data), np.asarray(data).dtype)
    return p


# -- geometry in napari layers and between files --------------------------------------------


def geometry_metadata(image: ImageFile) -> dict[str, Any] | None:
    """The geometry to keep in a layer's metadata (under :data:`GEOMETRY_KEY`), or None.

    Plain lists (``(Z, Y, X)`` order), so the metadata stays JSON-friendly.
    """
    if image.origin is None or image.direction is None:
        return None
    return {
        "spacing": [float(v) for v in image.spacing],
        "origin": [float(v) for v in image.origin],
        "direction": [[float(v) for v in row] for row in image.direction],
        "unit": image.unit or UNIT,
        "source": str(image.path),
    }


def geometry_from_metadata(
    meta: object, ndim: int
) -> tuple[tuple[float, ...], tuple[float, ...], NDArray[np.float64]] | None:
    """``(spacing, origin, direction)`` from :func:`geometry_metadata`'s dict if it fits.

    None when ``meta`` is missing, malformed or for another number of axes than ``ndim``
    (layer metadata can be edited or come from elsewhere, so it is checked, never trusted).
    """
    if not isinstance(meta, Mapping):
        return None
    try:
        spacing = tuple(float(v) for v in meta["spacing"])
        origin = tuple(float(v) for v in meta["origin"])
        direction = np.asarray(meta["direction"], dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    if len(spacing) != ndim or len(origin) != ndim or direction.shape != (ndim, ndim):
        return None
    if not (all(math.isfinite(v) and v > 0 for v in spacing) and np.isfinite(origin).all()):
        return None
    if not np.isfinite(direction).all() or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        return None
    return spacing, origin, direction


def geometry_mismatch(a: ImageFile, b: ImageFile) -> str | None:
    """How the voxel grids of two files differ, or None when they agree (or cannot be told).

    Only files that carry a full geometry (origin and direction: the formats here) are
    compared: spacing within 0.01 %, origin within 1 % of the smallest voxel, direction
    within 1e-4.
    """
    if None in (a.origin, a.direction, b.origin, b.direction):
        return None
    if len(a.spacing) != len(b.spacing):
        return f"{len(a.spacing)}D against {len(b.spacing)}D"
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=1e-4, atol=0):
        return f"spacing {a.spacing} against {b.spacing} (Z, Y, X)"
    tol = 0.01 * float(min(sa.min(), sb.min()))
    if not np.allclose(a.origin, b.origin, rtol=0, atol=tol):
        return f"origin {a.origin} against {b.origin} (Z, Y, X)"
    if not np.allclose(a.direction, b.direction, rtol=0, atol=1e-4):
        return f"direction {a.direction} against {b.direction} (Z, Y, X)"
    return None


def check_same_grid(a: ImageFile, b: ImageFile) -> None:
    """Refuse two files whose voxels are not the same physical points (see
    :func:`geometry_mismatch`); the message names both files and the fix."""
    why = geometry_mismatch(a, b)
    if why is not None:
        raise InputError(
            f"{b.path} is not on the voxel grid of {a.path} ({why}); resample it onto that "
            "image first (e.g. SimpleITK's Resample with the image as reference)"
        )
