"""``project`` (create or describe a project folder) and ``finetune`` (one correction round).

A project made in napari (the Fine-tune widget) or by ``project --create`` can be trained on
another machine: ``finetune`` runs the same correction round as the widget
(:func:`~napari_segtool.workflows.iter_correction_round`) while holding the project's lock,
so a napari window that has it open makes the command refuse in one line naming it. On a
chunked project (an image larger than memory) the round trains, validates and re-segments box
by box, and the image (TIFF or ``.zarr``) is read lazily.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_segtool.cli._common import (
    TerminalProgress,
    add_balance_flag,
    add_precision_flag,
    check_learning_rate,
    emit,
    read_labels,
    read_labels_file,
    read_mask,
    slices,
)
from napari_segtool.config import DEVICES, FinetuneConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from napari_segtool.io.project import ChunkedState, Project, ProjectState
    from napari_segtool.io.tiff import ImageFile

FINETUNE_PROGRAM = "napari-segtool finetune"
PROJECT_PROGRAM = "napari-segtool project"
DEFAULT_MODEL = "em-membranes-2d"  # the Fine-tune widget's default too


def add_parsers(sub: Any) -> None:
    """Add ``project`` and ``finetune`` to the subcommands."""
    pr = sub.add_parser("project", help="create a project folder, or print what one holds")
    pr.add_argument("folder", type=Path, help="the project folder (e.g. IMAGE.tif.segtool)")
    pr.add_argument("--create", type=Path, metavar="IMAGE",
                    help="create the project for this image (TIFF, NIfTI, ...)")  # fmt: skip
    pr.add_argument(
        "--labels", type=Path, help="with --create: the corrected labels (TIFF, NIfTI, ...)"
    )
    pr.add_argument(
        "--mask", type=Path,
        help="with --create: an image file, nonzero where the labels count as painted",
    )  # fmt: skip
    pr.add_argument(
        "--reviewed",
        type=slices,
        default=(),
        help="with --create: slices marked reviewed (they count whole), e.g. 3,7",
    )
    pr.add_argument("--model", help="with --create: the starting model, a bundled name or a "
                    f"model file (default: {DEFAULT_MODEL})")  # fmt: skip
    pr.set_defaults(run=cmd_project)

    fdef = FinetuneConfig()
    ft = sub.add_parser("finetune", help="run one correction round on a project folder")
    ft.add_argument("folder", type=Path, help="the project folder (made in napari or by "
                    "`napari-segtool project --create`)")  # fmt: skip
    ft.add_argument("--epochs", type=int, default=fdef.epochs)
    ft.add_argument("--steps-per-epoch", type=int, default=fdef.steps_per_epoch)
    ft.add_argument("--learning-rate", type=float, default=fdef.learning_rate)
    ft.add_argument("--device", choices=DEVICES, default=fdef.device)
    add_precision_flag(ft)
    add_balance_flag(ft)
    ft.add_argument(
        "--image", type=Path, help="the project's image (default: the path the project records)"
    )
    ft.set_defaults(run=cmd_finetune)


def cmd_project(args: argparse.Namespace) -> int:
    from napari_segtool.io.project import Project
    from napari_segtool.workflows import describe_project

    if args.create is not None:
        _create(args)
    else:
        given = [f for f in ("labels", "mask", "reviewed", "model") if getattr(args, f)]
        if given:
            raise InputError(f"--{given[0]} needs --create IMAGE (it describes a new project)")
        _need_project(Project(args.folder))
    emit(describe_project(Project(args.folder)))
    return 0


def _create(args: argparse.Namespace) -> None:
    from napari_segtool.io import read_image
    from napari_segtool.io.project import Project
    from napari_segtool.workflows import create_project
    from napari_segtool.workflows.projects import starting_model

    if args.labels is None:
        raise InputError("--create needs --labels LABELS (the corrected labels of the image)")
    from napari_segtool.io.zarr_io import is_zarr_path

    base = starting_model(args.model or DEFAULT_MODEL)
    if is_zarr_path(args.create) or is_zarr_path(args.labels):
        _create_chunked(args, base)
        return
    image = read_image(args.create)
    labels = read_labels(args.labels, grid=image)
    painted = None if args.mask is None else read_mask(args.mask, labels.shape, grid=image)
    project = Project(args.folder, program=PROJECT_PROGRAM)
    with project.lock():
        create_project(project, labels=labels, image_shape=tuple(image.data.shape),
                       painted=painted, reviewed=args.reviewed, base_model=base,
                       image={"name": args.create.stem,
                              "path": str(args.create.resolve())})  # fmt: skip


def _create_chunked(args: argparse.Namespace, base: str) -> None:
    """``--create`` for a .zarr image or labels: a chunked project, written box by box.

    The labels stand for the model's last prediction as in :func:`create_project`, so only
    ``--mask`` voxels and ``--reviewed`` slices count as labelled; nothing is read whole.
    """
    from napari_segtool.io import read_image
    from napari_segtool.io.chunked_state import grid_boxes
    from napari_segtool.io.project import Project

    image = read_image(args.create)
    labels = read_labels_file(args.labels, lazy=True)
    shape = tuple(int(n) for n in labels.data.shape)
    if tuple(image.data.shape[: len(shape)]) != shape:
        raise InputError(
            f"--labels {args.labels}: shape {shape} does not match the image "
            f"{tuple(image.data.shape)}"
        )
    mask = None
    if args.mask is not None:
        mask = read_labels_file(args.mask, lazy=True).data
        if tuple(mask.shape) != shape:
            raise InputError(f"--mask {args.mask}: shape {tuple(mask.shape)} does not match "
                             f"the labels {shape}")  # fmt: skip
    bad = [z for z in args.reviewed if not 0 <= z < (shape[0] if len(shape) == 3 else 1)]
    if bad:
        raise InputError(f"--reviewed {bad}: outside the image's slices")
    project = Project(args.folder, program=PROJECT_PROGRAM)
    if project.exists():
        raise InputError(
            f"{project.folder} already holds a project; choose another folder, or run "
            f"`napari-segtool project {project.folder}` to see it"
        )
    with project.lock():
        state = project.create_chunked(
            labels=labels.data, machine=labels.data, base_model=base,
            image={"name": args.create.name.removesuffix(".zarr"),
                   "path": str(args.create.resolve()), "shape": list(image.data.shape)},
        )  # fmt: skip
        state.reviewed = set(args.reviewed)
        if mask is not None:
            for box in grid_boxes(shape, state.chunks):
                block = np.asarray(mask[box]) != 0
                if block.any():
                    state.painted[box] = block
        project.save(state)


def _need_project(project: Project) -> None:
    if not project.exists():
        raise InputError(
            f"{project.folder}: no project here; open the image in napari and start one in "
            f"Fine-tune, or create one: napari-segtool project {project.folder} --create "
            "IMAGE --labels LABELS"
        )


def _project_image(
    args: argparse.Namespace, project: Project, state: ProjectState | ChunkedState
) -> ImageFile:
    """The image the project was made for (``--image`` overrides), checked against it.

    For a chunked project the image stays lazy (a zarr store, or a TIFF through tifffile's
    zarr store), so the round reads it box by box.
    """
    from napari_segtool.io import read_image
    from napari_segtool.io.project import ChunkedState
    from napari_segtool.io.zarr_io import is_zarr_path

    path = args.image
    if path is None:
        recorded = state.image.get("path") or ""
        if not recorded:
            raise InputError(f"{project.state_path}: records no image path; give --image IMAGE")
        path = Path(recorded)
        path = path if path.is_absolute() else project.folder.parent / path
        if not (path.is_file() or (is_zarr_path(path) and path.is_dir())):
            raise InputError(
                f"the project's image {path} is not there (moved, or another machine); "
                "give it with --image IMAGE"
            )
    # a chunked project's image is read box by box (a TIFF through its zarr store)
    image = read_image(path, lazy=isinstance(state, ChunkedState))
    shape = state.labels.shape
    if tuple(image.data.shape[: len(shape)]) != shape:
        raise InputError(
            f"{path}: image shape {image.data.shape}, but the project's labels have {shape}; "
            "give the project's image with --image"
        )
    return image


def cmd_finetune(args: argparse.Namespace) -> int:
    from napari_segtool.inference import resolve_device
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.io.project import Project
    from napari_segtool.workflows import iter_correction_round

    check_learning_rate(args.learning_rate)
    config = FinetuneConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            learning_rate=args.learning_rate, device=args.device,
                            precision=args.precision, balance=args.balance)  # fmt: skip
    resolve_device(args.device)
    project = Project(args.folder, program=FINETUNE_PROGRAM)
    _need_project(project)
    with project.lock():  # napari holding the project: refused, naming it
        state = project.load()
        image = _project_image(args, project, state)
        gen = iter_correction_round(project, image.data, state, config=config)
        with TerminalProgress("finetune") as progress:  # steps, then re-segmented tiles
            result = run_to_end(gen, progress)
    emit({"project": str(project.folder), **result.summary()})
    return 0
