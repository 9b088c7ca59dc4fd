"""Core types shared by every method: what a method returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class AnomalyOutput(NamedTuple):
    """What a method's forward returns.

    Attributes:
        anomaly_map: float32 [B, H, W] at the evaluation resolution (the method's input size), already smoothed
            if the method smooths. Raw scores: never clamped or re-normalised for metrics.
        image_score: float32 [B].
        extras: per-image tensors for logging and pictures (leading dim B), e.g. ``routing_weights`` [B, L, 2],
            ``entropy_map`` [B, h, w], ``gate`` [B], ``expert_share`` [L, E]. Detached; never used by the loss.
        loss_inputs: tensors the method's own ``loss`` needs (probability maps per layer, logits …). Methods
            fill it in training; it may be empty at test time.
    """

    anomaly_map: Tensor
    image_score: Tensor
    extras: dict[str, Tensor] = {}
    loss_inputs: dict[str, Tensor] = {}
