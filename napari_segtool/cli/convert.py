"""``convert``: any readable image as a chunked, multiscale OME-Zarr store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_segtool.cli._common import emit, tile_shape


def add_parsers(sub: Any) -> None:
    """Add ``convert`` to the subcommands."""
    convert = sub.add_parser(
        "convert",
        help="write an image (TIFF, medical, zarr) as chunked OME-Zarr with a pyramid",
        description="Read IN (TIFF lazily, NIfTI/NRRD/MetaImage/DICOM, zarr or OME-Zarr) and "
        "write OUT.zarr as OME-Zarr 0.5 with its spacing and a multiscale pyramid, block by "
        "block (peak memory stays a few chunks for TIFF and zarr inputs).",
    )
    convert.add_argument("input", type=Path, help="image to read")
    convert.add_argument("output", type=Path, help="OME-Zarr store to write (OUT.zarr)")
    convert.add_argument(
        "--chunks", type=tile_shape, help="chunk shape of the spatial axes (default 1,256,256)"
    )
    convert.add_argument(
        "--levels", type=int, help="pyramid levels including full resolution (default: auto)"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zarr")
    convert.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Run ``convert``; prints one JSON line."""
    from napari_segtool.io import read_image
    from napari_segtool.io.zarr_io import read_zarr, write_ome_zarr

    image = read_image(args.input, lazy=True)
    try:
        write_ome_zarr(
            args.output,
            image.data,
            spacing=image.spacing,
            unit=image.unit,
            axes=image.axes or None,
            chunks=args.chunks,
            levels=args.levels,
            overwrite=args.overwrite,
        )
    finally:
        image.close()
    out = read_zarr(args.output)
    emit(
        {
            "input": str(args.input),
            "output": str(args.output),
            "shape": list(out.data.shape),
            "dtype": str(out.data.dtype),
            "axes": out.axes,
            "spacing": list(out.spacing),
            "unit": out.unit,
            "chunks": list(out.data.chunks),
            "levels": [list(level.shape) for level in out.levels],
        }
    )
    return 0
