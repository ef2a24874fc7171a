"""The ``napari-segtool`` command line.

Subcommands, one module per group: ``segment`` (headless tiled inference on a file) and
``evaluate`` (metrics of a label image against a reference) in :mod:`.segment`; ``train``
(train or fine-tune a model on labels, optionally only where a mask says they count) and
``simulate`` (active-learning rounds on full labels) in :mod:`.train`; ``project`` (create a
project folder without the GUI, or print what one holds) and ``finetune`` (one correction
round on a project folder) in :mod:`.project`; ``models`` (list bundled models), ``export``
and ``import`` (bioimage.io model packages) and ``demo`` (napari with the plugin and a sample)
in :mod:`.models`; ``convert`` (any readable image as chunked OME-Zarr) in
:mod:`.convert`.

Errors print one line to stderr and exit with status 2 (bad input: a
:class:`~napari_segtool.errors.SegtoolError` or a path that cannot be read or written) or 1
(anything else); ``--debug`` prints the traceback first.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from napari_segtool.cli import convert, evaluate, models, project, segment, train
from napari_segtool.errors import SegtoolError

__all__ = ["build_parser", "main"]

GROUPS = (segment, evaluate, train, project, models, convert)
DEBUG_HELP = "print the traceback of an error, not only its one line"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``run``, the function that does its work."""
    parser = argparse.ArgumentParser(
        prog="napari-segtool",
        description="Human-in-the-loop U-Net segmentation of 2D images and 3D stacks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    for command in sub.choices.values():  # also after the command: `finetune DIR --debug`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


def _failure(args: argparse.Namespace, exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line for an error that ended a command."""
    if isinstance(exc, SegtoolError):
        return 2, str(exc)
    if isinstance(exc, OSError):  # a path given on the command line: missing, unreadable, full
        name = f"{exc.filename}: " if exc.filename else ""
        return 2, f"{name}{exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return 1, ("out of memory; use a smaller image, crop or tile it, or a smaller "
                   "--tile-shape / --batch-size")  # fmt: skip
    hint = "" if args.debug else " (run with --debug for the traceback)"
    return 1, f"unexpected {type(exc).__name__}: {exc}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-segtool`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # tifffile logs about every damaged tag: the one-line error suffices
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return args.run(args)
    except Exception as exc:  # every error ends in one line (and the traceback with --debug)
        code, line = _failure(args, exc)
        if args.debug:
            traceback.print_exc()
    print(f"napari-segtool {args.command}: error: {line}", file=sys.stderr)  # noqa: T201
    return code
