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
from napari_segtool.inference.execution import (
    autocast,
    autocast_dtype,
    check_precision,
    effective_memory_format,
    torch_memory_format,
    tune_allocator,
    use_all_cores,
)
from napari_segtool.inference.predict import resolve_device, segment
from napari_segtool.inference.predictor import plan_network
from napari_segtool.inference.seeding import TorchRandom
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
        The seed drives the patches and dropout through private generators: torch's global
        random state is left as it was.
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
    validator = validate
    if validator is None and validation:
        inference = inference or InferenceConfig(
            device=config.device,
            batch_size=4,
            precision=config.precision,
            memory_format=config.memory_format,
            compile="off",
        )

        def validator(m: SegmentationModel) -> tuple[float, float]:
            return validation_scores(m, validation, inference=inference)

    run = _Run.start(model, config, resume=resume)
    try:
        for epoch in range(run.first_epoch + 1, run.epochs + 1):
            t0 = time.perf_counter()
            run.net.train()
            losses = []
            for _ in range(min(config.steps_per_epoch, config.steps - run.step)):
                value = run.train_step(sampler, epoch)
                if math.isfinite(value):
                    losses.append(value)
                if progress_every and run.step % progress_every == 0:
                    yield StepProgress(run.step, config.steps, value)
            report = run.end_epoch(model, epoch, losses, validator, seconds_from=t0)
            logger.info("epoch %d: %s", epoch, report)
            yield report
            if patience is not None and run.since_best >= patience:
                logger.info("no better validation Dice for %d epochs: stopping", patience)
                break
    finally:
        run.restore()
    return model


@dataclass
class _Run:
    """The state of one training run: network, optimiser, schedule and the best weights."""

    config: TrainingConfig
    net: torch.nn.Module
    device: torch.device
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool  # float16 with a gradient scaler: an overflow skips a step
    autocast: torch.dtype | None
    memory_format: torch.memory_format
    class_weights: torch.Tensor | None
    rng: np.random.Generator
    torch_random: TorchRandom
    step: int
    first_epoch: int
    start_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = -math.inf
    since_best: int = 0
    bad_steps: int = 0
    diverged: bool = False

    @property
    def epochs(self) -> int:
        return math.ceil(self.config.steps / self.config.steps_per_epoch)

    @classmethod
    def start(cls, model: SegmentationModel, config: TrainingConfig, *, resume: bool) -> _Run:
        """Optimiser, cosine schedule and random streams, resumed from the model if asked."""
        device = resolve_device(config.device)
        precision, fmt = _execution(model, device, config)
        net = model.network.to(device, memory_format=fmt)
        opt = torch.optim.AdamW(
            net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        step = first_epoch = 0
        rng = np.random.default_rng(config.seed)
        state = model.training_state if resume else None
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            step, first_epoch = int(state["step"]), int(state["epoch"])
            rng = np.random.default_rng([config.seed, step])
        step0, total = step, config.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s + step0, total) / total))
        )
        use_amp = precision == "fp16"
        weights = None
        if config.class_weights:
            weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
        return cls(
            config=config,
            net=net,
            device=device,
            opt=opt,
            sched=sched,
            scaler=torch.amp.GradScaler(device.type, enabled=use_amp),
            use_amp=use_amp,
            autocast=autocast_dtype(precision),
            memory_format=fmt,
            class_weights=weights,
            rng=rng,
            torch_random=TorchRandom(config.seed, device),
            step=step,
            first_epoch=first_epoch,
            start_state=copy.deepcopy(net.state_dict()),
        )

    def train_step(self, sampler: PatchSampler, epoch: int) -> float:
        """One optimiser step on a batch of patches; returns its loss (maybe not finite).

        Raises
        ------
        InputError
            When the run diverged: a non-finite loss without mixed precision, or
            :data:`MAX_BAD_AMP_STEPS` in a row (or non-finite weights) with it.
        """
        x, y, v = sampler.sample(self.config.batch_size, self.rng)
        dev = self.device
        xt, yt, vt = (torch.from_numpy(a).to(dev) for a in (x, y, v))
        xt = xt.contiguous(memory_format=self.memory_format)  # the network's layout
        with self.torch_random.active():  # dropout draws from this run's stream only
            with autocast(dev, self.autocast):
                logits = self.net(xt)
            loss = dice_ce_loss(logits.float(), yt, valid=vt, class_weights=self.class_weights)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        value = float(loss.detach())
        self.step += 1
        self._check_loss(value, epoch)
        return value

    def _check_loss(self, value: float, epoch: int) -> None:
        if math.isfinite(value):
            self.bad_steps = 0
            return
        # under AMP a float16 overflow skips one step (GradScaler) and is not fatal; a few
        # in a row, or any without AMP, mean the run diverged
        self.bad_steps += 1
        if not self.use_amp or self.bad_steps >= MAX_BAD_AMP_STEPS or not _finite(self.net):
            self.diverged = True
            raise InputError(
                f"training diverged: the loss became {value} at step {self.step} "
                f"(epoch {epoch}); lower the learning rate (now {self.config.learning_rate:g})"
            )

    def end_epoch(
        self,
        model: SegmentationModel,
        epoch: int,
        losses: list[float],
        validator: Validator | None,
        *,
        seconds_from: float,
    ) -> EpochReport:
        """Validate, keep the weights if they are the best so far, and report the epoch."""
        self.net.eval()
        if not _finite(self.net) or not losses:
            self.diverged = True
            raise InputError(
                f"training diverged: the weights or every loss became NaN or infinite "
                f"in epoch {epoch} (step {self.step}); lower the learning rate "
                f"(now {self.config.learning_rate:g})"
            )
        val_dice = val_err = None
        if validator is not None:
            val_dice, val_err = validator(model)
        train_loss = float(np.mean(losses))
        score = val_dice if val_dice is not None else -train_loss
        is_best = score >= self.best_score
        if is_best or val_dice is None:
            self.best_score = score
            self.best_state = copy.deepcopy(self.net.state_dict())
        self.since_best = 0 if is_best else self.since_best + 1
        report = EpochReport(
            epoch=epoch,
            step=self.step,
            total_steps=self.config.steps,
            train_loss=train_loss,
            val_dice=val_dice,
            val_pixel_error=val_err,
            learning_rate=float(self.sched.get_last_lr()[0]),
            seconds=time.perf_counter() - seconds_from,
            best=is_best,
        )
        model.history.append(report.to_dict())
        model.training_state = {"optimizer": self.opt.state_dict(), "step": self.step,
                                "epoch": epoch}  # fmt: skip
        return report

    def restore(self) -> None:
        """The best epoch's weights (the starting ones after a divergence before any)."""
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
        elif self.diverged:
            self.net.load_state_dict(self.start_state)
        self.net.eval()


def _execution(
    model: SegmentationModel, device: torch.device, config: TrainingConfig
) -> tuple[str, torch.memory_format]:
    """The precision training runs in (``auto`` measured as for inference, on a batch of
    patches) and the layout of the network and its inputs; uses every usable core."""
    use_all_cores()
    tune_allocator()
    fmt = effective_memory_format(config.memory_format, device)
    precision = config.precision
    if precision == "auto":
        batch = (config.batch_size, model.config.in_channels, *config.patch_shape)
        infer = InferenceConfig(
            device=config.device, precision="auto", memory_format=fmt, compile="off"
        )
        precision = plan_network(model, device, infer, calls=0, batch_shape=batch)[1].precision
    else:
        check_precision(precision, device)
    logger.info("training on %s in %s, %s", device, precision, fmt.replace("_", "-"))
    return precision, torch_memory_format(model.spatial_dims, fmt)


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
