"""The training loop as a generator of per-epoch reports; closing it cancels training."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig, TrainingConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.predict import resolve_device, segment
from napari_segtool.metrics.overlap import foreground_dice
from napari_segtool.model.checkpoint import SegmentationModel
from napari_segtool.training.data import PatchSampler, labels_to_channels
from napari_segtool.training.losses import dice_ce_loss

logger = logging.getLogger(__name__)

MAX_BAD_AMP_STEPS = 5
"""Non-finite losses in a row that mixed precision may skip before a run counts as diverged."""


@dataclass(frozen=True)
class EpochReport:
    """What one epoch achieved; yielded by :func:`iter_train`.

    ``val_dice`` is the mean foreground Dice on the validation images (None without them),
    ``val_pixel_error`` the fraction of misclassified validation voxels; ``best`` says whether
    this epoch's weights are the best so far (and so the ones kept).
    """

    epoch: int
    step: int
    total_steps: int
    train_loss: float
    val_dice: float | None
    val_pixel_error: float | None
    learning_rate: float
    seconds: float
    best: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def validation_scores(
    model: SegmentationModel,
    validation: Sequence[tuple[NDArray, NDArray]],
    *,
    inference: InferenceConfig,
) -> tuple[float, float]:
    """Segment each validation image; return (mean foreground Dice, pixel error).

    ``ref`` holds label values (the model's :attr:`label_values`); both masks are mapped to
    channels before the Dice, so sparse ids score like ``0 .. C-1``.
    """
    dices, errors, sizes = [], [], []
    values = model.label_values or ()
    for image, labels in validation:
        ref = labels_to_channels(labels, values)
        pred = labels_to_channels(segment(image, model, config=inference).labels, values)
        dices.append(foreground_dice(pred, ref, model.config.out_channels))
        errors.append(float(np.count_nonzero(pred != ref)))
        sizes.append(ref.size)
    return float(np.mean(dices)), float(sum(errors) / sum(sizes))


@dataclass(frozen=True)
class StepProgress:
    """Yielded by :func:`iter_train` every ``progress_every`` steps (between epoch reports)."""

    step: int
    total_steps: int
    loss: float


Validator = Callable[[SegmentationModel], tuple[float, float]]


def iter_train(
    model: SegmentationModel,
    sampler: PatchSampler,
    *,
    config: TrainingConfig,
    validation: Sequence[tuple[NDArray, NDArray]] = (),
    inference: InferenceConfig | None = None,
    validate: Validator | None = None,
    patience: int | None = None,
    resume: bool = False,
    progress_every: int | None = None,
) -> Generator[EpochReport | StepProgress, None, SegmentationModel]:
    """Train ``model`` in place on patches from ``sampler``, one report per epoch.

    Parameters
    ----------
    model : SegmentationModel
        Starting point; its network is trained in place and, at the end, holds the weights of
        the best validation epoch (the last epoch without validation data).
    sampler : PatchSampler
        Source of (normalised) training patches; labels are channel indices
        ``0 .. out_channels - 1`` (see :func:`~napari_segtool.training.data.labels_to_channels`).
    config : TrainingConfig
        Steps, batch, learning rate (AdamW with cosine decay), seed, device, mixed precision.
    validation : sequence of (raw image, labels)
        Evaluated with tiled inference after each epoch.
    validate : callable, optional
        ``validate(model) -> (dice, pixel_error)``; replaces ``validation`` (fine-tuning
        scores only the held-out labelled voxels this way).
    patience : int, optional
        Stop early after this many epochs without a better validation Dice.
    resume : bool
        Continue from ``model.training_state`` (optimizer moments, step and epoch, saved in
        the model file by :meth:`SegmentationModel.save`): the epoch count and the learning
        rate schedule go on where they stopped, up to ``config.steps`` steps in all.
    progress_every : int, optional
        Also yield a :class:`StepProgress` every this many steps, so a consumer can show
        progress and cancel within an epoch.

    Yields
    ------
    EpochReport
        After each epoch of ``config.steps_per_epoch`` steps (and :class:`StepProgress`
        in between when ``progress_every`` is given). Closing the generator cancels; the
        network then holds the best epoch's weights so far (or its weights at the moment of
        cancelling when no epoch has finished).

    Returns
    -------
    SegmentationModel
        The same object, its ``history`` extended by this run's reports.

    Raises
    ------
    InputError
        Labels outside ``0 .. out_channels - 1`` (before training), or a loss or weights
        that become NaN or infinite (the run diverged; the network is put back to the best
        epoch's weights, or to its starting weights, and nothing is reported as best).
    """
    _check_classes(sampler, model.config.out_channels)
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    net = model.network.to(device)
    opt = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    step = first_epoch = 0
    state = model.training_state if resume else None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, first_epoch = int(state["step"]), int(state["epoch"])
        rng = np.random.default_rng([config.seed, step])
    step0 = step
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: 0.5 * (1 + math.cos(math.pi * min(s + step0, config.steps) / config.steps)),
    )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    weights = (
        torch.tensor(config.class_weights, dtype=torch.float32, device=device)
        if config.class_weights
        else None
    )
    inference = inference or InferenceConfig(device=config.device, batch_size=4)
    validator = validate
    if validator is None and validation:

        def validator(m: SegmentationModel) -> tuple[float, float]:
            return validation_scores(m, validation, inference=inference)

    best_score = -math.inf
    best_state = None
    start_state = copy.deepcopy(net.state_dict())
    diverged = False
    bad_steps = 0
    since_best = 0
    epochs = math.ceil(config.steps / config.steps_per_epoch)
    try:
        for epoch in range(first_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            net.train()
            losses = []
            for _ in range(min(config.steps_per_epoch, config.steps - step)):
                x, y, v = sampler.sample(config.batch_size, rng)
                xt = torch.from_numpy(x).to(device)
                yt = torch.from_numpy(y).to(device)
                vt = torch.from_numpy(v).to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    logits = net(xt)
                loss = dice_ce_loss(logits, yt, valid=vt, class_weights=weights)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                value = float(loss.detach())
                step += 1
                if math.isfinite(value):
                    losses.append(value)
                    bad_steps = 0
                else:
                    # under AMP a float16 overflow skips one step (GradScaler) and is not
                    # fatal; a few in a row, or any without AMP, mean the run diverged
                    bad_steps += 1
                    if not use_amp or bad_steps >= MAX_BAD_AMP_STEPS or not _finite(net):
                        diverged = True
                        raise InputError(
                            f"training diverged: the loss became {value} at step {step} "
                            f"(epoch {epoch}); lower the learning rate "
                            f"(now {config.learning_rate:g})"
                        )
                if progress_every and step % progress_every == 0:
                    yield StepProgress(step, config.steps, value)
            net.eval()
            if not _finite(net) or not losses:
                diverged = True
                raise InputError(
                    f"training diverged: the weights or every loss became NaN or infinite "
                    f"in epoch {epoch} (step {step}); lower the learning rate "
                    f"(now {config.learning_rate:g})"
                )
            val_dice = val_err = None
            if validator is not None:
                val_dice, val_err = validator(model)
            score = val_dice if val_dice is not None else -float(np.mean(losses))
            is_best = score >= best_score
            if is_best or val_dice is None:
                best_score = score
                best_state = copy.deepcopy(net.state_dict())
            report = EpochReport(
                epoch=epoch,
                step=step,
                total_steps=config.steps,
                train_loss=float(np.mean(losses)),
                val_dice=val_dice,
                val_pixel_error=val_err,
                learning_rate=float(sched.get_last_lr()[0]),
                seconds=time.perf_counter() - t0,
                best=is_best,
            )
            model.history.append(report.to_dict())
            model.training_state = {"optimizer": opt.state_dict(), "step": step, "epoch": epoch}
            logger.info("epoch %d: %s", epoch, report)
            yield report
            since_best = 0 if is_best else since_best + 1
            if patience is not None and since_best >= patience:
                logger.info("no better validation Dice for %d epochs: stopping", patience)
                break
    finally:
        if best_state is not None:
            net.load_state_dict(best_state)
        elif diverged:
            net.load_state_dict(start_state)
        net.eval()
    return model


def _finite(net: torch.nn.Module) -> bool:
    """Whether every floating-point weight and buffer of ``net`` is finite."""
    return all(
        bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point()
    )


def _check_classes(sampler: PatchSampler, n_classes: int) -> None:
    """Refuse labels that are not channel indices of the model, before any step."""
    for labels, valid in zip(sampler.labels, sampler.valid, strict=True):
        counted = labels if valid is None else labels[np.asarray(valid, bool)]
        if not counted.size:
            continue
        lo, hi = int(counted.min()), int(counted.max())
        if lo < 0:
            raise InputError(
                f"labels hold the negative value {lo}; label values must be >= 0 (0 is background)"
            )
        if hi >= n_classes:
            raise InputError(
                f"labels hold class {hi} but the model has {n_classes} output channels "
                f"(0-{n_classes - 1}); map label values with labels_to_channels"
            )
