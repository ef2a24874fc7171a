"""Reading and checking a model file, step by step, before and while its network is built.

A model file is a ``torch.save`` archive holding only a dict of plain values and tensors::

    {"format": "napari-segtool-model", "format_version": 2,
     "metadata": "<JSON text>", "metadata_sha256": "<hex>", "state_dict": {name: tensor}}

It is read with ``torch.load(weights_only=True)``, which refuses pickled Python objects, so a
shared model file cannot execute code on load. The JSON metadata holds the architecture
(:class:`~napari_segtool.config.ModelConfig`, its ``architecture`` name included), intensity
normalisation, class names, spatial dims, default tile shape, the label value of each output
channel, what the model was trained on and its training history.

Versions: 2 names the architecture in ``model_config["architecture"]``; version 1 files
(written before there was a choice, such as the bundled ``em_membranes_2d.pt``) hold no name
and are U-Nets. A name this package does not register is refused, listing the known ones.

Integrity: torch's zip reader does not check CRCs, so a file damaged inside a tensor record
loads without complaint. The metadata therefore holds ``weights_sha256``, a SHA-256 over the
weights (:func:`weights_digest`), and ``metadata_sha256`` covers the metadata text; both are
checked on load. Files written before the checksums (no such keys) still load; for every file
the weights must be finite, and the stored architecture must account for exactly the number of
values in the file before the network is built, so a small file cannot ask for a huge one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from napari_segtool.config import ModelConfig, NormalizationConfig
from napari_segtool.errors import CheckpointError
from napari_segtool.model import registry
from napari_segtool.model.unet import UNet

FORMAT = "napari-segtool-model"
FORMAT_VERSION = 2
"""2: ``model_config`` names its architecture; 1 (no name): a U-Net. Checksums and
``label_values`` are optional metadata and needed no new version."""
LEGACY_ARCHITECTURE = "unet"
"""The architecture of model files that name none (format version 1)."""


def read_payload(p: Path) -> dict[str, Any]:
    """The archive's top-level dict, after checking it is a napari-segtool model file."""
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, expected a model file")
    if not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"{p}: damaged or not a PyTorch file (not a zip archive as torch.save writes)"
        )
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"{p}: holds Python objects other than tensors and plain values; "
                "refusing to load it because that could run code from the file"
            ) from exc
        raise CheckpointError(f"{p}: damaged or not a PyTorch file ({msg[:200]})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{p}: damaged or not a PyTorch file ({str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{p}: not a napari-segtool model file (found {keys}); "
            "models from other tools must be converted first"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: model format version {version!r} is newer than this napari-segtool "
            f"understands ({FORMAT_VERSION}); update napari-segtool"
        )
    return payload


def read_metadata(p: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The metadata dict, checked against its stored checksum when there is one."""
    text = payload.get("metadata")
    stored = payload.get("metadata_sha256")
    if stored is not None and (
        not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != stored
    ):
        raise CheckpointError(
            f"{p}: damaged model metadata (it does not match the checksum stored with "
            "it); restore the file from a copy"
        )
    try:
        meta = json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{p}: damaged model metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{p}: damaged model metadata (a {type(meta).__name__}, not a JSON object)"
        )
    return meta


def read_configs(p: Path, meta: dict[str, Any]) -> tuple[ModelConfig, NormalizationConfig]:
    """The architecture (its name looked up in the registry, its parameters bounded) and the
    normalisation the metadata describes; nothing is built."""
    try:
        stored = meta["model_config"]
        if not isinstance(stored, dict):
            raise TypeError(f"model_config is a {type(stored).__name__}, not a JSON object")
        name = stored.get("architecture", LEGACY_ARCHITECTURE)
        if not isinstance(name, str) or name not in registry.REGISTRY:
            raise CheckpointError(
                f"{p}: architecture {name!r} is not one this napari-segtool knows "
                f"({', '.join(registry.REGISTRY)}); update napari-segtool, or use a model "
                "file written for one of those"
            )
        config = ModelConfig.from_dict({**stored, "architecture": name})
        norm = NormalizationConfig(**meta["normalization"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{p}: damaged model metadata ({exc})") from exc
    return config, norm


def read_state(
    p: Path, payload: dict[str, Any], config: ModelConfig, *, weights_sha256: str | None
) -> dict[str, torch.Tensor]:
    """The weights, once they are shown to be exactly as many as ``config`` needs, to match
    ``weights_sha256`` (the checksum stored in the metadata, if any) and to be finite."""
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{p}: no weights in the model file")
    # before building anything: the architecture must account for the file's weights
    needed = registry.state_size(config)
    held = sum(int(v.numel()) for v in state.values())
    if needed != held:
        raise CheckpointError(
            f"{p}: weights do not fit the stored architecture ({config.architecture} with "
            f"base_features={config.base_features}, depth={config.depth}, spatial_dims="
            f"{config.spatial_dims} needs {needed:,} values, the file holds {held:,}); "
            "the metadata is damaged or belongs to another model"
        )
    if weights_sha256 is not None and weights_sha256 != weights_digest(state):
        raise CheckpointError(
            f"{p}: damaged: the weights do not match the checksum stored in the file; "
            "restore it from a copy or train the model again"
        )
    bad = non_finite(state)
    if bad is not None:
        raise CheckpointError(
            f"{p}: weights hold NaN or infinite values ({bad!r}): the file is damaged or "
            "comes from a training run that diverged; use another model file"
        )
    return state


def build_loaded(p: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> UNet:
    """The network ``config`` names with ``state`` loaded, in eval mode."""
    try:
        network = registry.build_network(config)
    except ValueError as exc:
        raise CheckpointError(f"{p}: {exc}") from exc
    expected, got = set(network.state_dict()), set(state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: weights do not fit the stored architecture ({config.architecture}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise CheckpointError(
            f"{p}: weights do not fit the stored architecture ({first[-1].strip()[:200]})"
        ) from exc
    return network.eval()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over a state dict: every tensor's name, dtype, shape and bytes, by name.

    Examples
    --------
    >>> a = {"w": torch.zeros(2), "b": torch.ones(1)}
    >>> weights_digest(a) == weights_digest(dict(reversed(a.items())))
    True
    >>> weights_digest(a) == weights_digest({"w": torch.zeros(2), "b": torch.zeros(1)})
    False
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or infinity, or None."""
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None
