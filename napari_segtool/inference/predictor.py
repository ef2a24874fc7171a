"""Tile predictors: a model's softmax on a device, with flip test-time augmentation.

The network itself runs through :class:`~napari_segtool.inference.execution.NetworkRunner`
(layout, precision, compilation)."""

from __future__ import annotations

import itertools

import torch

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.execution import (
    ExecutionPlan,
    NetworkRunner,
    SpeedCache,
    inference_network,
    plan_execution,
)
from napari_segtool.inference.tiling import Predictor
from napari_segtool.model.checkpoint import SegmentationModel

__all__ = ["make_predictor", "make_runner", "plan_network", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "mps"`` into a usable :class:`torch.device`.

    Raises
    ------
    InputError
        If an accelerator is asked for by name but is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device 'cuda' requested but this torch has no usable CUDA GPU; "
            "use device 'auto' or 'cpu'"
        )
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise InputError(
            "device 'mps' requested but Apple MPS is not available; use device 'auto' or 'cpu'"
        )
    if device not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
    return torch.device(device)


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    axes = list(range(2, 2 + spatial_dims))
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def make_runner(
    model: SegmentationModel,
    device: torch.device,
    *,
    precision: str = "fp32",
    memory_format: str = "channels_last",
    compile: bool = False,
    dropout: bool = False,
) -> NetworkRunner:
    """The model's network ready for inference: an eval copy, batch norms folded, on
    ``device`` in ``memory_format``, called in ``precision`` (resolved, not ``auto``).

    With ``dropout`` the copy's dropout layers stay active (Monte Carlo dropout).
    """
    net = inference_network(
        model.network, model.spatial_dims, device=device, memory_format=memory_format
    )
    if dropout:
        _activate_dropout(net)
    return NetworkRunner(
        net,
        spatial_dims=model.spatial_dims,
        device=device,
        precision=precision,
        memory_format=memory_format,
        compile=compile,
    )


def _activate_dropout(net: torch.nn.Module) -> None:
    """Monte Carlo dropout: sample a different sub-network per call."""
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d | torch.nn.Dropout3d):
            m.train()


def network_description(model: SegmentationModel) -> str:
    """The network's architecture and sizes, for the speed cache's key."""
    c = model.config
    return (
        f"{c.architecture} {c.spatial_dims}D depth {c.depth} base {c.base_features} "
        f"in {c.in_channels} out {c.out_channels} norm {c.norm}"
    )


def plan_network(
    model: SegmentationModel,
    device: torch.device,
    config: InferenceConfig,
    *,
    calls: int,
    batch_shape: tuple[int, ...],
    cache: SpeedCache | None = None,
) -> tuple[NetworkRunner, ExecutionPlan]:
    """The runner a job of ``calls`` network calls uses, and the plan (precision, compile)
    decided for it; timings come from and go to ``cache`` (the user's speed cache by
    default)."""
    # timed without dropout: a probe must draw no random numbers, or a seeded Monte Carlo
    # dropout run would depend on whether the speed cache already held the timings
    eager = make_runner(model, device, memory_format=config.memory_format)
    plan = plan_execution(
        eager.network,
        spatial_dims=model.spatial_dims,
        description=network_description(model),
        device=device,
        precision=config.precision,
        compile=config.compile,
        memory_format=config.memory_format,
        calls=calls,
        batch_shape=batch_shape,
        cache=cache if cache is not None else SpeedCache.default(),
    )
    if config.mc_dropout:
        _activate_dropout(eager.network)
    runner = NetworkRunner(
        eager.network,
        spatial_dims=model.spatial_dims,
        device=device,
        precision=plan.precision,
        memory_format=plan.memory_format,
        compile=plan.compile,
    )
    return runner, plan


def make_predictor(
    model: SegmentationModel,
    device: torch.device,
    *,
    precision: str = "fp32",
    memory_format: str = "channels_last",
    tta: bool = False,
    disagreement: bool = False,
    dropout: bool = False,
    runner: NetworkRunner | None = None,
) -> Predictor:
    """A tile predictor returning softmax probabilities as float32.

    The network runs through ``runner`` (built by :func:`make_runner` from ``precision``,
    ``memory_format`` and ``dropout`` when not given). With ``tta`` the probabilities are
    averaged over every combination of spatial flips (4 in 2D, 8 in 3D). With
    ``disagreement`` (and ``tta``) one more channel is appended: the share of flips whose
    predicted class differs from the majority class (0 when all flips agree).
    """
    if runner is None:
        runner = make_runner(
            model, device, precision=precision, memory_format=memory_format, dropout=dropout
        )
    flips = _flip_sets(model.spatial_dims) if tta else [()]
    n_classes = model.config.out_channels

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = None
        votes = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            p = torch.softmax(runner(xi).float(), dim=1)
            if dims:
                p = torch.flip(p, dims)
            total = p if total is None else total + p
            if disagreement:
                v = torch.nn.functional.one_hot(p.argmax(1), n_classes).movedim(-1, 1)
                votes = v.float() if votes is None else votes + v
        assert total is not None
        mean = total / len(flips) if len(flips) > 1 else total
        if not disagreement:
            return mean
        assert votes is not None
        dis = 1.0 - votes.amax(dim=1, keepdim=True) / len(flips)
        return torch.cat([mean, dis], dim=1)

    return predict
