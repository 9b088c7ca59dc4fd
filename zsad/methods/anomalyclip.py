"""AnomalyCLIP: object-agnostic learnable prompts on DPAM V-V patch tokens (the CLIP substrate baseline).

The model is written as the general *multi-level* case so that MPA and MPAMA (``zsad.methods.mpama``) reuse its
maths unchanged: prompt set ``p`` is compared with the tapped patch tokens average-pooled over a ``r_p × r_p``
neighbourhood. AnomalyCLIP itself is the one-level case (kernel 1, no pooling) whose single prompt pair also scores
the global embedding.

Per tap l and level p: S^{l,p} = softmax_c(⟨F^{l,p}_i, t_c^p⟩ / T), c ∈ {normal, anomalous}.
Loss: λ · Σ_l Σ_p [Focal(S^{l,p}, G) + Dice(S_a^{l,p}, G) + Dice(S_n^{l,p}, 1−G)] + CE(⟨g, t^G⟩ / T, y), with
λ = ``seg_weight`` (1 in the spec; the public AnomalyCLIP code uses 4).
Test map: mean (``map_reduce: sum`` as the public code: sum) over l, p of (S_a + 1 − S_n)/2, bilinear to the input
size, Gaussian σ on the device.

``experiments/ablations/anomalyclip_faithful.yaml`` switches on every behaviour of the public code at once (sum of
maps, λ = 4, fp16 rounding of the deep text prompts; the CLIP defaults already follow it) and reproduces its outputs
(``tests/test_parity_anomalyclip.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules.types import Batch
from zsad.backbones.base import Backbone, VisionFeatures
from zsad.config import CLIPBackboneConfig, MethodConfig, OptimConfig, StageConfig
from zsad.losses import segmentation_loss
from zsad.maps import gaussian_blur, image_score, tokens_to_grid, upsample
from zsad.methods.base import ZSADMethod
from zsad.types import AnomalyOutput

ScoreRule = Literal["global", "max", "mean_topk"]
MapReduce = Literal["mean", "sum"]
SCORE_RULES = get_args(ScoreRule)
MAP_REDUCE = get_args(MapReduce)


@dataclass
class AnomalyCLIPConfig(MethodConfig):
    """AnomalyCLIP on the shared CLIP substrate (``specs/clip_substrate.md``)."""

    name: str = "anomalyclip"
    image_size: int = 518
    batch_size: int = 8
    smoothing_sigma: float = 4.0
    score_rule: ScoreRule = (
        "global"  # global (anomalous probability of the global embedding) | max | mean_topk
    )
    topk_frac: float = 0.01  # fraction of pixels averaged by the mean_topk rule
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {
            "main": StageConfig(epochs=15, optim=OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999]))
        }
    )
    clip: CLIPBackboneConfig = field(
        default_factory=lambda: CLIPBackboneConfig(name="ViT-L-14-336-quickgelu", pretrained="openai")
    )
    taps: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based blocks
    dpam_start: int | None = 6  # first block (1-based) with the V-V path; null = no DPAM
    n_ctx: int = 12
    deep_depth: int = 9
    deep_len: int = 4
    temperature: float = 0.07
    both_dice: bool = True  # Dice(S_n, 1 − G) besides Dice(S_a, G)
    # Weight of the summed segmentation terms against the image CE. The spec's formula has none (1.0); the public
    # AnomalyCLIP train.py (commit 76b83e1) multiplies them by ``lam = 4`` before adding the CE.
    seg_weight: float = 1.0
    # How the per-tap (and per-level) maps combine into the test map: mean (the spec; a map in [0, 1]) or sum (the
    # public test.py; [0, L·P]). Same ranking either way, but the absolute map values differ.
    map_reduce: MapReduce = "mean"
    # The public code casts every deep text prompt to fp16 in each text forward (AnomalyCLIP.py, the expanded
    # per-prompt copy ``.half()``): the text encoder sees them rounded, and each prompt copy's gradient is rounded
    # to fp16 before the copies are summed in fp32. True reproduces that; False keeps them in full precision.
    deep_prompt_fp16: bool = False


class AnomalyCLIP(ZSADMethod):
    """Frozen CLIP + object-agnostic learnable prompts; maps from the DPAM V-V path.

    Subclasses change the prompt sets and levels through ``kernels``, ``n_prompt_sets``, ``split_text`` and
    ``image_logits_text``, and the features through ``vision_features``/``tap_tokens``.
    """

    frozen_modules = ("clip",)

    def __init__(self, cfg: Any) -> None:
        from zsad.backbones.clip import build_clip
        from zsad.prompts.learnable import PromptLearner

        super().__init__(cfg)
        self._check_config()
        self.clip = build_clip(
            cfg.clip.name,
            cfg.clip.pretrained,
            image_size=int(cfg.image_size),
            pos_interp=str(cfg.clip.pos_interp),
            global_ln_post=bool(cfg.clip.global_ln_post),
        )
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.adopt_preprocessing(self.clip.visual)
        n_blocks = int(self.clip.visual.n_blocks)
        bad = [t for t in cfg.taps if not 1 <= int(t) <= n_blocks]
        if bad:
            raise ValueError(f"method.taps: blocks {bad} outside 1..{n_blocks} of {cfg.clip.name!r}")
        self.prompts = PromptLearner(
            self.clip.text,
            n_sets=self.n_prompt_sets(),
            n_ctx=int(cfg.n_ctx),
            depth=int(cfg.deep_depth),
            n_deep=int(cfg.deep_len),
            deep_fp16=bool(cfg.deep_prompt_fp16),
        )
        # Eval-time cache of the prompts' text features; cleared when training resumes or weights are loaded.
        self.register_buffer("_text_cache", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_text_cache())

    # --- configuration hooks (overridden by MPA) ---------------------------------------------------------------
    def _check_config(self) -> None:
        if not self.cfg.taps:
            raise ValueError("method.taps: at least one block must be tapped")
        if float(self.cfg.seg_weight) < 0:
            raise ValueError(f"method.seg_weight: must be ≥ 0, got {self.cfg.seg_weight}")

    def kernels(self) -> list[int]:
        """Pooling kernel of each perception level (AnomalyCLIP: one level, no pooling)."""
        return [1]

    def n_prompt_sets(self) -> int:
        return 1

    def split_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """[n_sets, 2, D] prompt features → (per-level pairs [P, 2, D], pair scoring the global embedding [2, D])."""
        return text[:1], text[0]

    # --- text features -------------------------------------------------------------------------------------------
    def encode_prompts(self) -> Tensor:
        """One batched text-encoder call for every prompt set: [n_sets, 2, D], L2-normalised."""
        return self.prompts(self.clip.text)

    def text_features(self) -> Tensor:
        """Fresh features while gradients may flow; a cache in eval mode without grad (test time)."""
        if self.training or torch.is_grad_enabled():
            self._text_cache = None
            return self.encode_prompts()
        if self._text_cache is None:
            # Built outside inference mode so the cached tensor is an ordinary one wherever it is used next.
            with torch.inference_mode(False), torch.no_grad():
                self._text_cache = self.encode_prompts()
        return self._text_cache

    def clear_text_cache(self) -> None:
        self._text_cache = None

    def train(self, mode: bool = True) -> AnomalyCLIP:
        if mode:
            self.clear_text_cache()
        return super().train(mode)

    # --- vision features -------------------------------------------------------------------------------------------
    def vision_features(self, images: Tensor, records: list) -> VisionFeatures:
        """Frozen CLIP forward: V-V tapped tokens and the global embedding (no grad: nothing trains there)."""
        with torch.no_grad():
            return self.clip.visual(
                images, taps=tuple(int(t) for t in self.cfg.taps), dpam_start=self.cfg.dpam_start
            )

    def tap_tokens(self, feats: VisionFeatures, records: list) -> list[Tensor]:
        """Per-tap patch tokens [B, N, D] that the prompts are compared with."""
        return list(feats.patch_tokens)

    # --- maths shared by AnomalyCLIP / MPA / MPAMA -------------------------------------------------------------------
    def level_probs(self, tokens: list[Tensor], grid: tuple[int, int], local_text: Tensor) -> Tensor:
        """Two-class probabilities per tap and level: [B, L, P, 2, gh, gw].

        Level p average-pools the tokens over r_p × r_p (stride 1, zero padding not counted) and renormalises them
        before the cosine with its own prompt pair ``local_text[p]``.
        """
        b, n_taps = tokens[0].shape[0], len(tokens)
        fmap = tokens_to_grid(torch.stack(tokens, 1).flatten(0, 1).float(), grid)  # [B*L, D, gh, gw]
        levels = []
        for r, pair in zip(self.kernels(), local_text):
            pooled = pool_level(fmap, r)
            logits = torch.einsum("bdhw,cd->bchw", pooled, pair.float()) / self.cfg.temperature
            levels.append(logits.softmax(1))
        probs = torch.stack(levels, 1)  # [B*L, P, 2, gh, gw]
        return probs.unflatten(0, (b, n_taps))

    def global_logits(self, embedding: Tensor, pair: Tensor) -> Tensor:
        """[B, 2] logits of the L2-normalised global embedding against a (normal, anomalous) pair."""
        g = F.normalize(embedding.float(), dim=-1)
        return g @ pair.float().t() / self.cfg.temperature

    def raw_map(self, probs: Tensor, size: tuple[int, int]) -> Tensor:
        """mean (or sum, ``map_reduce``) over l, p of (S_a + 1 − S_n)/2, bilinear to ``size``. [B, H, W] float32.

        Bilinear resizing is linear, so reducing before resizing gives the same map as resizing every level (the
        public code resizes first; the difference is float32 rounding) at 1/(L·P) of the cost.
        """
        m = (probs[:, :, :, 1] + 1.0 - probs[:, :, :, 0]) / 2
        m = m.sum((1, 2)) if self.cfg.map_reduce == "sum" else m.mean((1, 2))
        return upsample(m, size)

    def anomaly_map(self, probs: Tensor, size: tuple[int, int]) -> Tensor:
        """The test map: :meth:`raw_map` → Gaussian σ (scipy's ``gaussian_filter`` rule, on the device)."""
        return gaussian_blur(self.raw_map(probs, size), float(self.cfg.smoothing_sigma))

    def score(self, amap: Tensor, global_prob: Tensor) -> Tensor:
        if self.cfg.score_rule == "global":
            return global_prob
        return image_score(amap, self.cfg.score_rule, float(self.cfg.topk_frac))

    # --- the two calls ZSADModule makes --------------------------------------------------------------------------------
    def forward(self, images: Tensor, batch: Batch | None = None) -> AnomalyOutput:
        records: list = []
        feats = self.vision_features(images, records)
        tokens = self.tap_tokens(feats, records)
        local_text, global_pair = self.split_text(self.text_features())
        with float32_head(images):
            probs = self.level_probs(tokens, feats.grid, local_text)
            logits = self.global_logits(feats.global_embedding, global_pair)
            # Map and score are outputs only (the loss reads loss_inputs): no graph kept for them.
            amap = self.anomaly_map(probs.detach(), tuple(images.shape[-2:]))
            score = self.score(amap, logits.detach().softmax(-1)[:, 1])
        extras, loss_inputs = self.routing_outputs(records)
        loss_inputs.update(probs=probs, logits=logits)
        return AnomalyOutput(amap, score.float(), extras, loss_inputs)

    def routing_outputs(self, records: list) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(extras, loss_inputs) from routers that ran in this forward (MPAMA). None here."""
        return {}, {}

    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:
        gt = batch.gt
        if gt is None:
            raise ValueError(
                f"{self.cfg.name}: the auxiliary training set must have pixel masks (batch.mask is None)"
            )
        probs = output.loss_inputs["probs"]  # [B, L, P, 2, gh, gw]
        b, n_taps, n_levels = probs.shape[:3]
        maps = upsample(probs.flatten(1, 3), tuple(gt.shape[-2:])).reshape(
            b * n_taps * n_levels, 2, *gt.shape[-2:]
        )
        targets = gt[:, None].expand(b, n_taps * n_levels, *gt.shape[-2:]).reshape(-1, *gt.shape[-2:])
        # Focal is a pixel mean and Dice a per-map mean, so one batched call × (L·P) is exactly Σ_l Σ_p.
        seg = segmentation_loss(maps, targets, both_dice=bool(self.cfg.both_dice)) * (n_taps * n_levels)
        ce = F.cross_entropy(output.loss_inputs["logits"], batch.label.long())
        total = float(self.cfg.seg_weight) * seg
        if self.image_ce_trains():
            total = total + ce
        return {"loss": total, "seg": seg.detach(), "ce": ce.detach()}

    def image_ce_trains(self) -> bool:
        """Whether the image CE is part of the optimised loss (MPAMA's stage moe: a constant, logged only)."""
        return True

    @property
    def vision_backbone(self) -> Backbone:
        return self.clip.visual

    def identity(self) -> dict[str, Any]:
        return {**self.clip.identity(), "image_size": self.input_size}


def float32_head(like: Tensor) -> torch.autocast:
    """Autocast off for the head: bf16 cosines / 0.07 and bf16 maps quantise scores into ties (DESIGN: precision)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def pool_level(fmap: Tensor, kernel: int) -> Tensor:
    """AvgPool(kernel, stride 1, pad kernel//2, count_include_pad=False) over [B, D, h, w], then L2-normalise D."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd and ≥ 1 to keep the grid size, got {kernel}")
    if kernel > 1:
        fmap = F.avg_pool2d(fmap, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return F.normalize(fmap, dim=1)
