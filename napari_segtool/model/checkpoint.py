"""Model files: everything needed to rebuild and use a network, loaded without running code.

A model file is a ``torch.save`` archive holding only a dict of plain values and tensors::

    {"format": "napari-segtool-model", "format_version": 1,
     "metadata": "<JSON text>", "metadata_sha256": "<hex>", "state_dict": {name: tensor}}

It is read with ``torch.load(weights_only=True)``, which refuses pickled Python objects, so a
shared model file cannot execute code on load. The JSON metadata holds the architecture
(:class:`~napari_segtool.config.ModelConfig`), intensity normalisation, class names, spatial
dims, default tile shape, the label value of each output channel, what the model was trained
on and its training history.

Integrity: torch's zip reader does not check CRCs, so a file damaged inside a tensor record
loads without complaint. The metadata therefore holds ``weights_sha256``, a SHA-256 over the
weights (:func:`weights_digest`), and ``metadata_sha256`` covers the metadata text; both are
checked on load. Files written before the checksums (no such keys) still load; for every file
the weights must be finite, and the stored architecture must account for exactly the number of
values in the file before the network is built, so a small file cannot ask for a huge one.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_segtool.config import ModelConfig, NormalizationConfig
from napari_segtool.errors import CheckpointError
from napari_segtool.io.atomic import atomic_path
from napari_segtool.model.unet import UNet, state_size

logger = logging.getLogger(__name__)

FORMAT = "napari-segtool-model"
FORMAT_VERSION = 1  # the checksums and label_values are optional metadata: no new version
MAX_TILE = 4096
"""Largest default tile edge a model file may ask for."""
MAX_LABEL_VALUE = 2**32 - 1
"""Largest label value a model may predict (fits uint32 label images)."""


@dataclass
class SegmentationModel:
    """A U-Net together with what is needed to apply it to raw images.

    Attributes
    ----------
    network : UNet
        The network; its ``config`` is the architecture.
    normalization : NormalizationConfig
        Percentile normalisation applied to every image before the network sees it.
    class_names : tuple of str
        One name per output channel, background first.
    tile_shape : tuple of int
        Default spatial tile for inference (usually the training patch shape).
    name, description : str
        Shown in model pickers and ``napari-segtool models``.
    trained_on : dict
        Free-form record of the training data (files, slices, counts).
    history : list of dict
        Training history, one entry per epoch or round.
    training_state : dict or None
        Optimizer state, step and epoch of the last training run, so training can resume
        (``iter_train(..., resume=True)``); saved in the model file when present.
    label_values : tuple of int
        The label value each output channel stands for, background first: channel ``i``
        predicts voxels labelled ``label_values[i]``. Training maps label values to channels
        and inference maps channels back, so sparse ids (e.g. TotalSegmentator's organ ids)
        train as their real number of classes and come out with the user's ids. ``None``
        (and files written before it existed) means ``0 .. out_channels - 1``.
    """

    network: UNet
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    class_names: tuple[str, ...] = ("background", "foreground")
    tile_shape: tuple[int, ...] = (256, 256)
    name: str = "untitled"
    description: str = ""
    trained_on: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())
    training_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    label_values: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        cfg = self.network.config
        if len(self.class_names) != cfg.out_channels:
            raise CheckpointError(
                f"{len(self.class_names)} class names for a model with "
                f"{cfg.out_channels} output channels"
            )
        if len(self.tile_shape) != cfg.spatial_dims:
            raise CheckpointError(
                f"tile_shape {self.tile_shape} does not match spatial_dims {cfg.spatial_dims}"
            )
        if not all(_is_int(t) and 1 <= t <= MAX_TILE for t in self.tile_shape):
            raise CheckpointError(
                f"tile_shape {self.tile_shape}: entries must be integers from 1 to {MAX_TILE}"
            )
        self.class_names = tuple(str(c) for c in self.class_names)
        self.tile_shape = tuple(int(t) for t in self.tile_shape)
        if self.label_values is None:
            self.label_values = tuple(range(cfg.out_channels))
        values = tuple(self.label_values)
        if len(values) != cfg.out_channels:
            raise CheckpointError(
                f"{len(values)} label values for a model with {cfg.out_channels} output channels"
            )
        if not all(_is_int(v) and 0 <= v <= MAX_LABEL_VALUE for v in values):
            raise CheckpointError(
                f"label_values {list(values)[:8]}: must be integers from 0 to {MAX_LABEL_VALUE}"
            )
        if len(set(values)) != len(values):
            raise CheckpointError(f"label_values {list(values)[:8]} repeat a value")
        self.label_values = tuple(int(v) for v in values)

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def spatial_dims(self) -> int:
        return self.network.config.spatial_dims

    @classmethod
    def new(
        cls,
        config: ModelConfig | None = None,
        *,
        class_names: tuple[str, ...] | None = None,
        tile_shape: tuple[int, ...] | None = None,
        seed: int | None = 0,
        name: str = "new model",
        label_values: tuple[int, ...] | None = None,
    ) -> SegmentationModel:
        """An untrained model with freshly initialised weights (seeded for reproducibility).

        ``label_values`` gives the label value of each output channel (see the class
        attribute; default ``0 .. out_channels - 1``); with it, the default class names are
        ``"background"`` and ``"class <value>"``.
        """
        config = config or ModelConfig()
        if label_values is not None and len(label_values) != config.out_channels:
            raise CheckpointError(
                f"{len(label_values)} label values for a model with "
                f"{config.out_channels} output channels"
            )
        values = tuple(range(config.out_channels)) if label_values is None else label_values
        if seed is not None:
            torch.manual_seed(seed)
        if class_names is None:
            class_names = ("background", *(f"class {v}" for v in values[1:]))
        if tile_shape is None:
            tile_shape = (256, 256) if config.spatial_dims == 2 else (32, 128, 128)
        return cls(
            network=UNet(config),
            class_names=class_names,
            tile_shape=tile_shape,
            name=name,
            description="untrained: segment, correct and fine-tune to teach it",
            label_values=label_values,
        )

    def copy(self) -> SegmentationModel:
        """An independent copy (network weights included) to train without touching this one."""
        return copy.deepcopy(self)

    def metadata(self) -> dict[str, Any]:
        from napari_segtool import __version__

        return {
            "name": self.name,
            "description": self.description,
            "model_config": self.config.to_dict(),
            "spatial_dims": self.spatial_dims,
            "normalization": self.normalization.to_dict(),
            "class_names": list(self.class_names),
            "label_values": list(self.label_values or ()),
            "tile_shape": list(self.tile_shape),
            "trained_on": self.trained_on,
            "history": self.history,
            "created": self.created,
            "segtool_version": __version__,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model file atomically (a crash mid-save leaves any old file intact)."""
        p = Path(path)
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        bad = _non_finite(state)
        if bad is not None:
            raise CheckpointError(
                f"{p}: refusing to save model {self.name!r}: its weights hold NaN or infinite "
                f"values ({bad!r}); the training run diverged, lower the learning rate"
            )
        meta = {**self.metadata(), "weights_sha256": weights_digest(state)}
        text = json.dumps(meta)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": text,
            "metadata_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "state_dict": state,
        }
        if self.training_state is not None:
            payload["training_state"] = _to_cpu(self.training_state)
        with atomic_path(p) as tmp:
            torch.save(payload, tmp)
        logger.info("saved model %r to %s", self.name, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SegmentationModel:
        """Rebuild a model from a file written by :meth:`save`.

        Raises
        ------
        CheckpointError
            Naming the file and the problem: missing, not a PyTorch archive, damaged, holding
            Python objects (refused, never executed), not a napari-segtool model, written by a
            newer format version, failing its checksums, an architecture out of bounds or
            that does not account for the weights in the file (checked before the network is
            built), non-finite weights, or weights that do not fit the stored architecture.
        """
        p = Path(path)
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
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{p}: model format version {version!r} is newer than this napari-segtool "
                f"understands ({FORMAT_VERSION}); update napari-segtool"
            )
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
            if not isinstance(meta, dict):
                raise TypeError(f"metadata is a {type(meta).__name__}, not a JSON object")
            config = ModelConfig.from_dict(meta["model_config"])
            norm = NormalizationConfig(**meta["normalization"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{p}: damaged model metadata ({exc})") from exc
        state = payload.get("state_dict")
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{p}: no weights in the model file")
        # before building anything: the architecture must account for the file's weights
        needed = state_size(config)
        held = sum(int(v.numel()) for v in state.values())
        if needed != held:
            raise CheckpointError(
                f"{p}: weights do not fit the stored architecture (base_features="
                f"{config.base_features}, depth={config.depth}, spatial_dims="
                f"{config.spatial_dims} needs {needed:,} values, the file holds {held:,}); "
                "the metadata is damaged or belongs to another model"
            )
        digest = meta.get("weights_sha256")
        if digest is not None and digest != weights_digest(state):
            raise CheckpointError(
                f"{p}: damaged: the weights do not match the checksum stored in the file; "
                "restore it from a copy or train the model again"
            )
        bad = _non_finite(state)
        if bad is not None:
            raise CheckpointError(
                f"{p}: weights hold NaN or infinite values ({bad!r}): the file is damaged or "
                "comes from a training run that diverged; use another model file"
            )
        try:
            network = UNet(config)
        except ValueError as exc:
            raise CheckpointError(f"{p}: {exc}") from exc
        missing, unexpected = _key_mismatch(network, state)
        if missing or unexpected:
            raise CheckpointError(
                f"{p}: weights do not fit the stored architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()
            raise CheckpointError(
                f"{p}: weights do not fit the stored architecture ({first[-1].strip()[:200]})"
            ) from exc
        network.eval()
        try:
            return cls(
                network=network,
                normalization=norm,
                class_names=tuple(meta["class_names"]),
                tile_shape=tuple(meta["tile_shape"]),
                name=meta.get("name", p.stem),
                description=meta.get("description", ""),
                trained_on=meta.get("trained_on", {}),
                history=meta.get("history", []),
                created=meta.get("created", ""),
                training_state=payload.get("training_state"),
                label_values=meta.get("label_values"),
            )
        except KeyError as exc:
            raise CheckpointError(f"{p}: damaged model metadata (missing {exc})") from exc
        except (CheckpointError, TypeError) as exc:
            raise CheckpointError(f"{p}: damaged model metadata ({exc})") from exc


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


def _non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or infinity, or None."""
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _key_mismatch(network: torch.nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(network.state_dict())
    got = set(state)
    return sorted(expected - got), sorted(got - expected)
