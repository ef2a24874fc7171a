"""Exact segmentation of one box of a volume: the unit of work of block-parallel runs.

A box is segmented with the tiles of the *whole* image's grid that reach into it (the same
starts, the same Gaussian weights, added in the same grid order as
:func:`~napari_segtool.inference.tiling.iter_sliding_window`), read with the halo those tiles
need. Every voxel of the box therefore gets the same blended scores as in-memory inference of
the whole image, so boxes can be computed independently, in any order, on any machine, and
their labels pieced together equal the labels of one whole run. The price is the halo: tiles
that straddle a box border are computed for both boxes.

:func:`block_boxes` cuts a volume into boxes; :class:`BoxSegmenter` holds a model ready on its
device and segments boxes one after the other (a cluster worker keeps one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.blocks import _Writer, labels_dtype
from napari_segtool.inference.normalize import apply_range
from napari_segtool.inference.predict import Progress, _tile_shape
from napari_segtool.inference.predictor import make_predictor, plan_network, resolve_device
from napari_segtool.inference.tiling import (
    _add_tiles,
    _Plan,
    blend_weights,
    predicted_batches,
    run_to_end,
    tile_starts,
)
from napari_segtool.model.checkpoint import SegmentationModel

__all__ = [
    "BoxOutputs",
    "BoxSegmenter",
    "block_boxes",
    "box_read_region",
    "default_block_shape",
]

Box = tuple[slice, ...]

READ_VOXELS = 1 << 25
"""Default bound on the voxels a box reads with its halo (:func:`default_block_shape`)."""


def block_boxes(shape: Sequence[int], block_shape: Sequence[int]) -> list[Box]:
    """The boxes of a grid of ``block_shape`` over ``shape`` (the last ones shorter), in C
    order.

    Examples
    --------
    >>> [tuple((s.start, s.stop) for s in b) for b in block_boxes((5, 4), (3, 4))]
    [((0, 3), (0, 4)), ((3, 5), (0, 4))]
    """
    shape = tuple(int(n) for n in shape)
    block = tuple(int(n) for n in block_shape)
    if len(block) != len(shape) or any(b < 1 for b in block):
        raise InputError(f"block shape {block} must be {len(shape)} positive integers")
    axes = [
        [slice(a, min(a + b, n)) for a in range(0, n, b)]
        for n, b in zip(shape, block, strict=True)
    ]
    return [tuple(box) for box in itertools.product(*axes)]


def default_block_shape(
    shape: Sequence[int],
    model: SegmentationModel,
    *,
    config: InferenceConfig | None = None,
    chunks: Sequence[int] | None = None,
    read_voxels: int = READ_VOXELS,
) -> tuple[int, ...]:
    """A block shape for :func:`block_boxes` on a ``(Z, Y, X)`` volume (or ``(Y, X)`` image).

    Blocks are whole multiples of ``chunks`` (so no two blocks write one chunk) and read at
    most about ``read_voxels`` voxels with their halo. A 2D model keeps whole planes where one
    fits (no halo at all: its tiles never cross slices), else square bands; a 3D model takes
    the whole plane and as many slices as fit, at least twice the tile's depth where possible.
    """
    cfg = config or InferenceConfig()
    shape = tuple(int(n) for n in shape)
    chunk = tuple(int(c) for c in (chunks or (1,) * len(shape)))
    if len(chunk) != len(shape):
        raise InputError(f"chunks {chunk} must have {len(shape)} entries")
    tile = _tile_shape(cfg, model)
    yx_tile = tile[-2:]

    def round_to(n: int, c: int, limit: int) -> int:
        return min(limit, max(c, (n // c) * c))

    plane = shape[-1] * shape[-2]
    if len(shape) == 2 or model.spatial_dims == 2:
        if plane <= read_voxels:
            y, x = shape[-2:]
        else:  # square bands with a one-tile halo on each side
            side = max(int(math.sqrt(read_voxels)) - 2 * max(yx_tile), *yx_tile)
            y = round_to(side, chunk[-2], shape[-2])
            x = round_to(side, chunk[-1], shape[-1])
        if len(shape) == 2:
            return (y, x)
        rows = max(1, read_voxels // (y * x))
        return (round_to(rows, chunk[0], shape[0]), y, x)
    halo = tile[0]
    rows = max(2 * tile[0], read_voxels // max(plane, 1) - halo)
    if plane * (rows + halo) <= 2 * read_voxels:
        return (round_to(rows, chunk[0], shape[0]), shape[1], shape[2])
    side = max(int(math.sqrt(read_voxels / (3 * tile[0]))), *yx_tile)
    return (round_to(2 * tile[0], chunk[0], shape[0]), round_to(side, chunk[1], shape[1]),
            round_to(side, chunk[2], shape[2]))  # fmt: skip


@dataclass(frozen=True)
class _Axis:
    """One tiled axis of the whole image: its tile starts and the tile's extent in it."""

    starts: tuple[int, ...]
    extent: int

    def reaching(self, a: int, b: int) -> tuple[int, ...]:
        """Starts of the tiles that overlap ``[a, b)``."""
        return tuple(s for s in self.starts if s < b and s + self.extent > a)


def _axes(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float) -> list[_Axis]:
    return [
        _Axis(tuple(tile_starts(n, min(t, n), overlap)), min(t, n))
        for n, t in zip(shape, tile, strict=True)
    ]


def box_read_region(
    shape: Sequence[int],
    box: Sequence[slice],
    model: SegmentationModel,
    *,
    config: InferenceConfig | None = None,
) -> Box:
    """The region of the image :meth:`BoxSegmenter.iter_segment` reads for ``box``: the box
    with the halo of the tiles that reach into it (along Z too for a 3D model)."""
    cfg = config or InferenceConfig()
    shape3 = _as_stack_shape(shape)
    box3 = _as_stack_box(box, len(shape))
    tiled = shape3 if model.spatial_dims == 3 else shape3[1:]
    axes = _axes(tiled, _tile_shape(cfg, model), cfg.overlap)
    off = len(shape3) - len(tiled)
    read = list(box3)
    for k, ax in enumerate(axes):
        b = box3[off + k]
        sel = ax.reaching(b.start, b.stop)
        read[off + k] = slice(sel[0], sel[-1] + ax.extent)
    return tuple(read[-len(shape) :])


def _as_stack_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or 0 in shape:
        raise InputError(
            f"image must be a non-empty (Y, X) image or (Z, Y, X) volume, got shape {shape}"
        )
    return shape if len(shape) == 3 else (1, *shape)


def _as_stack_box(box: Sequence[slice], ndim: int) -> Box:
    box = tuple(box)
    if len(box) != ndim or any(not isinstance(s, slice) for s in box):
        raise InputError(f"a box needs {ndim} slices, got {box}")
    return box if ndim == 3 else (slice(0, 1), *box)


@dataclass
class BoxOutputs:
    """The results for one box, each of the box's shape (``probabilities``: classes first).

    ``counts[i]`` is the number of voxels given to class ``i``."""

    labels: NDArray
    counts: NDArray[np.int64]
    uncertainty: NDArray[np.float32] | None = None
    disagreement: NDArray[np.float32] | None = None
    probabilities: NDArray[np.float32] | None = None


class BoxSegmenter:
    """A model on its device, ready to segment boxes of one-channel images.

    Parameters
    ----------
    model : SegmentationModel
        A one-input-channel 2D or 3D model.
    config : InferenceConfig, optional
        As for :func:`~napari_segtool.inference.predict.segment`. Pass resolved choices
        (``precision``, ``compile``) when boxes are spread over processes, so that every
        process computes alike (:attr:`execution` says what was chosen here).
    uncertainty, disagreement, probabilities : bool
        Which maps to return besides the labels (the first two need ``config.tta``).
    calls : int
        How many network calls the work will take, for the ``auto`` choices.

    Notes
    -----
    A box's blended scores equal those of in-memory inference of the whole image bit for bit
    given the same tile predictions; the network's output for a tile may differ in the last
    float bits when it is batched with other tiles (a different batch composition), which can
    change a label only where two class scores tie within that error.
    """

    def __init__(
        self,
        model: SegmentationModel,
        config: InferenceConfig | None = None,
        *,
        uncertainty: bool = False,
        disagreement: bool = False,
        probabilities: bool = False,
        calls: int = 1000,
    ) -> None:
        cfg = config or InferenceConfig()
        if model.config.in_channels != 1:
            raise InputError(
                f"the model takes {model.config.in_channels} channels; boxes are segmented "
                "for one-channel images only"
            )
        if (uncertainty or disagreement) and not cfg.tta:
            raise InputError("uncertainty and disagreement need test-time augmentation (tta)")
        self.model, self.config = model, cfg
        self.tile = _tile_shape(cfg, model)
        self.device = resolve_device(cfg.device)
        self.want = (uncertainty, disagreement, probabilities)
        self.n_classes = model.config.out_channels
        self.n_out = self.n_classes + (1 if cfg.tta else 0)
        flips = 2**model.spatial_dims if cfg.tta else 1
        self.runner, plan = plan_network(
            model, self.device, cfg, calls=calls * flips,
            batch_shape=(cfg.batch_size, 1, *self.tile),
        )  # fmt: skip
        self.execution = plan
        self.predictor = make_predictor(
            model, self.device, runner=self.runner, tta=cfg.tta, disagreement=cfg.tta,
            dropout=cfg.mc_dropout,
        )  # fmt: skip
        self.channels_last = plan.memory_format == "channels_last"
        self.weights = {}

    @property
    def resolved_config(self) -> InferenceConfig:
        """The config with the choices made here (precision, compile, memory format)."""
        from dataclasses import replace

        p = self.execution
        return replace(self.config, precision=p.precision, memory_format=p.memory_format,
                       compile="on" if p.compile else "off")  # fmt: skip

    def labels_dtype(self) -> np.dtype:
        return labels_dtype(self.model)

    def iter_segment(
        self,
        image: Any,
        box: Sequence[slice],
        *,
        value_range: tuple[NDArray, NDArray],
    ) -> Generator[Progress, None, BoxOutputs]:
        """Segment ``box`` of ``image`` (``(Z, Y, X)`` or ``(Y, X)``; numpy, zarr or dask),
        reading only the box and its tiles' halo.

        Yields
        ------
        Progress
            Tiles done of the box's tiles.

        Returns
        -------
        BoxOutputs
        """
        ndim = len(image.shape)
        shape3 = _as_stack_shape(image.shape)
        box3 = _as_stack_box(box, ndim)
        for s, n in zip(box3, shape3, strict=True):
            if s.step not in (None, 1) or not 0 <= s.start < s.stop <= n:
                raise InputError(f"box {tuple(box)} is not inside the image of shape "
                                 f"{tuple(image.shape)}")  # fmt: skip
        lo, hi = (np.asarray(v, np.float64).reshape(-1) for v in value_range)
        if lo.shape != (1,) or hi.shape != (1,):
            raise InputError(f"value_range must hold one (lo, hi) pair, got {value_range}")
        read3 = box_read_region(shape3, box3, self.model, config=self.config)
        raw = np.asarray(image[read3[-ndim:]])
        items = raw.reshape(tuple(s.stop - s.start for s in read3))
        if self.model.spatial_dims == 3:
            items, tiled_box, tiled_read = items[None, None], box3, read3
        else:
            items, tiled_box, tiled_read = items[:, None], box3[1:], read3[1:]
        tiled_shape = shape3 if self.model.spatial_dims == 3 else shape3[1:]
        axes = _axes(tiled_shape, self.tile, self.config.overlap)
        eff = tuple(ax.extent for ax in axes)
        per_axis = [
            tuple(s - r.start for s in ax.reaching(b.start, b.stop))
            for ax, b, r in zip(axes, tiled_box, tiled_read, strict=True)
        ]
        grid = list(itertools.product(*per_axis))
        plan = self._plan(items.shape, grid, eff)

        def preprocess(batch: NDArray) -> NDArray:
            return apply_range(batch, lo, hi, channel_axis=1)

        acc = np.zeros((items.shape[0], self.n_out, *plan.spatial), np.float32)
        weighted = np.empty((self.n_out, *eff), np.float32)
        batches = predicted_batches(
            items, plan, self.predictor, out_channels=self.n_out,
            batch_size=self.config.batch_size, device=self.device, preprocess=preprocess,
            channels_last=self.channels_last,
        )  # fmt: skip
        for batch, y, progress in batches:
            _add_tiles(acc, y, batch, plan, weighted)
            yield Progress(progress.done, progress.total)
        del items, raw
        core = tuple(slice(b.start - r.start, b.stop - r.start)
                     for b, r in zip(tiled_box, tiled_read, strict=True))  # fmt: skip
        acc = acc[(slice(None), slice(None), *core)]
        acc /= plan.weight_sum[core]
        rows = np.moveaxis(acc[0], 0, 1) if self.model.spatial_dims == 3 else acc
        return self._outputs(rows, tuple(b.stop - b.start for b in box3), ndim)

    def segment(
        self, image: Any, box: Sequence[slice], *, value_range: tuple[NDArray, NDArray]
    ) -> BoxOutputs:
        """Plain-function form of :meth:`iter_segment`."""
        return run_to_end(self.iter_segment(image, box, value_range=value_range))

    def _plan(self, items_shape: tuple[int, ...], grid: list[tuple[int, ...]],
              eff: tuple[int, ...]) -> _Plan:  # fmt: skip
        spatial = tuple(int(n) for n in items_shape[2:])
        key = (eff, self.config.blend)
        if key not in self.weights:
            self.weights[key] = blend_weights(eff, self.config.blend)
        weights = self.weights[key]
        wsum = np.zeros(spatial, np.float32)
        for start in grid:  # grid order, as the whole image's weight sum is added
            wsum[tuple(slice(s, s + e) for s, e in zip(start, eff, strict=True))] += weights
        return _Plan(
            spatial=spatial,
            tile=self.tile,
            eff_tile=eff,
            pad=[(0, t - e) for t, e in zip(self.tile, eff, strict=True)],
            jobs=[(i, start) for i in range(items_shape[0]) for start in grid],
            weights=weights,
            weight_sum=wsum,
        )

    def _outputs(self, rows: NDArray[np.float32], box_shape: tuple[int, ...],
                 ndim: int) -> BoxOutputs:  # fmt: skip
        unc, dis, probs = self.want
        dtype = self.labels_dtype()
        labels = np.empty(box_shape, dtype)
        counts = np.zeros(self.n_classes, np.int64)
        maps = {
            "uncertainty": np.empty(box_shape, np.float32) if unc else None,
            "disagreement": np.empty(box_shape, np.float32) if dis else None,
            "probabilities": np.empty((self.n_classes, *box_shape), np.float32)
            if probs else None,
        }  # fmt: skip
        writer = _Writer(self.model, self.config, box_shape, labels, maps["uncertainty"],
                         maps["disagreement"], maps["probabilities"], counts)  # fmt: skip
        writer(0, box_shape[0], rows)
        if ndim == 2:  # back to (Y, X)
            labels = labels[0]
            maps = {k: None if v is None else (v[:, 0] if k == "probabilities" else v[0])
                    for k, v in maps.items()}  # fmt: skip
        return BoxOutputs(labels=labels, counts=counts, **maps)
