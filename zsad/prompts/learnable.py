"""AnomalyCLIP's object-agnostic learnable prompts, in independent sets, with an optional per-image bias.

A prompt set is a (normal, anomalous) pair ``[SOS] V1..V12 object. [EOT]`` / ``[SOS] W1..W12 damaged object. [EOT]``
whose 12 context vectors are learned. Deep text tokens (AnomalyCLIP's depth 9, length 4) replace the first context
positions inside the first text layers and are shared by every prompt. Every forward encodes all prompts of all
sets (and of all images, with a bias) in one text-encoder call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

DEFAULT_TEMPLATES: tuple[str, str] = ("object.", "damaged object.")


class PromptTextTower(Protocol):
    """What the learner needs from a frozen text tower (``zsad.backbones.clip.CLIPText`` implements it)."""

    width: int
    n_layers: int
    context_length: int

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """[P, context_length] token ids on the tower's device."""
        ...

    def token_embedding(self, tokens: Tensor) -> Tensor: ...

    def encode_embeddings(
        self, embeds: Tensor, eot_index: Tensor, deep_prompts: Tensor | None = None
    ) -> Tensor: ...


class PromptLearner(nn.Module):
    """Learnable (normal, anomalous) prompt pairs for a frozen CLIP text tower.

    The text tower is passed to ``__init__`` (to tokenise the templates and embed their fixed words once) and to
    ``forward``; it is never registered as a submodule, so the learner's state dict holds only ``ctx`` and
    ``deep``.

    Args:
        text: the frozen CLIP text tower.
        n_sets: number of independent prompt pairs (MPA: one per perception level, plus a global pair).
        n_ctx: learnable context vectors per prompt (12).
        templates: the fixed words after the context of the normal and the anomalous prompt.
        depth: AnomalyCLIP's ``learnabel_text_embedding_depth`` (9): the number of text layers whose first
            ``n_deep`` context positions are learned, counting layer 0 (whose learned tokens are the context
            vectors themselves). Clipped to the tower's layer count.
        n_deep: deep tokens per layer (4); they replace positions 1..n_deep, so ``n_deep <= n_ctx``.
        init_std: std of the N(0, std²) initialisation of context and deep tokens.
        deep_fp16: reproduce AnomalyCLIP's fp16 cast of the deep tokens: each prompt gets its own copy rounded to
            fp16 in the forward, and in the backward each copy's gradient is rounded to fp16 before the copies are
            summed in fp32 (the parameters themselves stay fp32).

    Attributes:
        ctx: [n_sets, 2, n_ctx, width] learnable context (index 0 normal, 1 anomalous).
        deep: [depth - 1, n_deep, width] learnable deep tokens, or ``None`` when depth ≤ 1 or n_deep = 0.
    """

    def __init__(
        self,
        text: PromptTextTower,
        *,
        n_sets: int = 1,
        n_ctx: int = 12,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        depth: int = 9,
        n_deep: int = 4,
        init_std: float = 0.02,
        deep_fp16: bool = False,
    ) -> None:
        super().__init__()
        if len(templates) != 2:
            raise ValueError(f"PromptLearner needs two templates (normal, anomalous), got {list(templates)}")
        if n_sets < 1 or n_ctx < 1:
            raise ValueError(f"PromptLearner needs n_sets >= 1 and n_ctx >= 1, got {n_sets}, {n_ctx}")
        if n_deep > n_ctx:
            raise ValueError(
                f"deep tokens replace context positions: n_deep ({n_deep}) must be <= n_ctx ({n_ctx})"
            )
        width = text.width
        self.n_sets, self.n_ctx, self.n_deep = n_sets, n_ctx, n_deep
        self.depth = max(1, min(depth, text.n_layers))
        self.templates = tuple(templates)
        self.deep_fp16 = bool(deep_fp16)
        self.ctx = nn.Parameter(torch.empty(n_sets, 2, n_ctx, width))
        nn.init.normal_(self.ctx, std=init_std)
        self.deep: nn.Parameter | None = None
        if self.depth > 1 and n_deep > 0:
            self.deep = nn.Parameter(torch.empty(self.depth - 1, n_deep, width))
            nn.init.normal_(self.deep, std=init_std)
        # "X" is one BPE token, so the placeholders occupy exactly positions 1..n_ctx.
        prompts = [" ".join(["X"] * n_ctx) + " " + t for t in self.templates]
        on_device = text.tokenize(prompts)
        tokens = on_device.cpu()
        eot = tokens.argmax(dim=-1)
        if int(eot.min()) <= n_ctx + 1 or int(tokens[:, -1].max()) != 0:
            raise ValueError(
                f"prompt templates {list(self.templates)} do not fit {text.context_length} tokens"
            )
        with torch.no_grad():
            emb = text.token_embedding(on_device).detach().cpu()
        # Fixed parts are derived from the frozen tower: not saved, rebuilt with the learner.
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot_index", eot, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # [2, 1, W] SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)  # [2, L-1-n_ctx, W]

    def forward(self, text: PromptTextTower, bias: Tensor | None = None) -> Tensor:
        """Normalised text features of every prompt, from one text-encoder call.

        Args:
            text: the frozen CLIP text tower the learner was built for.
            bias: optional per-image bias added to every context vector of the matching prompt:
                [B, n_sets, 2, width], or [B, 2, width] when n_sets = 1 (EntroAD / MRAD).

        Returns:
            [n_sets, 2, D] without bias; [B, n_sets, 2, D] with bias (index 0 normal, 1 anomalous).
        """
        ctx = self.ctx.unsqueeze(0)  # [1, S, 2, n, W]
        if bias is not None:
            ctx = ctx + self._check_bias(bias).unsqueeze(-2).to(ctx.dtype)
        b, s = ctx.shape[:2]
        width = ctx.shape[-1]
        prefix = self.prefix.to(ctx.dtype).expand(b, s, -1, -1, -1)
        suffix = self.suffix.to(ctx.dtype).expand(b, s, -1, -1, -1)
        embeds = torch.cat([prefix, ctx, suffix], dim=-2).reshape(b * s * 2, -1, width)
        eot = self.eot_index.expand(b, s, 2).reshape(-1)
        deep = self.deep
        if deep is not None and self.deep_fp16:
            # As AnomalyCLIP's text blocks do: expand to one copy per prompt, then round. .half() rounds the forward;
            # the backward of .float() rounds each copy's gradient to fp16 and expand's backward sums them in fp32.
            deep = deep.expand(embeds.shape[0], *deep.shape).half().float()
        feats = text.encode_embeddings(embeds, eot, deep_prompts=deep)
        return feats.view(s, 2, -1) if bias is None else feats.view(b, s, 2, -1)

    def _check_bias(self, bias: Tensor) -> Tensor:
        width = self.ctx.shape[-1]
        if bias.dim() == 3 and self.n_sets == 1:
            bias = bias.unsqueeze(1)
        if bias.dim() != 4 or tuple(bias.shape[1:]) != (self.n_sets, 2, width):
            raise ValueError(
                f"prompt bias must be [B, {self.n_sets}, 2, {width}]"
                + (f" or [B, 2, {width}]" if self.n_sets == 1 else "")
                + f", got {tuple(bias.shape)}"
            )
        return bias


__all__ = ["DEFAULT_TEMPLATES", "PromptLearner"]
