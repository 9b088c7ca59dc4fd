"""Frozen CLIP towers (open_clip weights, own forward) with the DPAM V-V dual path and deep text prompts.

``build_clip(name, pretrained)`` resolves the weights (an open_clip tag such as ``openai``, a local open_clip or
OpenAI checkpoint file, or ``none`` for random weights), builds only the towers asked for and returns a
:class:`CLIPBackbone` holding a :class:`CLIPVision` (a :class:`zsad.backbones.base.Backbone`) and/or a
:class:`CLIPText`. By concern:

* :mod:`.attention`: the attention paths of open_clip's blocks (packed q/k/v, V-V dual path, probabilities);
* :mod:`.vision`: the vision tower's forward (taps, DPAM, positional resize);
* :mod:`.text`: the text tower's forward with deep prompts, and the tokeniser;
* :mod:`.weights`: open_clip tags and the split of a CLIP state dict into towers (the none | tag | file decision
  is :mod:`zsad.backbones.weights`, shared with DINOv3);
* :mod:`.model`: presets, the QuickGELU decision, the towers and ``build_clip``.
"""

from __future__ import annotations

from zsad.backbones.clip.attention import _attention_probs, _check_block, _mlp_residual, _out_proj, _qkv
from zsad.backbones.clip.model import (
    DEFAULT_KEY,
    PRESETS,
    TINY_CONFIG,
    TOY_CONFIG,
    CLIPBackbone,
    _decide_quick_gelu,
    _model_config,
    build_clip,
)
from zsad.backbones.clip.text import CLIPText, _tokenizer
from zsad.backbones.clip.vision import ATTN_REDUCE, POS_INTERP, CLIPVision, VVMlp
from zsad.backbones.errors import WeightsError

__all__ = [
    "ATTN_REDUCE",
    "CLIPBackbone",
    "CLIPText",
    "CLIPVision",
    "DEFAULT_KEY",
    "POS_INTERP",
    "PRESETS",
    "TINY_CONFIG",
    "TOY_CONFIG",
    "VVMlp",
    "WeightsError",
    "_attention_probs",
    "_check_block",
    "_decide_quick_gelu",
    "_mlp_residual",
    "_model_config",
    "_out_proj",
    "_qkv",
    "_tokenizer",
    "build_clip",
]
