"""The fixed WinCLIP / APRIL-GAN prompt ensemble and a per-class-name cache of its text features.

For a class name ``obj`` the sentences of a state class are ``template.format(state.format(obj))`` for every state
word of that class and every template (7 × 35 normal, 5 × 35 anomalous). Their L2-normalised embeddings are averaged
and renormalised into one (normal, anomalous) pair. The prompts are fixed, so the pair is computed once per class
name and reused for every image and every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# The 35 templates of WinCLIP / APRIL-GAN (CLIP's ImageNet templates plus five "in the scene" sentences).
TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


class TextEncoder(Protocol):
    """What the cache needs from a text tower (``zsad.backbones.clip.CLIPText``)."""

    def tokenize(self, texts: list[str]) -> Tensor: ...

    def encode(self, tokens: Tensor) -> Tensor: ...


def state_sentences(
    class_name: str, states: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> list[str]:
    """Every sentence of one state class for ``class_name`` (states outer, templates inner)."""
    return [template.format(state.format(class_name)) for state in states for template in templates]


class EnsembleTextCache:
    """Per-class-name (normal, anomalous) text features of the fixed prompt ensemble.

    A plain object (not an ``nn.Module``) so that the frozen text tower is passed in at call time and never
    registered twice in the method's state dict. New class names of a batch are encoded together in one call.

    Attributes:
        features: class name → float32 [2, D] (row 0 normal, row 1 anomalous), unit rows.
        encode_calls: number of ``encoder.encode`` calls made so far (lets tests check the caching).
    """

    def __init__(
        self,
        normal_states: Sequence[str] = NORMAL_STATES,
        anomalous_states: Sequence[str] = ANOMALOUS_STATES,
        templates: Sequence[str] = TEMPLATES,
    ) -> None:
        self.states = (tuple(normal_states), tuple(anomalous_states))
        self.templates = tuple(templates)
        self.features: dict[str, Tensor] = {}
        self.encode_calls = 0

    def __call__(self, class_names: Sequence[str], encoder: TextEncoder, device: torch.device) -> Tensor:
        """float32 [B, 2, D] text features for each class name (order kept, duplicates allowed)."""
        new = sorted({name for name in class_names if name not in self.features})
        if new:
            # Outside inference mode: features cached during a test loop must stay usable in a training graph.
            # Autocast off: the cache must hold the same fp32 features whichever loop (bf16 or not) filled it.
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                torch.autocast(device_type=_autocast_type(encoder), enabled=False),
            ):
                self._encode(new, encoder)
        feats = [self._on(name, device) for name in class_names]
        return torch.stack(feats)

    def _on(self, name: str, device: torch.device) -> Tensor:
        """The cached pair of ``name`` on ``device``, moved there once (no host-to-device copy per step)."""
        pair = self.features[name]
        if pair.device != torch.device(device):
            pair = self.features[name] = pair.to(device)
        return pair

    def clear(self) -> None:
        self.features.clear()

    def _encode(self, names: list[str], encoder: TextEncoder) -> None:
        sentences: list[str] = []
        counts: list[int] = []
        for name in names:
            for states in self.states:
                group = state_sentences(name, states, self.templates)
                sentences += group
                counts.append(len(group))
        tokens = encoder.tokenize(sentences)
        # The text tower is causal and pools at EOT (the largest id): positions after the longest sentence's EOT
        # cannot change any pooled feature, so they are not computed (~5x less work than the 77-token context).
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        device = _device_of(encoder)
        if device is not None:
            tokens = tokens.to(device)
        emb = F.normalize(encoder.encode(tokens).float(), dim=-1)
        self.encode_calls += 1
        means = torch.stack([g.mean(0) for g in emb.split(counts)])  # [names * 2, D]
        pairs = F.normalize(means, dim=-1).view(len(names), 2, -1)
        for name, pair in zip(names, pairs):
            self.features[name] = pair


def _autocast_type(encoder: object) -> str:
    device = _device_of(encoder)
    return "cpu" if device is None else device.type


def _device_of(encoder: object) -> torch.device | None:
    params = getattr(encoder, "parameters", None)
    if params is None:
        return None
    first = next(iter(params()), None)
    return None if first is None else first.device
