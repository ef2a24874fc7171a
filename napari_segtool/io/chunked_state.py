"""A project state for volumes larger than memory: chunked zarr arrays on disk, read by box.

:class:`ChunkedState` holds what :class:`~napari_segtool.io.project_state.ProjectState` holds
(labels, the machine prediction, the painted mask, reviewed slices, versions), but its arrays
are zarr v3 arrays in the project folder, so memory is bounded by a chunk or a box, never by
the volume. :class:`~napari_segtool.io.project.Project` creates, saves and loads it; the
layout inside the project folder::

    state.json            the record: format, reviewed slices, versions, current version,
                          base model, image, shape, "storage": "chunked"; written
                          atomically, last
    state.zarr/           a zarr v3 group
      labels/             the corrected labels (napari paints into this array), integers
      machine/            what the model last wrote, same shape, dtype and chunks
      painted/            bool: voxels the user painted; a chunk without one is never written
        zarr.json         each array's metadata
        c/<z>/<y>/<x>     one file per chunk (zstd); missing: all 0 (all False)

Writing and saving
------------------
Writes go through to disk at once: a paint dab reads and rewrites the chunks it touches
(2-6 ms with the default chunks of ``(1, 256, 256)`` on a local disk), so nothing is cached
and nothing is lost when the program dies between saves. zarr's ``LocalStore`` writes each
chunk to a temporary ``<chunk>.<random>.partial`` beside it and renames it onto the chunk
(:func:`os.replace`), so a process killed at any moment leaves every chunk fully old or fully
new; a temporary left behind is ignored by zarr and removed by the next load that holds the
project's lock once it is :data:`STALE_PARTIAL_SECONDS` old. A save
(:meth:`~napari_segtool.io.project.Project.save`) writes no chunk: it flushes to disk
(``fsync``) the chunk files written since the last save, which the store keeps a list of,
and then writes the record atomically. After a power cut, what was saved is on disk; chunks
written since may be lost.

There is no atomicity *between* arrays or chunks: a kill between the labels and the painted
mask of a dab leaves the voxels labelled anyway (their label differs from the machine's),
and a kill in the middle of :meth:`ChunkedState.merge_untouched` may leave one box's labels
new and its machine prediction old, so those voxels count as changed (kept and trained on,
never lost). The record (reviewed slices, versions) is that of the last save.

Labelled voxels, by box
-----------------------
A voxel is labelled as in :mod:`napari_segtool.io.labelled`: painted, changed from the
machine prediction, or in a reviewed slice. :meth:`ChunkedState.labelled_region` computes
that for a box. :meth:`ChunkedState.labelled_boxes` lists the boxes that may hold labelled
voxels from which painted chunks exist (a directory listing, no chunk is read) and the
reviewed slices. Voxels changed without a paint event are found there too: creating a state
marks as painted every voxel where the starting labels differ from the machine's, the labels
chunks written since the last save count as well, and a save marks as painted their voxels
that differ from the machine's. Two kinds of write are left out, as they make no voxel
changed: a merge's, and one after which the labels chunk is known to hold what the machine
prediction's chunk holds (the store keeps digests of the bytes it last wrote into each, so
a segmentation writing both alike costs the next save no read); a later write of the chunk
makes it count again. Only labels written by another program (or through another store
object), or by one killed before it saved, need ``labelled_boxes(scan=True)``, which reads
every box. :meth:`ChunkedState.unlabelled_boxes` lists the boxes holding any voxel that is
neither painted nor reviewed: what a re-segmentation must touch.

Loading is checked like ``state.npz``: the record and each array's ``zarr.json`` are read as
plain JSON (sizes bounded) and checked (:mod:`napari_segtool.io.project_checks`) before zarr
opens anything, and no file or folder of the store may be a symbolic link, so every write
stays inside the project folder.

Threads: painting (:meth:`ChunkedState.mark_painted`, on the UI thread) and a save in a
worker share a lock around the painted mask, so saving while the user paints is safe. A
merge is not guarded against napari writing into ``labels``: a merge running while the user
paints the same chunk can lose the dab (both are read-modify-writes of the chunk), so merge
while nobody paints (or a box at a time on the UI thread:
:meth:`ChunkedState.iter_merge_untouched` yields after each box).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from napari_segtool.errors import InputError
from napari_segtool.io.atomic import fsync_directory
from napari_segtool.io.labelled import Patch, as_patches, labelled_in_box
from napari_segtool.io.memory import check_allocation
from napari_segtool.io.paint import paint_changes
from napari_segtool.io.project_checks import (
    CHUNKED_ARRAYS,
    MAX_METADATA_BYTES,
    array_metadata_problems,
    chunked_layout_problems,
    layout_problems,
    read_json_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNKS",
    "MAX_WHOLE_VOXELS",
    "RECORD_FILE",
    "STALE_PARTIAL_SECONDS",
    "STORE_DIR",
    "Box",
    "ChunkedState",
    "check_store",
    "grid_boxes",
    "normalise_box",
    "open_store",
    "record_text",
    "walk_store",
]

STORE_DIR = "state.zarr"
RECORD_FILE = "state.json"
#: Chunks by number of axes: one slice deep, so a paint dab (on one slice) rewrites little,
#: napari reads a slice from few files, and a reviewed slice covers whole chunks.
DEFAULT_CHUNKS = {2: (256, 256), 3: (1, 256, 256)}
#: Whole-volume masks (:meth:`ChunkedState.labelled` and kin) are refused above this many
#: voxels: use the box methods.
MAX_WHOLE_VOXELS = 2**27
#: A zarr temporary (``.partial``) this old, found by a load that holds the project's lock,
#: is a killed writer's and is removed (a live write takes milliseconds).
STALE_PARTIAL_SECONDS = 10.0
#: Voxels per box when writing a whole volume in (:meth:`ChunkedState.create`).
WRITE_BLOCK_VOXELS = 2**24

Box = tuple[slice, ...]
"""One ``slice(start, stop)`` per axis, in voxels, ``(Z, Y, X)`` or ``(Y, X)``."""

_CHUNK_NAME = re.compile(r"[0-9]+")
_LABEL_CHUNKS = "labels/c/"
_MACHINE_CHUNKS = "machine/c/"
_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")


# -- the store -----------------------------------------------------------------------------------


class _Written:
    """The keys a store wrote or deleted since they were last taken, and the labels chunks
    written since they were last looked at for changed voxels (thread-safe).

    A labels chunk written is a *suspect* (it may hold voxels changed without a paint event)
    unless it is known to hold what the machine prediction's chunk holds: for every chunk of
    ``labels`` and ``machine`` the store keeps a digest of the bytes it last wrote there
    (``b""`` for a deleted chunk, all fill value), known only once a write has finished with
    no other write of that key under way. With :attr:`twins` (the two arrays encode alike),
    equal digests mean equal values, so such a chunk holds no changed voxel and is not
    returned by :meth:`suspects` or :meth:`take_suspects` (it is dropped, as looking at it
    would find nothing). A chunk written later, by napari or anyone, changes its digest and
    is a suspect again. The digests last until :meth:`take_suspects` (the next save).
    """

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._suspects: set[str] = set()
        self._digests: dict[str, bytes | None] = {}
        self._busy: dict[str, int] = {}
        self._clashed: set[str] = set()
        self._lock = threading.Lock()
        #: Whether ``labels`` and ``machine`` encode equal values to equal bytes and back (one
        #: data type, codecs, fill value): only then are their chunks compared by digest.
        self.twins = False
        #: Held around every read-modify-write of the painted mask (painting, a save's
        #: marking), so a save in a worker never drops a dab painted meanwhile.
        self.painted_lock = threading.Lock()

    def begin(self, key: str) -> None:
        """A write or delete of ``key`` starts: its digest is unknown until it ends."""
        if not _is_twin_chunk(key):
            return
        with self._lock:
            busy = self._busy.get(key, 0)
            if busy:
                self._clashed.add(key)  # which of the two lands last is unknown
            self._busy[key] = busy + 1

    def end(self, key: str, digest: bytes | None, *, done: bool = True) -> None:
        """A write or delete of ``key`` ended (``done``: it succeeded) leaving ``digest``
        (None: unknown)."""
        with self._lock:
            if _is_twin_chunk(key):
                busy = self._busy.pop(key, 1) - 1
                if busy > 0:
                    self._busy[key] = busy
                clashed = key in self._clashed
                if busy <= 0:
                    self._clashed.discard(key)
                self._digests[key] = None if clashed or not done else digest
            if done:
                self._keys.add(key)
                if key.startswith(_LABEL_CHUNKS):
                    self._suspects.add(key)

    def add(self, key: str) -> None:
        """``key`` was written with contents unknown (a suspect if a labels chunk)."""
        self.begin(key)
        self.end(key, None)

    def forget(self, prefix: str) -> None:
        """Every key under ``prefix`` was removed by other means: digests unknown."""
        with self._lock:
            for key in [k for k in self._digests if k.startswith(prefix)]:
                self._digests[key] = None
            self._clashed.update(k for k in self._busy if k.startswith(prefix))

    def _consistent(self, key: str) -> bool:
        """Whether labels chunk ``key`` is known to hold the machine's chunk's values."""
        if not self.twins or not key.startswith(_LABEL_CHUNKS):
            return False
        twin = _MACHINE_CHUNKS + key[len(_LABEL_CHUNKS) :]
        if key in self._busy or twin in self._busy:
            return False
        digest = self._digests.get(key)
        return digest is not None and digest == self._digests.get(twin)

    def peek(self) -> set[str]:
        with self._lock:
            return set(self._keys)

    def suspects(self) -> set[str]:
        with self._lock:
            return {k for k in self._suspects if not self._consistent(k)}

    def take(self) -> set[str]:
        with self._lock:
            keys, self._keys = self._keys, set()
            return keys

    def take_suspects(self) -> set[str]:
        """The suspects, forgotten here; so are the digests (memory follows the chunks
        written between two saves; a chunk not written since is compared no more)."""
        with self._lock:
            keys, self._suspects = self._suspects, set()
            taken = {k for k in keys if not self._consistent(k)}
            self._digests.clear()  # a write still under way records its digest as it ends
            return taken

    def clear_suspects(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._suspects -= set(keys)

    def put_back(self, keys: Iterable[str] = (), suspects: Iterable[str] = ()) -> None:
        with self._lock:
            self._keys |= set(keys)
            self._suspects |= set(suspects)


def _is_twin_chunk(key: str) -> bool:
    return key.startswith((_LABEL_CHUNKS, _MACHINE_CHUNKS))


def _digest(value: Any) -> bytes:
    """A digest of a chunk's bytes (a zarr ``Buffer``); never ``b""``."""
    return hashlib.blake2b(value.as_buffer_like(), digest_size=16).digest()


class _TrackedStore(LocalStore):
    """A ``LocalStore`` that remembers which keys it wrote, so a save can fsync just those,
    and what it wrote into the chunks of ``labels`` and ``machine`` (:class:`_Written`)."""

    def __init__(
        self, root: Path | str, *, read_only: bool = False, written: _Written | None = None
    ) -> None:
        super().__init__(root, read_only=read_only)
        self.written = written if written is not None else _Written()

    def with_read_only(self, read_only: bool = False) -> _TrackedStore:
        return type(self)(self.root, read_only=read_only, written=self.written)

    async def set(self, key: str, value: Any) -> None:
        self.written.begin(key)
        try:
            await super().set(key, value)
        except BaseException:
            self.written.end(key, None, done=False)
            raise
        self.written.end(key, _digest(value))

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        self.written.begin(key)
        try:
            await super().set_if_not_exists(key, value)
        except BaseException:
            self.written.end(key, None, done=False)
            raise
        self.written.end(key, None)  # it may have been there already

    def set_sync(self, key: str, value: Any) -> None:
        self.written.begin(key)
        try:
            super().set_sync(key, value)
        except BaseException:
            self.written.end(key, None, done=False)
            raise
        self.written.end(key, _digest(value))

    async def delete(self, key: str) -> None:
        self.written.begin(key)
        try:
            await super().delete(key)
        except BaseException:
            self.written.end(key, None, done=False)
            raise
        self.written.end(key, b"")

    def delete_sync(self, key: str) -> None:
        self.written.begin(key)
        try:
            super().delete_sync(key)
        except BaseException:
            self.written.end(key, None, done=False)
            raise
        self.written.end(key, b"")

    async def delete_dir(self, prefix: str) -> None:
        try:
            await super().delete_dir(prefix)
        finally:
            self.written.forget(prefix)

    async def clear(self) -> None:
        try:
            await super().clear()
        finally:
            self.written.forget("")


def open_store(store_dir: Path, *, read_only: bool = False) -> LocalStore:
    """The zarr store of a chunked project (a ``LocalStore`` that tracks its writes)."""
    return _TrackedStore(store_dir, read_only=read_only)


# -- boxes ---------------------------------------------------------------------------------------


def grid_boxes(shape: Sequence[int], block: Sequence[int]) -> Iterator[Box]:
    """The cells of a grid of ``block`` from the origin, clipped to ``shape``, in C order.

    >>> [tuple((s.start, s.stop) for s in b) for b in grid_boxes((3, 5), (2, 4))]
    [((0, 2), (0, 4)), ((0, 2), (4, 5)), ((2, 3), (0, 4)), ((2, 3), (4, 5))]
    """
    ranges = [range(-(-s // b)) for s, b in zip(shape, block, strict=True)]
    for cell in itertools.product(*ranges):
        yield _cell_box(cell, shape, block)


def _cell_box(cell: Sequence[int], shape: Sequence[int], block: Sequence[int]) -> Box:
    return tuple(
        slice(i * b, min((i + 1) * b, s)) for i, s, b in zip(cell, shape, block, strict=True)
    )


def _cells_of(box: Box, block: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """The cells of a ``block`` grid that ``box`` overlaps."""
    ranges = [range(s.start // b, (s.stop - 1) // b + 1) for s, b in zip(box, block, strict=True)]
    return itertools.product(*ranges)


def _box_shape(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def _sub(box: Box, inner: Box) -> Box:
    """``inner`` (absolute) relative to ``box``."""
    return tuple(
        slice(i.start - b.start, i.stop - b.start) for b, i in zip(box, inner, strict=True)
    )


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple(
        slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
    return out if all(s.start < s.stop for s in out) else None


def _full(shape: Sequence[int]) -> Box:
    return tuple(slice(0, int(s)) for s in shape)


def normalise_box(box: Sequence[slice], shape: Sequence[int]) -> Box:
    """``box`` with explicit integer starts and stops inside ``shape``.

    Raises
    ------
    InputError
        For anything but one non-empty ``slice`` with step 1 per axis.
    """
    if len(box) != len(shape) or not all(isinstance(s, slice) for s in box):
        raise InputError(f"box {box} is not one slice per axis of {tuple(shape)}")
    out = []
    for s, n in zip(box, shape, strict=True):
        start, stop, step = s.indices(int(n))
        if step != 1 or start >= stop:
            raise InputError(f"box {box} is empty or strided in {tuple(shape)}")
        out.append(slice(start, stop))
    return tuple(out)


def _check_block(block: Sequence[int] | None, chunks: tuple[int, ...]) -> tuple[int, ...]:
    if block is None:
        return chunks
    block = tuple(int(b) for b in block)
    if len(block) != len(chunks) or min(block) < 1:
        raise InputError(f"block {block} is not one positive size per axis of {len(chunks)}")
    return block


# -- the state -----------------------------------------------------------------------------------


@dataclass(eq=False)
class ChunkedState:
    """Everything the user made for one image, in zarr arrays inside the project folder.

    The same attributes and methods as
    :class:`~napari_segtool.io.project_state.ProjectState` where they make sense for a volume
    larger than memory, plus box-wise ones; see the module docstring for the files, the
    saving and what a kill leaves. Make one with
    :meth:`~napari_segtool.io.project.Project.create_chunked`, open one with
    :meth:`~napari_segtool.io.project.Project.load`.

    Attributes
    ----------
    folder : Path
        The project folder (the arrays are in ``folder / "state.zarr"``).
    labels : zarr.Array
        The corrected labels; a napari ``Labels`` layer may paint into it directly.
    machine : zarr.Array
        What the model last wrote (same shape, dtype and chunks).
    painted : zarr.Array of bool
        Voxels the user painted, and the voxels found to differ from the machine prediction
        at creation and at each save (see the module docstring); as labelled either way.
    reviewed, versions, current_version, base_model, image
        As for :class:`~napari_segtool.io.project_state.ProjectState`.
    """

    folder: Path
    labels: zarr.Array
    machine: zarr.Array
    painted: zarr.Array
    reviewed: set[int] = field(default_factory=set)
    reviewed_patches: set[Patch] = field(default_factory=set)
    versions: list[dict[str, Any]] = field(default_factory=list)
    current_version: int | None = None
    base_model: str = ""
    image: dict[str, Any] = field(default_factory=dict)
    _written: _Written = field(default_factory=_Written, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        arrays = (self.labels, self.machine, self.painted)
        if len({(a.shape, a.chunks) for a in arrays}) != 1:
            raise InputError("labels, machine and painted masks differ in shape or chunks")
        self.reviewed = {int(z) for z in self.reviewed}
        self.reviewed_patches = as_patches(self.reviewed_patches)
        self._written.twins = _same_encoding(self.labels, self.machine)

    # -- making and opening ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        *,
        shape: Sequence[int] | None = None,
        dtype: Any = None,
        chunks: Sequence[int] | None = None,
        labels: Any = None,
        machine: Any = None,
        base_model: str = "",
        image: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ChunkedState:
        """New arrays in ``folder / "state.zarr"`` (replacing a store there); no record yet.

        Use :meth:`~napari_segtool.io.project.Project.create_chunked`, which also takes the
        lock and writes the record.

        Parameters
        ----------
        folder : path
            The project folder.
        shape, dtype : optional
            The labels' shape ``(Y, X)`` or ``(Z, Y, X)`` and integer dtype; taken from
            ``labels`` or ``machine`` when given.
        chunks : tuple of int, optional
            Chunk shape (default :data:`DEFAULT_CHUNKS`).
        labels, machine : array-like, optional
            Starting labels and machine prediction (numpy, zarr or dask; read a box at a
            time). One alone is both; neither: all 0. Voxels where they differ are marked
            painted, so the painted chunks index every change.
        progress : callable, optional
            ``progress(done, total)`` after each box written.

        Raises
        ------
        InputError
            For a layout :func:`~napari_segtool.io.project_checks.layout_problems` refuses,
            arrays that disagree in shape, or a ``state.zarr`` that is a link.
        """
        folder = Path(folder)
        source = labels if labels is not None else machine
        if source is not None:
            shape = tuple(int(n) for n in source.shape) if shape is None else tuple(shape)
            dtype = source.dtype if dtype is None else dtype
        if shape is None or dtype is None:
            raise InputError("give the labels' shape and dtype, or the labels themselves")
        shape = tuple(int(n) for n in shape)
        for name, arr in (("labels", labels), ("machine", machine)):
            if arr is not None and tuple(arr.shape) != shape:
                raise InputError(f"{name} {tuple(arr.shape)} do not match the shape {shape}")
        chunks = tuple(DEFAULT_CHUNKS.get(len(shape), shape) if chunks is None else chunks)
        if len(chunks) == len(shape) and all(isinstance(c, int | np.integer) for c in chunks):
            chunks = tuple(max(1, min(int(c), s)) if c >= 1 else int(c)
                           for c, s in zip(chunks, shape, strict=True))  # fmt: skip
        dt = np.dtype(dtype)
        problems = layout_problems(list(shape), dt.name, list(chunks), name="labels")
        if problems:
            raise InputError("cannot create a chunked project: " + "; ".join(problems))
        store_dir = folder / STORE_DIR
        if store_dir.is_symlink() or (store_dir.exists() and not store_dir.is_dir()):
            raise InputError(f"{store_dir} is a link or a file; remove it first")
        folder.mkdir(parents=True, exist_ok=True)
        store = open_store(store_dir)
        group = zarr.open_group(store, mode="w", zarr_format=3)
        arrays = {}
        for name, kind, fill in (("labels", dt, 0), ("machine", dt, 0), ("painted", bool, False)):
            arrays[name] = group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=kind,
                fill_value=fill,
                compressors=[ZstdCodec(level=1)],
                config={"write_empty_chunks": False},
            )
        state = cls(
            folder=folder,
            labels=arrays["labels"],
            machine=arrays["machine"],
            painted=arrays["painted"],
            base_model=base_model,
            image=dict(image or {"shape": list(shape)}),
            _written=store.written,
        )
        if source is not None:
            state._fill(labels, machine, progress=progress)
        return state

    def _fill(self, labels: Any, machine: Any, *, progress: Callable[[int, int], None] | None):
        lab_src = labels if labels is not None else machine
        mac_src = machine if machine is not None else labels
        block = _write_block(self.chunks, self.shape)
        boxes = list(grid_boxes(self.shape, block))
        for i, box in enumerate(boxes):
            lab = np.asarray(lab_src[box])
            mac = lab if mac_src is lab_src else np.asarray(mac_src[box])
            for name, values in (("labels", lab), ("machine", mac)):
                _check_values(values, self.labels.dtype, what=f"the starting {name}")
            self.labels[box] = lab
            self.machine[box] = mac
            if mac is not lab:
                differ = lab != mac
                if differ.any():
                    self.painted[box] = differ
            if progress is not None:
                progress(i + 1, len(boxes))
        self._written.take_suspects()  # their differences are marked already

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        record: dict[str, Any],
        *,
        walk: bool = True,
        remove_stale: bool = False,
    ) -> ChunkedState:
        """Open the arrays of the project in ``folder`` with a checked ``record``.

        :meth:`~napari_segtool.io.project.Project.load` reads and checks the record and calls
        this. The metadata of every array is checked first; with ``walk`` every file and
        folder of the store is looked at (no links allowed) and, with ``remove_stale``,
        zarr temporaries older than :data:`STALE_PARTIAL_SECONDS` are removed.

        Raises
        ------
        InputError
            Naming the store and every problem found.
        """
        folder = Path(folder)
        store_dir = folder / STORE_DIR
        shape = check_store(store_dir)
        if walk:
            problems = walk_store(store_dir, remove_stale=remove_stale)
            if problems:
                raise InputError(f"{store_dir}: " + "; ".join(problems[:8]))
        if record.get("shape", list(shape)) != list(shape):
            raise InputError(
                f"{store_dir}: holds {list(shape)}, the record says {record['shape']}"
            )
        store = open_store(store_dir)
        config = {"write_empty_chunks": False}
        try:
            arrays = {
                name: zarr.open_array(store, path=name, mode="r+", zarr_format=3, config=config)
                for name in CHUNKED_ARRAYS
            }
        except Exception as exc:  # any damage zarr finds beyond what the checks cover
            raise InputError(f"{store_dir}: damaged ({type(exc).__name__}: {exc})") from exc
        return cls(
            folder=folder,
            labels=arrays["labels"],
            machine=arrays["machine"],
            painted=arrays["painted"],
            reviewed=set(record.get("reviewed", [])),
            reviewed_patches=as_patches(record.get("reviewed_patches", [])),
            versions=[dict(v) for v in record.get("versions", [])],
            current_version=record.get("current_version"),
            base_model=record.get("base_model", ""),
            image=dict(record.get("image", {})),
            _written=store.written,
        )

    # -- the basics -----------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.labels.chunks)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def version(self, number: int) -> dict[str, Any]:
        for entry in self.versions:
            if entry["version"] == number:
                return entry
        raise InputError(f"no model version {number} in this project")

    def snapshot(self) -> ChunkedState:
        """A copy of the record (reviewed slices, versions) over the *same* arrays.

        The arrays are the files on disk and are not copied: a worker that saves or trains
        from the snapshot sees what the user paints since (each chunk old or new).
        """
        return ChunkedState(
            folder=self.folder,
            labels=self.labels,
            machine=self.machine,
            painted=self.painted,
            reviewed=set(self.reviewed),
            reviewed_patches=set(self.reviewed_patches),
            versions=[dict(v) for v in self.versions],
            current_version=self.current_version,
            base_model=self.base_model,
            image=dict(self.image),
            _written=self._written,
        )

    # -- painting -------------------------------------------------------------------------------

    def mark_painted(self, atoms: Any) -> int:
        """Record the voxels of napari paint-history atoms as painted; returns how many.

        As :meth:`~napari_segtool.io.project_state.ProjectState.mark_painted`; each atom
        rewrites the painted chunks it touches (milliseconds for a dab).
        """
        n = 0
        with self._written.painted_lock:
            for change in paint_changes(atoms):
                change.mark(self.painted)
                n += change.size
        return n

    # -- saving ---------------------------------------------------------------------------------

    def pending_keys(self) -> set[str]:
        """Store keys (``labels/c/0/1/2``) written or deleted since the last :meth:`sync`."""
        return self._written.peek()

    def sync(self) -> int:
        """Flush to disk the chunk files written since the last call; returns how many.

        :meth:`~napari_segtool.io.project.Project.save` calls it before writing the record.
        First, labels chunks written since the last call (a script writing into ``labels``)
        are compared with the machine prediction, and voxels that differ are marked painted,
        so that :meth:`labelled_boxes` finds them from the painted chunks; chunks written by
        a merge, or last written with the same bytes as the machine's chunk (a
        segmentation's), are not read (see :class:`_Written`). Files deleted since (chunks
        that became empty) only have their folder flushed.
        """
        self._fold_changes()
        keys = self._written.take()
        root = self.folder / STORE_DIR
        folders = set()
        done = 0
        try:
            for key in sorted(keys):
                path = root / key
                folders.add(path.parent)
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                    done += 1
                finally:
                    os.close(fd)
            for folder in sorted(folders):
                if folder.is_dir():
                    fsync_directory(folder)
        except BaseException:
            self._written.put_back(keys)  # the next save tries again
            raise
        return done

    def _fold_changes(self) -> None:
        """Mark painted the voxels of suspect labels chunks that differ from the machine's."""
        suspects = self._written.take_suspects()
        try:
            for key in sorted(suspects):
                index = _key_index(key, self.ndim)
                if index is None or not _on_grid(index, self.shape, self.chunks):
                    continue
                box = _cell_box(index, self.shape, self.chunks)
                differ = np.asarray(self.labels[box]) != np.asarray(self.machine[box])
                if not differ.any():
                    continue
                with self._written.painted_lock:
                    painted = np.asarray(self.painted[box], bool)
                    if (differ & ~painted).any():
                        self.painted[box] = painted | differ
        except BaseException:
            self._written.put_back(suspects=suspects)
            raise

    # -- labelled voxels, by box ----------------------------------------------------------------

    def changed_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """Voxels of ``box`` the user painted or whose label differs from the machine's."""
        box = normalise_box(box, self.shape)
        painted = np.asarray(self.painted[box], bool)
        return painted | (np.asarray(self.labels[box]) != np.asarray(self.machine[box]))

    def labelled_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """The labelled voxels of ``box`` (changed, painted or in a reviewed slice).

        The one definition (:func:`~napari_segtool.io.labelled.labelled_in_box`); reads the
        box of each array once.

        Raises
        ------
        InputError
            For a box outside the image or a reviewed slice outside it.
        """
        box = normalise_box(box, self.shape)
        return labelled_in_box(
            self.shape,
            box,
            changed=self.changed_region(box),
            reviewed=self.reviewed,
            patches=self.reviewed_patches,
        )

    def protected_region(self, box: Sequence[slice]) -> NDArray[np.bool_]:
        """Voxels of ``box`` a re-segmentation must not touch: the labelled ones."""
        return self.labelled_region(box)

    def _whole(self, what: str) -> Box:
        if self.size > MAX_WHOLE_VOXELS:
            raise InputError(
                f"{what}() of the whole volume: {self.size:,} voxels is more than "
                f"{MAX_WHOLE_VOXELS:,} to hold in memory; use {what}_region(box) with "
                "labelled_boxes() / unlabelled_boxes()"
            )
        check_allocation(self.size * (2 + 2 * self.labels.dtype.itemsize),
                         what=f"{what}() of a {self.shape} volume",
                         hint=f"use {what}_region(box) box by box")  # fmt: skip
        return _full(self.shape)

    def changed(self) -> NDArray[np.bool_]:
        """:meth:`changed_region` of the whole volume; refused above :data:`MAX_WHOLE_VOXELS`."""
        return self.changed_region(self._whole("changed"))

    def labelled(self) -> NDArray[np.bool_]:
        """:meth:`labelled_region` of the whole volume; refused above :data:`MAX_WHOLE_VOXELS`."""
        return self.labelled_region(self._whole("labelled"))

    def protected(self) -> NDArray[np.bool_]:
        """:meth:`protected_region` of the whole volume; refused above :data:`MAX_WHOLE_VOXELS`."""
        return self.protected_region(self._whole("protected"))

    def painted_chunks(self) -> set[tuple[int, ...]]:
        """Grid indices of the painted mask's chunks that exist on disk (hold a painted voxel).

        A directory listing of ``painted/c``: no chunk is read.
        """
        return _chunk_indices(self.folder / STORE_DIR / "painted", self.ndim)

    def boxes(self, block: Sequence[int] | None = None) -> Iterator[Box]:
        """Every cell of a grid of ``block`` (default: the chunks) over the volume."""
        return grid_boxes(self.shape, _check_block(block, self.chunks))

    def labelled_boxes(
        self, block: Sequence[int] | None = None, *, scan: bool = False
    ) -> list[Box]:
        """The cells of a ``block`` grid (default: the chunks) that may hold labelled voxels.

        Those overlapping a painted chunk or a reviewed slice, found without reading a
        chunk; ``scan=True`` also reads every other cell's labels and machine prediction
        (box by box) for voxels changed without being painted. A cell listed may still hold
        none (a painted chunk whose voxels lie in the neighbouring cell).

        Returns
        -------
        list of Box
            In C order of the grid.
        """
        block = _check_block(block, self.chunks)
        chunks = self.painted_chunks()
        chunks.update(
            i for k in self._written.suspects() if (i := _key_index(k, self.ndim)) is not None
        )
        cells = _labelled_cells(self.shape, self.chunks, block, chunks, self.reviewed)
        for z, y0, y1, x0, x1 in self.reviewed_patches:  # a reviewed patch is labelled whole
            box = (slice(y0, y1), slice(x0, x1))
            cells.update(_cells_of((slice(z, z + 1), *box) if self.ndim == 3 else box, block))
        if scan:
            for cell in itertools.product(
                *(range(-(-s // b)) for s, b in zip(self.shape, block, strict=True))
            ):
                if cell not in cells:
                    box = _cell_box(cell, self.shape, block)
                    if (np.asarray(self.labels[box]) != np.asarray(self.machine[box])).any():
                        cells.add(cell)
        return [_cell_box(c, self.shape, block) for c in sorted(cells)]

    def unlabelled_boxes(self, block: Sequence[int] | None = None) -> Iterator[Box]:
        """The cells of a ``block`` grid (default: the chunks) that hold an unlabelled voxel.

        A cell is left out only when each of its voxels is in a reviewed slice or painted:
        cells whose slices are all reviewed are skipped unread, cells overlapping a chunk
        with no painted voxel are yielded unread, and only cells covered by painted chunks
        have their painted mask read. Voxels labelled only by a changed label are not looked
        at, so a cell listed may be fully labelled (a merge then changes nothing there).
        """
        block = _check_block(block, self.chunks)
        painted = self.painted_chunks()
        reviewed = self.reviewed
        for box in grid_boxes(self.shape, block):
            open_rows = _unreviewed_rows(box, reviewed, self.ndim)
            if open_rows is None:
                continue  # every slice of the cell is reviewed
            if any(c not in painted for c in _chunks_of_rows(box, open_rows, self.chunks)):
                yield box  # a chunk without any painted voxel: unlabelled voxels for sure
                continue
            mask = np.asarray(self.painted[box], bool)
            if self.ndim == 3:
                mask = mask[[z - box[0].start for z in open_rows]]
            if not mask.all():
                yield box

    def painted_voxels(self) -> int:
        """How many voxels are painted (reads only the painted chunks that exist)."""
        total = 0
        for cell in self.painted_chunks():
            total += int(np.count_nonzero(self.painted[_cell_box(cell, self.shape, self.chunks)]))
        return total

    def labelled_voxels(self, block: Sequence[int] | None = None) -> int:
        """How many voxels are labelled (box by box over :meth:`labelled_boxes`)."""
        total = 0
        for box in self.labelled_boxes(block):
            total += int(np.count_nonzero(self.labelled_region(box)))
        return total

    # -- re-segmentation ------------------------------------------------------------------------

    def iter_merge_untouched(
        self,
        prediction: Any,
        *,
        block: Sequence[int] | None = None,
    ) -> Generator[tuple[int, int], None, int]:
        """:meth:`merge_untouched` as a generator: yields ``(boxes done, boxes)`` per box.

        Closing it stops after the current box: the boxes done are merged (each box is
        written whole before the next is read), the rest are as they were.
        """
        predict = prediction if callable(prediction) else None
        if predict is None and tuple(prediction.shape) != self.shape:
            raise InputError(
                f"the new prediction {tuple(prediction.shape)} does not match the labels "
                f"{self.shape}"
            )
        boxes = list(self.unlabelled_boxes(block))
        changed = 0
        for i, box in enumerate(boxes):
            pred = np.asarray(predict(box) if predict is not None else prediction[box])
            if pred.shape != _box_shape(box):
                raise InputError(
                    f"the prediction of box {box} has shape {pred.shape}, not {_box_shape(box)}"
                )
            _check_values(pred, self.labels.dtype, what="the new prediction")
            labels = np.asarray(self.labels[box])
            machine = np.asarray(self.machine[box])
            painted = np.asarray(self.painted[box], bool)
            free = ~labelled_in_box(self.shape, box, changed=painted | (labels != machine),
                                    reviewed=self.reviewed,
                                    patches=self.reviewed_patches)  # fmt: skip
            pred = pred.astype(self.labels.dtype, copy=False)
            changed += int(np.count_nonzero(free & (labels != pred)))
            # labels first: a kill before the machine's write leaves these voxels changed
            # (kept), never a machine prediction that the labels do not show
            written = _write_changed(self.labels, box, labels, np.where(free, pred, labels),
                                     self.chunks)  # fmt: skip
            _write_changed(self.machine, box, machine, np.where(free, pred, machine), self.chunks)
            # free voxels get one value in both arrays: no changed voxel comes from a merge
            self._written.clear_suspects(_LABEL_CHUNKS + "/".join(map(str, c)) for c in written)
            yield i + 1, len(boxes)
        return changed

    def merge_untouched(
        self,
        prediction: Any,
        *,
        block: Sequence[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Write a new machine prediction wherever the user has not worked; box by box.

        The blockwise twin of :func:`~napari_segtool.io.project_state.merge_untouched`, and
        equal to it: over :meth:`unlabelled_boxes`, voxels neither changed, painted nor in a
        reviewed slice take the new prediction in ``labels`` and ``machine``; only chunks
        whose values change are rewritten.

        Parameters
        ----------
        prediction : array-like or callable
            The new labels of the whole volume (numpy, zarr or dask; read box by box), or
            ``prediction(box) -> ndarray`` giving those of one box (segment only what is
            needed).
        block : tuple of int, optional
            The boxes (default: the chunks); a re-segmentation may want larger ones.
        progress : callable, optional
            ``progress(done, total)`` after each box.

        Returns
        -------
        int
            The number of voxels whose label changed.

        Raises
        ------
        InputError
            A prediction of another shape, or with values the labels' dtype cannot hold.
        """
        gen = self.iter_merge_untouched(prediction, block=block)
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                return int(stop.value)
            if progress is not None:
                progress(done, total)


# -- helpers -------------------------------------------------------------------------------------


def _write_block(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Whole chunks, stacked along the first axis up to about :data:`WRITE_BLOCK_VOXELS`."""
    deep = max(1, WRITE_BLOCK_VOXELS // max(1, math.prod(chunks)))
    return (min(shape[0], chunks[0] * deep), *chunks[1:])


def _check_values(values: NDArray, dtype: np.dtype, *, what: str) -> None:
    if values.dtype.kind not in "biu":
        raise InputError(f"{what} must be integers, not {values.dtype}")
    if values.size and values.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = int(values.min()), int(values.max())
        if lo < info.min or hi > info.max:
            raise InputError(
                f"{what} holds {lo if lo < info.min else hi}, which labels of dtype {dtype} "
                "cannot hold"
            )


def _write_changed(
    arr: zarr.Array, box: Box, old: NDArray, new: NDArray, chunks: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Write ``new`` over ``box`` of ``arr``, chunk by chunk, only where it differs from
    ``old`` (what ``arr`` holds there); returns the chunks written."""
    shape = tuple(arr.shape)
    written = []
    for cell in _cells_of(box, chunks):
        part = _intersect(box, _cell_box(cell, shape, chunks))
        if part is None:
            continue
        local = _sub(box, part)
        if not np.array_equal(old[local], new[local]):
            arr[part] = new[local]
            written.append(tuple(cell))
    return written


def _same_encoding(a: zarr.Array, b: zarr.Array) -> bool:
    """Whether ``a`` and ``b`` store equal chunks as equal bytes and read equal bytes back as
    equal values: the same metadata but for the attributes."""
    meta_a, meta_b = a.metadata.to_dict(), b.metadata.to_dict()
    for meta in (meta_a, meta_b):
        meta.pop("attributes", None)
    return meta_a == meta_b


def _key_index(key: str, ndim: int) -> tuple[int, ...] | None:
    """``labels/c/1/2/3`` -> ``(1, 2, 3)``; None for any other key."""
    parts = key.split("/")[2:]
    if len(parts) != ndim or not all(_CHUNK_NAME.fullmatch(p) for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _on_grid(index: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    return all(0 <= i < -(-s // c) for i, s, c in zip(index, shape, chunks, strict=True))


def _chunks_of_rows(
    box: Box, rows: list[int], chunks: tuple[int, ...]
) -> Iterator[tuple[int, ...]]:
    """The chunks that the given slices (rows of axis 0 in 3D; all of a 2D box) of ``box``
    overlap."""
    if len(box) == 2:
        yield from _cells_of(box, chunks)
        return
    plane = list(_cells_of(box[1:], chunks[1:]))
    for zc in sorted({z // chunks[0] for z in rows}):
        for rest in plane:
            yield (zc, *rest)


def _unreviewed_rows(box: Box, reviewed: set[int], ndim: int) -> list[int] | None:
    """The slices of ``box`` not reviewed (all of a 2D box unless 0 is), None for none."""
    if ndim == 2:
        return None if 0 in reviewed else [0]
    rows = [z for z in range(box[0].start, box[0].stop) if z not in reviewed]
    return rows or None


def _labelled_cells(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    block: tuple[int, ...],
    painted: set[tuple[int, ...]],
    reviewed: set[int],
) -> set[tuple[int, ...]]:
    cells: set[tuple[int, ...]] = set()
    for chunk in painted:
        if _on_grid(chunk, shape, chunks):
            cells.update(_cells_of(_cell_box(chunk, shape, chunks), block))
    other = [range(-(-s // b)) for s, b in zip(shape[1:], block[1:], strict=True)]
    if len(shape) == 2:
        if 0 in reviewed:
            cells.update(itertools.product(range(-(-shape[0] // block[0])), *other))
    else:
        for zc in sorted({z // block[0] for z in reviewed if 0 <= z < shape[0]}):
            cells.update((zc, *rest) for rest in itertools.product(*other))
    return cells


def _chunk_indices(array_dir: Path, ndim: int) -> set[tuple[int, ...]]:
    """Grid indices of the chunk files under ``array_dir / "c"`` (links never followed)."""
    found: set[tuple[int, ...]] = set()

    def walk(folder: str, prefix: tuple[int, ...]) -> None:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if not _CHUNK_NAME.fullmatch(entry.name):
                continue
            index = (*prefix, int(entry.name))
            if len(index) == ndim:
                if entry.is_file(follow_symlinks=False):
                    found.add(index)
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, index)

    walk(os.fspath(array_dir / "c"), ())
    return found


def check_store(store_dir: Path) -> tuple[int, ...]:
    """Check a chunked project's store from its metadata files alone; returns the shape.

    The group's and each array's ``zarr.json`` are read as plain JSON (at most
    :data:`~napari_segtool.io.project_checks.MAX_METADATA_BYTES`) and checked
    (:func:`~napari_segtool.io.project_checks.array_metadata_problems`); the store and its
    array folders must be folders, not links.

    Raises
    ------
    InputError
        Naming ``store_dir`` and every problem.
    """
    if store_dir.is_symlink() or not store_dir.is_dir():
        raise InputError(f"{store_dir}: missing, or not a folder")
    problems: list[str] = []
    layouts = {}
    try:
        group = read_json_file(store_dir / "zarr.json", limit=MAX_METADATA_BYTES)
        if (
            not isinstance(group, dict)
            or group.get("zarr_format") != 3
            or group.get("node_type") != "group"
        ):
            problems.append("zarr.json is not a zarr v3 group")
    except (OSError, ValueError) as exc:
        problems.append(f"zarr.json: {exc}")
    for name in CHUNKED_ARRAYS:
        folder = store_dir / name
        if folder.is_symlink() or not folder.is_dir():
            problems.append(f"{name!r}: missing, or not a folder")
            continue
        try:
            meta = read_json_file(folder / "zarr.json", limit=MAX_METADATA_BYTES)
        except (OSError, ValueError) as exc:
            problems.append(f"{name!r}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        found, layout = array_metadata_problems(meta, name)
        problems += found
        if layout is not None:
            layouts[name] = layout
    if not problems and len(layouts) == len(CHUNKED_ARRAYS):
        problems = chunked_layout_problems(layouts)
    if problems:
        raise InputError(f"{store_dir}: damaged chunked project: " + "; ".join(problems))
    return layouts["labels"][0]


def walk_store(store_dir: Path, *, remove_stale: bool = False) -> list[str]:
    """Look at every file and folder of a store: links are problems; returns them.

    With ``remove_stale``, zarr temporaries (``*.<32 hex>.partial``) older than
    :data:`STALE_PARTIAL_SECONDS` are removed (only safe under the project's lock).
    """
    problems: list[str] = []
    now = time.time()
    removed = 0
    stack = [os.fspath(store_dir)]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_symlink():
                    problems.append(
                        f"{os.path.relpath(entry.path, store_dir)} is a link; a project's "
                        "store holds only plain files"
                    )
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif remove_stale and _PARTIAL.fullmatch(entry.name):
                    try:
                        if (
                            now - entry.stat(follow_symlinks=False).st_mtime
                            >= STALE_PARTIAL_SECONDS
                        ):
                            os.unlink(entry.path)
                            removed += 1
                    except OSError as exc:
                        logger.warning("could not remove the temporary %s: %s", entry.path, exc)
    if removed:
        logger.info("removed %d temporaries of a killed writer from %s", removed, store_dir)
    return problems


def record_text(record: dict[str, Any]) -> bytes:
    """The record as the bytes of ``state.json``."""
    return json.dumps(record, indent=1).encode()
