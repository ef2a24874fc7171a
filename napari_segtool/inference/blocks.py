"""Block engine for larger-than-memory volumes: stream the sliding window along the first axis.

:func:`iter_sliding_window_streamed` runs exactly the tiles of
:func:`~napari_segtool.inference.tiling.iter_sliding_window` (same global grid, same Gaussian
weights, same order), but keeps the blended accumulator only for the rows of the first spatial
axis that a tile still covers. Rows that no later tile touches are final: they are divided by
the weight sum, handed to a ``sink`` and dropped, so peak memory is bounded by one tile's
extent along the first axis, whatever the volume's length. :func:`iter_segment_blocks` builds a
segmentation on it that writes labels (and uncertainty) block by block into any array that
supports ``out[a:b] = ...`` (numpy, ``zarr.Array``).

The input may be a numpy, zarr or dask array: it is only read region by region, as
``image[region]`` followed by ``np.asarray``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Sequence
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
)
from napari_segtool.model.checkpoint import SegmentationModel

logger = logging.getLogger(__name__)

__all__ = [
    "Sink",
    "iter_segment_blocks",
    "iter_sliding_window_streamed",
    "segment_blocks",
    "subsample_range",
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

    Returns
    -------
    lo, hi : ndarray of float64, shape (1,)
    """
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"image must be a non-empty 2D or 3D array, got shape {shape}")
    if max_voxels < 1:
        raise InputError(f"max_voxels must be positive, got {max_voxels}")
    plane = math.prod(shape[1:])
    n = max(1, min(shape[0], max_voxels // plane))
    step = shape[0] / n
    offset = 0.0 if n == shape[0] else float(np.random.default_rng(seed).uniform(0, step))
    index = sorted({min(shape[0] - 1, int(offset + k * step)) for k in range(n)})
    stride = max(1, math.ceil(plane / max_voxels))
    sample = np.stack([np.asarray(image[z])[::stride] for z in index])
    return percentile_range(sample, normalization)


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
) -> Generator[Progress, None, dict[str, object]]:
    """Segment a lazy one-channel ``(Z, Y, X)`` volume block by block.

    A 3D model streams the volume along Z (:func:`iter_sliding_window_streamed`); a 2D model
    segments the slices a few at a time (the chunks of
    :func:`~napari_segtool.inference.predict.iter_segment`). The results equal
    :func:`~napari_segtool.inference.predict.segment` on the same image with the same
    ``value_range``, written block by block.

    Parameters
    ----------
    image : array-like, shape (Z, Y, X)
        numpy, zarr or dask; read region by region only.
    model : SegmentationModel
        A one-input-channel 2D or 3D model.
    value_range : (lo, hi)
        Intensities mapped to 0 and 1 (required: a lazy volume has no cheap percentiles; see
        :func:`subsample_range`).
    labels_out : array-like, shape (Z, Y, X)
        Written as ``labels_out[a:b] = ...`` with the model's label values (dtype as
        :class:`~napari_segtool.inference.outputs.Segmentation`'s labels, or wider).
    config : InferenceConfig, optional
        Tiling, device, precision, test-time augmentation; as for ``segment``.
    uncertainty_out, disagreement_out : array-like, optional, shape (Z, Y, X)
        With ``config.tta``: normalised entropy and flip disagreement (float32).
    probabilities_out : array-like, optional, shape (n_classes, Z, Y, X)
        Written as ``probabilities_out[:, a:b] = ...``.

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
    read the whole volume); ``value_range`` is checked against the sample it came from.
    """
    cfg = config or InferenceConfig()
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3 or 0 in shape:
        raise InputError(f"image must be a non-empty (Z, Y, X) volume, got shape {shape}")
    if model.config.in_channels != 1:
        raise InputError(
            f"the model takes {model.config.in_channels} channels; the block engine segments "
            "one-channel volumes only"
        )
    n_classes = model.config.out_channels
    _check_outputs(shape, n_classes, cfg, labels_out, uncertainty_out, disagreement_out,
                   probabilities_out)  # fmt: skip
    lo, hi = (np.asarray(v, np.float64).reshape(-1) for v in value_range)
    if lo.shape != (1,) or hi.shape != (1,):
        raise InputError(f"value_range must hold one (lo, hi) pair, got {value_range}")
    tile = _tile_shape(cfg, model)
    device = resolve_device(cfg.device)
    n_out = n_classes + (1 if cfg.tta else 0)
    store = _Writer(model, cfg, shape, labels_out, uncertainty_out, disagreement_out,
                    probabilities_out)  # fmt: skip

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
    if model.spatial_dims == 3:

        def sink(a: int, b: int, block: NDArray[np.float32]) -> None:
            store(a, b, np.moveaxis(block, 0, 1))  # Z rows as items: the maths is voxel-wise

        windows = iter_sliding_window_streamed(
            _AddChannel(image), predictor, sink=sink, channels_last=channels_last, **common
        )
        yield from relay(windows, lambda s: Progress(s.done, total))
    else:
        for a, b in chunks:
            items = np.asarray(image[a:b])[:, np.newaxis]  # (b - a, 1, Y, X)
            gen = iter_sliding_window(items, predictor, channels_last=channels_last, **common)
            done = a * per_item

            def progress(step: TileProgress, done: int = done) -> Progress:
                return Progress(done + step.done, total)

            store(a, b, (yield from relay(gen, progress)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return execution.finish(runner)


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
    ) -> None:
        like = Outputs.empty((1, 1, 1), model, tta=False, probabilities=False)
        self.lut, self.dtype = like.lut, like.labels.dtype  # label values as ``segment``'s
        self.n_classes, self.tta, self.plane = model.config.out_channels, cfg.tta, shape[1:]
        self.labels, self.uncertainty = labels_out, uncertainty_out
        self.disagreement, self.probabilities = disagreement_out, probabilities_out

    def __call__(self, a: int, b: int, out: NDArray[np.float32]) -> None:
        """Rows ``a:b`` from blended scores ``(b - a, n_out, Y, X)``."""
        if self.tta:
            if self.disagreement is not None:
                self.disagreement[a:b] = out[:, self.n_classes]
            out = out[:, : self.n_classes]
        labels = argmax_channels(out, out=np.empty((b - a, *self.plane), self.dtype))
        self.labels[a:b] = labels if self.lut is None else self.lut[labels]
        if self.probabilities is not None:
            self.probabilities[:, a:b] = np.moveaxis(out, 1, 0)
        if self.uncertainty is not None:
            self.uncertainty[a:b] = normalized_entropy(out, axis=1)


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
        raise InputError(f"{name} has shape {got}, expected {shape} (the image's)")


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
    )
    if progress is None:
        return run_to_end(gen)
    return run_to_end(gen, lambda p: progress(p.done, p.total))
