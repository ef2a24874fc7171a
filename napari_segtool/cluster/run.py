"""Segment one or many inputs on a dask.distributed cluster, box by box, resumably.

:func:`segment_on_cluster` is the whole operation: it registers the model with the workers
(sent once per worker), resolves the ``auto`` choices and each input's intensity range on a
worker, creates (or reopens) the OME-Zarr outputs with their run record
(:mod:`~napari_segtool.cluster.records`), submits every box still to do of every input as one
task graph, shows progress, builds the pyramids on the workers and returns a summary.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_segtool.cluster.records import TODO, RunRecord
from napari_segtool.cluster.tasks import (
    BoxJob,
    ImageSpec,
    MaskSpec,
    ModelPlugin,
    model_file_bytes,
    plugin_name,
    pyramid_box,
    resolve_settings,
    segment_box,
    value_range,
)
from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.boxes import READ_VOXELS, block_boxes, default_block_shape
from napari_segtool.inference.predict import _tile_shape

logger = logging.getLogger(__name__)

__all__ = ["ClusterInput", "segment_on_cluster"]

#: Tries per box beyond the first when its task fails (a worker lost mid-box is rescheduled
#: by dask on its own, whatever this says).
RETRIES = 2
#: Spatial chunks of the outputs (Z, Y, X); blocks are whole multiples of them.
OUTPUT_CHUNKS = (1, 256, 256)


@dataclass(frozen=True)
class ClusterInput:
    """One input of a cluster run and where its results go.

    ``shape`` is the (region's) one-channel shape ``(Z, Y, X)`` or ``(Y, X)``; ``outputs``
    maps ``"labels"`` (required), ``"uncertainty"`` and ``"probabilities"`` to ``.zarr``
    paths; ``spacing``/``unit``/``translation`` are written into their OME-Zarr metadata."""

    image: ImageSpec
    shape: tuple[int, ...]
    outputs: dict[str, Path]
    spacing: tuple[float, ...] | None = None
    unit: str | None = None
    translation: tuple[float, ...] | None = None
    foreground: MaskSpec | None = None


def _settings(inp: ClusterInput, model: Any, config: InferenceConfig,
              block_shape: tuple[int, ...], min_intensity: float | None,
              digest: str) -> dict[str, Any]:  # fmt: skip
    """What a run's output depends on (compared on resume, as JSON)."""
    c = config
    return {
        "input": str(Path(inp.image.path).resolve()),
        "channel": None if inp.image.channel_key is None else repr(inp.image.channel_key),
        "region": None if inp.image.region is None else [list(r) for r in inp.image.region],
        "shape": list(inp.shape),
        "model": digest,
        "tile_shape": list(_tile_shape(c, model)),
        "overlap": c.overlap,
        "blend": c.blend,
        "batch_size": c.batch_size,
        "tta": c.tta,
        "mc_dropout": c.mc_dropout,
        "device": c.device,
        "precision": c.precision,
        "compile": c.compile,
        "block_shape": list(block_shape),
        "outputs": sorted(inp.outputs),
        "min_intensity": min_intensity,
        "foreground_mask": None if inp.foreground is None else _mask_identity(inp.foreground),
    }


def _mask_identity(mask: MaskSpec) -> dict[str, Any]:
    """A mask by path, shape and modification time: another mask is another run."""
    path = Path(mask.path).resolve()
    near = [path, *path.iterdir()] if path.is_dir() else [path]  # a store: its metadata
    stamp = max(p.stat().st_mtime_ns for p in near)
    return {"path": str(path), "shape": list(mask.mask_shape), "mtime_ns": stamp}


def _model_digest(model: Any) -> str:
    import hashlib
    import json

    from napari_segtool.model.modelfile import weights_digest

    meta = {"normalization": repr(model.normalization), "classes": list(model.class_names),
            "labels": list(model.label_values or ()), "config": repr(model.config)}  # fmt: skip
    text = weights_digest(model.network.state_dict()) + json.dumps(meta, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Prepared:
    inp: ClusterInput
    job: BoxJob
    record: RunRecord
    todo: list[int]
    resumed: int


def segment_on_cluster(
    client: Any,
    inputs: Sequence[ClusterInput],
    model: Any,
    *,
    config: InferenceConfig | None = None,
    block_shape: Sequence[int] | None = None,
    overwrite: bool = False,
    min_intensity: float | None = None,
    sample_voxels: int = 2**22,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Segment ``inputs`` on the cluster behind ``client``; resume what an earlier run left.

    Parameters
    ----------
    client : distributed.Client
    inputs : sequence of ClusterInput
        One-channel images (``.zarr``, TIFF, medical formats: anything :func:`read_image`
        opens lazily on the workers, who must see the same paths).
    model : SegmentationModel
        A one-input-channel model; its weights go to each worker once.
    config : InferenceConfig, optional
        As for ``segment``; ``auto`` choices are made once, on one worker, and used by all.
    block_shape : sequence of int, optional
        The boxes' shape (default :func:`default_block_shape`); whole multiples of the
        outputs' chunks (``OUTPUT_CHUNKS``) so that no two boxes write one chunk.
    overwrite : bool
        Replace existing outputs. Without it, an output of the same run (same settings)
        is resumed, and any other existing output is refused.
    min_intensity : float, optional
        Skip boxes whose image stays below this value (background, counted as ``empty``).
        Each input's ``foreground`` mask, when it has one, skips the boxes where the mask
        is all zero, the same way.
    sample_voxels : int
        Voxels of the sample each input's normalisation range is taken from.
    threads : int, optional
        Torch threads on each worker (default: its usable cores shared among the workers on
        its host).
    progress : callable, optional
        ``progress(done, total)`` in boxes as they finish.

    Returns
    -------
    dict
        The summary: per input, and totals of boxes computed, resumed (done before), empty
        (skipped), retried (started more than once), seconds and workers.
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    cfg = config or InferenceConfig()
    if model.config.in_channels != 1:
        raise InputError(f"--scheduler segments one-channel images; model {model.name!r} takes "
                         f"{model.config.in_channels} channels")  # fmt: skip
    digest = _model_digest(model)
    name = plugin_name(digest)
    _wait_for_workers(client)
    addresses = sorted(client.scheduler_info().get("workers", {}))
    plugin = ModelPlugin(model_file_bytes(model), name, threads, addresses=addresses)
    client.register_plugin(plugin, name=name)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    voxels = sum(int(np.prod(inp.shape)) for inp in inputs)
    # several boxes per worker (so the graph balances), none above READ_VOXELS
    read_voxels = int(np.clip(voxels // (4 * n_workers), 1 << 20, READ_VOXELS))
    resolved: list[InferenceConfig] = []  # the auto choices, made once (on a first new output)
    prepared = [
        _prepare(
            client,
            inp,
            model,
            cfg,
            name=name,
            digest=digest,
            block_shape=block_shape,
            read_voxels=read_voxels,
            overwrite=overwrite,
            min_intensity=min_intensity,
            sample_voxels=sample_voxels,
            resolved=resolved,
        )
        for inp in inputs
    ]
    total = sum(len(p.todo) for p in prepared)
    futures = [
        client.submit(
            segment_box,
            p.job,
            k,
            key=f"segtool-box-{p.record.digest[:16]}-{k}",
            retries=RETRIES,
            priority=-n,
            pure=False,
        )
        for n, p in enumerate(prepared)
        for k in p.todo
    ]
    results: list[dict[str, Any]] = []
    bar = _Bar(total, progress)
    try:
        for future in as_completed(futures):
            results.append(future.result())
            bar.update(len(results))
        _pyramids(client, prepared, name)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    summary = _summary(client, prepared, results, seconds, model)
    for p, entry in zip(prepared, summary["inputs"], strict=True):
        p.record.set_complete(entry)
    return summary


def _prepare(client: Any, inp: ClusterInput, model: Any, cfg: InferenceConfig, *, name: str,
             digest: str, block_shape: Sequence[int] | None, read_voxels: int, overwrite: bool,
             min_intensity: float | None, sample_voxels: int,
             resolved: list[InferenceConfig]) -> _Prepared:  # fmt: skip
    """One input's job and record: a new output created, or an earlier run's reopened."""
    shape = tuple(int(n) for n in inp.shape)
    chunks = OUTPUT_CHUNKS[-len(shape) :]
    if block_shape is not None:
        block = tuple(int(n) for n in block_shape)
    else:
        block = default_block_shape(shape, model, config=cfg, chunks=chunks,
                                    read_voxels=read_voxels)  # fmt: skip
    _check_block(block, shape, chunks)
    settings = _settings(inp, model, cfg, block, min_intensity, digest)
    record = _existing(inp, settings, overwrite)
    if record is None:
        if not resolved:
            resolved.append(_resolve(client, name, cfg, model, shape))
        lo_hi = client.submit(value_range, inp.image, model.normalization, sample_voxels,
                              pure=False).result()  # fmt: skip
        record = _create(inp, model, settings, resolved[0], lo_hi, block, chunks)
    chosen = record.resolved
    run_cfg = replace(cfg, precision=chosen["precision"], compile=chosen["compile"],
                      memory_format=chosen["memory_format"])  # fmt: skip
    job = BoxJob(plugin=name, image=inp.image, shape=shape, block_shape=block,
                 value_range=tuple(chosen["range"]), config=run_cfg,
                 outputs={k: str(v) for k, v in inp.outputs.items()},
                 min_intensity=min_intensity, foreground=inp.foreground,
                 background=int((model.label_values or (0,))[0]))  # fmt: skip
    state = record.state()
    todo = [int(k) for k in np.flatnonzero(state == TODO)]
    return _Prepared(inp, job, record, todo, int(state.size - len(todo)))


def _wait_for_workers(client: Any, timeout: float = 60.0) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as exc:
        raise InputError(f"the scheduler {client.scheduler.address} has no workers (waited "
                         f"{timeout:.0f} s); start `dask worker` processes") from exc  # fmt: skip


def _check_block(block: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    if len(block) != len(shape) or any(b < 1 for b in block):
        raise InputError(f"block shape {block} must be {len(shape)} positive integers")
    for b, c, n in zip(block, chunks, shape, strict=True):
        if b % c and b < n:
            raise InputError(f"block shape {block} must be whole multiples of the output "
                             f"chunks {chunks} (or span the axis)")  # fmt: skip


def _existing(inp: ClusterInput, settings: dict[str, Any], overwrite: bool) -> RunRecord | None:
    """The record to resume, or None after clearing the way for a new run."""
    labels = inp.outputs["labels"]
    present = [p for p in inp.outputs.values() if p.exists()]
    if not present:
        return None
    if overwrite:
        for p in present:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return None
    record = RunRecord.open(labels) if labels.exists() else None
    if record is None:
        raise InputError(f"{present[0]}: exists and is not the output of a resumable run; "
                         "pass --overwrite to replace it")  # fmt: skip
    differ = record.mismatch(settings)
    if differ:
        raise InputError(f"{labels}: was started with other settings ({', '.join(differ)}); "
                         "rerun with the same ones to resume, or pass --overwrite")  # fmt: skip
    missing = [str(p) for p in inp.outputs.values() if not p.exists()]
    if missing:
        raise InputError(f"{labels}: its run's output {missing[0]} is gone; pass --overwrite")
    return record


def _resolve(client: Any, name: str, cfg: InferenceConfig, model: Any,
             shape: tuple[int, ...]) -> InferenceConfig:  # fmt: skip
    """The ``auto`` choices, made once on one worker."""
    calls = max(1, int(np.prod(shape)) // int(np.prod(_tile_shape(cfg, model))))
    got = client.submit(resolve_settings, name, cfg, calls, pure=False).result()
    logger.info("workers run %s, %s, compile %s, %s torch threads", got["device"],
                got["precision"], got["compile"], got["threads"])  # fmt: skip
    return replace(cfg, precision=got["precision"], compile=got["compile"],
                   memory_format=got["memory_format"])  # fmt: skip


def _create(inp: ClusterInput, model: Any, settings: dict[str, Any], cfg: InferenceConfig,
            lo_hi: tuple[float, float], block: tuple[int, ...],
            chunks: tuple[int, ...]) -> RunRecord:  # fmt: skip
    from napari_segtool.inference.blocks import labels_dtype
    from napari_segtool.io.zarr_io import create_ome_zarr

    shape = tuple(int(n) for n in inp.shape)
    n = model.config.out_channels
    geometry = {"spacing": inp.spacing, "unit": inp.unit, "translation": inp.translation,
                "chunks": chunks}  # fmt: skip
    background = int((model.label_values or (0,))[0])
    kinds = {"labels": (shape, labels_dtype(model), True, background),
             "uncertainty": (shape, np.float32, False, 0),
             "probabilities": ((n, *shape), np.float32, False, 0)}  # fmt: skip
    for kind, path in inp.outputs.items():
        full, dtype, is_label, fill = kinds[kind]
        axes = ("C" if kind == "probabilities" else "") + "ZYX"[-len(shape) :]
        create_ome_zarr(path, shape=full, dtype=dtype, axes=axes, image_label=is_label,
                        fill_value=fill, **geometry)  # fmt: skip
    resolved = {"precision": cfg.precision, "compile": cfg.compile,
                "memory_format": cfg.memory_format, "range": list(lo_hi)}  # fmt: skip
    n_boxes = len(block_boxes(shape, block))
    return RunRecord.create(inp.outputs["labels"], settings=settings, resolved=resolved,
                            n_boxes=n_boxes, n_classes=n)  # fmt: skip


def _pyramids(client: Any, prepared: list[_Prepared], name: str) -> None:
    """Levels 1 and up of every output, chunk groups as tasks, from level 0 on the workers."""
    import zarr
    from distributed import wait

    futures = []
    for p in prepared:
        for path in p.job.outputs.values():
            group = zarr.open_group(path, mode="r")
            datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
            base = group[datasets[0]["path"]].shape
            for k in range(1, len(datasets)):
                level = group[datasets[k]["path"]]
                step = _steps(base, level.shape)
                group_shape = _task_shape(level.chunks, level.shape)
                for box in block_boxes(level.shape, group_shape):
                    futures.append(client.submit(pyramid_box, path, k, step, box, name,
                                                 pure=False, retries=RETRIES))  # fmt: skip
    wait(futures)
    for f in futures:
        f.result()  # raise the first error, if any


def _steps(base: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The step from level 0 to a level (powers of two: ``ceil(base / step) == shape``)."""
    out = []
    for b, n in zip(base, shape, strict=True):
        s = 1
        while -(-b // s) > n:
            s *= 2
        out.append(s)
    return tuple(out)


def _task_shape(chunks: Sequence[int], shape: Sequence[int], voxels: int = 1 << 24) -> tuple:
    """Whole chunks, grown along the first axis up to about ``voxels`` per task."""
    per = int(np.prod(chunks[1:]))
    rows = max(int(chunks[0]), (voxels // max(per, 1)) // int(chunks[0]) * int(chunks[0]))
    return (min(rows, int(shape[0])), *chunks[1:])


class _Bar:
    """Boxes done of the total on the terminal (rate and time left), and a callback."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        self.total, self.progress = total, progress
        self.tqdm = tqdm(total=total, unit="box", desc="segment", leave=False, delay=0.5)
        if progress is not None:
            progress(0, total)

    def update(self, done: int) -> None:
        self.tqdm.update(done - self.tqdm.n)
        if self.progress is not None:
            self.progress(done, self.total)

    def close(self) -> None:
        self.tqdm.close()


def _summary(client: Any, prepared: list[_Prepared], results: list[dict[str, Any]],
             seconds: float, model: Any) -> dict[str, Any]:  # fmt: skip
    inputs = []
    for p in prepared:
        counts = p.record.total_counts()
        inputs.append({
            "input": p.inp.image.path,
            "output": str(p.inp.outputs["labels"]),
            "shape": list(p.job.shape),
            "blocks": int(p.record.n_boxes),
            "block_shape": list(p.job.block_shape),
            "classes": {c: int(v) for c, v in zip(model.class_names, counts, strict=False)},
        })  # fmt: skip
    computed = [r for r in results if not r["skipped"]]
    return {
        "inputs": inputs,
        "blocks": {
            "total": sum(int(p.record.n_boxes) for p in prepared),
            "computed": len(computed),
            "resumed": sum(p.resumed for p in prepared),
            "empty": sum(1 for r in results if r["skipped"]),
            "retried": sum(1 for r in results if r["attempt"] > 1),
        },
        "seconds": round(seconds, 2),
        "box_seconds": round(sum(r["seconds"] for r in results), 2),
        "workers": len(client.scheduler_info().get("workers", {})),
    }
