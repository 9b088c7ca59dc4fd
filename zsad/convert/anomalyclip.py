"""Official AnomalyCLIP prompt-learner checkpoints (zqhang/AnomalyCLIP) ↔ zsad's AnomalyCLIP trainable state.

The official ``train.py`` saves ``{"prompt_learner": AnomalyCLIP_PromptLearner.state_dict()}`` as
``epoch_N.pth``. The mapping, written out:

=================================== ============================== ==========================================
official                            shape                          zsad (``AnomalyCLIP`` trainable state)
=================================== ============================== ==========================================
``ctx_pos``                         [1, 1, n_ctx, W]               ``prompts.ctx[0, 0]`` (normal prompt)
``ctx_neg``                         [1, 1, n_ctx, W]               ``prompts.ctx[0, 1]`` (anomalous prompt)
``compound_prompts_text.{i}``       [deep_len, W], i < depth − 1   ``prompts.deep[i]`` (text block i + 1)
``compound_prompt_projections.*``   Linear W → 896                 dropped: the forward never uses them
``token_prefix_*``, ``token_suffix_*``, ``tokenized_prompts_*``    dropped: tokenizer / ``token_embedding``
                                                                   buffers, rebuilt by zsad from the frozen tower
=================================== ============================== ==========================================

(The official ``[n_cls, n_templates]`` leading dimensions are 1 × 1 for its single class name ``object`` and
single template per state.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zsad.convert import ConversionError, check_keys, method_node

WRAPPER = "prompt_learner"  # train.py: torch.save({"prompt_learner": prompt_learner.state_dict()}, ...)
CTX = ("ctx_pos", "ctx_neg")  # (normal, anomalous) = zsad's ctx index 0, 1
DEEP = "compound_prompts_text"
# Official entries that exist in the file but carry nothing zsad needs (see the module docstring).
DROPPED_PREFIXES = ("compound_prompt_projections.",)
DROPPED_KEYS = frozenset(
    f"{kind}_{side}"
    for kind in ("token_prefix", "token_suffix", "tokenized_prompts")
    for side in ("pos", "neg")
)


def _dropped(key: str) -> bool:
    return key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES)


def official_names(cfg: Any) -> list[str]:  # noqa: ANN401 - run config or method node
    """The official keys the mapping reads, for the configured ``n_ctx`` / ``deep_depth``."""
    m = method_node(cfg)
    n_deep = int(m.deep_depth) - 1 if int(m.deep_len) > 0 else 0
    return [*CTX, *(f"{DEEP}.{i}" for i in range(max(0, n_deep)))]


def read_official(path: str | Path) -> dict[str, Tensor]:
    """The prompt learner's state dict from an official ``epoch_N.pth`` (or an unwrapped state dict file)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"official AnomalyCLIP checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing here
        raise ConversionError(f"{path}: cannot read the official checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and WRAPPER in obj:
        obj = obj[WRAPPER]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path}: expected {{'{WRAPPER}': state_dict}} as the official train.py saves it, or that state dict"
        )
    return dict(obj)


def to_zsad(official: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:  # noqa: ANN401
    """Official prompt-learner tensors → ``{"prompts.ctx": [1, 2, n_ctx, W], "prompts.deep": [K, deep_len, W]}``.

    Values are copied bit for bit (same dtype). ``prompts.deep`` is absent when the config has no deep prompts.
    """
    m = method_node(cfg)
    names = official_names(m)
    check_keys(official, names, _dropped, "official AnomalyCLIP prompt learner")
    n_ctx = int(m.n_ctx)
    ctx = []
    for name in CTX:
        t = official[name]
        if t.dim() != 4 or tuple(t.shape[:3]) != (1, 1, n_ctx):
            raise ConversionError(
                f"official {name}: expected [1, 1, n_ctx={n_ctx}, width] (method.n_ctx), got {list(t.shape)}"
            )
        ctx.append(t[0, 0])
    width = ctx[0].shape[-1]
    out = {"prompts.ctx": torch.stack(ctx)[None].clone()}
    deep_names = names[len(CTX) :]
    if deep_names:
        shape = (int(m.deep_len), width)
        bad = [f"{k} {list(official[k].shape)}" for k in deep_names if tuple(official[k].shape) != shape]
        if bad:
            raise ConversionError(
                f"official {DEEP}: expected [deep_len={shape[0]}, width={width}] (method.deep_len), got {bad}"
            )
        out["prompts.deep"] = torch.stack([official[k] for k in deep_names]).clone()
    return out


def to_official(zsad_state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:  # noqa: ANN401
    """zsad trainable state → the official prompt learner's trainable entries (bitwise inverse of ``to_zsad``).

    The dropped entries (unused projections, tokenizer buffers) are not re-created: the official code rebuilds the
    buffers itself, and ``load_state_dict(..., strict=False)`` leaves its projections at their initialisation.
    """
    m = method_node(cfg)
    names = official_names(m)
    expected = ["prompts.ctx"] + (["prompts.deep"] if len(names) > len(CTX) else [])
    check_keys(zsad_state, expected, lambda k: False, "zsad AnomalyCLIP trainable state")
    ctx = zsad_state["prompts.ctx"]
    if ctx.dim() != 4 or tuple(ctx.shape[:3]) != (1, 2, int(m.n_ctx)):
        raise ConversionError(
            f"prompts.ctx: expected [1, 2, n_ctx={int(m.n_ctx)}, width] (one prompt set), got {list(ctx.shape)}"
        )
    out = {name: ctx[0, i][None, None].clone() for i, name in enumerate(CTX)}
    deep_names = names[len(CTX) :]
    if deep_names:
        deep = zsad_state["prompts.deep"]
        if deep.shape[0] != len(deep_names):
            raise ConversionError(
                f"prompts.deep: {deep.shape[0]} layers, the config has {len(deep_names)} (method.deep_depth − 1)"
            )
        out.update({name: deep[i].clone() for i, name in enumerate(deep_names)})
    return out


__all__ = ["official_names", "read_official", "to_official", "to_zsad"]
