"""Segment a volume larger than memory into a chunked project, while the user may paint on it.

:func:`iter_segment_lazy` runs the block engine
(:func:`~napari_segtool.inference.blocks.iter_segment_blocks`) over a lazy one-channel
``(Z, Y, X)`` volume (or ``(Y, X)`` image) and writes each finished block into a
:class:`~napari_segtool.io.chunked_state.ChunkedState` through :class:`ProtectedLabels`:
the labels take the prediction only where the voxel is not labelled (painted, changed from
the machine prediction, or in a reviewed slice; :func:`~napari_segtool.io.labelled.
labelled_in_box`), so the user's voxels are never overwritten, whenever they were painted.

Painting while it fills
-----------------------
napari writes a brush stroke into ``state.labels`` on the UI thread and sends the paint event
when the stroke ends; the writer's read-modify-write of a chunk may fall in between and write
the stroke's voxels over with the prediction. Both sides therefore share one lock:
:class:`ProtectedLabels` holds it around the read-modify-write of each chunk (milliseconds),
and :func:`record_paint`, called from the paint event, holds it while it marks the stroke's
voxels painted and writes their new values again. Every chunk write is then either before
the stroke's record (and written over again by it) or after it (and sees the voxels painted).

Cancel by closing the generator: the chunk being written is finished, nothing more is written,
and the record is saved; every chunk holds either its old or its new values.

A box only
----------
With ``region``, only that box of the image is read and segmented (normalised with the whole
volume's range, so its voxels get the labels a whole run would give them) and only that box of
the project is written; everything outside keeps its labels, machine prediction and record.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.blocks import iter_segment_blocks, labels_dtype, subsample_range
from napari_segtool.io.chunked_state import ChunkedState, normalise_box
from napari_segtool.io.labelled import labelled_in_box
from napari_segtool.io.paint import paint_changes
from napari_segtool.io.project import Project
from napari_segtool.model.checkpoint import SegmentationModel

logger = logging.getLogger(__name__)

__all__ = [
    "UNCERTAINTY_STORE",
    "BlockProgress",
    "LazyResult",
    "ProtectedLabels",
    "iter_segment_lazy",
    "open_chunked",
    "record_paint",
]

#: The uncertainty map (flip TTA) of the last run, beside ``state.zarr`` in the project folder.
UNCERTAINTY_STORE = "uncertainty.zarr"

Box = tuple[slice, ...]


@dataclass(frozen=True)
class BlockProgress:
    """Progress of :func:`iter_segment_lazy`.

    Attributes
    ----------
    done, total : int
        Tiles done out of the total.
    rows : tuple of int
        ``(a, b)``: rows ``[a, b)`` of the labels' first axis (Z of a volume, Y of a 2D image)
        written since the previous report, final; ``a == b`` when none were.
    """

    done: int
    total: int
    rows: tuple[int, int] = (0, 0)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class LazyResult:
    """What :func:`iter_segment_lazy` returns once every row is written.

    Attributes
    ----------
    value_range : (float, float)
        The intensities mapped to 0 and 1 (also in ``state.image["value_range"]``).
    execution : dict
        How the network ran (precision, memory format, compiled).
    uncertainty : zarr.Array or None
        The normalised entropy, float32 in ``[0, 1]``, in ``<project>/uncertainty.zarr``
        (flip TTA only).
    """

    value_range: tuple[float, float]
    execution: dict[str, object]
    uncertainty: zarr.Array | None = None


def open_chunked(
    project: Project,
    *,
    shape: tuple[int, ...],
    dtype: Any,
    image: dict[str, Any] | None = None,
    base_model: str = "",
) -> ChunkedState:
    """The chunked project saved in ``project``'s folder if it fits, else a new one there.

    Parameters
    ----------
    project : Project
    shape : tuple of int
        The image's spatial shape ``(Z, Y, X)`` or ``(Y, X)``.
    dtype : dtype
        The labels' dtype (:func:`~napari_segtool.inference.blocks.labels_dtype` of the
        model): a saved project must hold it.
    image, base_model : optional
        The record of a new project (:meth:`~napari_segtool.io.project.Project.create_chunked`).

    Raises
    ------
    InputError
        When the folder holds an in-memory project, or one of another shape, or labels too
        narrow for the model's values; the message names the folder.
    """
    shape = tuple(int(s) for s in shape)
    if not project.exists():
        return project.create_chunked(shape=shape, dtype=dtype, base_model=base_model,
                                      image=image)  # fmt: skip
    state = project.load()
    where = project.folder
    if not isinstance(state, ChunkedState):
        raise InputError(
            f"{where} holds an in-memory project, which a volume larger than memory cannot use; "
            "move or rename that folder, and segment again"
        )
    if state.shape != shape:
        raise InputError(
            f"{where} holds a project for shape {state.shape}, not this image's {shape}; move "
            "or rename that folder, and segment again"
        )
    if not np.can_cast(np.dtype(dtype), state.labels.dtype):
        raise InputError(
            f"{where} holds labels of dtype {state.labels.dtype}, too narrow for the model's "
            f"{np.dtype(dtype)}; pick another model or move that folder"
        )
    return state


def _cells(box: Box, chunks: tuple[int, ...]) -> Iterable[Box]:
    """The parts of ``box`` that lie in one chunk each, in C order."""
    ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(box, chunks, strict=True)]
    for cell in itertools.product(*ranges):
        yield tuple(
            slice(max(s.start, i * c), min(s.stop, (i + 1) * c))
            for i, s, c in zip(cell, box, chunks, strict=True)
        )


class ProtectedLabels:
    """A ``labels_out`` for the block engine that never writes over the user's voxels.

    ``out[key] = prediction`` (a box of whole rows) is written chunk by chunk, each under
    ``lock``: voxels that are labelled (:meth:`ChunkedState.labelled_region`'s definition)
    keep their labels; the others take the prediction. The machine prediction takes it
    everywhere except at voxels labelled only because their label differs from the machine's
    (there it stays, so they still count as changed). Chunks whose values do not change are
    not written.

    Parameters
    ----------
    state : ChunkedState
    lock : threading.Lock, optional
        Shared with :func:`record_paint` (default: a new one, :attr:`lock`).
    region : tuple of slice, optional
        A box of ``state``: then this array has the box's shape, and ``out[key]`` writes
        ``state``'s voxels at ``key`` shifted by the box's start (nothing outside the box).
    """

    def __init__(
        self,
        state: ChunkedState,
        *,
        lock: threading.Lock | None = None,
        region: Box | None = None,
    ) -> None:
        self.state = state
        self.lock = lock if lock is not None else threading.Lock()
        self._full = state.shape
        self.region = normalise_box(region or (slice(None),) * len(self._full), self._full)
        self.shape = tuple(s.stop - s.start for s in self.region)
        self.ndim = len(self.shape)
        self.dtype = state.labels.dtype
        self._rows: tuple[int, int] | None = None
        self._rows_lock = threading.Lock()

    def __setitem__(self, key: Any, value: Any) -> None:
        box = _shifted(key, self.shape, self.region)
        value = np.asarray(value)
        if value.shape != tuple(s.stop - s.start for s in box):
            raise InputError(f"a block of shape {value.shape} does not fit the box {box}")
        if value.dtype != self.dtype:
            value = value.astype(self.dtype)  # labels_dtype never exceeds it (open_chunked)
        for part in _cells(box, self.state.chunks):
            local = tuple(
                slice(p.start - b.start, p.stop - b.start) for p, b in zip(part, box, strict=True)
            )
            with self.lock:
                self._write(part, value[local])
        with self._rows_lock:
            a, b = box[0].start, box[0].stop
            self._rows = (a, b) if self._rows is None else (min(a, self._rows[0]),
                                                            max(b, self._rows[1]))  # fmt: skip

    def _write(self, part: Box, pred: NDArray) -> None:
        state = self.state
        labels = np.asarray(state.labels[part])
        machine = np.asarray(state.machine[part])
        painted = np.asarray(state.painted[part], bool)
        differ = labels != machine
        keep = labelled_in_box(self._full, part, changed=painted | differ,
                               reviewed=set(state.reviewed),
                               patches=set(state.reviewed_patches))  # fmt: skip
        new_labels = np.where(keep, labels, pred)
        new_machine = np.where(differ & ~painted, machine, pred)
        # labels first, as a merge does: a kill before the machine's write leaves these
        # voxels changed (kept), never a machine prediction that the labels do not show
        if not np.array_equal(new_labels, labels):
            state.labels[part] = new_labels
        if not np.array_equal(new_machine, machine):
            state.machine[part] = new_machine

    def take_rows(self) -> tuple[int, int] | None:
        """The rows ``(a, b)`` written since the last call (their hull), or None."""
        with self._rows_lock:
            rows, self._rows = self._rows, None
            return rows


def _shifted(key: Any, shape: tuple[int, ...], region: Box) -> Box:
    """``key`` (a box of an array of ``shape``, the size of ``region``) as a box of the whole."""
    keys = key if isinstance(key, tuple) else (key,)
    box = normalise_box(keys + (slice(None),) * (len(shape) - len(keys)), shape)
    return tuple(
        slice(b.start + r.start, b.stop + r.start) for b, r in zip(box, region, strict=True)
    )


class _Placed:
    """An output of ``region``'s shape that writes into ``out`` (the whole) at the box."""

    def __init__(self, out: Any, region: Box) -> None:
        self.out, self.region = out, region
        self.shape = tuple(s.stop - s.start for s in region)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.out[_shifted(key, self.shape, self.region)] = value


def record_paint(
    state: ChunkedState,
    atoms: Any,
    *,
    lock: threading.Lock | None = None,
    rewrite: bool = False,
) -> int:
    """Record a napari paint event's atoms (``Labels.events.paint``'s ``value``) as painted.

    Parameters
    ----------
    state : ChunkedState
    atoms : list
        The history atoms (:func:`~napari_segtool.io.paint.paint_changes` reads both kinds).
    lock : threading.Lock, optional
        The :class:`ProtectedLabels` lock of a run in progress: held throughout.
    rewrite : bool
        Also write the atoms' new values into ``state.labels`` again, in case a run wrote the
        prediction over them between napari's write and this event (do this while a run
        writes; napari has written them already otherwise).

    Returns
    -------
    int
        The number of voxels recorded.
    """
    atoms = list(atoms)
    with lock if lock is not None else contextlib.nullcontext():
        n = state.mark_painted(atoms)
        if rewrite:
            for change in paint_changes(atoms):
                _rewrite(state.labels, change)
    return n


def _rewrite(labels: Any, change: Any) -> None:
    """Write one paint change's new values into ``labels`` (read-modify-write of its box)."""
    if change.indices is not None:
        idx = change.indices
        if not idx or idx[0].size == 0:
            return
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        region = np.asarray(labels[box]).copy()
        region[tuple(i - s.start for i, s in zip(idx, box, strict=True))] = change.new_value
    else:
        box = change.box
        region = np.asarray(labels[box]).copy()
        if change.mask is None:
            region[...] = change.new_value
        else:
            region[change.mask] = change.new_value
    labels[box] = region


def iter_segment_lazy(
    image: Any,
    model: SegmentationModel,
    *,
    state: ChunkedState,
    project: Project | None = None,
    config: InferenceConfig | None = None,
    value_range: tuple[NDArray, NDArray] | None = None,
    uncertainty: bool = False,
    lock: threading.Lock | None = None,
    region: Box | None = None,
) -> Generator[BlockProgress, None, LazyResult]:
    """Segment a lazy one-channel volume into a chunked project, block by block.

    Parameters
    ----------
    image : array-like, shape (Z, Y, X) or (Y, X)
        numpy, zarr or dask; read region by region only. The shape of ``state``.
    model : SegmentationModel
        A one-input-channel 2D or 3D model.
    state : ChunkedState
        Where the labels go (:class:`ProtectedLabels`: never over labelled voxels).
    project : Project, optional
        Saves the record (with the range used) at the end, also when cancelled or failed.
    config : InferenceConfig, optional
        As for :func:`~napari_segtool.inference.predict.segment`.
    value_range : (lo, hi), optional
        Intensities mapped to 0 and 1; default
        :func:`~napari_segtool.inference.blocks.subsample_range` of the whole image (also
        with a ``region``) with the model's normalisation. Stored in
        ``state.image["value_range"]``.
    uncertainty : bool
        With ``config.tta``: write the normalised entropy into ``<project>/uncertainty.zarr``
        (replaced by every run; with a ``region``, 0 outside the box).
    lock : threading.Lock, optional
        Shared with :func:`record_paint` while the user may paint.
    region : tuple of slice, optional
        One slice per axis (step 1, open ends allowed): segment only ``image[region]`` and
        write only that box of ``state``; every voxel outside keeps its values. Progress
        ``rows`` are rows of the whole image.

    Yields
    ------
    BlockProgress
        After each batch of tiles, with the rows that became final since the last report;
        a last one with every row written. Closing the generator cancels after the current
        chunk (see the module docstring).

    Returns
    -------
    LazyResult

    Raises
    ------
    InputError
        An image of another shape than ``state``, a model with more than one input channel,
        labels too narrow for the model's values, an unusable intensity range, or a
        ``region`` that is empty, strided or not one slice per axis.

    Notes
    -----
    On the voxels it may write, the labels equal those of
    :func:`~napari_segtool.inference.predict.segment` (of ``image[region]`` with a region)
    with the same ``value_range``.
    Memory is that of the block engine plus one chunk of each array.
    """
    cfg = config or InferenceConfig()
    shape = tuple(int(s) for s in image.shape)
    if shape != state.shape:
        raise InputError(f"the image {shape} does not match the project's labels {state.shape}")
    if not np.can_cast(labels_dtype(model), state.labels.dtype):
        raise InputError(
            f"the project's labels ({state.labels.dtype}) cannot hold the model's label values "
            f"({labels_dtype(model)}); start a new project folder"
        )
    if uncertainty and not cfg.tta:
        raise InputError("the uncertainty needs flip test-time augmentation (config.tta=True)")
    box = None if region is None else normalise_box(tuple(region), shape)
    if value_range is None:
        value_range = subsample_range(image, model.normalization)
    lo, hi = (float(np.asarray(v, np.float64).reshape(-1)[0]) for v in value_range)
    # what a re-segmentation after a round must reuse, so untouched voxels change only
    # because the model did (the tiling and flips change labels too)
    settings = {"tile_shape": list(cfg.tile_shape) if cfg.tile_shape else None,
                "overlap": cfg.overlap, "blend": cfg.blend, "tta": cfg.tta}  # fmt: skip
    state.image = {**state.image, "value_range": [lo, hi], "inference": settings}
    unc = None
    if uncertainty:
        unc = zarr.open_array(state.folder / UNCERTAINTY_STORE, mode="w", shape=shape,
                              chunks=state.chunks, dtype="f4", fill_value=0.0,
                              zarr_format=3)  # fmt: skip
    out = ProtectedLabels(state, lock=lock, region=box)
    unc_out = None if unc is None or box is None else _Placed(unc, box)
    blocks = iter_segment_blocks(image, model, value_range=value_range, labels_out=out,
                                 config=cfg, uncertainty_out=unc_out or unc,
                                 region=box)  # fmt: skip
    total = 0
    try:
        while True:
            try:
                p = next(blocks)
            except StopIteration as stop:
                execution = dict(stop.value or {})
                break
            total = p.total
            yield BlockProgress(p.done, p.total, out.take_rows() or (0, 0))
        rows = out.take_rows()  # the writes that finished after the last batch
        if rows is not None:
            yield BlockProgress(total, total, rows)
    finally:
        blocks.close()  # waits for a write in flight: every chunk is old or new
        if project is not None:
            project.save(state)
    return LazyResult((lo, hi), execution, unc)
