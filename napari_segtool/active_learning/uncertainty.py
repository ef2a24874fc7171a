"""Per-voxel uncertainty: from the flip TTA the user already ran, or from MC dropout."""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from napari_segtool.config import InferenceConfig
from napari_segtool.errors import InputError
from napari_segtool.inference.predict import (
    Segmentation,
    normalized_entropy,
    resolve_device,
    segment,
)
from napari_segtool.inference.seeding import TorchRandom
from napari_segtool.model.checkpoint import SegmentationModel

KINDS = ("entropy", "disagreement", "combined")


def voxel_uncertainty(result: Segmentation, *, kind: str = "combined") -> NDArray[np.float32]:
    """Per-voxel uncertainty of a TTA segmentation.

    ``entropy`` is the normalised predictive entropy of the flip-averaged probabilities
    (0 certain, 1 uniform over all classes); ``disagreement`` the share of flips whose class
    differs from the majority's; ``combined`` their mean, which ranks voxels where the flips
    disagree above voxels that are merely near a boundary.
    """
    if kind not in KINDS:
        raise InputError(f"uncertainty kind must be one of {KINDS}, got {kind!r}")
    if result.uncertainty is None or result.disagreement is None:
        raise InputError("uncertainty needs a segmentation run with flip TTA (tta=True)")
    if kind == "entropy":
        return result.uncertainty
    if kind == "disagreement":
        return result.disagreement
    return (0.5 * (result.uncertainty + result.disagreement)).astype(np.float32)


def mc_dropout(
    image: NDArray,
    model: SegmentationModel,
    *,
    passes: int = 8,
    config: InferenceConfig | None = None,
    seed: int = 0,
) -> tuple[NDArray, NDArray[np.float32], NDArray[np.float32]]:
    """Monte Carlo dropout: ``passes`` segmentations with dropout left on.

    Returns the labels of the mean probabilities, their normalised predictive entropy and the
    mutual information between prediction and weights (BALD), also divided by
    ``log(n_classes)``. Needs a model built with ``dropout > 0``; batch normalisation keeps its
    running statistics.
    """
    if model.config.dropout <= 0:
        raise InputError("MC dropout needs a model with dropout > 0 (ModelConfig.dropout)")
    if passes < 2:
        raise InputError(f"MC dropout needs at least 2 passes, got {passes}")
    cfg = dataclasses.replace(config or InferenceConfig(), mc_dropout=True)
    mean = None
    mean_entropy = None
    # dropout draws from a private stream: torch's global random state is left alone
    random = TorchRandom(seed, resolve_device(cfg.device))
    try:
        for _ in range(passes):
            with random.active():
                probs = segment(image, model, config=cfg, return_probabilities=True).probabilities
            assert probs is not None
            h = normalized_entropy(probs, axis=0)
            mean = probs if mean is None else mean + probs
            mean_entropy = h if mean_entropy is None else mean_entropy + h
    finally:
        model.network.eval()
    assert mean is not None
    assert mean_entropy is not None
    mean /= passes
    mean_entropy /= passes
    entropy = normalized_entropy(mean, axis=0)
    bald = np.clip(entropy - mean_entropy, 0, None).astype(np.float32)
    labels = np.argmax(mean, axis=0).astype(np.uint8)
    return labels, entropy, bald
