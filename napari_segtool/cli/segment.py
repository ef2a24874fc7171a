"""``segment``: tiled inference on a file, a folder of files, or a cluster (``--scheduler``)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_segtool.cli._common import (
    REGION_HELP,
    TerminalProgress,
    add_precision_flag,
    check_output,
    emit,
    image_outputs,
    in_memory,
    logger,
    parse_region,
    tile_shape,
)
from napari_segtool.cluster.scheduler import SCHEDULER_HELP
from napari_segtool.config import DEVICES, InferenceConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from contextlib import ExitStack

    from napari_segtool.inference import Segmentation
    from napari_segtool.io.tiff import ImageFile
    from napari_segtool.model import SegmentationModel

#: Voxels of the sample the block engine's normalisation range comes from (whole slices).
SAMPLE_VOXELS = 2**22
#: Spatial chunk of the .zarr outputs in y and x (z: the engine's rows, see ``block_rows``).
ZARR_CHUNK_YX = 256


SEGMENT_DESCRIPTION = (
    "Segment IMAGE with a U-Net and write the labels. Large volumes: when IMAGE is a .zarr "
    "store, an output is .zarr, or --region is given, a one-channel image is segmented by the "
    "block engine, which reads, segments and writes a block of slices at a time, so memory "
    "stays bounded by the block (the tile's depth for a 3D model) whatever the volume's size. "
    "Its intensities are normalised with the percentiles of a sample of the whole volume: at "
    f"most {SAMPLE_VOXELS:,} voxels in whole, evenly spaced slices (seeded; the whole image "
    "when smaller), not every voxel; the JSON's 'normalization' says what was sampled. .zarr "
    "outputs are OME-Zarr 0.5 with the input's spacing and unit and a pyramid, built in a "
    "temporary store beside them and renamed into place when complete. A .zarr input with a "
    "TIFF or medical output holds that output in memory (checked first: otherwise write .zarr)."
)
REGION_SEGMENT_HELP = (
    f"segment only {REGION_HELP}, normalised with the whole volume's range. The outputs "
    "hold the box: .zarr outputs carry an OME-Zarr translation (the box's offset times the "
    "spacing, plus the input's own translation), so they overlay the image in napari; medical "
    "outputs get the box's origin; a TIFF cannot record the offset (the JSON's 'region' says it)"
)


def add_parsers(sub: Any) -> None:
    """Add ``segment`` to the subcommands."""
    defaults = InferenceConfig()
    seg = sub.add_parser("segment", help="segment an image file with a U-Net",
                         description=SEGMENT_DESCRIPTION)  # fmt: skip
    seg.add_argument("image", type=Path, nargs="+", help="input image: TIFF, NIfTI, NRRD, "
                     "MetaImage, a folder of DICOM slices (FOLDER::SERIESUID for one of "
                     "several), a zarr array or OME-Zarr image (.zarr, read block by block); "
                     "PNG/JPEG for 2D. Several images, glob patterns or a folder of images "
                     "give one output each in the -o folder, under the input's name (.zarr "
                     "for every input with --scheduler)")  # fmt: skip
    seg.add_argument("-o", "--output", type=Path, required=True,
                     help="labels to write: .zarr (OME-Zarr 0.5 labels, written block by "
                     "block), .tif, or .nii.gz/.nii/.nrrd/.nhdr/.mha/.mhd with the input's "
                     "spacing, origin and direction; a folder for several inputs")  # fmt: skip
    seg.add_argument(
        "-m", "--model", default="em-membranes-2d",
        help="bundled model name (see `napari-segtool models`) or a model file",
    )  # fmt: skip
    seg.add_argument("--device", choices=DEVICES, default=defaults.device)
    seg.add_argument("--tile-shape", type=tile_shape, default=None,
                     help="spatial tile, e.g. 256,256 (default: the model's)")  # fmt: skip
    seg.add_argument("--overlap", type=float, default=defaults.overlap)
    seg.add_argument("--batch-size", type=int, default=defaults.batch_size)
    seg.add_argument("--blend", choices=("gaussian", "constant"), default=defaults.blend)
    add_precision_flag(seg, compile_flag=True)
    seg.add_argument("--no-amp", action="store_true", help="the same as --precision fp32")
    seg.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    seg.add_argument("--uncertainty", type=Path,
                     help="with --tta: write the uncertainty (.tif, .zarr, ...)")  # fmt: skip
    seg.add_argument("--probabilities", type=Path,
                     help="write class probabilities (C, ...) (.tif, .zarr, ...)")  # fmt: skip
    seg.add_argument(
        "--channel-axis", type=int, default=None, help="axis of the image that holds channels"
    )
    seg.add_argument("--rgb", action="store_true", help="the last axis holds RGB channels")
    seg.add_argument("--region", help=REGION_SEGMENT_HELP)
    seg.add_argument("--overwrite", action="store_true",
                     help="replace existing .zarr outputs (TIFF and medical files are "
                     "replaced anyway); with --scheduler, start again, not resume")  # fmt: skip
    seg.add_argument("--scheduler", help=SCHEDULER_HELP + ". Each finished block is recorded "
                     "in the output store; the same command again computes only the blocks "
                     "still missing (other settings against an existing output are refused "
                     "without --overwrite)")  # fmt: skip
    seg.add_argument("--block-shape", type=tile_shape, default=None,
                     help="with --scheduler: the blocks' shape Z,Y,X (whole multiples of the "
                     "outputs' 1,256,256 chunks; default: whole planes for a 2D model, about "
                     "32 M voxels read per block)")  # fmt: skip
    seg.add_argument("--min-intensity", type=float, default=None,
                     help="with --scheduler: blocks whose image stays below this value are "
                     "background, not segmented (counted as 'empty')")  # fmt: skip
    seg.add_argument("--foreground-mask", type=Path, default=None, metavar="MASK",
                     help="with --scheduler: blocks where MASK is all zero are background, "
                     "not segmented (counted as 'empty'). MASK covers the image's field of "
                     "view at any resolution (e.g. a thresholded low-resolution level); with "
                     "several inputs, a folder of masks with the inputs' names")  # fmt: skip
    seg.set_defaults(run=cmd_segment)


def _channels(args: argparse.Namespace, image: ImageFile, model: SegmentationModel):
    """``(rgb, channel_axis)`` from the flags and the axes the file declares."""
    rgb = True if args.rgb else (image.rgb if args.channel_axis is None else None)
    channel_axis = args.channel_axis if args.channel_axis is not None else image.channel_axis
    n_in = model.config.in_channels
    if args.channel_axis is None and image.channel_axis is not None and n_in == 1:
        raise InputError(
            f"{args.image}: the file declares axes {image.axes} "
            f"({image.data.shape[image.channel_axis]} channels) but model {model.name!r} takes "
            f"1 channel; if the file is a Z stack, save it again with metadata={{'axes': 'ZYX'}} "
            "(tifffile.imwrite(..., imagej=True) declares a 3D array as channels otherwise), or "
            "pick one channel"
        )
    return rgb, None if rgb else channel_axis


def _geometry(image: ImageFile, ndim: int, start: tuple[int, ...] | None = None) -> dict:
    """Spacing, unit, origin and direction for outputs of ``ndim`` spatial axes: the input's,
    with the origin moved to the box at ``start`` (voxels) when one was segmented."""
    same = len(image.spacing) == ndim
    origin = image.origin if same else None
    if same and start is not None and any(start):
        offset = np.asarray(start, np.float64) * np.asarray(image.spacing, np.float64)
        if image.direction is not None:  # physical axes of a medical image
            offset = np.asarray(image.direction, np.float64) @ offset
        base = np.zeros(ndim) if origin is None else np.asarray(origin, np.float64)
        origin = tuple(float(v) for v in base + offset)
    return {"spacing": image.spacing if same else None, "unit": image.unit, "origin": origin,
            "direction": image.direction if same else None}  # fmt: skip


def _translation(args: argparse.Namespace, geometry: dict) -> tuple[float, ...] | None:
    """The OME-Zarr translation of a .zarr output (OME-Zarr records no direction)."""
    direction = geometry["direction"]
    if direction is not None and not np.allclose(direction, np.eye(len(direction))):
        logger.warning("%s: OME-Zarr records no direction; the labels keep the voxel grid but "
                       "not the image's orientation", args.output)  # fmt: skip
    return geometry["origin"]


def _write(args: argparse.Namespace, path: Path, data: np.ndarray, geometry: dict, *,
           axes: str | None = None, image_label: bool = False) -> None:  # fmt: skip
    """One in-memory output: OME-Zarr for .zarr, else TIFF or a medical format."""
    from napari_segtool.io import write_image
    from napari_segtool.io.zarr_io import is_zarr_path, write_ome_zarr

    if is_zarr_path(path):
        write_ome_zarr(path, data, spacing=geometry["spacing"], unit=geometry["unit"],
                       axes=axes, translation=_translation(args, geometry),
                       image_label=image_label, overwrite=args.overwrite)  # fmt: skip
    else:
        write_image(path, data, axes=axes, **geometry)


def _write_outputs(args: argparse.Namespace, image: ImageFile, result: Segmentation) -> None:
    # medical outputs get the input's whole geometry, so they overlay it in other tools
    geometry = _geometry(image, result.labels.ndim)
    _write(args, args.output, result.labels, geometry, image_label=True)
    if args.uncertainty is not None and result.uncertainty is not None:
        _write(args, args.uncertainty, result.uncertainty, geometry)
    if args.probabilities is not None and result.probabilities is not None:
        probs = result.probabilities  # (C, *spatial): a channel axis, then the image's spacing
        _write(args, args.probabilities, probs, geometry, axes="C" + "ZYX"[-(probs.ndim - 1) :])


def _progress(done: int, total: int, last: list[int]) -> None:
    pct = 100 * done // max(total, 1)
    if pct // 10 != last[0] // 10:
        logger.info("segmenting: %d / %d tiles", done, total)
    last[0] = pct


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    return [(flag, path) for flag, path in (("-o", args.output),
            ("--uncertainty", args.uncertainty), ("--probabilities", args.probabilities))
            if path is not None]  # fmt: skip


def cmd_segment(args: argparse.Namespace) -> int:
    from napari_segtool.cli.batch import expand_inputs, segment_many, segment_on_scheduler

    inputs = expand_inputs(list(args.image))
    many = len(inputs) > 1 or (len(args.image) == 1 and inputs[0] != args.image[0].resolve()
                               and not args.image[0].is_file())  # fmt: skip
    if args.scheduler is None and (args.block_shape is not None or args.min_intensity
                                   is not None or args.foreground_mask is not None):  # fmt: skip
        raise InputError("--block-shape, --min-intensity and --foreground-mask apply to "
                         "--scheduler runs")  # fmt: skip
    if args.scheduler is not None:
        if args.uncertainty and not args.tta:
            raise InputError("--uncertainty needs --tta (the uncertainty comes from the flips)")
        emit(segment_on_scheduler(args, inputs, many=many, config=_config(args)))
        return 0
    if many:
        emit(segment_many(args, inputs, _segment_one))
        return 0
    args.image = inputs[0]
    emit(_segment_one(args))
    return 0


def _config(args: argparse.Namespace) -> InferenceConfig:
    return InferenceConfig(tile_shape=args.tile_shape, overlap=args.overlap, blend=args.blend,
                           batch_size=args.batch_size, device=args.device,
                           precision="fp32" if args.no_amp else args.precision,
                           compile=args.compile, tta=args.tta)  # fmt: skip


def _segment_one(args: argparse.Namespace) -> dict[str, object]:
    """``segment IMAGE -o OUTPUT`` in this process: the summary."""
    from napari_segtool.inference import resolve_device
    from napari_segtool.io import read_image
    from napari_segtool.io.zarr_io import ZARR_SUFFIX, is_zarr_path
    from napari_segtool.model import load_model

    if args.uncertainty and not args.tta:
        raise InputError("--uncertainty needs --tta (the uncertainty comes from the flips)")
    for flag, path in _outputs(args):
        check_output(path, flag=flag, suffixes=(*image_outputs(), ZARR_SUFFIX),
                     overwrite=args.overwrite)  # fmt: skip
        if path.resolve() == args.image.resolve():
            raise InputError(f"{flag} {path}: is the input image; name another output")
    resolve_device(args.device)  # fail before any work if the device is not there
    lazy = (is_zarr_path(args.image) or args.region is not None
            or any(is_zarr_path(path) for _, path in _outputs(args)))  # fmt: skip
    image = read_image(args.image, lazy=lazy)
    try:
        model = load_model(args.model)
        config = _config(args)
        volume = _one_channel(args, image, model) if lazy else None
        if volume is not None:
            summary = _segment_blocks(args, image, volume, model, config)
        elif args.region is not None:
            raise InputError(
                "--region segments one-channel images with one-channel models (the block "
                f"engine); {args.image} has axes {image.axes or '?'} and model "
                f"{model.name!r} takes {model.config.in_channels} channel(s)"
            )
        else:
            summary = _segment_in_memory(args, in_memory(image, purpose="segmenting"), model,
                                         config)  # fmt: skip
    finally:
        image.close()
    return summary


def _segment_in_memory(args: argparse.Namespace, image: ImageFile, model: SegmentationModel,
                       config: InferenceConfig) -> dict[str, object]:  # fmt: skip
    from napari_segtool.inference import segment

    rgb, channel_axis = _channels(args, image, model)
    t0 = time.perf_counter()
    last = [-1]
    with TerminalProgress("segment") as bar:

        def progress(done: int, total: int) -> None:
            _progress(done, total, last)
            bar.tiles(done, total)

        result = segment(
            image.data,
            model,
            config=config,
            channel_axis=channel_axis,
            rgb=rgb,
            return_probabilities=args.probabilities is not None,
            progress=progress,
        )
    _write_outputs(args, image, result)
    values = model.label_values or tuple(range(len(model.class_names)))
    return {
        "output": str(args.output),
        "shape": list(result.labels.shape),
        "dtype": str(result.labels.dtype),
        "classes": {
            name: int(np.count_nonzero(result.labels == v))
            for v, name in zip(values, model.class_names, strict=False)
        },
        "device": result.device,
        "execution": result.execution,
        "engine": "in-memory",
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


def _one_channel(args: argparse.Namespace, image: ImageFile, model: SegmentationModel) -> Any:
    """The image as a lazy one-channel ``(Z, Y, X)`` or ``(Y, X)`` array for the block
    engine (a channel axis of length 1 dropped), or None when it has colour or channels."""
    from napari_segtool.io.zarr_io import RegionView

    if model.config.in_channels != 1 or args.rgb or (image.rgb and args.channel_axis is None):
        return None
    data = image.data
    axis = args.channel_axis if args.channel_axis is not None else image.channel_axis
    if axis is not None:
        if not -data.ndim <= axis < data.ndim or data.shape[axis] != 1:
            return None
        key: list[slice | int] = [slice(None)] * data.ndim
        key[axis] = 0
        data = RegionView(data, key)
    return data if len(data.shape) in (2, 3) else None


def _segment_blocks(
    args: argparse.Namespace,
    image: ImageFile,
    volume: Any,
    model: SegmentationModel,
    config: InferenceConfig,
) -> dict[str, object]:
    """Segment with the block engine: zarr outputs filled block by block, others in memory."""
    from contextlib import ExitStack

    from napari_segtool.inference import resolve_device
    from napari_segtool.inference.blocks import segment_blocks, subsample_range, subsample_slices

    full = tuple(int(n) for n in volume.shape)
    region = None if args.region is None else parse_region(args.region, full)
    shape = full if region is None else tuple(r.stop - r.start for r in region)
    t0 = time.perf_counter()
    value_range = subsample_range(volume, model.normalization, max_voxels=SAMPLE_VOXELS)
    index, stride = subsample_slices(full, max_voxels=SAMPLE_VOXELS)
    geometry = _geometry(image, len(shape), None if region is None else
                         tuple(r.start for r in region))  # fmt: skip
    counts = np.zeros(model.config.out_channels, np.int64)
    last = [-1]
    with ExitStack() as stack, TerminalProgress("segment") as bar:
        targets, finish = _block_targets(args, stack, shape, model, config, geometry)

        def progress(done: int, total: int) -> None:
            _progress(done, total, last)
            bar.tiles(done, total)

        execution = segment_blocks(volume, model, value_range=value_range, config=config,
                                   region=region, counts_out=counts, progress=progress,
                                   **targets)  # fmt: skip
        finish()
    return {
        "output": str(args.output),
        "shape": list(shape),
        "dtype": str(targets["labels_out"].dtype),
        "classes": {name: int(n) for name, n in zip(model.class_names, counts, strict=False)},
        "device": str(resolve_device(config.device)),
        "execution": execution,
        "engine": "blocks",
        "region": None if region is None else [[r.start, r.stop] for r in region],
        "normalization": {
            "range": [float(value_range[0][0]), float(value_range[1][0])],
            "percentiles": [model.normalization.lower, model.normalization.upper],
            "sampled": {
                "slices": len(index),
                "of": full[0],
                "stride": stride,
                "voxels": len(index) * -(-full[1] // stride) * math.prod(full[2:]),
            },
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _block_targets(args: argparse.Namespace, stack: ExitStack, shape: tuple[int, ...],
                   model: SegmentationModel, config: InferenceConfig,
                   geometry: dict) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """The engine's output arrays and a ``finish()`` that completes them: .zarr outputs are
    OME-Zarr stores filled block by block (removed unless finished), the others arrays in
    memory (checked first) written as files at the end."""
    from napari_segtool.inference.blocks import block_rows, labels_dtype
    from napari_segtool.io import check_allocation
    from napari_segtool.io.memory import format_bytes
    from napari_segtool.io.zarr_io import OmeZarrWriter, is_zarr_path

    n = model.config.out_channels
    spatial = "ZYX"[-len(shape) :]
    wanted = [("labels_out", args.output, labels_dtype(model), False)]
    if args.uncertainty is not None:
        wanted.append(("uncertainty_out", args.uncertainty, np.dtype(np.float32), False))
    if args.probabilities is not None:
        wanted.append(("probabilities_out", args.probabilities, np.dtype(np.float32), True))
    in_ram = [(path, math.prod(shape) * dtype.itemsize * (n if probs else 1))
              for _, path, dtype, probs in wanted if not is_zarr_path(path)]  # fmt: skip
    if in_ram:
        check_allocation(
            sum(nbytes for _, nbytes in in_ram),
            what=f"holding {', '.join(f'{p} ({format_bytes(b)})' for p, b in in_ram)} in "
            "memory until it is written",
            hint="write .zarr outputs instead (OME-Zarr, written block by block)",
        )
    rows = block_rows(shape, model, config=config)
    chunks = (*((rows,) if len(shape) == 3 else ()),
              *(min(ZARR_CHUNK_YX, s) for s in shape[-2:]))  # fmt: skip
    targets: dict[str, Any] = {}
    later: list[Any] = []
    for key, path, dtype, probs in wanted:
        full = (n, *shape) if probs else shape
        axes = ("C" if probs else "") + spatial
        if is_zarr_path(path):
            writer = stack.enter_context(OmeZarrWriter(
                path, shape=full, dtype=dtype, axes=axes, spacing=geometry["spacing"],
                unit=geometry["unit"], translation=_translation(args, geometry),
                chunks=chunks, image_label=key == "labels_out", overwrite=args.overwrite,
            ))  # fmt: skip
            targets[key] = writer.rows  # in row order: every level's chunks written once, whole
            later.append(writer.commit)
        else:
            arr = np.empty(full, dtype)
            targets[key] = arr
            later.append(lambda path=path, arr=arr, axes=axes: _write(
                args, path, arr, geometry, axes=axes if "C" in axes else None))  # fmt: skip

    def finish() -> None:
        for done in later:
            done()

    return targets, finish
