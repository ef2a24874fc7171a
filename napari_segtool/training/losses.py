"""Dice + cross-entropy loss with an optional mask of the voxels that count."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Mean of cross-entropy and soft Dice loss over the foreground classes.

    Parameters
    ----------
    logits : Tensor, shape (B, C, *S)
    target : Tensor of int64, shape (B, *S)
        Class per voxel.
    valid : Tensor of bool, shape (B, *S), optional
        Voxels that count; the rest contribute nothing to the loss or its gradient.
    class_weights : Tensor, shape (C,), optional
        Cross-entropy weights per class.
    smooth : float
        Added to numerator and denominator of the Dice term.

    Returns
    -------
    Tensor
        Scalar loss. With no valid voxel at all it is 0 (and carries a zero gradient).

    Notes
    -----
    The Dice term is the batch Dice (sums over batch and space) averaged over foreground
    classes 1..C-1, computed on softmax probabilities restricted to the valid voxels.
    """
    if valid is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.float(), safe_target, weight=class_weights, reduction="none")
    ce = (ce * valid).sum() / n_valid
    probs = torch.softmax(logits.float(), dim=1)
    n_classes = logits.shape[1]
    onehot = F.one_hot(safe_target, n_classes).movedim(-1, 1).float()
    v = valid.unsqueeze(1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot * v).sum(dims)
    denom = ((probs + onehot) * v).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    dice_loss = 1.0 - dice[1:].mean()
    return 0.5 * ce + 0.5 * dice_loss
