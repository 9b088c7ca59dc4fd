"""Frozen DINOv3 ViT backbones (timm ``vit_*_patch16_dinov3``) with per-block taps.

``build_dinov3(name, pretrained)`` resolves the weights (a timm tag such as ``lvd1689m``, a local timm or Meta
checkpoint file, or ``none`` for random weights) and returns a :class:`DINOv3Backbone` whose forward gives, for every
tapped block, the block output passed through the model's final norm and split into CLS, register and patch tokens.

A Meta DINOv3 ``.pth`` is translated key by key (:func:`meta_to_timm`): its RoPE periods replace timm's recomputed
ones (and survive dtype casts), its q/v biases load into timm's ``…_qkvb`` variant with the k bias masked as Meta's
``LinearKMaskedBias`` does, and what timm cannot reproduce is a ``WeightsError`` naming the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsad.backbones.base import IMAGENET_MEAN, IMAGENET_STD, VisionFeatures
from zsad.backbones.errors import WeightsError
from zsad.backbones.weights import few as _few
from zsad.backbones.weights import read_state_dict, resolve_source, tag_unavailable

# Test / CPU-demo preset: the DINOv3 recipe (RoPE, 4 registers, layer scale, patch 16) at toy width and depth.
# Layer scale starts at 1 (not 1e-5) so that random blocks change the tokens and taps differ visibly.
TINY_PRESET: dict[str, Any] = dict(
    base="vit_small_patch16_dinov3", embed_dim=64, depth=4, num_heads=4, init_values=1.0
)
DEFAULT_KEY = "method.vision.pretrained"
log = logging.getLogger("zsad")


class DINOv3Backbone(nn.Module):
    """A frozen timm DINOv3 ViT that returns normed CLS / register / patch tokens of chosen blocks.

    Attributes:
        model: the timm ``Eva`` model (frozen, eval mode).
        width: token width C.
        depth: number of blocks.
        patch_size: 16 for every DINOv3 ViT.
        num_registers: register tokens after the CLS token (4).
        mean, std: ImageNet normalisation the weights expect.
        interpolation: the image resize of the data layer for DINOv3 (``bilinear``, as the reference's loaders).
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __init__(
        self, model: nn.Module, name: str, pretrained: str, rope_periods: Tensor | None = None
    ) -> None:
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
        # The checkpoint's RoPE periods (a plain attribute, not a buffer: a dtype cast must not round them).
        self.rope_periods = None if rope_periods is None else rope_periods.detach().float().cpu().clone()
        self._restore_periods()

    def _apply(self, fn: Any, recurse: bool = True) -> DINOv3Backbone:  # noqa: ANN401 - nn.Module's signature
        # timm rebuilds ``rope.periods`` from its temperature whenever a cast downcasts the buffer (.to(bf16)):
        # put the checkpoint's values back after every move or cast.
        super()._apply(fn, recurse)
        self._restore_periods()
        return self

    def _restore_periods(self) -> None:
        rope = getattr(self.model, "rope", None)
        if getattr(self, "rope_periods", None) is None or rope is None:
            return
        with torch.no_grad():
            rope.periods.copy_(self.rope_periods.to(rope.periods.device, rope.periods.dtype))
            cached = getattr(rope, "pos_embed_cached", None)
            if cached is not None and getattr(rope, "feat_shape", None) is not None:
                # the fixed-size cache (unused with dynamic image sizes) was built from the old periods
                cached.copy_(rope.get_embed(shape=list(rope.feat_shape)).to(cached.dtype))

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
            (see :func:`meta_to_timm`: RoPE periods and q/v biases are taken from the file).
        image_size: nominal input size; any multiple of 16 works at run time (RoPE, no absolute position table).
        config_key: the config key named in weight errors.

    Raises:
        WeightsError: the weights cannot be found, do not fit the architecture, or hold something the timm model
            cannot reproduce (the message names the key).
    """
    arch, overrides = _arch(name)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=image_size, **overrides)
    tags = [] if name == "tiny" else [m.split(".", 1)[1] for m in timm.list_pretrained(f"{arch}.*")]
    source = resolve_source(
        pretrained,
        name=name,
        config_key=config_key,
        family="timm",
        is_tag=tags.__contains__,
        known_tags=lambda: tags,
    )
    periods = None
    try:
        if source.kind == "none":
            model = timm.create_model(arch, pretrained=False, **kwargs)
        elif source.kind == "file":
            model, periods = _from_file(arch, kwargs, source.path, config_key)
        else:
            model = _from_tag(arch, source.value, kwargs, config_key)
    except WeightsError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise WeightsError(
            f"cannot load DINOv3 weights {source.value!r} for {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f" — set {config_key} to a local weight file, or to 'none' for random weights"
        ) from e
    return DINOv3Backbone(model, name=name, pretrained=source.value, rope_periods=periods)


# Meta's DINOv3 names → timm's Eva names (the only renames; every other key is the same in both).
_META_RENAMES = (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"))
# Meta keys with no counterpart in the frozen backbone's forward: EUPE distillation heads and the 7B model's norm for
# local crops (training only). They are dropped by name and listed in the log.
_META_UNUSED_PREFIXES = ("projectors.", "local_cls_norm.")


def _with_qkv_bias(arch: str, path: Path, config_key: str) -> str:
    """timm's DINOv3 variant with q/v biases (``…_qkvb``) for a file that has them."""
    if arch.endswith("_qkvb"):
        return arch
    qkvb = f"{arch}_qkvb"
    if qkvb not in timm.list_models(qkvb):
        raise WeightsError(
            f"{path} ({config_key}) has attention q/v biases (attn.qkv.bias) but timm has no {qkvb} to hold them"
        )
    return qkvb


def _from_file(
    arch: str, kwargs: dict[str, Any], path: Path, config_key: str
) -> tuple[nn.Module, Tensor | None]:
    """A timm model loaded from a local timm or Meta file, and the file's RoPE periods (Meta files) or ``None``."""
    sd = read_state_dict(path, config_key)
    meta = "storage_tokens" in sd
    if any(k.endswith(("attn.qkv.bias", "attn.q_bias")) for k in sd):
        arch = _with_qkv_bias(arch, path, config_key)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    periods = None
    if meta:
        sd, periods = meta_to_timm(sd, f"{path} ({config_key})")
        rope = getattr(model, "rope", None)
        if rope is None or tuple(rope.periods.shape) != tuple(periods.shape):
            want = None if rope is None else tuple(rope.periods.shape)
            raise WeightsError(
                f"{path} ({config_key}): rope_embed.periods has shape {tuple(periods.shape)}, the model needs {want}"
            )
    else:
        from timm.models.eva import checkpoint_filter_fn

        sd = checkpoint_filter_fn(sd, model)  # timm / EVA naming, patch-embed resampling
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{config_key}: '{path}' does not fit {arch}: missing keys {_few(missing)}, unexpected keys "
            f"{_few(unexpected)}"
        )
    return model, periods


def meta_to_timm(sd: dict[str, Tensor], where: str = "DINOv3 file") -> tuple[dict[str, Tensor], Tensor]:
    """Translate a Meta DINOv3 state dict to timm Eva names, honouring everything the forward depends on.

    - ``rope_embed.periods`` is returned (float32) to be copied into the timm model: timm recomputes the periods
      from the temperature, but Meta's released files store them rounded to bf16 (features move by ~1e-3).
    - ``blocks.N.attn.qkv.bias`` is multiplied by ``bias_mask`` exactly as Meta's ``LinearKMaskedBias`` does; the q
      and v thirds become timm's ``q_bias`` / ``v_bias``. timm's k bias is fixed at zero, so an effective k bias
      that is not zero cannot be honoured: ``WeightsError`` naming the key.
    - ``mask_token`` enters Meta's forward only as ``cls_token + 0 * mask_token`` and is dropped (it must be
      finite, else that product would poison the CLS token); ``projectors.*`` / ``local_cls_norm.*`` are training
      heads, dropped and logged. Any other key keeps its name (except ``storage_tokens`` → ``reg_token`` and
      ``lsN.gamma`` → ``gamma_N``); a key the model does not know is reported by the caller's strict load.

    Args:
        sd: the Meta state dict.
        where: the file and config key, for error messages.

    Returns:
        (timm state dict, RoPE periods float32).
    """
    if "rope_embed.periods" not in sd:
        raise WeightsError(f"{where}: Meta DINOv3 file without rope_embed.periods")
    out: dict[str, Tensor] = {}
    dropped = []
    for key, value in sd.items():
        if key == "rope_embed.periods" or key.endswith("attn.qkv.bias_mask"):
            continue  # periods returned below; masks used with their biases
        if key.startswith(_META_UNUSED_PREFIXES):
            dropped.append(key)
        elif key == "mask_token":
            if not torch.isfinite(value).all():
                raise WeightsError(
                    f"{where}: mask_token is not finite (Meta adds 0 * mask_token to the CLS token)"
                )
        elif key.endswith("attn.qkv.bias"):
            q, v = _masked_qv_bias(key, value, sd.get(f"{key}_mask"), where)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
        elif key == "storage_tokens":
            out["reg_token"] = value
        else:
            for old, new in _META_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    orphans = [k for k in sd if k.endswith("attn.qkv.bias_mask") and k[: -len("_mask")] not in sd]
    if orphans:
        raise WeightsError(f"{where}: {orphans[0]} has no qkv.bias to mask")
    if dropped:
        log.info("%s: dropped %d training-only keys (%s)", where, len(dropped), _few(dropped))
    return out, sd["rope_embed.periods"].detach().float()


def _masked_qv_bias(key: str, bias: Tensor, mask: Tensor | None, where: str) -> tuple[Tensor, Tensor]:
    """(q, v) thirds of ``bias * mask`` (Meta's LinearKMaskedBias; no mask = a plain Linear bias)."""
    if mask is not None and mask.shape != bias.shape:
        raise WeightsError(f"{where}: {key}_mask has shape {tuple(mask.shape)}, {key} {tuple(bias.shape)}")
    effective = bias if mask is None else bias * mask
    if effective.ndim != 1 or effective.numel() % 3:
        raise WeightsError(f"{where}: {key} has shape {tuple(bias.shape)}, expected [3 * width]")
    q, k, v = effective.chunk(3)
    if torch.count_nonzero(k):
        raise WeightsError(
            f"{where}: {key} has a non-zero key bias after masking ({key}_mask); timm's DINOv3 fixes the "
            "k bias at zero, so this file cannot be reproduced"
        )
    return q.clone(), v.clone()


def _from_tag(arch: str, tag: str, kwargs: dict[str, Any], config_key: str) -> nn.Module:
    try:
        return timm.create_model(f"{arch}.{tag}", pretrained=True, **kwargs)
    except OSError as e:  # huggingface_hub raises OSError subclasses when offline or the file is not cached
        raise tag_unavailable(
            config_key, tag, arch, "not in the local Hugging Face cache and cannot be downloaded: offline?"
        ) from e


__all__ = ["DINOv3Backbone", "WeightsError", "build_dinov3", "meta_to_timm", "TINY_PRESET"]
