"""Frozen parameter groups: the single source of defaults for the core, the CLI and the widgets.

Nothing here imports torch, Qt or napari, so the widgets can build their controls from these
defaults and the CLI can expose them as flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np

from napari_segtool.errors import InputError

Device = Literal["auto", "cpu", "cuda", "mps"]
Norm = Literal["batch", "instance", "group", "none"]
Architecture = Literal["unet", "resunet"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
NORMS: tuple[str, ...] = ("batch", "instance", "group", "none")
ARCHITECTURES: tuple[str, ...] = ("unet", "resunet")
"""Network architectures a model may use; each is built by :mod:`napari_segtool.model.registry`."""
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""How the network computes: float32, bfloat16 or float16 autocast, or ``auto`` (measured; see
:mod:`napari_segtool.inference.execution`)."""
CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[str, ...] = ("auto", "on", "off")
MemoryFormat = Literal["channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = ("channels_last", "contiguous")
MAX_IN_CHANNELS = 64
"""Most image channels a model may read."""
MAX_CLASSES = 256
"""Most output channels (classes, background included) a model may have."""
MAX_BASE_FEATURES = 256
"""Most feature maps at a U-Net's first level."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a segmentation network: which one, and its parameters.

    Attributes
    ----------
    spatial_dims : int
        2 for a network over ``(Y, X)`` planes, 3 for ``(Z, Y, X)`` volumes.
    in_channels : int
        Number of image channels the network reads (1 for grey, 3 for RGB).
    out_channels : int
        Number of classes, background included (2 for a binary mask), at most
        ``MAX_CLASSES``; which label value each channel stands for is kept with the model
        (:attr:`~napari_segtool.model.SegmentationModel.label_values`).
    depth : int
        Number of resolution levels; the input is padded to a multiple of ``2 ** (depth - 1)``.
    base_features : int
        Feature maps at the first level; doubled at each level down (at most
        ``MAX_BASE_FEATURES``; the network's total size is bounded too, see
        :func:`napari_segtool.model.registry.state_size`).
    norm : {"batch", "instance", "group", "none"}
        Normalisation after each convolution. ``"batch"`` (with running statistics at
        inference) makes every tile's prediction independent of its neighbours.
    dropout : float
        Dropout probability in the two deepest levels (0 disables it).
    architecture : {"unet", "resunet"}
        ``"unet"``: two 3x3(x3) convolutions per level (Ronneberger et al. 2015).
        ``"resunet"``: the same encoder/decoder with each level's two convolutions wrapped in
        a residual block (a 1x1 projection where the channel count changes). Model files
        written before this field existed are ``"unet"``.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    depth: int = 4
    base_features: int = 16
    norm: Norm = "batch"
    dropout: float = 0.0
    architecture: Architecture = "unet"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        for name in ("spatial_dims", "in_channels", "out_channels", "depth", "base_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InputError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if not 1 <= self.in_channels <= MAX_IN_CHANNELS:
            raise InputError(
                f"in_channels must be between 1 and {MAX_IN_CHANNELS}, got {self.in_channels}"
            )
        if not 2 <= self.out_channels <= MAX_CLASSES:
            raise InputError(
                f"out_channels must be between 2 (background plus at least one class) and "
                f"{MAX_CLASSES}, got {self.out_channels}"
            )
        if not 1 <= self.depth <= 7:
            raise InputError(f"depth must be between 1 and 7, got {self.depth}")
        if not 1 <= self.base_features <= MAX_BASE_FEATURES:
            raise InputError(
                f"base_features must be between 1 and {MAX_BASE_FEATURES}, "
                f"got {self.base_features}"
            )
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def features(self) -> tuple[int, ...]:
        """Feature maps per level, shallowest first."""
        return tuple(self.base_features * 2**level for level in range(self.depth))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class NormalizationConfig:
    """Percentile intensity normalisation, computed over the whole image per channel.

    Voxels at ``lower`` percentile map to 0 and at ``upper`` percentile to 1; values outside
    are kept (not clipped), as in Cellpose and csbdeep.
    """

    lower: float = 1.0
    upper: float = 99.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower < self.upper <= 100.0:
            raise InputError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, "
                f"got lower={self.lower}, upper={self.upper}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"lower": self.lower, "upper": self.upper}


def check_execution(*, precision: str, memory_format: str, compile: str = "off") -> None:
    """Refuse unknown execution options, naming the allowed values."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if compile not in COMPILE_MODES:
        raise InputError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if memory_format not in MEMORY_FORMATS:
        raise InputError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")


@dataclass(frozen=True)
class InferenceConfig:
    """How a model is applied to an image.

    Attributes
    ----------
    tile_shape : tuple of int or None
        Spatial tile (``(Y, X)`` for 2D models, ``(Z, Y, X)`` for 3D ones). ``None`` uses the
        model's own default (the size it was trained on).
    overlap : float
        Fraction of a tile shared with its neighbour along each axis, in ``[0, 1)``.
    blend : {"gaussian", "constant"}
        Weighting of overlapping tiles; Gaussian weights fall off towards tile borders with
        ``sigma = 0.125 * tile`` (MONAI's default), so border artefacts do not show.
    batch_size : int
        Tiles per forward pass; halved automatically on a CUDA out-of-memory error.
    device : {"auto", "cpu", "cuda", "mps"}
        ``"auto"`` picks CUDA, then MPS, then the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``auto`` measures one batch in float32 and in the device's reduced precision (float16
        on CUDA, bfloat16 on CPUs with native support) and keeps the faster, if clearly so.
    compile : {"auto", "on", "off"}
        ``torch.compile`` the network; ``auto`` only when the job is long enough for the
        warm-up to pay back (never for a single small image).
    memory_format : {"channels_last", "contiguous"}
        Layout of the network's weights and inputs; channels-last is faster on CPU and CUDA.
    tta : bool
        Flip test-time augmentation: average the probabilities over all axis flips and report
        the normalised predictive entropy as a per-voxel uncertainty.
    mc_dropout : bool
        Keep the network's dropout layers active (for Monte Carlo dropout sampling; see
        :func:`napari_segtool.active_learning.mc_dropout`).
    """

    tile_shape: tuple[int, ...] | None = None
    overlap: float = 0.25
    blend: Literal["gaussian", "constant"] = "gaussian"
    batch_size: int = 4
    device: Device = "auto"
    precision: Precision = "auto"
    compile: CompileMode = "auto"
    memory_format: MemoryFormat = "channels_last"
    tta: bool = False
    mc_dropout: bool = False

    def __post_init__(self) -> None:
        if self.tile_shape is not None:
            if any(int(t) < 1 for t in self.tile_shape):
                raise InputError(f"tile_shape entries must be >= 1, got {self.tile_shape}")
            object.__setattr__(self, "tile_shape", tuple(int(t) for t in self.tile_shape))
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.blend not in ("gaussian", "constant"):
            raise InputError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {DEVICES}, got {self.device!r}")
        check_execution(
            precision=self.precision, compile=self.compile, memory_format=self.memory_format
        )

    def with_(self, **changes: Any) -> InferenceConfig:
        """Return a copy with some fields changed."""
        return replace(self, **changes)


# The Segment widget's starting values: flip TTA on, because the Queue ranks by the
# uncertainty layer that only a TTA run makes (the CLI keeps TTA opt-in: it costs 4-8x).
SEGMENT_WIDGET_DEFAULTS = InferenceConfig(tta=True)

#: Image layers with more voxels than this (or with lazy data: dask, zarr, multiscale) are
#: segmented by the Segment widget into a chunked project beside the image file, block by
#: block, instead of in memory (1 Gi voxels: a float32 volume of 4 GiB).
LAZY_SEGMENT_VOXELS = 2**30

#: What the Segment widget segments: the whole image (the default), the box the canvas shows,
#: or the box of a rectangle drawn in a Shapes layer (``segment --region`` on the command line).
SEGMENT_REGIONS: tuple[str, ...] = ("whole image", "field of view", "Shapes rectangle")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings shared by the bundled-model script and (later) fine-tuning."""

    patch_shape: tuple[int, ...] = (256, 256)
    batch_size: int = 8
    steps: int = 1000
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    steps_per_epoch: int = 50
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    memory_format: MemoryFormat = "channels_last"
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if any(int(p) < 1 for p in self.patch_shape):
            raise InputError(f"patch_shape entries must be >= 1, got {self.patch_shape}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 1 or self.steps_per_epoch < 1:
            raise InputError("steps and steps_per_epoch must be >= 1")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {DEVICES}, got {self.device!r}")
        check_execution(precision=self.precision, memory_format=self.memory_format)


BALANCE_MODES = ("auto", "off")
"""How a fine-tuning round treats rare foreground (``FinetuneConfig.balance``)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning round on a user's corrections.

    Attributes
    ----------
    epochs, steps_per_epoch : int
        At most ``epochs * steps_per_epoch`` optimisation steps; validation after each epoch.
    batch_size : int
        Patches per step (and tiles per batch when validating).
    patch_shape : tuple of int or None
        Training patch; ``None`` uses the model's tile shape, shrunk to the labelled images.
    learning_rate : float
        AdamW learning rate (cosine decay over the round); lower than training from scratch
        so a good model is adjusted, not relearned.
    validation_fraction : float
        Share of the labelled slices (or blocks of a 2D image) held out to validate.
    patience : int
        Stop after this many epochs without a better validation Dice.
    seed : int
        Seeds the validation split, patch sampling and augmentation.
    device, precision, memory_format
        As for inference (training never compiles: a round is too short to pay back).
    balance : {"auto", "off"}
        ``auto`` plans the round from the training voxels' class counts
        (:func:`~napari_segtool.training.balance.plan_round`): rare foreground is oversampled,
        weighted in the loss and given more steps; ``off`` runs the fixed round.
    """

    epochs: int = 6
    steps_per_epoch: int = 15
    batch_size: int = 4
    patch_shape: tuple[int, ...] | None = None
    learning_rate: float = 5e-4
    validation_fraction: float = 0.25
    patience: int = 3
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    memory_format: MemoryFormat = "channels_last"
    balance: str = "auto"

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise InputError(f"balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise InputError("epochs, steps_per_epoch and batch_size must be >= 1")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if not 0 <= self.seed < 2**32:
            raise InputError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.patience < 1:
            raise InputError(f"patience must be >= 1, got {self.patience}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {DEVICES}, got {self.device!r}")
        check_execution(precision=self.precision, memory_format=self.memory_format)

    def replace(self, **changes: Any) -> FinetuneConfig:
        return replace(self, **changes)
