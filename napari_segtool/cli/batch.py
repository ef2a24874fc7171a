"""``segment`` on many inputs and on a dask cluster (``--scheduler``).

Several inputs (files, glob patterns, a folder of images) give one output each in the output
folder, under the input's name. Without ``--scheduler`` they are segmented one after the
other in this process, each as a single ``segment`` would; with it, every box of every input
is a task of one dask graph (:func:`napari_segtool.cluster.run.segment_on_cluster`), written
by the workers into OME-Zarr outputs that a rerun resumes.
"""

from __future__ import annotations

import argparse
import glob
import os
from copy import copy
from pathlib import Path
from typing import Any

from napari_segtool.errors import InputError
from napari_segtool.io.names import image_stem
from napari_segtool.io.names import image_suffix as _image_suffix

__all__ = [
    "dashboard_link",
    "expand_inputs",
    "image_stem",
    "is_image_folder",
    "output_name",
    "segment_many",
    "segment_on_scheduler",
]


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of images (a folder that is not a ``.zarr`` store)."""
    return path.is_dir() and _image_suffix(path) != ".zarr"


def expand_inputs(values: list[Path]) -> list[Path]:
    """Files, ``.zarr`` stores, glob patterns and folders of images, as a sorted list.

    A folder that is not a ``.zarr`` store stands for the images directly in it (TIFF,
    medical formats, ``.zarr`` stores); a folder without any (a DICOM series) is one input.
    """
    out: list[Path] = []
    for value in values:
        text = os.fspath(value)
        if not value.exists() and any(c in text for c in "*?["):
            hits = sorted(Path(p) for p in glob.glob(text))
            if not hits:
                raise InputError(f"{text}: no file matches this pattern")
            out.extend(hits)
        elif value.is_dir() and _image_suffix(value) != ".zarr":
            images = sorted(p for p in value.iterdir() if _image_suffix(p) is not None
                            and not p.name.startswith("."))  # fmt: skip
            out.extend(images or [value])
        else:
            out.append(value)
    seen: dict[str, Path] = {}
    for p in out:
        key = p.name
        if key in seen and seen[key].resolve() != p.resolve():
            raise InputError(f"{seen[key]} and {p} have the same name; their outputs would "
                             "collide in the output folder")  # fmt: skip
        seen[key] = p
    unique = list(dict.fromkeys(p.resolve() for p in out))
    if not unique:
        raise InputError("no input image given")
    return [Path(p) for p in unique]


def output_name(image: Path, folder: Path, *, zarr: bool) -> Path:
    """The output for ``image`` in ``folder``: the input's name (``.zarr`` when ``zarr``)."""
    suffix = _image_suffix(image)
    if zarr and suffix != ".zarr":
        stem = image.name[: -len(suffix)] if suffix else image.name
        return folder / f"{stem}.zarr"
    return folder / image.name


def _folder(path: Path, flag: str) -> Path:
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: with several inputs, give a folder for the outputs")
    if path.is_dir() and _image_suffix(path) == ".zarr":
        raise InputError(f"{flag} {path}: with several inputs, give a folder, not a .zarr store")
    return path


def segment_many(args: argparse.Namespace, inputs: list[Path], run_one: Any) -> dict[str, Any]:
    """Each input in turn, in this process, as ``segment IMAGE -o FOLDER/NAME``."""
    keys = [k for k in ("output", "uncertainty", "probabilities") if getattr(args, k)]
    folders = {k: _folder(getattr(args, k), f"--{k}") for k in keys}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    results = []
    for image in inputs:
        one = copy(args)
        one.image = image
        for key, folder in folders.items():
            setattr(one, key, output_name(image, folder, zarr=False))
        results.append(run_one(one))
    return {"inputs": results, "engine": "in-process", "count": len(results)}


def segment_on_scheduler(args: argparse.Namespace, inputs: list[Path], *, many: bool,
                         config: Any) -> dict[str, Any]:  # fmt: skip
    """Every box of every input as tasks on the cluster named by ``--scheduler``."""
    import sys

    from napari_segtool.cluster.run import segment_on_cluster
    from napari_segtool.cluster.scheduler import connect, parse_scheduler
    from napari_segtool.io.zarr_io import is_zarr_path
    from napari_segtool.model import load_model

    kind, target = parse_scheduler(args.scheduler)
    keys = [k for k in ("output", "uncertainty", "probabilities") if getattr(args, k)]
    if not many:
        for key in keys:
            if not is_zarr_path(getattr(args, key)):
                raise InputError(
                    f"--{key} {getattr(args, key)}: with --scheduler the workers write the "
                    "outputs block by block: name a .zarr store"
                )
    model = load_model(args.model)
    cluster_inputs = [_cluster_input(args, p, keys, many, model) for p in inputs]
    threads = None
    if kind == "local":
        from napari_segtool.inference.execution import usable_cores

        threads = max(1, usable_cores() // target)
    with connect(args.scheduler) as client:
        link = dashboard_link(client)
        where = link or "off (install bokeh)"
        sys.stderr.write(f"scheduler {client.scheduler.address}; dashboard {where}\n")
        summary = segment_on_cluster(
            client, cluster_inputs, model, config=config, block_shape=args.block_shape,
            overwrite=args.overwrite, min_intensity=args.min_intensity, threads=threads,
        )  # fmt: skip
        summary["scheduler"] = client.scheduler.address
        summary["dashboard"] = link
    summary["engine"] = "cluster"
    return summary


def _cluster_input(args: argparse.Namespace, image_path: Path, keys: list[str], many: bool,
                   model: Any) -> Any:  # fmt: skip
    """One input's :class:`~napari_segtool.cluster.run.ClusterInput` from the command's
    flags (:func:`~napari_segtool.cluster.inputs.cluster_input` does the work)."""
    from napari_segtool.cli._common import parse_region
    from napari_segtool.cluster.inputs import cluster_input, image_shape

    outputs = {}
    for key in keys:
        target_path = getattr(args, key)
        if many:
            _folder(target_path, f"--{key}").mkdir(parents=True, exist_ok=True)
            target_path = output_name(image_path, target_path, zarr=True)
        outputs["labels" if key == "output" else key] = Path(target_path)
    region = None
    if args.region is not None:
        shape = image_shape(image_path, channel_axis=args.channel_axis, rgb=args.rgb)
        region = parse_region(args.region, shape)
    mask = None
    if args.foreground_mask is not None:
        mask = _mask_path(args.foreground_mask, image_path, many)
    return cluster_input(image_path, outputs, model, channel_axis=args.channel_axis,
                         rgb=args.rgb, region=region, foreground_mask=mask)  # fmt: skip


def _mask_path(value: Path, image_path: Path, many: bool) -> Path:
    """The mask of one input: ``value``, or with several inputs its namesake in that folder."""
    if not many:
        if is_image_folder(value):
            raise InputError(f"--foreground-mask {value}: one input takes one mask file (a "
                             "folder of masks goes with several inputs)")  # fmt: skip
        return value
    if not is_image_folder(value):
        raise InputError(f"--foreground-mask {value}: with several inputs, give a folder of "
                         "masks named as the inputs")  # fmt: skip
    stem = image_stem(image_path)
    found = [p for p in sorted(value.iterdir()) if image_stem(p) == stem]
    if not found:
        raise InputError(f"--foreground-mask {value}: no mask named {stem} (for {image_path})")
    return found[0]


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address, or None without one (its pages need bokeh)."""
    from napari_segtool.cluster.scheduler import has_bokeh

    if not has_bokeh():
        return None
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return None
        return str(client.dashboard_link)
    except (KeyError, AttributeError, OSError):
        return None
