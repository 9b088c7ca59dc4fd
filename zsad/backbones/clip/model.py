"""Build the frozen CLIP towers a method asks for: presets, open_clip model configs, the QuickGELU decision, the
towers themselves (open_clip's public ``VisionTransformer`` / ``TextTransformer``) and their weights."""

from __future__ import annotations

import warnings
from copy import deepcopy
from functools import partial
from typing import Any

import open_clip
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer, VisionTransformer
from torch import nn

from zsad.backbones.base import CLIP_MEAN, CLIP_STD
from zsad.backbones.clip import weights
from zsad.backbones.clip.text import CLIPText
from zsad.backbones.clip.vision import POS_INTERP, CLIPVision

DEFAULT_KEY = "method.clip.pretrained"

# Test / CPU-demo preset: the OpenAI CLIP recipe (QuickGELU, patch 14, CLIP vocabulary) at toy width and depth.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
# The architecture ``zsad pretrain`` trains on its generated world (zsad/pretrain): the tiny recipe with its native
# positional grid at the CPU benchmark's input size (112² → 8×8 patches), so toy weights need no resizing there.
TOY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 112, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
# Architectures of zsad's own (no open_clip config, no published tags): method.clip.name = tiny | toy.
PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY_CONFIG, "toy": TOY_CONFIG}


# --------------------------------------------------------------------------------------------------------------
# Backbone and builder
# --------------------------------------------------------------------------------------------------------------


class CLIPBackbone(nn.Module):
    """The frozen CLIP towers a method asked for, plus the identity stored in its checkpoints.

    Attributes:
        visual: the vision tower, or ``None`` when built with ``vision=False``.
        text: the text tower, or ``None`` when built with ``text=False``.
        name: open_clip model name (or ``tiny``).
        pretrained: weight source as configured (``none``, a tag, or a file path).
        quick_gelu: whether the MLPs use QuickGELU (OpenAI weights need it).
    """

    def __init__(
        self,
        visual: CLIPVision | None,
        text: CLIPText | None,
        *,
        name: str,
        pretrained: str,
        quick_gelu: bool,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.name = name
        self.pretrained = pretrained
        self.quick_gelu = quick_gelu

    def train(self, mode: bool = True) -> CLIPBackbone:
        return super().train(False)

    def identity(self) -> dict[str, Any]:
        """Name, weight source, activation, input size and the vision switches.

        A checkpoint refuses to load onto another backbone; the positional resize and the global ``ln_post`` change
        every feature, so a vision tower's identity holds them too (text-only towers have neither).
        """
        if self.visual is not None:
            return self.visual.identity()
        return {
            "kind": "clip",
            "name": self.name,
            "pretrained": self.pretrained,
            "quick_gelu": self.quick_gelu,
            "image_size": None,
        }


def build_clip(
    name: str,
    pretrained: str = "none",
    *,
    vision: bool = True,
    text: bool = True,
    force_quick_gelu: bool | None = None,
    image_size: int = 518,
    config_key: str = DEFAULT_KEY,
    cache_dir: str | None = None,
    pos_interp: str = "bilinear",
    global_ln_post: bool = False,
) -> CLIPBackbone:
    """Build frozen CLIP towers from an open_clip model config and resolve their weights.

    Args:
        name: open_clip model name (the paper: ``ViT-L-14-336-quickgelu``), ``tiny`` (test/CPU preset,
            :data:`TINY_CONFIG`) or ``toy`` (the architecture of ``zsad pretrain``'s toy weights, :data:`TOY_CONFIG`).
        pretrained: ``none`` (random weights, same architecture); an open_clip tag such as ``openai``, taken from
            the Hugging Face / open_clip cache (downloaded only when not offline); or a local file: an open_clip
            state dict (``.bin``/``.pt``/``.safetensors``, optionally under ``state_dict``) or OpenAI's original
            TorchScript / state-dict ``.pt``.
        vision, text: which towers to build (the other is never instantiated).
        force_quick_gelu: ``None`` follows the config and the tag (an OpenAI tag on a GELU config forces QuickGELU
            with a warning); ``True``/``False`` overrides both (``False`` reproduces the GELU-with-OpenAI-weights
            bug some reference code has).
        image_size: default input side of the vision tower (multiple of the patch size).
        config_key: config key named in weight errors.
        cache_dir: open_clip / Hugging Face cache folder for tags (default: the libraries' defaults).
        pos_interp: resize of the native positional grid to other input sizes: ``bilinear`` (AnomalyCLIP, MRAD)
            or ``bicubic`` (ablation).
        global_ln_post: ``False`` (AnomalyCLIP, MRAD): the global embedding is ``x_ori[CLS] @ proj``; ``True``:
            ``ln_post(x_ori[CLS]) @ proj`` as open_clip's ``encode_image`` does (ablation).

    Raises:
        WeightsError: the weights cannot be found, read or do not fit the architecture.
        ValueError: unknown model name or unsupported architecture.
    """
    if not (vision or text):
        raise ValueError("build_clip: ask for at least one tower (vision and/or text)")
    prefix = config_key.rsplit(".", 1)[0]
    if pos_interp not in POS_INTERP:
        raise ValueError(f"{prefix}.pos_interp: {pos_interp!r}; expected one of {list(POS_INTERP)}")
    if not isinstance(global_ln_post, bool):
        raise ValueError(f"{prefix}.global_ln_post: expected true or false, got {global_ln_post!r}")
    cfg = _model_config(name, config_key)
    source, tag_cfg, weights_path = weights.resolve(
        name, pretrained, presets=set(PRESETS), config_key=config_key, cache_dir=cache_dir
    )
    quick_gelu = _decide_quick_gelu(name, cfg, tag_cfg, source.value, force_quick_gelu)
    if cfg["vision_cfg"].get("timm_model_name") or not isinstance(cfg["vision_cfg"].get("layers", 12), int):
        raise ValueError(f"{name}: only CLIP ViT towers are supported (no timm/ResNet vision towers)")
    if cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"{name}: only CLIP text transformers are supported (no Hugging Face text towers)")
    vit = _vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu) if vision else None
    txt = _text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu) if text else None
    if weights_path is not None:
        weights.load_weights(weights_path, vit, txt, name, config_key)
    ident = {"name": name, "pretrained": source.value, "quick_gelu": quick_gelu}
    visual = None
    if vit is not None:
        visual = CLIPVision(
            vit,
            image_size=image_size,
            mean=tag_cfg.get("mean", CLIP_MEAN),
            std=tag_cfg.get("std", CLIP_STD),
            pos_interp=pos_interp,
            global_ln_post=global_ln_post,
            source=ident,
        )
    return CLIPBackbone(visual, CLIPText(txt) if txt is not None else None, **ident)


def _model_config(name: str, config_key: str) -> dict[str, Any]:
    if name in PRESETS:
        return deepcopy(PRESETS[name])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        name_key = config_key.rsplit(".", 1)[0] + ".name"
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
        raise ValueError(
            f"unknown open_clip model {name!r} ({name_key}); expected one of {sorted(PRESETS)} or: {vits}"
        )
    return cfg


def _decide_quick_gelu(
    name: str, cfg: dict[str, Any], tag_cfg: dict[str, Any], source: str, force: bool | None
) -> bool:
    """QuickGELU if forced, else if the config says so, else if the tag's weights were trained with it (warned)."""
    from_cfg = bool(cfg.get("quick_gelu", False))
    from_tag = bool(tag_cfg.get("quick_gelu", False))
    if force is not None:
        if tag_cfg and bool(force) != from_tag:
            warnings.warn(
                f"CLIP {name}: force_quick_gelu={force} but tag {source!r} was trained with "
                f"quick_gelu={from_tag}; the activations will not match the weights",
                UserWarning,
                stacklevel=3,
            )
        return bool(force)
    if from_tag and not from_cfg:
        warnings.warn(
            f"CLIP {name} with tag {source!r}: the weights were trained with QuickGELU but the config uses GELU; "
            f"forcing QuickGELU (use '{name}-quickgelu' to silence this)",
            UserWarning,
            stacklevel=3,
        )
        return True
    return from_cfg


def _block_args(cfg: Any, quick_gelu: bool) -> dict[str, Any]:
    """The block arguments both towers take, with the activation and norm open_clip's builder picks for float32."""
    act_layer: Any = QuickGELU if quick_gelu else nn.GELU
    norm_layer: Any = LayerNorm
    if cfg.norm_kwargs:
        norm_layer = partial(norm_layer, **cfg.norm_kwargs)
    if cfg.act_kwargs is not None:
        act_layer = partial(act_layer, **cfg.act_kwargs)
    names = ("mlp_ratio", "ls_init_value", "output_tokens", "block_type", "qk_norm", "scaled_cosine_attn")
    names += ("scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    return {"act_layer": act_layer, "norm_layer": norm_layer, **{n: getattr(cfg, n) for n in names}}


# The towers are open_clip's public transformer classes, built from the public config dataclasses with the
# arguments open_clip's own (private) ``_build_vision_tower`` / ``_build_text_tower`` pass for a plain CLIP ViT and
# text transformer (float32; timm, ResNet and Hugging Face towers are refused before): same modules, same parameter
# keys, same initialisation order. ``open_clip.create_model`` would build both towers and the logit scale.
def _vision_tower(embed_dim: int, vision_cfg: dict[str, Any], quick_gelu: bool) -> VisionTransformer:
    c = open_clip.CLIPVisionCfg(**vision_cfg)
    return VisionTransformer(
        image_size=c.image_size,
        patch_size=c.patch_size,
        width=c.width,
        layers=c.layers,
        heads=c.width // c.head_width,
        patch_dropout=c.patch_dropout,
        attentional_pool=c.attentional_pool,
        attn_pooler_queries=c.attn_pooler_queries,
        attn_pooler_heads=c.attn_pooler_heads,
        pos_embed_type=c.pos_embed_type,
        no_ln_pre=c.no_ln_pre,
        final_ln_after_pool=c.final_ln_after_pool,
        pool_type=c.pool_type,
        output_dim=embed_dim,
        **_block_args(c, quick_gelu),
    )


def _text_tower(embed_dim: int, text_cfg: dict[str, Any], quick_gelu: bool) -> TextTransformer:
    c = open_clip.CLIPTextCfg(**text_cfg)
    return TextTransformer(
        context_length=c.context_length,
        vocab_size=c.vocab_size,
        width=c.width,
        heads=c.heads,
        layers=c.layers,
        output_dim=embed_dim,
        embed_cls=c.embed_cls,
        no_causal_mask=c.no_causal_mask,
        pad_id=c.pad_id,
        eos_id=c.eos_id,
        pool_type=c.pool_type,
        proj_type=c.proj_type,
        proj_bias=c.proj_bias,
        **_block_args(c, quick_gelu),
    )
