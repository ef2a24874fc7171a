"""What a segmentation returns, and the per-voxel maths that fills it chunk by chunk."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_segtool.model.checkpoint import SegmentationModel

__all__ = ["Outputs", "Segmentation", "argmax_channels", "normalized_entropy"]


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`segment`.

    Attributes
    ----------
    labels : ndarray of uint8 (uint16, uint32 for label values beyond 255, 65535)
        The label value per voxel, the image's spatial shape: channel ``i``'s winners get
        ``model.label_values[i]`` (``i`` itself for models with values ``0 .. C-1``).
    probabilities : ndarray of float32 or None
        ``(n_classes, *spatial)`` class probabilities when asked for, one per output
        channel (channel ``i`` is label value ``model.label_values[i]``).
    uncertainty : ndarray of float32 or None
        With test-time augmentation: the predictive entropy of the flip-averaged probabilities
        divided by ``log(n_classes)``, so 0 is certain and 1 is uniform.
    device : str
        The device that ran the network.
    disagreement : ndarray of float32 or None
        With test-time augmentation: the share of flips whose class differs from the
        majority's (0: all agree; at most ``1 - 1/flips``), blended across tiles.
    execution : dict or None
        How the network ran: precision, memory format, whether it was compiled, threads, and
        the reasons for each choice
        (:meth:`~napari_segtool.inference.execution.ExecutionPlan.finish`).
    """

    labels: NDArray
    probabilities: NDArray[np.float32] | None
    uncertainty: NDArray[np.float32] | None
    device: str
    disagreement: NDArray[np.float32] | None = None
    execution: dict[str, object] | None = None


@dataclass
class Outputs:
    """The whole image's results, filled chunk by chunk (item axis first)."""

    n_classes: int
    labels: NDArray
    lut: NDArray | None  # channel index -> the user's label value (None: the same)
    probabilities: NDArray[np.float32] | None
    uncertainty: NDArray[np.float32] | None
    disagreement: NDArray[np.float32] | None

    @classmethod
    def empty(
        cls, items_shape: tuple[int, ...], model: SegmentationModel, *, tta: bool,
        probabilities: bool,
    ) -> Outputs:  # fmt: skip
        n_classes = model.config.out_channels
        shape = (items_shape[0], *items_shape[2:])
        values = model.label_values or tuple(range(n_classes))
        top = max(values)
        dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
        lut = None if values == tuple(range(n_classes)) else np.asarray(values, dtype)
        return cls(
            n_classes=n_classes,
            labels=np.empty(shape, dtype),
            lut=lut,
            probabilities=np.empty((n_classes, *shape), np.float32) if probabilities else None,
            uncertainty=np.empty(shape, np.float32) if tta else None,
            disagreement=np.empty(shape, np.float32) if tta else None,
        )

    def store(self, a: int, b: int, out: NDArray[np.float32]) -> None:
        """Items ``a:b`` from the tiler's blended output ``(b - a, n_out, *S)``."""
        if self.disagreement is not None:
            self.disagreement[a:b] = out[:, self.n_classes]
            out = out[:, : self.n_classes]
        argmax_channels(out, out=self.labels[a:b])
        if self.lut is not None:
            self.labels[a:b] = self.lut[self.labels[a:b]]
        if self.probabilities is not None:
            self.probabilities[:, a:b] = np.moveaxis(out, 1, 0)
        if self.uncertainty is not None:
            self.uncertainty[a:b] = normalized_entropy(out, axis=1)

    def result(
        self, spatial: tuple[int, ...], device: str, execution: dict[str, object] | None = None
    ) -> Segmentation:
        """Back to the image's own spatial shape (drops the item or the one-slice axis)."""

        def shaped(a: NDArray | None) -> NDArray | None:
            return None if a is None else a.reshape(spatial)

        probs = self.probabilities
        if probs is not None:
            probs = probs.reshape((self.n_classes, *spatial))
        return Segmentation(
            self.labels.reshape(spatial),
            probs,
            shaped(self.uncertainty),
            device,
            shaped(self.disagreement),
            execution,
        )


def argmax_channels(probs: NDArray, *, out: NDArray) -> NDArray:
    """``argmax`` over axis 1 of ``(N, C, *S)`` written into ``out`` (any integer dtype).

    Unlike ``np.argmax(...).astype(...)`` it needs no int64 temporary the size of the
    output, only one float plane and one mask; ties go to the lower class, as in argmax.

    >>> p = np.array([[[0.2, 0.5, 0.5]], [[0.8, 0.5, 0.4]]], np.float32)[None]
    >>> argmax_channels(p[:, :, 0], out=np.empty((1, 3), np.uint8)).tolist()
    [[1, 0, 0]]
    """
    best = np.array(probs[:, 0], copy=True)
    out[...] = 0
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best
        out[better] = c
        np.copyto(best, probs[:, c], where=better)
    return out


def normalized_entropy(probabilities: NDArray, *, axis: int = 0) -> NDArray[np.float32]:
    """Entropy of class probabilities divided by ``log(n_classes)``: 0 certain, 1 uniform.

    Examples
    --------
    >>> import numpy as np
    >>> normalized_entropy(np.array([[1.0, 0.5], [0.0, 0.5]])).round(3)
    array([0., 1.], dtype=float32)
    """
    p = np.clip(probabilities, 1e-12, 1.0)
    n = probabilities.shape[axis]
    h = -(p * np.log(p)).sum(axis=axis)
    return (h / math.log(n)).astype(np.float32)
