"""WinCLIP (zero-shot): a fixed prompt ensemble scored on multi-scale windows of CLIP patch tokens. No training.

The usual first row of a zero-shot anomaly-detection table (Jeong et al., CVPR 2023), here on the shared CLIP
substrate: it shows what a pretrained CLIP gives *before* any method trains anything.

* Text: for the image's class name, the (normal, anomalous) pair of the fixed state × template ensemble
  (``zsad.prompts.ensemble``), computed once per class name.
* Windows: for every scale k (in patches) and every k × k window of the patch grid (stride 1), the CLIP vision
  tower encodes **only that window's tokens** (with their positional embeddings) behind the CLS token; the window's
  embedding is ``ln_post(CLS) @ proj`` as for a whole image. Its anomaly score is
  ``s_w = softmax(⟨ê_w, t_n⟩ / T, ⟨ê_w, t_a⟩ / T)_a`` with unit vectors ê, t and ``T = temperature`` (CLIP's 0.01).
* Map: at scale k, patch p gets the harmonic mean of the scores of the windows that contain it,
  ``M_k(p) = |W_p| / Σ_{w ∋ p} 1 / s_w``; the map is the mean of ``M_k`` over scales, resized bilinearly to the input
  and smoothed by a Gaussian σ.
* Image score (``score_rule``): ``global`` is the whole image's anomalous probability ``s_image`` (the paper's
  zero-shot classifier); ``global_max`` is ``(s_image + max M) / 2``; ``max`` / ``mean_topk`` read the map only.

Not included: WinCLIP+'s few-shot reference memory (this repository is zero-shot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules.types import Batch
from zsad.backbones.base import Backbone
from zsad.config import BackboneConfig, MethodConfig, StageConfig
from zsad.maps import gaussian_blur, image_score, upsample
from zsad.methods.base import ZSADMethod
from zsad.prompts.ensemble import EnsembleTextCache
from zsad.types import AnomalyOutput

ScoreRule = Literal["global", "global_max", "max", "mean_topk"]
SCORE_RULES = get_args(ScoreRule)


@dataclass
class WinCLIPConfig(MethodConfig):
    """WinCLIP zero-shot; defaults are the paper's (ViT-B/16+ at 240², windows of 2 and 3 patches)."""

    name: str = "winclip"
    image_size: int = 240
    batch_size: int = 8
    smoothing_sigma: float = 4.0
    score_rule: ScoreRule = "global"
    topk_frac: float = 0.01
    stages: dict[str, StageConfig] = field(default_factory=dict)  # training-free: no stage
    clip: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="ViT-B-16-plus-240", pretrained="laion400m_e31")
    )
    scales: list[int] = field(default_factory=lambda: [2, 3])  # window sides in patches
    temperature: float = 0.01  # CLIP's logit scale 100


def window_index(grid: tuple[int, int], k: int) -> Tensor:
    """long [n_windows, k*k]: flat patch indices of every k × k window of the grid (stride 1), row-major."""
    gh, gw = grid
    if not 1 <= k <= min(gh, gw):
        raise ValueError(f"window side {k} does not fit the {gh}x{gw} patch grid (method.scales)")
    flat = torch.arange(gh * gw).view(gh, gw)
    win = flat.unfold(0, k, 1).unfold(1, k, 1)  # [gh-k+1, gw-k+1, k, k]
    return win.reshape(-1, k * k)


def harmonic_map(scores: Tensor, index: Tensor, n_patches: int) -> Tensor:
    """[B, n_patches]: per patch, the harmonic mean of the scores [B, n_windows] of the windows holding it."""
    inv = 1.0 / scores.clamp_min(1e-6)
    b, n_win = scores.shape
    k2 = index.shape[1]
    sums = torch.zeros(b, n_patches, device=scores.device, dtype=scores.dtype)
    sums.index_add_(1, index.flatten().to(scores.device), inv.repeat_interleave(k2, dim=1))
    counts = torch.bincount(index.flatten(), minlength=n_patches).to(scores.device, scores.dtype)
    return counts / sums


class WinCLIP(ZSADMethod):
    """Frozen CLIP + the fixed prompt ensemble, scored on windows of patch tokens; nothing trains."""

    frozen_modules = ("clip",)

    def __init__(self, cfg: Any) -> None:
        from zsad.backbones.clip import build_clip

        super().__init__(cfg)
        if not cfg.scales or any(int(k) < 1 for k in cfg.scales):
            raise ValueError(f"method.scales: window sides ≥ 1 patch, got {list(cfg.scales)}")
        if cfg.stages:
            raise ValueError("method.stages: WinCLIP is training-free; leave stages empty")
        self.clip = build_clip(cfg.clip.name, cfg.clip.pretrained, image_size=int(cfg.image_size))
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.adopt_preprocessing(self.clip.visual)
        self.text_cache = EnsembleTextCache()

    def encode_windows(self, tokens: Tensor, index: Tensor | None) -> Tensor:
        """Unit CLIP embeddings of token subsets.

        Args:
            tokens: [B, 1+N, width] CLS + patch tokens after the positional embedding and ``ln_pre``.
            index: [n_windows, m] patch indices of each window, or ``None`` for the whole image.

        Returns:
            [B, n_windows, D] (``n_windows = 1`` for the whole image).
        """
        visual = self.clip.visual
        if index is None:
            seq = tokens[:, None]
        else:
            patches = tokens[:, 1:][:, index.to(tokens.device)]  # [B, n_win, m, width]
            cls = tokens[:, :1, None].expand(-1, index.shape[0], -1, -1)
            seq = torch.cat([cls, patches], dim=2)
        b, n_win = seq.shape[:2]
        x = seq.flatten(0, 1)
        for block in visual.blocks:  # open_clip's own block forward: a window is a short image
            x = block(x)
        emb = visual.vit.ln_post(x[:, 0]) @ visual.vit.proj
        return F.normalize(emb.float(), dim=-1).view(b, n_win, -1)

    def window_scores(self, emb: Tensor, text: Tensor) -> Tensor:
        """[B, n_windows] anomalous probabilities of unit embeddings [B, n_win, D] against pairs [B, 2, D]."""
        logits = torch.einsum("bwd,bcd->bwc", emb, text.float()) / float(self.cfg.temperature)
        return logits.softmax(-1)[..., 1]

    def forward(self, images: Tensor, batch: Batch) -> AnomalyOutput:
        visual = self.clip.visual
        grid = visual._grid_of(images)
        n = grid[0] * grid[1]
        text = self.text_cache(list(batch.class_name), self.clip.text, images.device)
        with torch.no_grad():
            tokens = visual._embed(images, grid)
            s_image = self.window_scores(self.encode_windows(tokens, None), text)[:, 0]
            maps = []
            for k in self.cfg.scales:
                index = window_index(grid, int(k))
                s = self.window_scores(self.encode_windows(tokens, index), text)
                maps.append(harmonic_map(s, index, n))
            patch_map = torch.stack(maps).mean(0).view(-1, *grid)
        amap = gaussian_blur(upsample(patch_map, tuple(images.shape[-2:])), float(self.cfg.smoothing_sigma))
        rule = str(self.cfg.score_rule)
        if rule == "global":
            score = s_image
        elif rule == "global_max":
            score = (s_image + amap.flatten(1).amax(1)) / 2
        else:
            score = image_score(amap, rule, float(self.cfg.topk_frac))
        return AnomalyOutput(amap.float(), score.float(), {}, {})

    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:
        raise RuntimeError("WinCLIP is training-free: it has no loss (method.stages is empty)")

    @property
    def vision_backbone(self) -> Backbone:
        return self.clip.visual

    def identity(self) -> dict[str, Any]:
        return {**self.clip.identity(), "image_size": self.input_size}
