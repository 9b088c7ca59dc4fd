"""The frozen CLIP text tower: open_clip's ``TextTransformer`` weights under an own forward with deep prompts
(AnomalyCLIP's learnable tokens replaced before each of the first text layers), and CLIP's BPE tokeniser."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from zsad.backbones.clip.attention import _check_block, _mlp_residual, _out_proj, _qkv


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=context_length)


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
