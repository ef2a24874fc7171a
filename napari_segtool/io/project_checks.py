"""Checks of a project file before anything is allocated: headers, record, paths.

Files are hostile until checked (see :mod:`napari_segtool.io.project`): the ``.npy`` headers
of ``state.npz`` are read and checked against each other and :data:`MAX_VOXELS` before any
data, and every field of the JSON record before it is used.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.errors import InputError

FORMAT = "napari-segtool-project"
FORMAT_VERSION = 1
#: Largest label image a project may hold (voxels); checked from the headers before reading.
MAX_VOXELS = 2**32
#: Largest JSON record in ``state.npz`` (bytes).
MAX_RECORD_BYTES = 16 * 2**20
ARRAYS = ("labels", "machine", "painted", "meta")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def inside(folder: Path, relative: str) -> bool:
    """Whether ``folder / relative`` stays inside ``folder`` once symlinks are resolved."""
    if not relative or Path(relative).is_absolute() or "\\" in relative:
        return False
    try:
        root = folder.resolve()
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return resolved != root and resolved.is_relative_to(root)


def base_model_problem(value: object, folder: str | os.PathLike[str]) -> str | None:
    """What is wrong with a ``base_model`` value for a project in ``folder`` (None: nothing).

    See the module docstring for the values allowed.

    >>> base_model_problem("em-membranes-2d", "/p") is None
    True
    >>> base_model_problem("../../elsewhere.pt", "/p")
    "'../../elsewhere.pt' leaves the project folder; give a bundled name or an absolute path"
    """
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if value == "" or (NAME.fullmatch(value) and value not in {".", ".."}):
        return None
    if Path(value).is_absolute():
        if not Path(value).is_file():
            return f"{value!r} is not an existing model file; pick the starting model again"
        return None
    if not inside(Path(folder), value):
        return f"{value!r} leaves the project folder; give a bundled name or an absolute path"
    return None


def record_problems(record: object, shape: tuple[int, ...], folder: Path) -> list[str]:
    """Every problem of a project record for labels of ``shape``; empty when it is sound."""
    if not isinstance(record, dict):
        return ["the record is not a JSON object"]
    if record.get("format") != FORMAT:
        return ["'format': not a napari-segtool project file"]
    version = record.get("format_version")
    if not is_int(version) or version < 1:
        return [f"'format_version': {version!r} is not a positive integer"]
    if version > FORMAT_VERSION:
        return ["'format_version': written by a newer napari-segtool; update it to open this"]
    problems = []
    if "shape" in record and record["shape"] != list(shape):
        problems.append(f"'shape': {record['shape']!r} but the labels have {list(shape)}")
    problems += _reviewed_problems(record.get("reviewed", []), 1 if len(shape) == 2 else shape[0])
    version_problems, numbers = _versions_problems(record.get("versions", []), folder)
    problems += version_problems
    current = record.get("current_version")
    if current is not None and (not is_int(current) or current not in numbers):
        problems.append(f"'current_version': {current!r} is not one of the versions {numbers}")
    problem = base_model_problem(record.get("base_model", ""), folder)
    if problem:
        problems.append(f"'base_model': {problem}")
    return problems + _image_problems(record.get("image", {}), shape)


def _reviewed_problems(reviewed: object, depth: int) -> list[str]:
    if not isinstance(reviewed, list) or not all(is_int(z) for z in reviewed):
        return [f"'reviewed': {str(reviewed)[:80]} is not a list of slice numbers"]
    if bad := [z for z in reviewed if not 0 <= z < depth]:
        return [f"'reviewed': slices {bad[:8]} are outside 0..{depth - 1}"]
    if len(set(reviewed)) != len(reviewed):
        return ["'reviewed': a slice is listed twice"]
    return []


def _versions_problems(versions: object, folder: Path) -> tuple[list[str], list[int]]:
    """Problems of the version list, and the numbers of the sound entries."""
    if not isinstance(versions, list):
        return ["'versions': not a list"], []
    problems, numbers = [], []
    for i, entry in enumerate(versions):
        problem = version_problem(entry, folder)
        if problem:
            problems.append(f"'versions'[{i}]: {problem}")
        else:
            numbers.append(entry["version"])
    if len(set(numbers)) != len(numbers):
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        problems.append(f"'versions': version numbers {twice[:8]} are listed twice")
    return problems, numbers


def _image_problems(image: object, shape: tuple[int, ...]) -> list[str]:
    if not isinstance(image, dict):
        return ["'image': not a JSON object"]
    if "shape" in image and image["shape"] != list(shape):
        return [f"'image': shape {image['shape']!r} but the labels have {list(shape)}"]
    if bad_keys := [k for k in ("name", "path") if k in image and not isinstance(image[k], str)]:
        return [f"'image': {bad_keys[0]} is not a string"]
    return []


def version_problem(entry: object, folder: Path) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    number, file, parent = entry.get("version"), entry.get("file"), entry.get("parent")
    reviewed = entry.get("reviewed", [])
    checks = [
        (is_int(number) and number >= 1, f"'version' {number!r} is not a positive integer"),
        (
            isinstance(file, str) and inside(folder, file),
            f"'file' {file!r} is not a relative path inside the project folder",
        ),
        (parent is None or is_int(parent), f"'parent' {parent!r} is not a version number"),
        (
            isinstance(entry.get("promoted", False), bool),
            f"'promoted' {entry.get('promoted')!r} is not true or false",
        ),
        *(
            (
                entry.get(key) is None or is_number(entry.get(key)),
                f"{key!r} {entry.get(key)!r} is not a number",
            )
            for key in ("val_dice", "baseline_dice")
        ),
        (
            isinstance(reviewed, list) and all(is_int(z) for z in reviewed),
            "'reviewed' is not a list of slice numbers",
        ),
    ]
    return next((message for ok, message in checks if not ok), None)


def read_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data size of one ``.npy`` member, from its header alone."""
    info = zf.getinfo(f"{name}.npy")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"{name}: unsupported .npy version {version}")
        header_end = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}: holds Python objects")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_end + nbytes:
        raise ValueError(
            f"{name}: the header says {shape} {dtype} but the member holds "
            f"{info.file_size - header_end} bytes"
        )
    return tuple(shape), dtype, nbytes


def header_problems(headers: dict[str, tuple[tuple[int, ...], np.dtype, int]]) -> list[str]:
    shape, dtype, _ = headers["labels"]
    problems = []
    if len(shape) not in (2, 3) or min(shape, default=0) < 1:
        return [f"'labels': shape {shape} is not a 2D image or a 3D stack"]
    size = math.prod(shape)
    if size > MAX_VOXELS:
        problems.append(f"'labels': {size:,} voxels is more than {MAX_VOXELS:,}")
    if dtype.kind not in "ui":
        problems.append(f"'labels': dtype {dtype} is not an integer type")
    m_shape, m_dtype, _ = headers["machine"]
    if (m_shape, m_dtype) != (shape, dtype):
        problems.append(f"'machine': {m_shape} {m_dtype} but the labels are {shape} {dtype}")
    p_shape, p_dtype, _ = headers["painted"]
    if p_shape != ((size + 7) // 8,) or p_dtype != np.uint8:
        problems.append(
            f"'painted': {p_shape} {p_dtype}, not the {(size + 7) // 8} bytes of a bit mask "
            f"over {shape}"
        )
    r_shape, r_dtype, r_bytes = headers["meta"]
    if len(r_shape) != 1 or r_dtype != np.uint8 or r_bytes > MAX_RECORD_BYTES:
        problems.append(f"'meta': {r_shape} {r_dtype} is not a JSON record of bytes")
    return problems


def read_members(
    zf: zipfile.ZipFile, *, arrays: bool
) -> tuple[Any, tuple[int, ...], tuple[NDArray, NDArray, NDArray] | None]:
    """The record, the labels' shape and (``arrays``) the arrays; headers checked first."""
    names = set(zf.namelist())
    missing = [n for n in ARRAYS if f"{n}.npy" not in names]
    if missing:
        raise InputError(f"{', '.join(repr(n) for n in missing)} missing")
    headers = {name: read_header(zf, name) for name in ARRAYS}
    problems = header_problems(headers)
    if problems:
        raise InputError("; ".join(problems))
    shape = headers["labels"][0]
    record = json.loads(read_array(zf, "meta").tobytes().decode())
    if not arrays:
        return record, shape, None
    labels = read_array(zf, "labels")
    machine = read_array(zf, "machine")
    bits = read_array(zf, "painted")
    painted = np.unpackbits(bits, count=labels.size).astype(bool).reshape(shape)
    return record, shape, (labels, machine, painted)


def read_array(zf: zipfile.ZipFile, name: str) -> NDArray:
    fh: IO[bytes]
    with zf.open(f"{name}.npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)
