"""``train`` (train or fine-tune a model on label files) and ``simulate`` (active learning).

Both hold the image and its labels in memory: a zarr store (``.zarr``) is read whole, after a
check that it fits (:func:`~napari_segtool.cli._common.in_memory`); crop a larger volume.
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
    check_output,
    emit,
    finetune_config,
    in_memory,
    logger,
    read_labels,
    read_mask,
    tile_shape,
    write_json,
)
from napari_segtool.config import ARCHITECTURES, DEVICES, FinetuneConfig, ModelConfig
from napari_segtool.errors import InputError

if TYPE_CHECKING:
    from napari_segtool.model import SegmentationModel
    from napari_segtool.training import FinetuneResult


IN_MEMORY = (
    "The image, labels and mask are held in memory: a .zarr store (zarr array or OME-Zarr) is "
    "read whole after a check that it fits; crop a larger volume first."
)


# active_learning.simulate.SIMULATION_STRATEGIES, without importing torch to build the parser
SIM_STRATEGIES = (
    "uncertainty",
    "uncertainty-diverse",
    "disagreement",
    "class-balanced",
    "random",
    "foreground-random",
)
SIM_DEFAULT = "disagreement"  # active_learning.select.DEFAULT_STRATEGY
SIM_UNITS = ("slices", "patches")  # active_learning.simulate.UNIT_KINDS


def _training_flags(parser: argparse.ArgumentParser, defaults: FinetuneConfig) -> None:
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--patch-shape", type=tile_shape, help="training patch, e.g. 256,256")
    parser.add_argument("--device", choices=DEVICES, default=defaults.device)
    add_precision_flag(parser)
    add_balance_flag(parser)


def add_parsers(sub: Any) -> None:
    """Add ``train`` and ``simulate`` to the subcommands."""
    fdef = FinetuneConfig()
    tr = sub.add_parser(
        "train", help="train or fine-tune a model on (partial) labels",
        description=f"Train or fine-tune a model on (partial) labels. {IN_MEMORY}",
    )  # fmt: skip
    tr.add_argument(
        "image", type=Path,
        help="image (TIFF, NIfTI, NRRD, MHA, DICOM folder, .zarr): 2D, RGB or 3D",
    )  # fmt: skip
    tr.add_argument(
        "labels", type=Path,
        help="training labels (TIFF, NIfTI, .zarr, ...): 0 background, any other values are "
        "classes (sparse ids such as 5, 117 train as that many classes and come back out as the "
        "same ids)",
    )  # fmt: skip
    tr.add_argument(
        "-o", "--output", type=Path, required=True,
        help="model file to write; an existing one is replaced only by a promoted model, "
        "otherwise the new model goes to NAME.rejected.pt beside it",
    )  # fmt: skip
    tr.add_argument("--init", help="start from this model (bundled name or file); default: new")
    tr.add_argument("--mask", type=Path, help="image file: nonzero where the labels count")
    _training_flags(tr, fdef)
    tr.add_argument("--learning-rate", type=float, help="default: 5e-4 fine-tuning, 2e-3 new")
    tr.add_argument("--validation-fraction", type=float, default=fdef.validation_fraction)
    tr.add_argument("--patience", type=int, default=fdef.patience)
    tr.add_argument("--dims", type=int, choices=(2, 3), default=2, help="a new model's dims")
    tr.add_argument("--arch", choices=ARCHITECTURES, default=ModelConfig().architecture,
                    help="a new model's architecture: unet or resunet")  # fmt: skip
    tr.add_argument("--seed", type=int, default=fdef.seed)
    tr.add_argument("--resume", action="store_true",
                    help="continue the training run saved in --init (epoch count, optimizer) "
                    "to --epochs")  # fmt: skip
    tr.set_defaults(run=cmd_train)

    sim = sub.add_parser(
        "simulate", help="measure an active-learning strategy by simulated correction rounds",
        description="Measure an active-learning strategy by simulated correction rounds. "
        f"{IN_MEMORY}",
    )  # fmt: skip
    sim.add_argument(
        "image", type=Path, help="image (TIFF, NIfTI, NRRD, MHA, DICOM folder, .zarr): 3D or 2D"
    )
    sim.add_argument("labels", type=Path,
                     help="the full reference labels (TIFF, NIfTI, .zarr, ...)")  # fmt: skip
    sim.add_argument("--strategy", choices=SIM_STRATEGIES, default=SIM_DEFAULT,
                     help="uncertainty-diverse: the most uncertain units spread out by k-center "
                     "greedy on their pooled foreground and uncertainty; disagreement: where "
                     "the current and previous model versions differ; class-balanced: units "
                     "showing the classes least labelled so far")  # fmt: skip
    sim.add_argument(
        "--score",
        choices=("top", "mean"),
        default="top",
        help="unit score: mean of its 5 %% most uncertain voxels, or of all",
    )
    sim.add_argument("--init", help="starting model (bundled name or file); default: new 2D")
    sim.add_argument("--initial", type=int, default=2, help="units revealed at random first")
    sim.add_argument("--rounds", type=int, default=4)
    sim.add_argument("--per-round", type=int, default=2, help="units revealed per round")
    sim.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1")
    sim.add_argument("--units", choices=SIM_UNITS, default="slices",
                     help="units of a stack: slices, or --tile patches within slices")  # fmt: skip
    sim.add_argument("--tile", type=int, default=128,
                     help="size of a 2D image's tiles, or of a stack's patches")  # fmt: skip
    sim.add_argument("--held-out", type=float, default=0.3, help="fraction of units held out")
    sim.add_argument("--review-fraction", type=float, default=0.01,
                     help="effort of reviewing a unit, as a share of its voxels (added to the "
                     "voxels the shown prediction gets wrong in it)")  # fmt: skip
    _training_flags(sim, fdef)
    sim.add_argument("--learning-rate", type=float, help="default: 5e-4 with --init, else 2e-3")
    sim.add_argument("--json", action="store_true", help="print the curves as one JSON object")
    sim.add_argument("-o", "--output", type=Path, help="also write the curves to this .json file")
    sim.set_defaults(run=cmd_simulate)


def _start_model(args: argparse.Namespace, image: np.ndarray, labels: np.ndarray,
                 mask: np.ndarray | None) -> SegmentationModel:  # fmt: skip
    """``--init`` (checked for ``--resume``), or a new model with the labels' classes."""
    from napari_segtool.model import SegmentationModel, load_model
    from napari_segtool.training.data import label_values_present

    if args.init:
        model = load_model(args.init)
        if args.resume and model.training_state is None:
            raise InputError(f"{args.init}: holds no training run to resume")
        return model
    if args.resume:
        raise InputError("--resume needs --init MODEL (the model file of the run to continue)")
    rgb = image.ndim == labels.ndim + 1
    values = label_values_present(labels, mask=mask)  # one channel per value present
    config = ModelConfig(spatial_dims=args.dims, in_channels=image.shape[-1] if rgb else 1,
                         out_channels=len(values), architecture=args.arch)  # fmt: skip
    return SegmentationModel.new(config, seed=args.seed, name=args.output.stem,
                                 label_values=values)  # fmt: skip


def _save_trained(args: argparse.Namespace, result: FinetuneResult) -> dict[str, object]:
    """Write the model; never replace an existing model with one that did not beat it."""
    out = args.output
    existed = out.exists()
    target = out
    if existed and not result.promote:
        target = out.with_name(f"{out.stem}.rejected{out.suffix or '.pt'}")
        logger.warning(
            "the trained model was not promoted (validation Dice %s, the starting model's "
            "%s): kept %s unchanged and wrote the new model to %s",
            result.best_dice, result.baseline_dice, out, target,
        )  # fmt: skip
    result.model.save(target)
    return {"output": str(target), "replaced": existed and target == out,
            "kept": None if target == out else str(out)}  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from napari_segtool.inference import resolve_device
    from napari_segtool.inference.tiling import run_to_end
    from napari_segtool.io import read_image
    from napari_segtool.training.finetune import LabelledImage, iter_finetune

    # options and the output path first: nothing is read or trained for a run that must fail
    check_learning_rate(args.learning_rate)
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: give a seed >= 0")
    check_output(args.output)
    config = finetune_config(args, validation_fraction=args.validation_fraction,
                             patience=args.patience, seed=args.seed)  # fmt: skip
    resolve_device(args.device)
    image = in_memory(read_image(args.image), purpose="training")
    labels = read_labels(args.labels, grid=image)
    mask = None if args.mask is None else read_mask(args.mask, labels.shape, grid=image)
    model = _start_model(args, image.data, labels, mask)
    gen = iter_finetune(model, [LabelledImage(image.data, labels, mask)], config=config,
                        resume=args.resume, progress_every=1)  # fmt: skip
    with TerminalProgress("train") as progress:  # a bar of steps on a terminal
        result = run_to_end(gen, progress)  # each epoch is logged (-v)
    result.model.trained_on["files"] = {"image": str(args.image), "labels": str(args.labels)}
    emit({
        **_save_trained(args, result),
        "classes": result.model.config.out_channels,
        "label_values": list(result.model.label_values or ()),
        **result.summary(),
    })  # fmt: skip
    return 0


def _mean_curve(runs: list[dict[str, Any]], key: str = "curve") -> list[list[float]]:
    """The seeds' mean ``[x, Dice]`` per round (empty when their curves differ in length).

    ``x`` is the revealed units (the same for every seed) or, for ``effort_curve``, the mean
    effort in voxels over the seeds at that round."""
    lengths = {len(r[key]) for r in runs}
    if len(lengths) != 1:
        return []
    return [[float(np.mean([r[key][i][0] for r in runs])) if key != "curve"
             else runs[0][key][i][0], float(np.mean([r[key][i][1] for r in runs]))]
            for i in range(lengths.pop())]  # fmt: skip


def cmd_simulate(args: argparse.Namespace) -> int:
    from napari_segtool.active_learning import SimulationConfig, iter_simulate
    from napari_segtool.inference import resolve_device
    from napari_segtool.io import read_image
    from napari_segtool.model import SegmentationModel, load_model
    from napari_segtool.training.data import label_values_present

    check_output(args.output, suffixes=(".json",))
    resolve_device(args.device)
    image_file = in_memory(read_image(args.image), purpose="simulating")
    image = image_file.data
    labels = read_labels(args.labels, grid=image_file)
    if args.seeds < 1:
        raise InputError("--seeds must be >= 1")
    values = label_values_present(labels)  # sparse ids train as their real class count
    config = SimulationConfig(strategy=args.strategy, score=args.score, initial=args.initial,
                              rounds=args.rounds, per_round=args.per_round,
                              held_out_fraction=args.held_out, tile=args.tile,
                              units=args.units, review_fraction=args.review_fraction,
                              finetune=finetune_config(args))  # fmt: skip
    tile = (256, 256) if labels.ndim == 3 else (args.tile, args.tile)
    runs = []
    total = args.seeds * (args.rounds + 1)  # each seed: the initial round, then --rounds
    with TerminalProgress("simulate", quiet=args.json) as progress:
        progress.advance("round", 0, total)  # the bar shows from the start: rounds are long
        for seed in range(args.seeds):
            if args.init:
                model = load_model(args.init)
            else:
                model = SegmentationModel.new(ModelConfig(out_channels=len(values)),
                                              tile_shape=tile, seed=seed,
                                              label_values=values)  # fmt: skip
            curve = []
            for point in iter_simulate(image, labels, model, config=config, seed=seed):
                curve.append(point)
                progress.advance("round", seed * (args.rounds + 1) + len(curve), total)
                if not args.json:
                    progress.write(
                        f"seed {seed} round {point.round}: {point.n_revealed} units, "
                        f"{point.effort:,} voxels of effort, held-out Dice {point.dice:.4f} "
                        f"({point.seconds:.0f} s)"
                    )
            runs.append({"seed": seed, "curve": [[p.n_revealed, p.dice] for p in curve],
                         "effort_curve": [[p.effort, p.dice] for p in curve],
                         "revealed": list(curve[-1].revealed)})  # fmt: skip
    kind = "tiles" if labels.ndim == 2 else args.units
    out = {"strategy": args.strategy, "units": kind,
           "seeds": runs, "mean": _mean_curve(runs),
           "mean_effort": _mean_curve(runs, key="effort_curve"),
           "review_fraction": args.review_fraction, "label_values": list(values)}  # fmt: skip
    if args.output is not None:
        write_json(args.output, out)
    if args.json:
        emit(out)
    return 0
