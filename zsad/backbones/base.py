"""What every frozen vision backbone is: the :class:`Backbone` protocol, its uniform output and the
normalisation constants of the two families (CLIP, DINOv3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

# OpenAI CLIP's input normalisation (open_clip's OPENAI_DATASET_MEAN / _STD): the CLIP towers' preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The ImageNet normalisation of DINOv3 (and of the data layer's resize for it): a backbone's own preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionFeatures:
    """Per-tap tensors from one forward of a vision backbone.

    Attributes:
        patch_tokens: one [B, N, C] tensor per tap (N = gh*gw). CLIP: V-V-path tokens through ``ln_post`` + ``proj``,
            L2-normalised, C = joint dim. DINOv3: tokens after the final norm, C = width (no standardisation).
        cls_tokens: one [B, C'] tensor per tap (DINOv3: CLS after final norm) or ``None``.
        global_embedding: [B, D] CLIP image embedding (original path's CLS ``@ proj``, by default without ``ln_post``
            as in the reference codes; not normalised), or None.
        grid: (gh, gw) patch grid.
        pre_proj_tokens: one [B, N, width] tensor per tap: CLIP V-V tokens after ``ln_post``, before ``proj``
            (EntroAD's memory keys read these). ``None`` unless asked for.
        attentions: one original-path attention-probability tensor per tap (CLIP), only when asked for:
            [B, heads, 1+N, 1+N], or the head mean [B, 1+N, 1+N] with ``attn_reduce="mean_heads"``; else ``None``.
        register_tokens: DINOv3 register tokens per tap [B, R, C], or ``None``.
    """

    patch_tokens: list[Tensor]
    grid: tuple[int, int]
    cls_tokens: list[Tensor] | None = None
    global_embedding: Tensor | None = None
    pre_proj_tokens: list[Tensor] | None = None
    attentions: list[Tensor] | None = None
    register_tokens: list[Tensor] | None = None


@runtime_checkable
class Backbone(Protocol):
    """A frozen vision backbone, as methods, the data layer and the benches see it.

    ``zsad.backbones.clip.CLIPVision`` and ``zsad.backbones.dinov3.DINOv3Backbone`` implement it; a method exposes
    its own as ``ZSADMethod.vision_backbone``. Backbone-specific options (CLIP's V-V path, attention taps) are
    keyword arguments of ``forward`` after these two.

    Attributes:
        mean, std: the input normalisation the weights expect (the data layer applies it).
        interpolation: the image resize the data layer uses for this backbone (``bicubic`` CLIP, ``bilinear`` DINOv3).
        patch_size: patch side; inputs are multiples of it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    patch_size: int

    def identity(self) -> dict[str, Any]:
        """Architecture and weight source (``kind``, ``name``, ``pretrained`` …), stored with checkpoints."""
        ...

    def forward(self, images: Tensor, taps: Sequence[int]) -> VisionFeatures:
        """Features of the tapped blocks (1-based) of normalised images [B, 3, H, W]."""
        ...
