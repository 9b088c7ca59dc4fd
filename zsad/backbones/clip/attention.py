"""Attention paths of open_clip's ``ResidualAttentionBlock`` (batch-first packed ``nn.MultiheadAttention``), shared
by both CLIP towers: the packed q/k/v, the out-projection, the MLP residual, float32 probabilities and the DPAM
dual path (original ``softmax(qkᵀ)v`` and V-V ``softmax(vvᵀ)v`` of one block in one SDPA call).

Every attention that is not asked for as probabilities runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_block(block: nn.Module, where: str) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or not attn.batch_first:
        raise ValueError(
            f"{where}: expected open_clip ResidualAttentionBlocks with a batch-first packed nn.MultiheadAttention "
            f"(plain CLIP ViT), got {type(attn).__name__}"
        )


def _qkv(block: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as [B, heads, T, head_dim] from the block's packed in-projection."""
    attn: nn.MultiheadAttention = block.attn
    b, t, w = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(b, t, 3, attn.num_heads, w // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _out_proj(block: nn.Module, o: Tensor) -> Tensor:
    """Merge heads of [B, heads, T, head_dim] and apply the block's out-projection and layer scale."""
    b, nh, t, d = o.shape
    o = o.transpose(1, 2).reshape(b, t, nh * d)
    return block.ls_1(block.attn.out_proj(o))


def _mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """Softmax probabilities [B, h, T, T] in float32 (entropies of bf16 probabilities are too coarse).

    The scores too are a float32 matmul whatever the autocast: bf16 rounds a logit of 20 to steps of 0.125.
    Only the tapped blocks materialise probabilities, so this costs little.
    """
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
        return torch.softmax(scores, dim=-1)


def dual_attention(
    block: nn.Module, h: Tensor, *, dual: bool, want_probs: bool, reduce: str = "none", head_chunk: int = 4
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Original-path and (if ``dual``) V-V attention outputs of one block, after out-projection.

    Both paths share the LN1 input and the packed in-projection; without probabilities they run as one
    SDPA call over the stacked batch [q; v] · [k; v] → [v; v]. With ``reduce="mean_heads"`` the
    probabilities are built ``head_chunk`` heads at a time and only their head mean [B, T, T] is kept.
    """
    q, k, v = _qkv(block, h)
    b = h.shape[0]
    probs = None
    if want_probs:
        if reduce == "mean_heads":
            o, probs = attention_head_mean(q, k, v, head_chunk)
        else:
            probs = _attention_probs(q, k)
            o = probs.to(v.dtype) @ v
        if dual:
            o = torch.cat([o, F.scaled_dot_product_attention(v, v, v)])
    elif dual:
        o = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
    else:
        o = F.scaled_dot_product_attention(q, k, v)
    o = _out_proj(block, o)
    return o[:b], (o[b:] if dual else None), probs


def attention_head_mean(q: Tensor, k: Tensor, v: Tensor, head_chunk: int) -> tuple[Tensor, Tensor]:
    """Attention output [B, heads, T, d] and head-mean probabilities [B, T, T] (float32), in head chunks.

    Peak extra memory is one chunk of ``head_chunk`` heads' probabilities plus the running sum, instead of
    all heads (at 518², B=8, 16 heads: ~0.25 GB per chunk of 4 instead of ~0.96 GB per tap, kept per tap).
    """
    heads = q.shape[1]
    total: Tensor | None = None
    outs = []
    for a in range(0, heads, head_chunk):
        p = _attention_probs(q[:, a : a + head_chunk], k[:, a : a + head_chunk])
        outs.append(p.to(v.dtype) @ v[:, a : a + head_chunk])
        part = p.sum(1)
        total = part if total is None else total.add_(part)
    return torch.cat(outs, dim=1), total.div_(heads)
