"""Losses shared by the methods (probability-space focal and soft dice, as in the AnomalyCLIP code family)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Multi-class focal loss on probabilities (not logits).

    Args:
        probs: [B, C, H, W] class probabilities (softmax over C already applied).
        target: [B, H, W] integer or {0,1} float class index per pixel.
        gamma: focusing exponent.
        smooth: the one-hot target is clamped to [smooth/(C-1), 1-smooth] and ``smooth`` is added to p_t, which
            keeps the log finite on saturated probabilities (the reference's convention).

    Returns:
        Scalar mean over pixels.
    """
    c = probs.shape[1]
    one_hot = F.one_hot(target.long(), c).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / max(c - 1, 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft dice loss per sample, averaged over the batch. ``prob`` and ``target`` are [B, H, W]."""
    p = prob.flatten(1)
    t = target.flatten(1).to(p.dtype)
    dice = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(probs: Tensor, gt: Tensor, both_dice: bool = True) -> Tensor:
    """Focal(S, G) + Dice(S_a, G) [+ Dice(S_n, 1-G)] on a 2-class probability map ``probs`` [B, 2, H, W]."""
    loss = focal_loss(probs, gt) + dice_loss(probs[:, 1], gt)
    if both_dice:
        loss = loss + dice_loss(probs[:, 0], 1.0 - gt)
    return loss


def switch_balance_loss(router_probs: Tensor, assignments: Tensor) -> Tensor:
    """Switch-Transformer load balance E · Σ_e f_e · P̄_e (without α).

    Args:
        router_probs: [T, E] full softmax router probabilities per token.
        assignments: [T, E] 0/1 (or counts) of the experts each token was dispatched to (top-k slots).

    Returns:
        Scalar; equals 1 under perfectly uniform routing and grows up to E under collapse.
    """
    e = router_probs.shape[-1]
    f = assignments.float().sum(0) / assignments.float().sum().clamp_min(1.0)
    p_mean = router_probs.mean(0)
    return e * (f * p_mean).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean of logsumexp(logits)² over tokens."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
