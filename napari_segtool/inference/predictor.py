"""Tile predictors: a model's softmax on a device, with flip test-time augmentation."""

from __future__ import annotations

import itertools

import torch

from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import Predictor
from napari_segtool.model.checkpoint import SegmentationModel

__all__ = ["make_predictor", "resolve_device"]


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


def make_predictor(
    model: SegmentationModel,
    device: torch.device,
    *,
    amp: bool = True,
    tta: bool = False,
    disagreement: bool = False,
    dropout: bool = False,
) -> Predictor:
    """A tile predictor returning softmax probabilities as float32.

    With ``tta`` the probabilities are averaged over every combination of spatial flips
    (4 in 2D, 8 in 3D). With ``disagreement`` (and ``tta``) one more channel is appended:
    the share of flips whose predicted class differs from the majority class (0 when all
    flips agree). With ``amp`` on CUDA the network runs under float16 autocast.
    """
    net = model.network.to(device).eval()
    if dropout:  # Monte Carlo dropout: sample a different sub-network per call
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d | torch.nn.Dropout3d):
                m.train()
    use_amp = amp and device.type == "cuda"
    flips = _flip_sets(model.spatial_dims) if tta else [()]
    n_classes = model.config.out_channels

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            total = None
            votes = None
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = torch.softmax(net(xi).float(), dim=1)
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
