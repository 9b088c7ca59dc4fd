"""Frozen CLIP towers (open_clip weights, own forward) with the DPAM V-V dual path and deep text prompts.

``build_clip(name, pretrained)`` resolves the weights (an open_clip tag such as ``openai``, a local open_clip or
OpenAI checkpoint file, or ``none`` for random weights), builds only the towers asked for and returns a
:class:`CLIPBackbone` holding a :class:`CLIPVision` and/or a :class:`CLIPText`. The forwards are written here on top
of open_clip's modules (weights, LayerNorms, MLPs) so that the V-V path, attention taps and deep prompts need no
hooks; every attention that is not asked for as probabilities runs through ``scaled_dot_product_attention``.

Two defaults follow the reference codes (AnomalyCLIP, MRAD) and are switches of ``build_clip``: the native 24×24
positional grid is resized **bilinearly** to other input sizes (``pos_interp``), and the global image embedding is
the original path's CLS ``@ proj`` **without** ``ln_post`` (``global_ln_post``).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn

from zsad.backbones.base import VisionFeatures
from zsad.backbones.errors import WeightsError

log = logging.getLogger(__name__)

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

# Keys of a full CLIP state dict that belong to neither tower (attn_mask: a buffer TorchScript archives keep).
_SHARED_KEYS = {"logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size", "attn_mask"}

VVMlp = Callable[[int, nn.Module, Tensor], "Tensor | None"]
ATTN_REDUCE = ("none", "mean_heads")
# Resize of the native positional grid to another input size. AnomalyCLIP and MRAD use bilinear (align_corners
# False, no antialias); bicubic is kept as an ablation (it moves every tap by ~3.5 % at 24×24 → 37×37).
POS_INTERP = ("bilinear", "bicubic")


# --------------------------------------------------------------------------------------------------------------
# Attention helpers shared by both towers (open_clip ResidualAttentionBlock: batch-first nn.MultiheadAttention)
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------------------


class CLIPVision(nn.Module):
    """Frozen CLIP ViT with the DPAM V-V dual path, tapped patch tokens and optional attention probabilities.

    Attributes:
        vit: the open_clip ``VisionTransformer`` (frozen, eval mode; its state dict keys are open_clip's ``visual.*``).
        image_size: default input side (518 for the paper); any multiple of ``patch_size`` works at run time.
        patch_size: patch side (14 for ViT-L/14).
        grid: (gh, gw) patch grid of ``image_size``.
        native_grid: grid the positional embedding was trained at (24×24 for @336).
        width: token width (1024 for ViT-L).
        embed_dim: joint image-text dimension (768 for ViT-L/14).
        heads: attention heads per block.
        n_blocks: number of transformer blocks.
        mean, std: CLIP's input normalisation.
        pos_interp: ``bilinear`` (the reference codes) or ``bicubic``: how the native positional grid is resized.
        global_ln_post: whether the global embedding goes through ``ln_post`` before ``proj`` (the reference codes
            do not: ``x_ori[CLS] @ proj``; only tapped patch tokens go through ``ln_post``).
        head_chunk: heads per chunk when attention probabilities are head-averaged (``attn_reduce``).
    """

    head_chunk: int = 4

    def __init__(
        self,
        vit: VisionTransformer,
        image_size: int = 518,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
        *,
        pos_interp: str = "bilinear",
        global_ln_post: bool = False,
    ) -> None:
        super().__init__()
        if pos_interp not in POS_INTERP:
            raise ValueError(f"CLIP pos_interp must be one of {POS_INTERP}, got {pos_interp!r}")
        if getattr(vit, "attn_pool", None) is not None or vit.pool_type != "tok" or vit.proj is None:
            raise ValueError(
                "CLIPVision supports CLIP ViTs with CLS-token pooling and a projection (no attn pool)"
            )
        for block in vit.transformer.resblocks:
            _check_block(block, "CLIPVision")
        self.vit = vit
        self.patch_size = int(vit.patch_size[0])
        if image_size % self.patch_size:
            raise ValueError(
                f"CLIP input size must be a multiple of the patch size {self.patch_size}, got {image_size} "
                "(set method.image_size)"
            )
        self.image_size = int(image_size)
        self.native_grid = (int(vit.grid_size[0]), int(vit.grid_size[1]))
        self.width = int(vit.transformer.width)
        self.embed_dim = int(vit.proj.shape[1])
        self.heads = int(vit.transformer.resblocks[0].attn.num_heads)
        self.n_blocks = len(vit.transformer.resblocks)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pos_interp = pos_interp
        self.global_ln_post = bool(global_ln_post)
        self._pos_cache: dict[tuple, Tensor] = {}
        vit.requires_grad_(False)
        vit.eval()

    @property
    def blocks(self) -> nn.ModuleList:
        """The open_clip ``ResidualAttentionBlock``s (``ln_1``, ``attn``, ``ln_2``, ``mlp``)."""
        return self.vit.transformer.resblocks

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def train(self, mode: bool = True) -> CLIPVision:
        # Frozen is frozen: stays in eval mode whatever the caller asks.
        return super().train(False)

    def pos_embed(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """[1 + gh*gw, width] positional embedding for ``grid``, resized from the native grid once.

        The patch rows are resized with ``pos_interp`` (``align_corners=False``, no antialias, as
        ``F.interpolate`` does by default in the reference codes); the CLS row is kept.

        Cached per (grid, device, dtype); the cache key also holds the parameter's version counter so that
        reloading weights in place invalidates it.
        """
        param = self.vit.positional_embedding
        key = (grid, device, dtype, param._version)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        # Built outside inference mode so that a cache filled during a test loop is usable in training.
        with torch.inference_mode(False), torch.no_grad():
            pos = param.detach().float()
            if grid != self.native_grid:
                cls, patches = pos[:1], pos[1:]
                gh0, gw0 = self.native_grid
                patches = patches.reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
                patches = F.interpolate(patches, size=grid, mode=self.pos_interp, align_corners=False)
                patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
                pos = torch.cat([cls, patches])
            cached = pos.to(device=device, dtype=dtype).clone()
        self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[3] == param._version}
        self._pos_cache[key] = cached
        return cached

    def _grid_of(self, images: Tensor) -> tuple[int, int]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPVision expects images [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"CLIP input size must be a multiple of the patch size {self.patch_size}, got {h}x{w} "
                "(set method.image_size)"
            )
        return h // self.patch_size, w // self.patch_size

    def _embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.vit.conv1(images).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.vit.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid, x.device, x.dtype)
        return self.vit.ln_pre(x)

    def _check_args(self, taps: Sequence[int], dpam_start: int | None, vv_mlp: VVMlp | None) -> list[int]:
        taps = [int(t) for t in taps]
        if not taps or any(not 1 <= t <= self.n_blocks for t in taps):
            raise ValueError(f"CLIP taps must be 1-based block indices in 1..{self.n_blocks}, got {taps}")
        if dpam_start is not None and not 1 <= dpam_start <= self.n_blocks:
            raise ValueError(f"CLIP dpam_start must be None or in 1..{self.n_blocks}, got {dpam_start}")
        if vv_mlp is not None and dpam_start is None:
            raise ValueError("vv_mlp needs the V-V path: set dpam_start")
        return taps

    def _attention(
        self, block: nn.Module, h: Tensor, *, dual: bool, want_probs: bool, reduce: str = "none"
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Original-path and (if ``dual``) V-V attention outputs of one block, after out-projection.

        Both paths share the LN1 input and the packed in-projection; without probabilities they run as one
        SDPA call over the stacked batch [q; v] · [k; v] → [v; v]. With ``reduce="mean_heads"`` the
        probabilities are built a few heads at a time and only their head mean [B, T, T] is kept.
        """
        q, k, v = _qkv(block, h)
        b = h.shape[0]
        probs = None
        if want_probs:
            if reduce == "mean_heads":
                o, probs = self._attention_head_mean(q, k, v)
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

    def _attention_head_mean(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Attention output [B, heads, T, d] and head-mean probabilities [B, T, T] (float32), in head chunks.

        Peak extra memory is one chunk of ``head_chunk`` heads' probabilities plus the running sum, instead of
        all heads (at 518², B=8, 16 heads: ~0.25 GB per chunk of 4 instead of ~0.96 GB per tap, kept per tap).
        """
        heads = q.shape[1]
        total: Tensor | None = None
        outs = []
        for a in range(0, heads, self.head_chunk):
            p = _attention_probs(q[:, a : a + self.head_chunk], k[:, a : a + self.head_chunk])
            outs.append(p.to(v.dtype) @ v[:, a : a + self.head_chunk])
            part = p.sum(1)
            total = part if total is None else total.add_(part)
        return torch.cat(outs, dim=1), total.div_(heads)

    def forward(
        self,
        images: Tensor,
        *,
        taps: Sequence[int] = (6, 12, 18, 24),
        dpam_start: int | None = 6,
        attn_taps: bool = False,
        pre_proj: bool = False,
        vv_mlp: VVMlp | None = None,
        attn_reduce: str = "none",
    ) -> VisionFeatures:
        """Tapped patch tokens (V-V path from ``dpam_start`` on) and the global embedding (original path).

        Args:
            images: [B, 3, H, W] CLIP-normalised, H and W multiples of ``patch_size``.
            taps: 1-based block indices; the output lists follow this order.
            dpam_start: first block (1-based) that runs the V-V path; ``None`` is plain CLIP (taps read the
                original path). Before ``dpam_start`` the V-V path equals the original path.
            attn_taps: also return the original-path attention probabilities [B, heads, 1+N, 1+N] (float32) of
                the tapped blocks (materialised only there).
            attn_reduce: ``"none"`` keeps every head's probabilities; ``"mean_heads"`` returns their mean over heads
                [B, 1+N, 1+N] (float32) instead, computed ``head_chunk`` heads at a time so that the full
                [B, heads, 1+N, 1+N] tensor never exists (EntroAD needs only the head mean).
            pre_proj: also return the tapped V-V tokens after ``ln_post``, before ``proj`` ([B, N, width]).
            vv_mlp: ``vv_mlp(block_idx_1based, block, x)`` called at every V-V block (dpam_start .. max tap) with
                the V-V tokens x [B, 1+N, width] after that block's V-V attention; it returns a residual delta
                (same shape) added to the V-V path, or ``None`` for no change. It runs in the ambient grad mode.

        Returns:
            ``VisionFeatures`` with ``patch_tokens`` (L2-normalised [B, N, embed_dim] per tap), ``grid``,
            ``global_embedding`` ([B, embed_dim], the original path's CLS ``@ proj`` — through ``ln_post`` first only
            when ``global_ln_post`` — not normalised) and, when asked, ``pre_proj_tokens`` and ``attentions``.
        """
        taps = self._check_args(taps, dpam_start, vv_mlp)
        if attn_reduce not in ATTN_REDUCE:
            raise ValueError(f"CLIPVision attn_reduce must be one of {ATTN_REDUCE}, got {attn_reduce!r}")
        grid = self._grid_of(images)
        tap_set, last_vv = set(taps), max(taps)
        tapped: dict[int, Tensor] = {}
        attentions: dict[int, Tensor] = {}
        with torch.no_grad():
            x_ori = self._embed(images, grid)
        x_vv: Tensor | None = None
        for i, block in enumerate(self.blocks, start=1):
            dual = dpam_start is not None and dpam_start <= i <= last_vv
            want_probs = attn_taps and i in tap_set
            # The original path never needs a gradient (frozen weights); nor does the V-V attention, which reads
            # x_ori only. Only vv_mlp's delta below carries a graph.
            with torch.no_grad():
                o_ori, o_vv, probs = self._attention(
                    block, block.ln_1(x_ori), dual=dual, want_probs=want_probs, reduce=attn_reduce
                )
                x_next = _mlp_residual(block, x_ori + o_ori)
            if dual:
                x_vv = (x_ori if x_vv is None else x_vv) + o_vv
                if vv_mlp is not None:
                    delta = vv_mlp(i, block, x_vv)
                    if delta is not None:
                        x_vv = x_vv + delta
            x_ori = x_next
            if i in tap_set:
                tapped[i] = x_vv if dual else x_ori
            if want_probs:
                attentions[i] = probs
        vit = self.vit
        with torch.no_grad():
            cls = x_ori[:, 0]
            global_embedding = (vit.ln_post(cls) if self.global_ln_post else cls) @ vit.proj
        patch_tokens, pre_tokens = [], []
        for t in taps:
            z = vit.ln_post(tapped[t][:, 1:])
            pre_tokens.append(z)
            patch_tokens.append(F.normalize(z @ vit.proj, dim=-1))
        return VisionFeatures(
            patch_tokens=patch_tokens,
            grid=grid,
            global_embedding=global_embedding,
            pre_proj_tokens=pre_tokens if pre_proj else None,
            attentions=[attentions[t] for t in taps] if attn_taps else None,
        )


# --------------------------------------------------------------------------------------------------------------
# Text tower
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class CLIPText(nn.Module):
    """Frozen CLIP text transformer: tokenisation, token embeddings and encoding with deep prompts.

    Attributes:
        tower: the open_clip ``TextTransformer`` (frozen, eval mode).
        width: token width (768 for ViT-L/14's text tower).
        embed_dim: joint dimension (768).
        context_length: 77.
        n_layers: number of text blocks (12).
        heads: attention heads per block.
    """

    def __init__(self, tower: TextTransformer) -> None:
        super().__init__()
        if tower.cls_emb is not None or tower.pool_type != "argmax" or tower.attn_mask is None:
            raise ValueError("CLIPText supports causal CLIP text towers with EOT (argmax) pooling")
        if tower.text_projection is None:
            raise ValueError("CLIPText needs a text projection")
        for block in tower.transformer.resblocks:
            _check_block(block, "CLIPText")
        self.tower = tower
        self.width = int(tower.width)
        self.embed_dim = int(tower.output_dim)
        self.context_length = int(tower.context_length)
        self.n_layers = len(tower.transformer.resblocks)
        self.heads = int(tower.heads)
        tower.requires_grad_(False)
        tower.eval()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.transformer.resblocks

    def train(self, mode: bool = True) -> CLIPText:
        return super().train(False)

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """LongTensor [P, context_length] of CLIP BPE ids (SOS … EOT, zero-padded) on the tower's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = _tokenizer(self.context_length)(texts)
        return tokens.to(self.tower.token_embedding.weight.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """[P, L, width] word embeddings (no positional embedding)."""
        return self.tower.token_embedding(tokens)

    def encode(self, tokens: Tensor) -> Tensor:
        """[P, embed_dim] L2-normalised text features of token ids [P, L] (EOT = the largest id)."""
        return self.encode_embeddings(self.token_embedding(tokens), tokens.argmax(dim=-1))

    def encode_embeddings(
        self, embeds: Tensor, eot_index: Tensor, deep_prompts: Tensor | None = None
    ) -> Tensor:
        """[P, embed_dim] L2-normalised features of prompt embeddings, with optional deep prompts.

        Args:
            embeds: [P, L, width] token embeddings (learnable context already placed), L ≤ context_length.
            eot_index: [P] position of the EOT token of each prompt.
            deep_prompts: [K, n_deep, width] shared or [P, K, n_deep, width] per prompt, K < n_layers. As in
                AnomalyCLIP, layer 0 reads ``embeds`` as given and, before text layer j = 1..K (0-based), the
                n_deep tokens at positions 1..n_deep (right after SOS) are replaced by ``deep_prompts[j - 1]``
                (so AnomalyCLIP's "depth 9" is K = 8). The causal mask is kept.

        Gradients flow into ``embeds`` and ``deep_prompts``; the tower's weights are frozen.
        """
        p, length, width = embeds.shape
        if length > self.context_length or width != self.width:
            raise ValueError(
                f"text embeddings must be [P, L<={self.context_length}, {self.width}], got {tuple(embeds.shape)}"
            )
        deep = self._check_deep(deep_prompts, p)
        x = embeds + self.tower.positional_embedding[:length].to(embeds.dtype)
        for j, block in enumerate(self.blocks):
            if deep is not None and 1 <= j <= deep.shape[-3]:
                tokens = deep[..., j - 1, :, :].to(x.dtype)
                tokens = tokens.expand(p, -1, -1) if tokens.dim() == 2 else tokens
                x = torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)
            q, k, v = _qkv(block, block.ln_1(x))
            x = x + _out_proj(block, F.scaled_dot_product_attention(q, k, v, is_causal=True))
            x = _mlp_residual(block, x)
        pooled = self.tower.ln_final(x[torch.arange(p, device=x.device), eot_index.to(x.device)])
        proj = self.tower.text_projection
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return F.normalize(pooled, dim=-1)

    def _check_deep(self, deep: Tensor | None, p: int) -> Tensor | None:
        if deep is None or deep.numel() == 0:
            return None
        ok = deep.dim() == 3 or (deep.dim() == 4 and deep.shape[0] == p)
        if not ok or deep.shape[-1] != self.width or deep.shape[-3] >= self.n_layers:
            raise ValueError(
                f"deep_prompts must be [K, n_deep, {self.width}] or [P={p}, K, n_deep, {self.width}] with "
                f"K < {self.n_layers} text layers, got {tuple(deep.shape)}"
            )
        return deep


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
        ident: dict[str, Any] = {
            "kind": "clip",
            "name": self.name,
            "pretrained": self.pretrained,
            "quick_gelu": self.quick_gelu,
            "image_size": self.visual.image_size if self.visual is not None else None,
        }
        if self.visual is not None:
            ident["pos_interp"] = self.visual.pos_interp
            ident["global_ln_post"] = self.visual.global_ln_post
        return ident


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
    source = str(pretrained).strip()
    tag_cfg = (
        {} if source.lower() == "none" or name in PRESETS else open_clip.get_pretrained_cfg(name, source)
    )
    weights_path = (
        None if source.lower() == "none" else _resolve_weights(name, source, tag_cfg, config_key, cache_dir)
    )
    quick_gelu = _decide_quick_gelu(name, cfg, tag_cfg, source, force_quick_gelu)
    if cfg["vision_cfg"].get("timm_model_name") or not isinstance(cfg["vision_cfg"].get("layers", 12), int):
        raise ValueError(f"{name}: only CLIP ViT towers are supported (no timm/ResNet vision towers)")
    if cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"{name}: only CLIP text transformers are supported (no Hugging Face text towers)")
    vit = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu) if vision else None
    txt = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu) if text else None
    if weights_path is not None:
        _load_weights(weights_path, vit, txt, name, config_key)
    mean = tag_cfg.get("mean", OPENAI_DATASET_MEAN)
    std = tag_cfg.get("std", OPENAI_DATASET_STD)
    return CLIPBackbone(
        CLIPVision(
            vit,
            image_size=image_size,
            mean=mean,
            std=std,
            pos_interp=pos_interp,
            global_ln_post=global_ln_post,
        )
        if vit is not None
        else None,
        CLIPText(txt) if txt is not None else None,
        name=name,
        pretrained=source,
        quick_gelu=quick_gelu,
    )


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


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def _resolve_weights(
    name: str, source: str, tag_cfg: dict[str, Any], config_key: str, cache_dir: str | None
) -> Path:
    if tag_cfg and not _looks_like_path(source):
        return _resolve_tag(name, source, tag_cfg, config_key, cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if _looks_like_path(source) or path.exists():
        raise WeightsError(
            f"{config_key}: CLIP weight file not found: '{source}'; set it to an existing .pt/.bin/.safetensors "
            "file, an open_clip tag, or 'none'"
        )
    tags = [] if name in PRESETS else open_clip.list_pretrained_tags_by_model(name)
    raise WeightsError(
        f"{config_key}: {source!r} is neither a known open_clip tag for {name} (known: {tags}) nor an existing "
        "file; set it to a tag, a local .pt/.bin/.safetensors path, or 'none'"
    )


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> Path | None:
    """The tag's weight file if it already lies in the Hugging Face or open_clip URL cache (never touches the net)."""
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            # open_clip's convention: 'org/repo/' means the default weight file, 'org/repo/file' that file; a
            # .safetensors twin is preferred when cached.
            repo_id, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS_NAME
            names = [filename]
            if filename == HF_WEIGHTS_NAME:
                names.insert(0, HF_SAFE_WEIGHTS_NAME)
            elif filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for fname in names:
                found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = tag_cfg.get("url", "")
    if url:
        folder = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        candidate = folder / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _resolve_tag(
    name: str, tag: str, tag_cfg: dict[str, Any], config_key: str, cache_dir: str | None
) -> Path:
    cached = _cached_tag_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    hint = f"set {config_key} to a local .pt/.bin/.safetensors path (or 'none' for random weights)"
    if _hf_offline():
        raise WeightsError(
            f"{config_key}: could not load tag '{tag}' for {name} (offline: HF_HUB_OFFLINE is set and no cached "
            f"copy was found) — {hint}"
        )
    log.info("downloading CLIP weights %s/%s", name, tag)
    try:
        target = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # network, hub and filesystem errors all mean the same thing to the user
        raise WeightsError(
            f"{config_key}: could not load tag '{tag}' for {name} (offline?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} — {hint}"
        ) from e
    if not target or not Path(target).is_file():
        raise WeightsError(f"{config_key}: could not load tag '{tag}' for {name} — {hint}")
    return Path(target)


def _read_state_dict(path: Path, config_key: str) -> dict[str, Tensor]:
    """Tensors of an open_clip/OpenAI checkpoint: safetensors, a (wrapped) state dict or a TorchScript archive."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as e:
                if "TorchScript" not in str(e) and "torchscript" not in str(e).lower():
                    raise
                # OpenAI's original release (ViT-L-14-336px.pt) is a TorchScript archive.
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise WeightsError(
            f"{config_key}: cannot read CLIP weights '{path}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{config_key}: '{path}' holds no state dict (got {type(obj).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(vision, text) state dicts in the keys of open_clip's VisionTransformer / TextTransformer."""
    vision = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    text = {}
    for k, v in state.items():
        if k.startswith("visual.") or k in _SHARED_KEYS:
            continue
        text[k[len("text.") :] if k.startswith("text.") else k] = v
    return vision, text


def _load_weights(
    path: Path, vit: VisionTransformer | None, txt: TextTransformer | None, name: str, config_key: str
) -> None:
    vision_sd, text_sd = _split_state_dict(_read_state_dict(path, config_key))
    for tower, sd, what in ((vit, vision_sd, "vision"), (txt, text_sd, "text")):
        if tower is None:
            continue
        try:
            tower.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise WeightsError(
                f"{config_key}: '{path}' does not fit the {what} tower of {name}: {detail[:500]}"
            ) from e


__all__ = [
    "CLIPBackbone",
    "CLIPText",
    "CLIPVision",
    "TINY_CONFIG",
    "TOY_CONFIG",
    "WeightsError",
    "build_clip",
]
