"""What runs on a dask worker: the model, loaded once per worker, and one box at a time.

The client registers a :class:`ModelPlugin` carrying the model file's bytes; dask sends it
once to each worker (and to workers that join later), where the model is rebuilt on the first
box and kept. Tasks receive a small :class:`BoxJob` and a box index, read their box (with its
tiles' halo) from the input on shared storage, write their results straight into the output
stores and return a few numbers: no voxel data goes through the scheduler or the client.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from napari_segtool.config import InferenceConfig
from napari_segtool.inference.boxes import Box, BoxSegmenter, block_boxes

logger = logging.getLogger(__name__)

__all__ = [
    "BoxJob",
    "ImageSpec",
    "MaskSpec",
    "ModelPlugin",
    "plugin_name",
    "pyramid_box",
    "segment_box",
]


@dataclass(frozen=True)
class ImageSpec:
    """Where a worker finds an input: a path, an index that picks one channel (or None), and
    the region to segment (``(start, stop)`` per axis, or None for all of it)."""

    path: str
    channel_key: tuple[Any, ...] | None = None
    region: tuple[tuple[int, int], ...] | None = None

    def open(self) -> tuple[Any, Any]:
        """``(image_file, array)``: the file (to close) and the lazy one-channel region."""
        from napari_segtool.io import read_image
        from napari_segtool.io.zarr_io import RegionView

        image = read_image(self.path, lazy=True)
        data = image.data
        if self.channel_key is not None:
            data = RegionView(data, self.channel_key)
        if self.region is not None:
            data = RegionView(data, tuple(slice(a, b) for a, b in self.region))
        return image, data


@dataclass(frozen=True)
class MaskSpec:
    """A foreground mask of an input, at any resolution over the same field of view.

    ``image_shape`` is the whole input's one-channel shape and ``offset`` the start of the
    segmented region in it (zeros without a region): box coordinates are shifted by it and
    scaled by ``mask_shape / image_shape`` per axis.
    """

    path: str
    image_shape: tuple[int, ...]
    mask_shape: tuple[int, ...]
    offset: tuple[int, ...]

    def box(self, box: Box) -> Box:
        """The mask's voxels that overlap ``box`` of the region (every partial one too).

        Examples
        --------
        >>> m = MaskSpec("m.tif", (100, 400), (10, 100), (0, 0))
        >>> m.box((slice(0, 10), slice(6, 9)))
        (slice(0, 1, None), slice(1, 3, None))
        >>> MaskSpec("m.tif", (100, 400), (10, 100), (50, 0)).box((slice(0, 1), slice(0, 4)))
        (slice(5, 6, None), slice(0, 1, None))
        """
        out = []
        for b, n, m, off in zip(box, self.image_shape, self.mask_shape, self.offset,
                                strict=True):  # fmt: skip
            a, z = b.start + off, b.stop + off
            lo = min(m - 1, (a * m) // n)
            hi = max(lo + 1, min(m, -((-z * m) // n)))
            out.append(slice(lo, hi))
        return tuple(out)


@dataclass(frozen=True)
class BoxJob:
    """One input's boxes: everything a worker needs to segment box ``i`` of it."""

    plugin: str
    image: ImageSpec
    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    value_range: tuple[float, float]
    config: InferenceConfig
    outputs: dict[str, str]  # "labels" / "uncertainty" / "probabilities" -> store path
    min_intensity: float | None = None
    background: int = 0
    foreground: MaskSpec | None = None
    boxes: list[Box] = field(default_factory=list, compare=False, repr=False)

    def box(self, index: int) -> Box:
        if not self.boxes:
            object.__setattr__(self, "boxes", block_boxes(self.shape, self.block_shape))
        return self.boxes[index]


def plugin_name(digest: str) -> str:
    return f"napari-segtool-model-{digest[:16]}"


class ModelPlugin(WorkerPlugin):
    """A dask worker plugin: the model (from its file's bytes), built once per worker.

    Parameters
    ----------
    model_file : bytes
        The model file, as written by :meth:`SegmentationModel.save`.
    name : str
        The plugin's name on the worker (one per model).
    threads : int, optional
        Torch threads per worker (a LocalCluster's share of the cores). Without it, each
        worker takes its usable cores (its CPU affinity: a SLURM job's allocation) divided
        by the number of workers on its host among ``addresses``: dask's nanny sets
        ``OMP_NUM_THREADS=1`` in every worker, which would leave torch one core.
    addresses : sequence of str, optional
        The workers' addresses when the run started: on a host with several GPUs, each
        worker takes GPU ``i % count``, ``i`` its place among the host's workers (one model
        per GPU; a worker started with its own ``CUDA_VISIBLE_DEVICES`` sees one GPU).
    """

    def __init__(self, model_file: bytes, name: str, threads: int | None = None,
                 addresses: Sequence[str] = ()) -> None:  # fmt: skip
        self.model_file, self.name, self.threads = model_file, name, threads
        self.addresses = tuple(addresses)
        self._reset()

    def _reset(self) -> None:
        self._model = None
        self._segmenters: dict[Any, BoxSegmenter] = {}
        self._images: dict[Any, tuple[Any, Any]] = {}
        self._arrays: dict[str, Any] = {}
        self._records: dict[str, Any] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"model_file": self.model_file, "name": self.name, "threads": self.threads,
                "addresses": self.addresses}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, worker: Any = None) -> None:
        import torch

        from napari_segtool.inference.execution import tune_allocator, usable_cores

        threads = self.threads
        if not threads:
            host = _host(getattr(worker, "address", "") or "")
            threads = max(1, usable_cores() // workers_per_host(self.addresses).get(host, 1))
        torch.set_num_threads(threads)
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            rank = local_rank(getattr(worker, "address", "") or "", self.addresses)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        tune_allocator()  # the nanny's MALLOC_TRIM_THRESHOLD_ costs a third of the speed

    def teardown(self, worker: Any = None) -> None:
        for image, _ in self._images.values():
            image.close()
        self._reset()

    def model(self) -> Any:
        if self._model is None:
            from napari_segtool.model import SegmentationModel

            fd, tmp = tempfile.mkstemp(suffix=".pt", prefix="segtool-model-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.model_file)
                self._model = SegmentationModel.load(tmp)
            finally:
                os.unlink(tmp)
        return self._model

    def segmenter(self, config: InferenceConfig, want: tuple[bool, bool, bool],
                  calls: int = 1000) -> BoxSegmenter:  # fmt: skip
        key = (config, want)
        if key not in self._segmenters:
            unc, dis, probs = want
            self._segmenters[key] = BoxSegmenter(self.model(), config, uncertainty=unc,
                                                 disagreement=dis, probabilities=probs,
                                                 calls=calls)  # fmt: skip
        return self._segmenters[key]

    def image(self, spec: ImageSpec) -> Any:
        if spec not in self._images:
            self._images[spec] = spec.open()
        return self._images[spec][1]

    def array(self, path: str, level: str = "s0") -> Any:
        key = f"{path}::{level}"
        if key not in self._arrays:
            import zarr

            self._arrays[key] = zarr.open_group(path, mode="r+")[level]
        return self._arrays[key]

    def record(self, path: str) -> Any:
        if path not in self._records:
            from napari_segtool.cluster.records import RunRecord

            self._records[path] = RunRecord.open(path)
        return self._records[path]


def _host(address: str) -> str:
    """``tcp://10.0.0.5:40123`` -> ``10.0.0.5`` (the scheduler's ``host`` of a worker)."""
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0].strip("[]")


def local_rank(address: str, addresses: Sequence[str]) -> int:
    """A worker's place among the workers on its host (by address; 0 when not listed).

    >>> local_rank("tcp://10.0.0.5:4002", ["tcp://10.0.0.5:4009", "tcp://10.0.0.5:4002",
    ...                                    "tcp://10.0.0.6:4001"])
    0
    >>> local_rank("tcp://10.0.0.5:4009", ["tcp://10.0.0.5:4009", "tcp://10.0.0.5:4002"])
    1
    """
    host = _host(address)
    same = sorted(a for a in addresses if _host(a) == host)
    return same.index(address) if address in same else 0


def workers_per_host(addresses: Sequence[str]) -> dict[str, int]:
    """Workers per host among worker ``addresses``.

    >>> workers_per_host(["tcp://a:1", "tcp://a:2", "tcp://b:1"])
    {'a': 2, 'b': 1}
    """
    counts: dict[str, int] = {}
    for address in addresses:
        host = _host(address)
        counts[host] = counts.get(host, 0) + 1
    return counts


def _plugin(name: str) -> ModelPlugin:
    from distributed import get_worker

    return get_worker().plugins[name]


def _want(job: BoxJob) -> tuple[bool, bool, bool]:
    return ("uncertainty" in job.outputs, False, "probabilities" in job.outputs)


def resolve_settings(plugin: str, config: InferenceConfig, calls: int) -> dict[str, Any]:
    """On a worker: build the model as the run will and say what ``auto`` chose (precision,
    compile, memory format), so every worker then runs the same."""
    seg = _plugin(plugin).segmenter(config, (False, False, False), calls=calls)
    resolved = seg.resolved_config
    import torch

    return {"precision": resolved.precision, "compile": resolved.compile,
            "memory_format": resolved.memory_format, "device": str(seg.device),
            "threads": torch.get_num_threads()}  # fmt: skip


def value_range(spec: ImageSpec, normalization: Any, max_voxels: int) -> tuple[float, float]:
    """On a worker: the normalisation range from a sample of whole slices."""
    from napari_segtool.inference.blocks import subsample_range

    image, data = spec.open()
    try:
        lo, hi = subsample_range(data, normalization, max_voxels=max_voxels)
    finally:
        image.close()
    return float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])


def segment_box(job: BoxJob, index: int) -> dict[str, Any]:
    """Segment box ``index`` of ``job`` and write it into the outputs; record it done."""
    t0 = time.perf_counter()
    plugin = _plugin(job.plugin)
    record = plugin.record(job.outputs["labels"])
    attempt = record.started(index)
    box = job.box(index)
    image = plugin.image(job.image)
    skipped = False
    if job.foreground is not None:  # no tissue in the mask: nothing to segment
        mask = plugin.image(ImageSpec(job.foreground.path))
        skipped = not bool(np.any(np.asarray(mask[job.foreground.box(box)])))
    if not skipped and job.min_intensity is not None:
        skipped = bool(np.asarray(image[box]).max() < job.min_intensity)
    if skipped:
        counts = np.zeros(record.counts.shape[1], np.int64)
        counts[0] = int(np.prod([s.stop - s.start for s in box]))
        _write_background(plugin, job, box)
    else:
        with plugin.lock:  # one network per worker; its threads read and write meanwhile
            seg = plugin.segmenter(job.config, _want(job))
            out = seg.segment(
                image,
                box,
                value_range=(np.array([job.value_range[0]]), np.array([job.value_range[1]])),
            )
        plugin.array(job.outputs["labels"])[box] = out.labels
        if out.uncertainty is not None:
            plugin.array(job.outputs["uncertainty"])[box] = out.uncertainty
        if out.probabilities is not None:
            plugin.array(job.outputs["probabilities"])[(slice(None), *box)] = out.probabilities
        counts = out.counts
    record.finish(index, counts, skipped=skipped)
    return {"index": index, "skipped": skipped, "attempt": attempt,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _write_background(plugin: ModelPlugin, job: BoxJob, box: Box) -> None:
    """A skipped box: labels and uncertainty keep their fill (background, 0); probabilities
    say background with certainty."""
    if "probabilities" in job.outputs:
        arr = plugin.array(job.outputs["probabilities"])
        shape = tuple(s.stop - s.start for s in box)
        block = np.zeros((arr.shape[0], *shape), np.float32)
        block[0] = 1.0
        arr[(slice(None), *box)] = block


def pyramid_box(path: str, level: int, step: tuple[int, ...], box: Box,
                plugin: str) -> int:  # fmt: skip
    """On a worker: level ``level`` of store ``path`` over ``box`` (its chunks whole), taken
    from level 0 with ``step`` (nearest-neighbour subsampling, as the in-process writer)."""
    p = _plugin(plugin)
    src, dst = p.array(path, "s0"), p.array(path, f"s{level}")
    key = tuple(slice(b.start * s, min(b.stop * s, n), s)
                for b, s, n in zip(box, step, src.shape, strict=True))  # fmt: skip
    dst[box] = np.asarray(src[key])
    return int(np.prod([b.stop - b.start for b in box]))


def model_file_bytes(model: Any) -> bytes:
    """The model's file (without any training state), as bytes to send to workers."""
    from dataclasses import replace

    with tempfile.TemporaryDirectory(prefix="segtool-send-") as tmp:
        path = Path(tmp) / "model.pt"
        replace(model, training_state=None).save(path)
        return path.read_bytes()
