"""The frozen CLIP vision tower: open_clip's ``VisionTransformer`` weights under an own forward with the DPAM V-V
dual path, per-block taps and optional attention probabilities (no hooks).

Two defaults follow the reference codes (AnomalyCLIP, MRAD) and are switches of ``build_clip``: the native 24×24
positional grid is resized **bilinearly** to other input sizes (``pos_interp``), and the global image embedding is
the original path's CLS ``@ proj`` **without** ``ln_post`` (``global_ln_post``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from zsad.backbones.base import CLIP_MEAN, CLIP_STD, VisionFeatures
from zsad.backbones.clip.attention import _check_block, _mlp_residual, dual_attention

VVMlp = Callable[[int, nn.Module, Tensor], "Tensor | None"]
ATTN_REDUCE = ("none", "mean_heads")
# Resize of the native positional grid to another input size. AnomalyCLIP and MRAD use bilinear (align_corners
# False, no antialias); bicubic is kept as an ablation (it moves every tap by ~3.5 % at 24×24 → 37×37).
POS_INTERP = ("bilinear", "bicubic")


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
        mean, std: CLIP's input normalisation (the tag's, else OpenAI's).
        interpolation: the image resize of the data layer for CLIP (``bicubic``, as CLIP's own preprocessing).
        pos_interp: ``bilinear`` (the reference codes) or ``bicubic``: how the native positional grid is resized.
        global_ln_post: whether the global embedding goes through ``ln_post`` before ``proj`` (the reference codes
            do not: ``x_ori[CLS] @ proj``; only tapped patch tokens go through ``ln_post``).
        head_chunk: heads per chunk when attention probabilities are head-averaged (``attn_reduce``).
    """

    head_chunk: int = 4
    interpolation: str = "bicubic"

    def __init__(
        self,
        vit: VisionTransformer,
        image_size: int = 518,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        *,
        pos_interp: str = "bilinear",
        global_ln_post: bool = False,
        source: dict[str, Any] | None = None,
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
        # name, weight source and activation, as build_clip resolved them (identity)
        self.source = dict(source or {"name": "custom", "pretrained": "none", "quick_gelu": None})
        vit.requires_grad_(False)
        vit.eval()

    def identity(self) -> dict[str, Any]:
        """Name, weight source, activation, input size and the two switches that change every feature."""
        return {
            "kind": "clip",
            **self.source,
            "image_size": self.image_size,
            "pos_interp": self.pos_interp,
            "global_ln_post": self.global_ln_post,
        }

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
        """:func:`~zsad.backbones.clip.attention.dual_attention` with this tower's ``head_chunk``."""
        return dual_attention(
            block, h, dual=dual, want_probs=want_probs, reduce=reduce, head_chunk=self.head_chunk
        )

    def forward(
        self,
        images: Tensor,
        taps: Sequence[int] = (6, 12, 18, 24),
        *,
        dpam_start: int | None = None,
        attn_taps: bool = False,
        pre_proj: bool = False,
        vv_mlp: VVMlp | None = None,
        attn_reduce: str = "none",
    ) -> VisionFeatures:
        """Tapped patch tokens (V-V path from ``dpam_start`` on) and the global embedding (original path).

        Args:
            images: [B, 3, H, W] CLIP-normalised, H and W multiples of ``patch_size``.
            taps: 1-based block indices; the output lists follow this order.
            dpam_start: first block (1-based) that runs the V-V path; ``None`` (the default: what a plain
                ``Backbone`` call gets) is plain CLIP, taps read the original path. Before ``dpam_start`` the V-V
                path equals the original path.
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
