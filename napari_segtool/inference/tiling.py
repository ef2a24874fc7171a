"""Sliding-window inference: tile grid, blend weights and stitching.

The engine works on a batch of independent images ``(N, C, *S)`` with any predictor callable
``(B, C, *tile) -> (B, C_out, *tile)``. Tiles from all ``N`` images are batched together (so a
stack of small slices fills each forward pass), computed on ``device`` and stitched on the CPU
into float32 accumulators, so accelerator memory is bounded by one batch of tiles.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.errors import InputError

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]
Preprocess = Callable[[NDArray], NDArray]
T = TypeVar("T")
Y = TypeVar("Y")
R = TypeVar("R")


@dataclass(frozen=True)
class TileProgress:
    """Progress of a tiled run: ``done`` of ``total`` tiles computed."""

    done: int
    total: int


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``.

    Neighbouring tiles overlap by at least ``overlap * tile`` voxels; the last tile ends at
    ``size`` exactly. A tile at least as long as the axis gives the single start 0 (the image is
    padded to the tile).

    Examples
    --------
    >>> tile_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    >>> tile_starts(511, 256, 0.25)
    [0, 192, 255]
    >>> tile_starts(100, 256, 0.25)
    [0]
    """
    if tile >= size:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(n)]
    return sorted(set(starts))


@lru_cache(maxsize=16)
def _blend_weights_cached(tile_shape: tuple[int, ...], mode: str) -> NDArray[np.float32]:
    if mode == "constant":
        return np.ones(tile_shape, np.float32)
    w = np.ones((), np.float64)
    for t in tile_shape:
        sigma = 0.125 * t
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2.0
        g = np.exp(-0.5 * (x / sigma) ** 2)
        w = np.multiply.outer(w, g / g.max())
    # corners are covered by one tile only: keep them well above 0. The floor is MONAI's
    # (max(min, 1e-3)), so the two blend identically where only tile borders overlap
    w = np.maximum(w, 1e-3)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def blend_weights(tile_shape: Sequence[int], mode: str = "gaussian") -> NDArray[np.float32]:
    """Per-voxel weight of a tile's prediction when overlapping tiles are averaged.

    ``"gaussian"`` (our default): a separable Gaussian with ``sigma = 0.125 * tile`` per axis,
    1 at the centre, clipped below at 1e-3. ``"constant"``: all ones. Read-only.

    Notes
    -----
    MONAI's ``sliding_window_inference`` defaults to ``mode="constant"`` (plain averaging);
    its ``mode="gaussian"`` uses the same ``sigma_scale=0.125`` and the same floor
    (``max(min, 1e-3)``), so both blend a tile's borders alike. We default to the Gaussian,
    which hides tile seams.
    """
    return _blend_weights_cached(tuple(int(t) for t in tile_shape), mode)


def tile_grid(
    spatial: Sequence[int], tile: Sequence[int], overlap: float
) -> list[tuple[int, ...]]:
    """Start corners of all tiles covering ``spatial`` (``tile`` no larger than the image)."""
    axes = [tile_starts(s, t, overlap) for s, t in zip(spatial, tile, strict=True)]
    return list(itertools.product(*axes))


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def iter_sliding_window(
    images: NDArray,
    predictor: Predictor,
    *,
    tile_shape: Sequence[int],
    out_channels: int,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    preprocess: Preprocess | None = None,
    channels_last: bool = False,
) -> Generator[TileProgress, None, NDArray[np.float32]]:
    """Apply ``predictor`` tile by tile and blend the tiles back into whole images.

    Parameters
    ----------
    images : ndarray, shape (N, C, *S)
        ``N`` independent images of spatial shape ``S`` (any dtype that ``preprocess`` turns into
        float32; without ``preprocess`` they must already be float32).
    predictor : callable
        Maps a float32 tensor ``(B, C, *tile_shape)`` on ``device`` to ``(B, out_channels,
        *tile_shape)``.
    tile_shape : sequence of int
        Spatial tile; axes where the image is smaller than the tile are padded by reflection for
        the predictor and cropped back.
    overlap : float
        Fraction in ``[0, 1)`` of a tile shared with its neighbour.
    blend : {"gaussian", "constant"}
        Weighting of overlapping predictions.
    batch_size : int
        Tiles per predictor call. On an out-of-memory error the batch is halved and retried;
        at a batch of one tile the error is re-raised as :class:`InputError`.
    device : torch.device or str
        Where tiles are sent; stitching always happens on the CPU.
    preprocess : callable, optional
        Applied to each batch of raw tiles ``(B, C, *tile)`` before the predictor, e.g. intensity
        normalisation, so the whole image is never copied.
    channels_last : bool
        Hand the predictor each batch in channels-last memory order (``(B, C, *tile)`` with
        the channel axis innermost), the layout of a channels-last network, so the network
        converts nothing.

    Yields
    ------
    TileProgress
        After each batch of tiles.

    Returns
    -------
    ndarray of float32, shape (N, out_channels, *S)
        The blended predictions, as the generator's return value (:func:`run_to_end` hands
        it over; :func:`sliding_window` is the plain-function form).
    """
    plan = _plan(images.shape, tile_shape, overlap, blend)
    acc = np.zeros((images.shape[0], out_channels, *plan.spatial), np.float32)
    weighted = np.empty((out_channels, *plan.eff_tile), np.float32)
    batches = predicted_batches(
        images, plan, predictor, out_channels=out_channels, batch_size=batch_size,
        device=device, preprocess=preprocess, channels_last=channels_last,
    )  # fmt: skip
    for batch, y, progress in batches:
        _add_tiles(acc, y, batch, plan, weighted)
        yield progress
    acc /= plan.weight_sum
    return acc


def predicted_batches(
    images: NDArray,
    plan: _Plan,
    predictor: Predictor,
    *,
    out_channels: int,
    batch_size: int,
    device: torch.device | str,
    preprocess: Preprocess | None,
    channels_last: bool,
) -> Iterator[tuple[list[tuple[int, tuple[int, ...]]], NDArray[np.float32], TileProgress]]:
    """The plan's tiles in order, a batch at a time: ``(jobs, predictions, progress)``.

    Reads, preprocesses and predicts each batch, checks the predictor's output shape, and
    halves the batch on an out-of-memory error (:func:`_smaller_batch`). Shared by the
    in-memory tiler and the streamed one (:mod:`napari_segtool.inference.blocks`).
    """
    dev = torch.device(device)
    total = len(plan.jobs)
    bs = batch_size
    pos = 0
    while pos < total:
        batch = plan.jobs[pos : pos + bs]
        x = _read_tiles(images, batch, plan, preprocess, channels_last=channels_last)
        try:
            y = _predict_tiles(predictor, x, dev)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            bs = _smaller_batch(exc, bs, dev, plan.tile)
            continue
        _check_output(y, len(batch), out_channels, plan.tile)
        pos += len(batch)
        yield batch, y, TileProgress(pos, total)


@dataclass(frozen=True)
class _Plan:
    """Where the tiles of a sliding-window run go and how they are weighted."""

    spatial: tuple[int, ...]
    tile: tuple[int, ...]  # what the predictor sees
    eff_tile: tuple[int, ...]  # the part of a tile inside the image
    pad: list[tuple[int, int]]
    jobs: list[tuple[int, tuple[int, ...]]]  # (image, tile start)
    weights: NDArray[np.float32]
    weight_sum: NDArray[np.float32]

    def region(self, start: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(s, s + e) for s, e in zip(start, self.eff_tile, strict=True))


def _plan(shape: tuple[int, ...], tile_shape: Sequence[int], overlap: float, blend: str) -> _Plan:
    """Check the arguments and lay out the tiles of ``N`` images of ``shape[2:]``."""
    if len(shape) < 3:
        raise InputError(f"images must be (N, C, *spatial), got shape {shape}")
    spatial = tuple(shape[2:])
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
    weights = blend_weights(eff_tile, blend)
    # the weight sum is the same for every image and channel: one spatial map
    wsum = np.zeros(spatial, np.float32)
    for start in grid:
        wsum[tuple(slice(s, s + e) for s, e in zip(start, eff_tile, strict=True))] += weights
    return _Plan(
        spatial=spatial,
        tile=tile,
        eff_tile=eff_tile,
        pad=[(0, t - e) for t, e in zip(tile, eff_tile, strict=True)],
        jobs=[(i, start) for i in range(shape[0]) for start in grid],
        weights=weights,
        weight_sum=wsum,
    )


def _read_tiles(
    images: NDArray,
    batch: Sequence[tuple[int, tuple[int, ...]]],
    plan: _Plan,
    preprocess: Preprocess | None,
    *,
    channels_last: bool = False,
) -> NDArray[np.float32]:
    """The batch's tiles ``(B, C, *tile)``: padded to the tile, preprocessed, float32, in
    C order or, with ``channels_last``, with the channel axis innermost in memory."""
    raw = np.stack([images[(i, slice(None), *plan.region(start))] for i, start in batch])
    if any(p for _, p in plan.pad):
        mode = "reflect" if _reflectable(plan.eff_tile, plan.pad) else "edge"
        raw = np.pad(raw, [(0, 0), (0, 0), *plan.pad], mode=mode)
    x = preprocess(raw) if preprocess is not None else raw
    x = x if x.dtype == np.float32 else x.astype(np.float32)
    if channels_last and x.shape[1] > 1:
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    return np.ascontiguousarray(x)  # one channel: the same bytes in either layout


def _predict_tiles(predictor: Predictor, x: NDArray, dev: torch.device) -> NDArray[np.float32]:
    """Run the predictor on one batch on ``dev``; the result back on the CPU as float32."""
    with torch.inference_mode():
        y = predictor(torch.from_numpy(x).to(dev))  # keeps x's layout
        return y.float().cpu().numpy()


def _smaller_batch(exc: BaseException, bs: int, dev: torch.device, tile: tuple[int, ...]) -> int:
    """The batch size to retry with after ``exc``; re-raises what is not out-of-memory."""
    if not is_out_of_memory(exc):
        raise exc
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if bs == 1:
        raise InputError(
            f"out of {dev.type} memory even with one tile of shape {tile}; "
            "use a smaller tile shape or device='cpu'"
        ) from exc
    bs = max(1, bs // 2)
    logger.warning("out of %s memory; retrying with batch size %d", dev.type, bs)
    return bs


def _check_output(y: NDArray, n: int, out_channels: int, tile: tuple[int, ...]) -> None:
    if y.shape != (n, out_channels, *tile):
        raise InputError(
            f"predictor returned shape {y.shape}, expected ({n}, {out_channels}, *{tile})"
        )


def _add_tiles(
    acc: NDArray[np.float32],
    y: NDArray[np.float32],
    batch: Sequence[tuple[int, tuple[int, ...]]],
    plan: _Plan,
    weighted: NDArray[np.float32],
) -> None:
    """Add the weighted predictions of a batch (cropped to the image) to the accumulator."""
    crop = (slice(None), *(slice(0, e) for e in plan.eff_tile))
    for k, (i, start) in enumerate(batch):
        np.multiply(y[k][crop], plan.weights, out=weighted)  # no temporary per tile
        acc[(i, slice(None), *plan.region(start))] += weighted


def _reflectable(eff_tile: Sequence[int], pad: Sequence[tuple[int, int]]) -> bool:
    # numpy reflect padding needs at least two voxels along a padded axis
    return all(e > 1 for e, (_, p) in zip(eff_tile, pad, strict=True) if p)


def _capture(gen: Generator[Y, None, R], box: list[R]) -> Generator[Y, None, None]:
    """Yield what ``gen`` yields; put its return value in ``box``."""
    box.append((yield from gen))


def run_to_end(gen: Generator[Y, None, R], on_yield: Callable[[Y], object] | None = None) -> R:
    """Drive a generator to its end and return its value; ``on_yield`` sees each item.

    The one place that drives a progress generator (plain-function twins, callback-style
    callers, tests): no hand-written ``next`` / ``StopIteration`` loops elsewhere.

    >>> def gen():
    ...     yield 1
    ...     yield 2
    ...     return "done"
    >>> seen = []
    >>> run_to_end(gen(), seen.append), seen
    ('done', [1, 2])
    """
    box: list[R] = []
    for item in _capture(gen, box):
        if on_yield is not None:
            on_yield(item)
    return box[0]


def relay(gen: Generator[Y, None, R], convert: Callable[[Y], T]) -> Generator[T, None, R]:
    """Yield ``convert(item)`` for each item of ``gen`` and return its value.

    Closing the relay closes ``gen`` (so its ``finally:`` runs on cancel).

    >>> def gen():
    ...     yield 1
    ...     return "done"
    >>> run_to_end(relay(gen(), lambda i: 10 * i), print)
    10
    'done'
    """
    box: list[R] = []
    inner = _capture(gen, box)
    try:
        for item in inner:
            yield convert(item)
    finally:
        inner.close()
    return box[0]


def sliding_window(images: NDArray, predictor: Predictor, **kwargs: object) -> NDArray[np.float32]:
    """Plain-function form of :func:`iter_sliding_window` (same arguments, no progress)."""
    return run_to_end(iter_sliding_window(images, predictor, **kwargs))  # type: ignore[arg-type]
