"""The Segment widget's cluster path: the image's file segmented on a dask scheduler.

With a scheduler in the widget (``local:N``, ``tcp://HOST:PORT`` or a scheduler file), the
layer's file is segmented box by box on the cluster's workers
(:func:`~napari_segtool.cluster.background.iter_segment_on_cluster`), exactly as
``napari-segtool segment FILE -o OUT.zarr --scheduler ...`` does, into ``<stem>_labels.zarr``
beside the file (a region's box in the name; with flip TTA also ``<stem>_uncertainty.zarr``).
The widget shows boxes done of the total and, when the run completes, opens the OME-Zarr
result lazily as a multiscale Labels layer (and the uncertainty as an Image layer). A run
that was cancelled or lost its client is resumed by the next run of the same settings; an
output made with other settings is never replaced from the widget.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import napari.layers

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference import Progress
from napari_segtool.inference.tiling import relay
from napari_segtool.io.names import image_stem

#: Marks a layer opened from a cluster run's output (the store's path).
CLUSTER_OUTPUT_KEY = "segtool_cluster_output"


@dataclass(frozen=True)
class ClusterJob:
    """A cluster run read from the widget's controls on the main thread."""

    image_name: str
    image_path: str
    outputs: dict[str, Path]  # "labels", and "uncertainty" with flip TTA
    scheduler: str
    model: str
    config: InferenceConfig
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    cancel: threading.Event
    region: tuple[slice, ...] | None = None


@dataclass(frozen=True)
class ClusterOutput:
    path: Path
    summary: dict[str, Any]


def output_path(image_path: str | Path, region: tuple[slice, ...] | None,
                kind: str = "labels") -> Path:  # fmt: skip
    """``<stem>_<kind>.zarr`` beside the image (``_z0-z1_y0-y1_x0-x1`` added for a region).

    >>> output_path("/data/em.ome.zarr", None).name
    'em_labels.zarr'
    >>> output_path("/data/em.tif", (slice(2, 4), slice(0, 64), slice(8, 72)), "uncertainty").name
    'em_2-4_0-64_8-72_uncertainty.zarr'
    """
    p = Path(image_path)
    stem = image_stem(p) or p.name
    stem = stem[:-4] if stem.lower().endswith(".ome") else stem
    if region is not None:
        stem += "_" + "_".join(f"{s.start}-{s.stop}" for s in region)
    return p.parent / f"{stem}_{kind}.zarr"


def cluster_job(
    layer: napari.layers.Image,
    *,
    scheduler: str,
    model: str,
    config: InferenceConfig,
    region: tuple[slice, ...] | None = None,
) -> ClusterJob:
    """The job for ``layer`` on ``scheduler``, or an :class:`InputError` saying what is missing."""
    from napari_segtool.cluster.scheduler import parse_scheduler

    parse_scheduler(scheduler)  # a bad value is one line, before anything starts
    path = getattr(layer.source, "path", None)
    if not path:
        raise InputError(
            f"'{layer.name}' has no file: the workers read the image from its file; open it "
            "from one (File > Open) or save it first, on storage the workers share"
        )
    if layer.rgb:
        raise InputError(f"'{layer.name}' is RGB: a cluster run segments one-channel images")
    return ClusterJob(
        image_name=layer.name, image_path=str(path),
        outputs={k: output_path(path, region, k)
                 for k in ("labels", "uncertainty")[: 2 if config.tta else 1]},
        scheduler=scheduler.strip(), model=model, config=config, scale=tuple(layer.scale),
        translate=tuple(layer.translate), cancel=threading.Event(), region=region,
    )  # fmt: skip


def run_cluster_job(job: ClusterJob) -> Generator[Progress, None, ClusterOutput]:
    """Worker body: build the input, run it on the cluster, report boxes done."""
    from napari_segtool.cluster.background import iter_segment_on_cluster
    from napari_segtool.cluster.inputs import cluster_input
    from napari_segtool.model import load_model

    model = load_model(job.model)
    inp = cluster_input(job.image_path, job.outputs, model, region=job.region)
    run = iter_segment_on_cluster(job.scheduler, [inp], model, config=job.config,
                                  cancel=job.cancel)  # fmt: skip
    summary = yield from relay(run, lambda report: Progress(*report))
    return ClusterOutput(job.outputs["labels"], summary)


def open_result(viewer: napari.viewer.Viewer, job: ClusterJob,
                path: Path) -> napari.layers.Labels:  # fmt: skip
    """The output store as a lazy Labels layer (multiscale when it has levels), placed over
    the image (a region's box shifted by its start); the uncertainty, if any, below it."""
    from napari_segtool._widgets.segment_layers import write_uncertainty_layer
    from napari_segtool.io.zarr_io import read_zarr

    result = read_zarr(path)
    levels = list(result.levels) or [result.data]
    translate = list(job.translate)
    if job.region is not None:
        offset = len(translate) - len(job.region)
        for i, s in enumerate(job.region):
            translate[offset + i] += s.start * job.scale[offset + i]
    ndim = len(levels[0].shape)
    layer = viewer.add_labels(
        levels if len(levels) > 1 else levels[0],
        name=f"{job.image_name} prediction",
        multiscale=len(levels) > 1,
        scale=job.scale[-ndim:],
        translate=translate[-ndim:],
        metadata={CLUSTER_OUTPUT_KEY: str(path)},
    )
    if "uncertainty" in job.outputs:
        unc = read_zarr(job.outputs["uncertainty"]).data  # level 0, lazily (the Queue's input)
        write_uncertainty_layer(viewer, f"{job.image_name} uncertainty", unc,
                                tuple(job.scale[-ndim:]), tuple(translate[-ndim:]))  # fmt: skip
    return layer
