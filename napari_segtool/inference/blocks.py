"""Block engine for larger-than-memory volumes: stream the sliding window along the first axis.

:func:`iter_sliding_window_streamed` runs exactly the tiles of
:func:`~napari_segtool.inference.tiling.iter_sliding_window` (same global grid, same Gaussian
weights, same order), but keeps the blended accumulator only for the rows of the first spatial
axis that a tile still covers. Rows that no later tile touches are final: they are divided by
the weight sum, handed to a ``sink`` and dropped, so peak memory is bounded by one tile's
extent along the first axis, whatever the volume's length. :func:`iter_segment_blocks` builds a
segmentation on it that writes labels (and uncertainty) block by block into any array that
supports ``out[a:b] = ...`` (numpy, ``zarr.Array``), optionally of a box of the volume only
(``region``), and counts the classes as it writes them. :func:`block_rows` says how many
rows it writes at a time, so output chunks can match its writes.

The input may be a numpy, zarr or dask array: it is only read region by region, as
``image[region]`` followed by ``np.asarray``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig, NormalizationConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import predict
from napari_segtool.inference.normalize import apply_range, percentile_range
from napari_segtool.inference.outputs import Outputs, argmax_channels, normalized_entropy
from napari_segtool.inference.predict import Progress, _tile_shape
from napari_segtool.inference.predictor import make_predictor, plan_network, resolve_device
from napari_segtool.inference.tiling import (
    Predictor,
    Preprocess,
    TileProgress,
    _Plan,
    blend_weights,
    iter_sliding_window,
    predicted_batches,
    relay,
    run_to_end,
    tile_grid,
    tile_starts,
)
from napari_segtool.io.zarr_io import RegionView
from napari_segtool.model.checkpoint import SegmentationModel

logger = logging.getLogger(__name__)

__all__ = [
    "Sink",
    "block_rows",
    "iter_segment_blocks",
    "iter_sliding_window_streamed",
    "labels_dtype",
    "segment_blocks",
    "subsample_range",
    "subsample_slices",
]

Sink = Callable[[int, int, NDArray[np.float32]], None]
"""``sink(a, b, block)``: final rows ``[a, b)`` of the first spatial axis,
``block`` of shape ``(C_out, b - a, *S[1:])`` float32."""


class _OneItem:
    """``(1, C, *S)`` view of a lazy ``(C, *S)`` image for the tiler's reader: reads only the
    asked region, as ``np.asarray(image[(slice(None), *region)])``."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.shape = (1, *tuple(image.shape))

    def __getitem__(self, key: tuple[Any, ...]) -> NDArray:
        return np.asarray(self.image[(slice(None), *key[2:])])


class _AddChannel:
    """``(1, *S)`` view of a lazy one-channel ``(*S)`` volume (reads regions only)."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.shape = (1, *tuple(image.shape))

    def __getitem__(self, key: tuple[Any, ...]) -> NDArray:
        return np.asarray(self.image[key[1:]])[np.newaxis]


class _Plane:
    """``(1, Y, X)`` view of a lazy 2D ``(Y, X)`` image: a one-slice stack (reads regions)."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.shape = (1, *tuple(image.shape))

    def __getitem__(self, key: Any) -> NDArray:
        keys = key if isinstance(key, tuple) else (key,)
        first, rest = keys[0], tuple(keys[1:]) + (slice(None),) * (3 - len(keys))
        block = np.asarray(self.image[rest])
        if isinstance(first, slice):
            return block[np.newaxis][first]
        if int(first) not in (0, -1):
            raise IndexError(f"index {first} is out of bounds for a one-slice stack")
        return block


class _PlaneOut:
    """An output of the 2D image's shape written as a one-slice stack: the leading axis of
    the image (``axis`` of the output: 0, or 1 after the probabilities' class axis) drops."""

    def __init__(self, out: Any, axis: int) -> None:
        self.out, self.axis = out, axis
        shape = tuple(out.shape)
        self.shape = (*shape[:axis], 1, *shape[axis:])

    def __setitem__(self, key: Any, value: NDArray) -> None:
        keys = key if isinstance(key, tuple) else (key,)
        inner = keys[: self.axis] + keys[self.axis + 1 :]
        self.out[inner] = np.asarray(value)[(slice(None),) * self.axis + (0,)]


def _streamed_plan(
    shape: tuple[int, ...], tile_shape: Sequence[int], overlap: float, blend: str
) -> _Plan:
    """The tiler's plan for one item ``(C, *S)``, without the whole-image weight sum."""
    if len(shape) < 2:
        raise InputError(f"image must be (C, *spatial), got shape {shape}")
    spatial = tuple(int(s) for s in shape[1:])
    tile = tuple(int(t) for t in tile_shape)
    if len(tile) != len(spatial):
        raise InputError(
            f"tile_shape {tile} has {len(tile)} axes but the image has {len(spatial)} spatial "
            f"axes {spatial}"
        )
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    eff_tile = tuple(min(t, s) for t, s in zip(tile, spatial, strict=True))
    grid = tile_grid(spatial, eff_tile, overlap)
    return _Plan(
        spatial=spatial,
        tile=tile,
        eff_tile=eff_tile,
        pad=[(0, t - e) for t, e in zip(tile, eff_tile, strict=True)],
        jobs=[(0, start) for start in grid],
        weights=blend_weights(eff_tile, blend),
        weight_sum=np.zeros((0,) * len(spatial), np.float32),  # rolling instead, see below
    )


def iter_sliding_window_streamed(
    image: Any,
    predictor: Predictor,
    *,
    tile_shape: Sequence[int],
    out_channels: int,
    sink: Sink,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    preprocess: Preprocess | None = None,
    channels_last: bool = False,
) -> Generator[TileProgress, None, None]:
    """:func:`~napari_segtool.inference.tiling.iter_sliding_window` for one lazy item, with a
    rolling accumulator along the first spatial axis.

    Parameters
    ----------
    image : array-like, shape (C, *S)
        One image (``S`` 2D or 3D): numpy, zarr or dask. Read tile by tile only.
    predictor, tile_shape, out_channels, overlap, blend, batch_size, device, preprocess, \
channels_last
        As for :func:`~napari_segtool.inference.tiling.iter_sliding_window`.
    sink : callable
        ``sink(a, b, block)`` receives the final blended rows ``[a, b)`` of the first spatial
        axis, ``block`` float32 of shape ``(out_channels, b - a, *S[1:])``, in increasing order
        and covering ``[0, S[0])`` exactly once. The block is not reused afterwards.

    Yields
    ------
    TileProgress
        After each batch of tiles. Closing the generator cancels; no sink call follows.

    Notes
    -----
    The tiles, their order (grid order, first axis slowest), their weights and every float32
    addition are those of the in-memory tiler, so the blocks equal its output bit for bit for
    the same predictor outputs. Rows ``[z_k, z_{k+1})`` are final once the first tile starting
    at ``z_{k+1}`` arrives (later tiles start at ``z_{k+1}`` or beyond), so the accumulator and
    its weight sum hold ``eff_tile[0]`` rows: about ``eff_tile[0] * prod(S[1:]) *
    (out_channels + 1) * 4`` bytes plus one flushed block, independent of ``S[0]``.
    """
    plan = _streamed_plan(tuple(image.shape), tile_shape, overlap, blend)
    reader = _OneItem(image)
    rolling = _Rolling(plan, out_channels, sink)
    batches = predicted_batches(
        reader, plan, predictor, out_channels=out_channels, batch_size=batch_size,
        device=device, preprocess=preprocess, channels_last=channels_last,
    )  # fmt: skip
    try:
        for batch, y, progress in batches:
            for k, (_, start) in enumerate(batch):
                rolling.add(y[k], start)
            yield progress
        rolling.flush(plan.spatial[0])
    finally:
        rolling.free()


class _Rolling:
    """The blended scores and weight sum of the rows ``[lo, lo + eff_tile[0])`` still open."""

    def __init__(self, plan: _Plan, out_channels: int, sink: Sink) -> None:
        self.plan, self.sink, self.lo = plan, sink, 0
        self.rows = plan.eff_tile[0]
        rest = plan.spatial[1:]
        self.acc = np.zeros((out_channels, self.rows, *rest), np.float32)
        self.wsum = np.zeros((self.rows, *rest), np.float32)
        self.weighted = np.empty((out_channels, *plan.eff_tile), np.float32)
        self.crop = (slice(None), *(slice(0, e) for e in plan.eff_tile))

    def add(self, y: NDArray[np.float32], start: tuple[int, ...]) -> None:
        """Add one tile's weighted prediction (grid order: rows before ``start[0]`` are final)."""
        if start[0] > self.lo:
            self.flush(start[0])
        plan = self.plan
        local = (slice(0, self.rows), *plan.region(start)[1:])  # start[0] == lo now
        np.multiply(y[self.crop], plan.weights, out=self.weighted)
        self.acc[(slice(None), *local)] += self.weighted
        self.wsum[local] += plan.weights

    def flush(self, to: int) -> None:
        """Hand rows ``[lo, to)`` to the sink, divided by their weight sum; drop them."""
        n = to - self.lo
        if n <= 0:
            return
        block = self.acc[:, :n] / self.wsum[:n]
        # shift the rows still open to the front; the freed rows start again from zero
        keep = self.rows - n
        self.acc[:, :keep] = self.acc[:, n:].copy()
        self.acc[:, keep:] = 0
        self.wsum[:keep] = self.wsum[n:].copy()
        self.wsum[keep:] = 0
        a, self.lo = self.lo, to
        self.sink(a, to, block)

    def free(self) -> None:
        self.acc = self.wsum = self.weighted = np.zeros(0, np.float32)


def subsample_slices(
    shape: Sequence[int], *, max_voxels: int = 2**22, seed: int = 0
) -> tuple[list[int], int]:
    """The slices (indices along the first axis) :func:`subsample_range` reads, and the stride
    along each slice's first axis that keeps the sample within ``max_voxels``.

    Examples
    --------
    >>> subsample_slices((100, 64, 64), max_voxels=10 * 64 * 64, seed=0)[0][:3]
    [6, 16, 26]
    >>> subsample_slices((3, 64, 64), max_voxels=2**22)
    ([0, 1, 2], 1)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"image must be a non-empty 2D or 3D array, got shape {shape}")
    if max_voxels < 1:
        raise InputError(f"max_voxels must be positive, got {max_voxels}")
    plane = math.prod(shape[1:])
    n = max(1, min(shape[0], max_voxels // plane))
    step = shape[0] / n
    offset = 0.0 if n == shape[0] else float(np.random.default_rng(seed).uniform(0, step))
    index = sorted({min(shape[0] - 1, int(offset + k * step)) for k in range(n)})
    return index, max(1, math.ceil(plane / max_voxels))


def subsample_range(
    image: Any,
    normalization: NormalizationConfig,
    *,
    max_voxels: int = 2**22,
    seed: int = 0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Percentile range of a one-channel volume from an evenly spaced subset of its slices.

    Reads at most ``max_voxels`` voxels: ``n = clip(max_voxels // plane, 1, Z)`` whole slices
    ``image[z]`` of the first axis at ``z = offset + k * step`` (``step = Z / n``,
    ``k = 0 .. n-1``, rounded down), where ``offset`` is drawn in ``[0, step)`` from
    ``numpy.random.default_rng(seed)`` (0 when every slice is read). A 2D image ``(Y, X)`` is
    read row-wise the same way. When one slice alone exceeds ``max_voxels``, each read slice
    is subsampled by a stride along its first axis so the total stays within budget (the whole
    slice is still read from storage). The percentiles are then those of
    :func:`~napari_segtool.inference.normalize.percentile_range` on the stacked sample; with
    ``max_voxels >= image.size`` the sample is the whole image and the range is the same.
    :func:`subsample_slices` gives the slices and the stride.

    Returns
    -------
    lo, hi : ndarray of float64, shape (1,)

    Raises
    ------
    InputError
        If the sample holds NaN or infinite values, or its range is unusable
        (:func:`~napari_segtool.inference.normalize.check_range`).
    """
    index, stride = subsample_slices(image.shape, max_voxels=max_voxels, seed=seed)
    sample = np.stack([np.asarray(image[z])[::stride] for z in index])
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise InputError(
            f"image has non-finite values (NaN or infinite) in the slices {index[:8]} sampled "
            "for its intensity range; replace them first, e.g. with numpy.nan_to_num"
        )
    return percentile_range(sample, normalization)


def labels_dtype(model: SegmentationModel) -> np.dtype:
    """The dtype of the labels :func:`iter_segment_blocks` writes (and ``segment`` returns):
    uint8 for label values up to 255, uint16 up to 65535, else uint32."""
    return Outputs.empty((1, 1, 1), model, tta=False, probabilities=False).labels.dtype


def block_rows(
    shape: Sequence[int], model: SegmentationModel, *, config: InferenceConfig | None = None
) -> int:
    """Rows of the first axis that :func:`iter_segment_blocks` writes at a time.

    Every write covers rows ``[a, b)`` of whole planes. A 2D model writes chunks of slices of
    this length (the last one shorter), so output chunks of this depth (or a divisor of it)
    along Z are each written once, whole. A 3D model writes the rows between consecutive tile
    starts along Z (this stride) and, at the end, the rows of the last tile, which is shifted
    to end at the volume's end: the one chunk that straddles its start is written twice
    (:attr:`~napari_segtool.io.zarr_io.OmeZarrWriter.rows` buffers rows to whole chunks, so
    there every chunk is written once).

    Parameters
    ----------
    shape : sequence of int
        The (region's) shape ``(Z, Y, X)``, or ``(Y, X)`` (one slice: returns 1).
    model : SegmentationModel
    config : InferenceConfig, optional
        Its tile shape, overlap and batch size (default: the model's tile).

    Examples
    --------
    >>> from napari_segtool.config import ModelConfig
    >>> m = SegmentationModel.new(ModelConfig(spatial_dims=3, depth=2, base_features=4),
    ...                           tile_shape=(16, 32, 32))
    >>> block_rows((100, 64, 64), m, config=InferenceConfig(overlap=0.25))
    12
    """
    cfg = config or InferenceConfig()
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return 1
    tile = _tile_shape(cfg, model)
    if model.spatial_dims == 2:
        chunks, _, _ = _layout(shape, tile, cfg, 2)
        return chunks[0][1] - chunks[0][0]
    starts = tile_starts(shape[0], min(tile[0], shape[0]), cfg.overlap)
    return shape[0] if len(starts) == 1 else starts[1] - starts[0]


def iter_segment_blocks(
    image: Any,
    model: SegmentationModel,
    *,
    value_range: tuple[NDArray, NDArray],
    labels_out: Any,
    config: InferenceConfig | None = None,
    uncertainty_out: Any | None = None,
    disagreement_out: Any | None = None,
    probabilities_out: Any | None = None,
    region: Sequence[slice] | None = None,
    counts_out: NDArray[np.int64] | None = None,
) -> Generator[Progress, None, dict[str, object]]:
    """Segment a lazy one-channel ``(Z, Y, X)`` volume (or ``(Y, X)`` image) block by block.

    A 3D model streams the volume along Z (:func:`iter_sliding_window_streamed`); a 2D model
    segments the slices a few at a time (the chunks of
    :func:`~napari_segtool.inference.predict.iter_segment`). The results equal
    :func:`~napari_segtool.inference.predict.segment` on the same image (or on
    ``image[region]``) with the same ``value_range``, written block by block. A 2D image is
    segmented as a one-slice stack, as ``segment`` does.

    Parameters
    ----------
    image : array-like, shape (Z, Y, X) or (Y, X)
        numpy, zarr or dask; read region by region only.
    model : SegmentationModel
        A one-input-channel 2D or 3D model.
    value_range : (lo, hi)
        Intensities mapped to 0 and 1 (required: a lazy volume has no cheap percentiles; see
        :func:`subsample_range`). For a ``region``, pass the whole volume's range so the box
        is normalised like the whole.
    labels_out : array-like, shape of the image (or of the region)
        Written as ``labels_out[a:b] = ...`` with the model's label values (dtype
        :func:`labels_dtype`, or wider), rows of whole planes (:func:`block_rows`).
    config : InferenceConfig, optional
        Tiling, device, precision, test-time augmentation; as for ``segment``.
    uncertainty_out, disagreement_out : array-like, optional, same shape as ``labels_out``
        With ``config.tta``: normalised entropy and flip disagreement (float32).
    probabilities_out : array-like, optional, shape (n_classes, *labels_out.shape)
        Written as ``probabilities_out[:, a:b] = ...``.
    region : sequence of slice, optional
        A box of ``image``, one slice per axis (step 1; open ends allowed): only
        ``image[region]`` is read and segmented, and the outputs have the box's shape.
    counts_out : ndarray of int64, shape (n_classes,), optional
        Incremented, block by block, with the number of voxels given to each class (channel
        ``i`` is label value ``model.label_values[i]``), so nothing has to read the labels
        back to count them.

    Yields
    ------
    Progress
        Tiles done out of the total; closing the generator cancels (nothing more is written).

    Returns
    -------
    dict
        How the network ran (:meth:`~napari_segtool.inference.execution.ExecutionPlan.finish`).

    Notes
    -----
    Unlike ``segment``, the image's values are not checked for NaN or constancy (that would
    read the whole volume); ``value_range`` is checked against the sample it came from, and
    a normalised block that is not finite raises :class:`~napari_segtool.errors.InputError`.
    Memory: the blended scores of one chunk of slices (2D model) or of one tile's depth of
    rows (3D model), whatever the number of slices. The next chunk of slices is read, and the
    last block written, on two worker threads while the network runs (one of each in flight,
    in order), so the outputs must accept writes from another thread (numpy and zarr do); a
    failed write is raised at the next block, and none follows a cancel.
    """
    cfg = config or InferenceConfig()
    if region is not None:
        image = RegionView(image, tuple(region))
    shape = tuple(int(s) for s in image.shape)
    if len(shape) not in (2, 3) or 0 in shape:
        raise InputError(
            f"image must be a non-empty (Y, X) image or (Z, Y, X) volume, got shape {shape}"
        )
    if model.config.in_channels != 1:
        raise InputError(
            f"the model takes {model.config.in_channels} channels; the block engine segments "
            "one-channel volumes only"
        )
    n_classes = model.config.out_channels
    _check_outputs(shape, n_classes, cfg, labels_out, uncertainty_out, disagreement_out,
                   probabilities_out)  # fmt: skip
    if counts_out is not None and tuple(counts_out.shape) != (n_classes,):
        raise InputError(f"counts_out has shape {counts_out.shape}, expected ({n_classes},)")
    if len(shape) == 2:  # a one-slice stack, in and out
        image, shape = _Plane(image), (1, *shape)
        labels_out, uncertainty_out, disagreement_out = (
            None if out is None else _PlaneOut(out, 0)
            for out in (labels_out, uncertainty_out, disagreement_out)
        )
        probabilities_out = None if probabilities_out is None else _PlaneOut(probabilities_out, 1)
    lo, hi = (np.asarray(v, np.float64).reshape(-1) for v in value_range)
    if lo.shape != (1,) or hi.shape != (1,):
        raise InputError(f"value_range must hold one (lo, hi) pair, got {value_range}")
    tile = _tile_shape(cfg, model)
    device = resolve_device(cfg.device)
    n_out = n_classes + (1 if cfg.tta else 0)
    store = _Writer(model, cfg, shape, labels_out, uncertainty_out, disagreement_out,
                    probabilities_out, counts_out)  # fmt: skip

    def preprocess(raw: NDArray) -> NDArray:
        return apply_range(raw, lo, hi, channel_axis=1)

    common = {
        "tile_shape": tile,
        "out_channels": n_out,
        "overlap": cfg.overlap,
        "blend": cfg.blend,
        "batch_size": cfg.batch_size,
        "device": device,
        "preprocess": preprocess,
    }
    flips = 2**model.spatial_dims if cfg.tta else 1
    chunks, per_item, batches = _layout(shape, tile, cfg, model.spatial_dims)
    total = per_item * (1 if model.spatial_dims == 3 else shape[0])
    runner, execution = plan_network(
        model, device, cfg, calls=batches * flips, batch_shape=(cfg.batch_size, 1, *tile)
    )
    predictor = make_predictor(
        model, device, runner=runner, tta=cfg.tta, disagreement=cfg.tta, dropout=cfg.mc_dropout
    )
    channels_last = execution.memory_format == "channels_last"
    io = _Overlap()  # the next read and the last write run while the network computes
    store.run = io.write
    try:
        if model.spatial_dims == 3:

            def sink(a: int, b: int, block: NDArray[np.float32]) -> None:
                store(a, b, np.moveaxis(block, 0, 1))  # Z rows as items: voxel-wise maths

            windows = iter_sliding_window_streamed(
                _AddChannel(image), predictor, sink=sink, channels_last=channels_last, **common
            )
            yield from relay(windows, lambda s: Progress(s.done, total))
        else:
            yield from _slice_chunks(image, chunks, store, io, per_item, total,
                                     predictor=predictor, channels_last=channels_last,
                                     common=common)  # fmt: skip
    finally:
        io.close()  # waits for the last write; after a cancel, no write follows
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return execution.finish(runner)


def _slice_chunks(
    image: Any,
    chunks: list[tuple[int, int]],
    store: _Writer,
    io: _Overlap,
    per_item: int,
    total: int,
    *,
    predictor: Predictor,
    channels_last: bool,
    common: dict[str, Any],
) -> Generator[Progress, None, None]:
    """A 2D model: the slices a chunk at a time, the next chunk read while this one runs."""

    def read(a: int, b: int) -> NDArray:
        return np.asarray(image[a:b])[:, np.newaxis]  # (b - a, 1, Y, X)

    io.prefetch(read, *chunks[0])
    for i, (a, b) in enumerate(chunks):
        items = io.fetched()
        if i + 1 < len(chunks):
            io.prefetch(read, *chunks[i + 1])
        gen = iter_sliding_window(items, predictor, channels_last=channels_last, **common)
        done = a * per_item

        def progress(step: TileProgress, done: int = done) -> Progress:
            return Progress(done + step.done, total)

        store(a, b, (yield from relay(gen, progress)))
        del items, gen  # the next chunk's arrays replace these, not add to them


def _layout(
    shape: tuple[int, ...], tile: tuple[int, ...], cfg: InferenceConfig, spatial_dims: int
) -> tuple[list[tuple[int, int]], int, int]:
    """Chunks of slices (a 2D model; empty for a 3D one), tiles per item, network batches."""
    if spatial_dims == 3:
        eff = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))
        per_item = len(tile_grid(shape, eff, cfg.overlap))
        return [], per_item, math.ceil(per_item / cfg.batch_size)
    plane = shape[1] * shape[2]
    chunk = max(cfg.batch_size, min(shape[0], math.ceil(predict.CHUNK_VOXELS / plane)))
    chunks = [(z, min(z + chunk, shape[0])) for z in range(0, shape[0], chunk)]
    eff = tuple(min(t, s) for t, s in zip(tile, shape[1:], strict=True))
    per_item = len(tile_grid(shape[1:], eff, cfg.overlap))
    batches = sum(math.ceil((b - a) * per_item / cfg.batch_size) for a, b in chunks)
    return chunks, per_item, batches


class _Writer:
    """Writes blended scores of Z rows into the output arrays (the maths of ``Outputs``)."""

    def __init__(
        self,
        model: SegmentationModel,
        cfg: InferenceConfig,
        shape: tuple[int, ...],
        labels_out: Any,
        uncertainty_out: Any | None,
        disagreement_out: Any | None,
        probabilities_out: Any | None,
        counts_out: NDArray[np.int64] | None = None,
    ) -> None:
        like = Outputs.empty((1, 1, 1), model, tta=False, probabilities=False)
        self.lut, self.dtype = like.lut, like.labels.dtype  # label values as ``segment``'s
        self.n_classes, self.tta, self.plane = model.config.out_channels, cfg.tta, shape[1:]
        self.labels, self.uncertainty = labels_out, uncertainty_out
        self.disagreement, self.probabilities = disagreement_out, probabilities_out
        self.counts = counts_out
        self.run: Callable[..., None] = lambda fn, *args: fn(*args)  # or on a writer thread

    def __call__(self, a: int, b: int, out: NDArray[np.float32]) -> None:
        """Rows ``a:b`` from blended scores ``(b - a, n_out, Y, X)``."""
        disagreement = None
        if self.tta:
            if self.disagreement is not None:
                disagreement = out[:, self.n_classes]
            out = out[:, : self.n_classes]
        labels = argmax_channels(out, out=np.empty((b - a, *self.plane), self.dtype))
        if self.counts is not None:
            flat = labels.reshape(-1)
            for start in range(0, flat.size, 1 << 22):  # chunks: no block-sized intp copy
                part = flat[start : start + (1 << 22)]
                self.counts += np.bincount(part, minlength=self.n_classes)[: self.n_classes]
        if self.lut is not None:
            labels = self.lut[labels]
        probs = None if self.probabilities is None else np.moveaxis(out, 1, 0)
        unc = None if self.uncertainty is None else normalized_entropy(out, axis=1)
        self.run(self._write, a, b, labels, probs, unc, disagreement)

    def _write(self, a: int, b: int, labels: NDArray, probs: NDArray | None,
               unc: NDArray | None, disagreement: NDArray | None) -> None:  # fmt: skip
        self.labels[a:b] = labels
        if probs is not None:
            self.probabilities[:, a:b] = probs
        if unc is not None:
            self.uncertainty[a:b] = unc
        if disagreement is not None:
            self.disagreement[a:b] = disagreement


class _Overlap:
    """A reader and a writer thread, one task each in flight: the next block is read and the
    last one written while the network computes (memory: one block more of each)."""

    def __init__(self) -> None:
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="segtool-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="segtool-write")
        self._read: Future[Any] | None = None
        self._written: Future[None] | None = None

    def prefetch(self, fn: Callable[..., Any], *args: Any) -> None:
        self._read = self._reader.submit(fn, *args)

    def fetched(self) -> Any:
        read, self._read = self._read, None
        assert read is not None
        return read.result()

    def write(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread once the previous write is done (whose
        error, if any, is raised here)."""
        self._wait()
        self._written = self._writer.submit(fn, *args)

    def _wait(self) -> None:
        written, self._written = self._written, None
        if written is not None:
            written.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._read is not None:
                self._read.cancel()
            self._reader.shutdown(wait=True)
            self._writer.shutdown(wait=True)


def _check_outputs(
    shape: tuple[int, ...],
    n_classes: int,
    cfg: InferenceConfig,
    labels_out: Any,
    uncertainty_out: Any | None,
    disagreement_out: Any | None,
    probabilities_out: Any | None,
) -> None:
    _check_out("labels_out", labels_out, shape)
    maps = (("uncertainty_out", uncertainty_out), ("disagreement_out", disagreement_out))
    for name, arr in maps:
        if arr is not None:
            if not cfg.tta:
                raise InputError(f"{name} needs test-time augmentation (config.tta=True)")
            _check_out(name, arr, shape)
    if probabilities_out is not None:
        _check_out("probabilities_out", probabilities_out, (n_classes, *shape))


def _check_out(name: str, arr: Any, shape: tuple[int, ...]) -> None:
    got = tuple(int(s) for s in arr.shape)
    if got != shape:
        raise InputError(f"{name} has shape {got}, expected {shape} (the image's or region's)")


def segment_blocks(
    image: Any,
    model: SegmentationModel,
    *,
    value_range: tuple[NDArray, NDArray],
    labels_out: Any,
    config: InferenceConfig | None = None,
    uncertainty_out: Any | None = None,
    disagreement_out: Any | None = None,
    probabilities_out: Any | None = None,
    region: Sequence[slice] | None = None,
    counts_out: NDArray[np.int64] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Plain-function form of :func:`iter_segment_blocks`; ``progress(done, total)``."""
    gen = iter_segment_blocks(
        image,
        model,
        value_range=value_range,
        labels_out=labels_out,
        config=config,
        uncertainty_out=uncertainty_out,
        disagreement_out=disagreement_out,
        probabilities_out=probabilities_out,
        region=region,
        counts_out=counts_out,
    )
    if progress is None:
        return run_to_end(gen)
    return run_to_end(gen, lambda p: progress(p.done, p.total))
