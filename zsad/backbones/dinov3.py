"""Frozen DINOv3 ViT backbones (timm ``vit_*_patch16_dinov3``) with per-block taps.

``build_dinov3(name, pretrained)`` resolves the weights (a timm tag such as ``lvd1689m``, a local timm or Meta
checkpoint file, or ``none`` for random weights) and returns a :class:`DINOv3Backbone` whose forward gives, for every
tapped block, the block output passed through the model's final norm and split into CLS, register and patch tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsad.backbones.base import VisionFeatures
from zsad.backbones.errors import WeightsError
from zsad.methods.base import IMAGENET_MEAN, IMAGENET_STD

# Test / CPU-demo preset: the DINOv3 recipe (RoPE, 4 registers, layer scale, patch 16) at toy width and depth.
# Layer scale starts at 1 (not 1e-5) so that random blocks change the tokens and taps differ visibly.
TINY_PRESET: dict[str, Any] = dict(
    base="vit_small_patch16_dinov3", embed_dim=64, depth=4, num_heads=4, init_values=1.0
)
DEFAULT_KEY = "method.vision.pretrained"


class DINOv3Backbone(nn.Module):
    """A frozen timm DINOv3 ViT that returns normed CLS / register / patch tokens of chosen blocks.

    Attributes:
        model: the timm ``Eva`` model (frozen, eval mode).
        width: token width C.
        depth: number of blocks.
        patch_size: 16 for every DINOv3 ViT.
        num_registers: register tokens after the CLS token (4).
        mean, std: ImageNet normalisation the weights expect.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, model: nn.Module, name: str, pretrained: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.width = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_registers = int(model.num_prefix_tokens) - 1
        if model.cls_token is None or self.num_registers < 0:
            raise ValueError(f"DINOv3 model {name!r} has no CLS token; expected 1 CLS + registers")
        # Every block attends through F.scaled_dot_product_attention (no probabilities are materialised here).
        for blk in model.blocks:
            blk.attn.fused_attn = hasattr(F, "scaled_dot_product_attention")
        model.requires_grad_(False)
        model.eval()

    @property
    def fused_attn(self) -> bool:
        """True when every block uses the fused SDPA kernel."""
        return all(bool(blk.attn.fused_attn) for blk in self.model.blocks)

    def train(self, mode: bool = True) -> DINOv3Backbone:
        # Frozen is frozen: stays in eval mode whatever the caller asks.
        return super().train(False)

    def identity(self) -> dict[str, Any]:
        """Name and weight source: a checkpoint of trainable parts refuses to load onto another backbone."""
        return {"kind": "dinov3", "name": self.name, "pretrained": self.pretrained, "width": self.width}

    def _check_taps(self, taps: tuple[int, ...]) -> list[int]:
        if not taps or any(not 1 <= int(t) <= self.depth for t in taps):
            raise ValueError(
                f"DINOv3 taps must be 1-based block indices in 1..{self.depth}, got {list(taps)}"
            )
        return [int(t) - 1 for t in taps]

    def forward(self, images: Tensor, taps: tuple[int, ...] = (6, 12, 18, 24)) -> VisionFeatures:
        """Tokens of the tapped blocks (1-based), each through the final norm.

        Args:
            images: [B, 3, H, W] ImageNet-normalised, H and W multiples of the patch size.
            taps: 1-based block indices.

        Returns:
            ``VisionFeatures`` with ``patch_tokens`` [B, N, C], ``cls_tokens`` [B, C] and ``register_tokens``
            [B, R, C] per tap, ``grid`` = (H/16, W/16).
        """
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"DINOv3 input size must be a multiple of {self.patch_size}, got {h}x{w} (set method.image_size)"
            )
        indices = self._check_taps(tuple(taps))
        blocks = sorted(set(indices))  # timm returns the taken blocks in block order
        with torch.no_grad():
            taken = self.model.forward_intermediates(
                images,
                indices=blocks,
                norm=True,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
        outs = [taken[blocks.index(i)] for i in indices]
        return VisionFeatures(
            patch_tokens=[patches for patches, _ in outs],
            grid=(h // self.patch_size, w // self.patch_size),
            cls_tokens=[prefix[:, 0] for _, prefix in outs],
            register_tokens=[prefix[:, 1:] for _, prefix in outs],
        )


def _is_path(pretrained: str) -> bool:
    return (
        "/" in pretrained
        or "\\" in pretrained
        or Path(pretrained).suffix in {".pth", ".pt", ".safetensors", ".bin"}
    )


def _arch(name: str) -> tuple[str, dict[str, Any]]:
    """timm architecture and keyword overrides for ``name`` (a timm DINOv3 ViT name or ``tiny``)."""
    if name == "tiny":
        preset = dict(TINY_PRESET)
        return preset.pop("base"), preset
    if "dinov3" not in name or not name.startswith("vit_") or name not in timm.list_models("vit_*dinov3*"):
        known = ", ".join(timm.list_models("vit_*dinov3*"))
        raise ValueError(
            f"unknown DINOv3 model {name!r} (method.vision.name); expected 'tiny' or one of: {known}"
        )
    return name, {}


def build_dinov3(
    name: str, pretrained: str = "none", image_size: int = 512, config_key: str = DEFAULT_KEY
) -> DINOv3Backbone:
    """Build a frozen DINOv3 backbone.

    Args:
        name: timm DINOv3 ViT name (``vit_large_patch16_dinov3`` …) or ``tiny`` (test preset).
        pretrained: ``none`` (random weights, same architecture), a timm tag (``lvd1689m``, ``sat493m``) resolved
            from the Hugging Face cache or hub, or a local file: a timm state dict or a Meta DINOv3 ``.pth``
            (converted by timm's checkpoint filter).
        image_size: nominal input size; any multiple of 16 works at run time (RoPE, no absolute position table).
        config_key: the config key named in weight errors.

    Raises:
        WeightsError: the weights cannot be found or do not fit the architecture.
    """
    arch, overrides = _arch(name)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=image_size, **overrides)
    source = str(pretrained)
    try:
        if source == "none":
            model = timm.create_model(arch, pretrained=False, **kwargs)
        elif _is_path(source) or Path(source).exists():
            path = Path(source).expanduser()
            if not path.is_file():
                raise WeightsError(
                    f"DINOv3 weight file not found: {path}; set {config_key} to an existing file"
                )
            model = timm.create_model(
                arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
        else:
            model = _from_tag(arch, name, source, kwargs, config_key)
    except WeightsError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise WeightsError(
            f"cannot load DINOv3 weights {source!r} for {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f" — set {config_key} to a local weight file, or to 'none' for random weights"
        ) from e
    return DINOv3Backbone(model, name=name, pretrained=source)


def _from_tag(arch: str, name: str, tag: str, kwargs: dict[str, Any], config_key: str) -> nn.Module:
    if name == "tiny":
        raise WeightsError(
            f"the tiny preset has no published weights; set {config_key} to 'none' or a local file"
        )
    tags = [m.split(".", 1)[1] for m in timm.list_pretrained(f"{arch}.*")]
    if tag not in tags:
        raise WeightsError(
            f"unknown weight tag {tag!r} for {arch} ({config_key}); known tags: {tags}, a file, or none"
        )
    try:
        return timm.create_model(f"{arch}.{tag}", pretrained=True, **kwargs)
    except OSError as e:  # huggingface_hub raises OSError subclasses when offline or the file is not cached
        raise WeightsError(
            f"DINOv3 weights {arch}.{tag} are not in the local Hugging Face cache and cannot be downloaded "
            f"(offline?): set {config_key} to a local weight file (timm or Meta .pth), or to 'none'"
        ) from e


__all__ = ["DINOv3Backbone", "WeightsError", "build_dinov3", "TINY_PRESET"]
