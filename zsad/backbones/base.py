"""The uniform output of a frozen vision backbone."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
