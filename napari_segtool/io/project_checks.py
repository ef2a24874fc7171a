"""Checks of a project file before anything is allocated: headers, record, paths.

Files are hostile until checked (see :mod:`napari_segtool.io.project`): the ``.npy`` headers
of ``state.npz`` are read and checked against each other and :data:`MAX_VOXELS` before any
data, and every field of the JSON record before it is used. A chunked project
(:mod:`napari_segtool.io.chunked_state`) is checked the same way: each array's ``zarr.json``
is read as plain JSON and checked (:func:`array_metadata_problems`,
:func:`chunked_layout_problems`) before zarr opens anything.
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
from napari_segtool.io.labelled import as_patches, patch_problem

FORMAT = "napari-segtool-project"
FORMAT_VERSION = 1
#: Largest label image a project may hold (voxels); checked from the headers before reading.
MAX_VOXELS = 2**32
#: Largest JSON record in ``state.npz`` (bytes).
MAX_RECORD_BYTES = 16 * 2**20
ARRAYS = ("labels", "machine", "painted", "meta")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

# -- chunked projects (state.zarr) --------------------------------------------------------------

#: Largest label image a chunked project may hold (voxels). It is never held in memory whole,
#: so the bound is against absurd headers, not memory: 2**40 is 1 TiB of uint8.
MAX_CHUNKED_VOXELS = 2**40
#: Most chunks along the grid of one array: bounds every walk over the grid (a box iterator,
#: a merge) however the chunks were chosen.
MAX_CHUNKS = 2**24
#: Most voxels in one chunk: zarr allocates every chunk it reads whole.
MAX_CHUNK_VOXELS = 2**24
#: Largest ``zarr.json`` of a chunked project (bytes); read before zarr parses it.
MAX_METADATA_BYTES = 2**20
#: The arrays of a chunked project, in the order they are checked.
CHUNKED_ARRAYS = ("labels", "machine", "painted")
#: Integer data types a chunked project's labels may have (zarr v3 names).
LABEL_DTYPES = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
)
#: Byte-to-byte codecs a chunked project may use after the ``bytes`` codec (no sharding).
BYTES_CODECS = frozenset({"zstd", "blosc", "gzip", "crc32c"})
_ARRAY_KEYS = frozenset(
    {"shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
     "attributes", "zarr_format", "node_type", "storage_transformers", "dimension_names"}
)  # fmt: skip


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
    problems += _patch_problems(record.get("reviewed_patches", []), shape)
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


def _patch_problems(patches: object, shape: tuple[int, ...]) -> list[str]:
    if not isinstance(patches, list):
        return [f"'reviewed_patches': {str(patches)[:80]} is not a list of patches"]
    try:
        boxes = as_patches(patches)
    except InputError as exc:
        return [f"'reviewed_patches': {exc}"]
    if len(boxes) != len(patches):
        return ["'reviewed_patches': a patch is listed twice"]
    problem = patch_problem(boxes, shape)
    return [f"'reviewed_patches': {problem}"] if problem else []


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


# -- chunked projects --------------------------------------------------------------------------


def read_json_file(path: Path, *, limit: int) -> Any:
    """A JSON file of at most ``limit`` bytes, parsed; ``ValueError`` for anything else.

    The size is checked before reading (a hostile file may be huge) and the file must be a
    regular file, not a link.
    """
    info = path.lstat()
    if not path.is_file() or path.is_symlink():
        raise ValueError(f"{path.name} is not a regular file")
    if info.st_size > limit:
        raise ValueError(f"{path.name} holds {info.st_size:,} bytes, more than {limit:,}")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    return json.loads(data.decode())


def layout_problems(shape: object, dtype: object, chunks: object, *, name: str) -> list[str]:
    """Problems of an array layout (shape, zarr data type name, chunk shape) of a chunked
    project; empty when it is sound. ``dtype`` ``"bool"`` is the painted mask's.

    >>> layout_problems([4, 512, 512], "uint16", [1, 256, 256], name="labels")
    []
    >>> layout_problems([4, 512], "float32", [1, 0], name="labels")  # doctest: +ELLIPSIS
    ["'labels': data type 'float32' is not an integer type", "'labels': chunk shape [1, 0] ..."]
    """
    problems = []
    if (
        not isinstance(shape, list | tuple)
        or len(shape) not in (2, 3)
        or not all(is_int(n) and n >= 1 for n in shape)
    ):
        return [f"{name!r}: shape {str(shape)[:80]} is not a 2D image or a 3D stack"]
    size = math.prod(shape)
    if size > MAX_CHUNKED_VOXELS:
        problems.append(f"{name!r}: {size:,} voxels is more than {MAX_CHUNKED_VOXELS:,}")
    if dtype != "bool" and dtype not in LABEL_DTYPES:
        problems.append(f"{name!r}: data type {str(dtype)[:40]!r} is not an integer type")
    if (
        not isinstance(chunks, list | tuple)
        or len(chunks) != len(shape)
        or not all(is_int(c) and c >= 1 for c in chunks)
    ):
        problems.append(
            f"{name!r}: chunk shape {str(chunks)[:80]} is not one positive size per axis"
        )
        return problems
    if math.prod(chunks) > MAX_CHUNK_VOXELS:
        problems.append(
            f"{name!r}: chunks of {math.prod(chunks):,} voxels are more than {MAX_CHUNK_VOXELS:,}"
        )
    count = math.prod(-(-s // c) for s, c in zip(shape, chunks, strict=True))
    if count > MAX_CHUNKS:
        problems.append(f"{name!r}: {count:,} chunks is more than {MAX_CHUNKS:,}; use larger ones")
    return problems


def array_metadata_problems(
    meta: object, name: str
) -> tuple[list[str], tuple[tuple[int, ...], str, tuple[int, ...]] | None]:
    """Problems of one array's ``zarr.json`` in a chunked project, and its layout.

    Only what :mod:`napari_segtool.io.chunked_state` writes is accepted: zarr v3, a regular
    chunk grid, the default chunk keys with ``/``, the ``bytes`` codec followed by
    compressors and checksums from :data:`BYTES_CODECS` (no sharding, no storage
    transformers), and a fill value of 0 (``false`` for the painted mask).

    Returns
    -------
    problems : list of str
        Empty when sound.
    layout : (shape, data type, chunks) or None
        None when a problem prevents reading it.
    """
    if not isinstance(meta, dict):
        return [f"{name!r}: the zarr metadata is not a JSON object"], None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return [f"{name!r}: not a zarr v3 array"], None
    problems = []
    if unknown := sorted(set(meta) - _ARRAY_KEYS):
        problems.append(f"{name!r}: unknown zarr metadata {unknown[:4]}")
    grid = meta.get("chunk_grid")
    chunks = None
    if (
        isinstance(grid, dict)
        and grid.get("name") == "regular"
        and isinstance(grid.get("configuration"), dict)
    ):
        chunks = grid["configuration"].get("chunk_shape")
    else:
        problems.append(f"{name!r}: the chunk grid is not a regular one")
    shape, dtype = meta.get("shape"), meta.get("data_type")
    problems += layout_problems(shape, dtype, chunks, name=name)
    if (dtype == "bool") != (name == "painted"):
        problems.append(f"{name!r}: data type {str(dtype)[:40]!r} is not what {name} holds")
    problems += _encoding_problems(meta, name)
    problems += _codec_problems(meta.get("codecs"), name)
    dims = meta.get("dimension_names")
    if dims is not None and (
        not isinstance(dims, list)
        or not isinstance(shape, list)
        or len(dims) != len(shape)
        or not all(d is None or isinstance(d, str) for d in dims)
    ):
        problems.append(f"{name!r}: dimension names {str(dims)[:60]} are not one per axis")
    if not isinstance(meta.get("attributes", {}), dict):
        problems.append(f"{name!r}: attributes are not a JSON object")
    if problems:
        return problems, None
    return [], (tuple(shape), str(dtype), tuple(chunks))  # type: ignore[arg-type]


def _encoding_problems(meta: dict[str, Any], name: str) -> list[str]:
    """Chunk keys, fill value and storage transformers of one array's metadata."""
    problems = []
    encoding = meta.get("chunk_key_encoding")
    config = encoding.get("configuration", {}) if isinstance(encoding, dict) else None
    if (
        not isinstance(encoding, dict)
        or encoding.get("name") != "default"
        or not isinstance(config, dict)
        or config.get("separator", "/") != "/"
    ):
        problems.append(f"{name!r}: chunk keys are not zarr's default ones with '/'")
    fill = meta.get("fill_value")
    if name == "painted" and fill is not False:
        problems.append(f"{name!r}: fill value {str(fill)[:20]} is not false")
    elif name != "painted" and (not is_int(fill) or fill != 0):
        problems.append(f"{name!r}: fill value {str(fill)[:20]} is not 0")
    if meta.get("storage_transformers", []) != []:
        problems.append(f"{name!r}: storage transformers are not supported")
    return problems


def _codec_problems(codecs: object, name: str) -> list[str]:
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) for c in codecs):
        return [f"{name!r}: codecs are not a list of objects"]
    names = [c.get("name") for c in codecs]
    if names[0] != "bytes" or not all(n in BYTES_CODECS for n in names[1:]):
        return [
            f"{name!r}: codecs {[str(n)[:20] for n in names[:6]]} are not 'bytes' followed by "
            f"{sorted(BYTES_CODECS)}"
        ]
    return []


def chunked_layout_problems(
    layouts: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]],
) -> list[str]:
    """Problems between the arrays of a chunked project: one shape and chunk grid for all,
    one data type for the labels and the machine prediction."""
    shape, dtype, chunks = layouts["labels"]
    problems = []
    m_shape, m_dtype, m_chunks = layouts["machine"]
    if (m_shape, m_dtype, m_chunks) != (shape, dtype, chunks):
        problems.append(
            f"'machine': {list(m_shape)} {m_dtype} in chunks {list(m_chunks)} but the labels "
            f"are {list(shape)} {dtype} in chunks {list(chunks)}"
        )
    p_shape, _, p_chunks = layouts["painted"]
    if (p_shape, p_chunks) != (shape, chunks):
        problems.append(
            f"'painted': {list(p_shape)} in chunks {list(p_chunks)} but the labels are "
            f"{list(shape)} in chunks {list(chunks)}"
        )
    return problems
