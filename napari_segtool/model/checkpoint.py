"""A segmentation network with what is needed to apply it, saved to and loaded from a file.

The file layout, its versions and every check made on load are described in
:mod:`napari_segtool.model.modelfile`; the network is any architecture in
:mod:`napari_segtool.model.registry`, named by ``ModelConfig.architecture``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_segtool.config import ModelConfig, NormalizationConfig
from napari_segtool.errors import CheckpointError
from napari_segtool.io.atomic import atomic_path
from napari_segtool.model.modelfile import (
    FORMAT,
    FORMAT_VERSION,
    build_loaded,
    non_finite,
    read_configs,
    read_metadata,
    read_payload,
    read_state,
    weights_digest,
)
from napari_segtool.model.registry import build_network
from napari_segtool.model.unet import UNet

__all__ = ["FORMAT", "FORMAT_VERSION", "SegmentationModel", "weights_digest"]

logger = logging.getLogger(__name__)

MAX_TILE = 4096
"""Largest default tile edge a model file may ask for."""
MAX_LABEL_VALUE = 2**32 - 1
"""Largest label value a model may predict (fits uint32 label images)."""


@dataclass
class SegmentationModel:
    """A network together with what is needed to apply it to raw images.

    Attributes
    ----------
    network : UNet
        The network (a :class:`~napari_segtool.model.unet.UNet` or a subclass of it, one per
        registered architecture); its ``config`` is the architecture, name included.
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
        """An untrained model of the architecture ``config`` names, with fresh weights.

        The weights are drawn from torch's RNG seeded with ``seed`` (``None``: unseeded) in a
        forked RNG state, so the caller's global RNG is left as it was.

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
        if class_names is None:
            class_names = ("background", *(f"class {v}" for v in values[1:]))
        if tile_shape is None:
            tile_shape = (256, 256) if config.spatial_dims == 2 else (32, 128, 128)
        with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG untouched
            if seed is not None:
                torch.manual_seed(seed)
            network = build_network(config)
        return cls(
            network=network,
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
        # contiguous copies: the file is the same whatever layout the network trained in
        state = {
            k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in self.network.state_dict().items()
        }
        bad = non_finite(state)
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
        """Rebuild a model from a file written by :meth:`save` (or by an older version).

        Raises
        ------
        CheckpointError
            Naming the file and the problem: missing, not a PyTorch archive, damaged, holding
            Python objects (refused, never executed), not a napari-segtool model, written by a
            newer format version, failing its checksums, naming an architecture this version
            does not know, an architecture out of bounds or that does not account for the
            weights in the file (checked before the network is built), non-finite weights, or
            weights that do not fit the stored architecture.
        """
        p = Path(path)
        payload = read_payload(p)
        meta = read_metadata(p, payload)
        return cls.from_metadata(
            p, meta, payload.get("state_dict"), training_state=payload.get("training_state")
        )

    @classmethod
    def from_metadata(
        cls,
        path: str | os.PathLike[str],
        meta: dict[str, Any],
        weights: object,
        *,
        training_state: dict[str, Any] | None = None,
    ) -> SegmentationModel:
        """Rebuild a model from the metadata and the state dict read from ``path``.

        Checked as :meth:`load` checks a model file's (architecture, weight count,
        ``weights_sha256``, finiteness, every field); shared by :meth:`load` and bioimage.io
        packages (:func:`~napari_segtool.model.bioimageio_package.read_package`).

        Raises
        ------
        CheckpointError
            Naming ``path`` and the problem, as for :meth:`load`.
        """
        p = Path(path)
        config, norm = read_configs(p, meta)
        payload = {"state_dict": weights}
        state = read_state(p, payload, config, weights_sha256=meta.get("weights_sha256"))
        network = build_loaded(p, config, state)
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
                training_state=training_state,
                label_values=meta.get("label_values"),
            )
        except KeyError as exc:
            raise CheckpointError(f"{p}: damaged model metadata (missing {exc})") from exc
        except (CheckpointError, TypeError) as exc:
            raise CheckpointError(f"{p}: damaged model metadata ({exc})") from exc


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
