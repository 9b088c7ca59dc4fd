"""EntroAD: memory retrieval, structural-entropy routing and confidence-gated dual-branch prompts.

Spec ``entroad.md``. One forward, batched over images:

1. frozen CLIP (V-V path from block 2) → tapped projected tokens, tap-24 pre-projection tokens, global embedding
   and, outside the retrieval stage, the original-path attention at the taps;
2. retrieval against the memory → patch anomaly probability ``p`` [B, N] and image probability ``p_img`` [B];
3. structural entropy ``ê`` [B, N] (no grad), routing weights, routed tokens ``t_n``, ``t_raw``, gate ``g``;
4. per-image bias of each branch's prompt contexts → one text-encoder call for B × branches × 2 prompts;
5. branch maps on tap 24, fused map, Gaussian smoothing, image score.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from data_modules.types import Batch, Sample
from zsad.backbones.base import Backbone
from zsad.losses import dice_loss, focal_loss, segmentation_loss
from zsad.maps import gaussian_blur, image_score, tokens_to_grid, upsample
from zsad.methods.base import AuxiliaryData, ZSADMethod
from zsad.methods.entroad import memory as M
from zsad.methods.entroad.entropy import structural_entropy
from zsad.methods.entroad.routing import (
    confidence_gate,
    entropy_split,
    neighbour_average,
    normalise_routes,
    pool,
    retrieve,
    route_weights,
)
from zsad.types import AnomalyOutput, ExtraSpec

log = logging.getLogger("zsad")
STAGES = ("retrieval", "prompt")
_FUSION_EPS = 1e-6  # share of the fixed branch weights in the confidence fusion (see EntroAD.fuse)


class Retrieval(nn.Module):
    """The four trainable projections of stage 1: image query/keys (D→D) and patch query/keys (W→D)."""

    def __init__(self, embed_dim: int, width: int) -> None:
        super().__init__()
        self.image_q = nn.Linear(embed_dim, embed_dim)
        self.image_k = nn.Linear(embed_dim, embed_dim)
        self.patch_q = nn.Linear(width, embed_dim)
        self.patch_k = nn.Linear(width, embed_dim)


class BranchBias(nn.Module):
    """Bias MLPs ``b = Lin_{branch, class}(t)`` (D → text width), one Linear per branch and per prompt class.

    Stored as stacked weights so all branches and classes run in one einsum. Initialised like ``nn.Linear``.
    """

    def __init__(self, n_sets: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_sets, 2, out_dim, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_sets, 2, out_dim).uniform_(-bound, bound))

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, S, 2, D] routed tokens → [B, S, 2, W] context biases."""
        return torch.einsum("bscd,scwd->bscw", tokens, self.weight.to(tokens.dtype)) + self.bias.to(
            tokens.dtype
        )


class EntroAD(ZSADMethod):
    """Structural-entropy-guided prompt adaptation with an MRAD-style memory (two stages).

    Trainable: ``retrieval`` (stage ``retrieval``), ``prompts`` and ``bias`` (stage ``prompt``). ``memory`` holds
    persistent buffers built from the auxiliary set in ``prepare`` and saved with every checkpoint.
    """

    frozen_modules = ("clip",)
    EXTRAS = {
        "entropy_map": ExtraSpec("image_map"),  # [B, gh, gw] normalised structural entropy
        "routing_weights": ExtraSpec("image_array"),  # [B, 2, N] per-patch weights of t_n and t_a
        "gate": ExtraSpec("image_scalar"),  # [B] confidence gate of t_a
        "p_img": ExtraSpec("image_scalar"),  # [B] retrieval image probability
    }

    def __init__(self, cfg: Any) -> None:
        from zsad.backbones.clip import build_clip
        from zsad.prompts.learnable import PromptLearner

        super().__init__(cfg)
        _check_config(cfg)
        self.clip = build_clip(
            cfg.clip.name,
            cfg.clip.pretrained,
            image_size=int(cfg.image_size),
            pos_interp=str(cfg.clip.pos_interp),
            global_ln_post=bool(cfg.clip.global_ln_post),
        )
        self.clip.requires_grad_(False)
        self.clip.eval()
        vis, txt = self.clip.visual, self.clip.text
        bad = [t for t in cfg.taps if not 1 <= int(t) <= vis.n_blocks]
        if bad:
            raise ValueError(f"method.taps: blocks {bad} outside 1..{vis.n_blocks} of {cfg.clip.name!r}")
        self.adopt_preprocessing(vis)
        self.taps = tuple(int(t) for t in cfg.taps)
        self.kernels = tuple(int(k) for k in cfg.kernels)
        self.n_branches = 1 if cfg.single_branch else 2
        self.memory = M.Memory(vis.embed_dim, vis.width)
        self.retrieval = Retrieval(vis.embed_dim, vis.width)
        self.prompts = PromptLearner(
            txt,
            n_sets=self.n_branches,
            n_ctx=int(cfg.n_ctx),
            depth=int(cfg.deep_depth),
            n_deep=int(cfg.deep_len),
        )
        self.bias = BranchBias(self.n_branches, vis.embed_dim, txt.width)
        weights = [float(w) for w in cfg.branch_weights][: self.n_branches]
        self.register_buffer(
            "branch_weights", torch.tensor(weights if self.n_branches == 2 else [1.0]), persistent=False
        )

    # --- stages ------------------------------------------------------------------------------------------------
    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.retrieval.requires_grad_(name == "retrieval")
        self.prompts.requires_grad_(name == "prompt")
        self.bias.requires_grad_(name == "prompt")

    @property
    def vision_backbone(self) -> Backbone:
        return self.clip.visual

    def identity(self) -> dict[str, Any]:
        return {**self.clip.identity(), "image_size": self.input_size}

    # --- memory --------------------------------------------------------------------------------------------------
    def memory_settings(self, device: torch.device, mask_resize: str = "float") -> dict[str, Any]:
        """Everything besides samples and backbone that changes the memory's content (part of its cache key)."""
        settings = {
            "input_size": self.input_size,
            "kernels": list(self.kernels),
            "tap": self.taps[-1],
            "dpam_start": self.cfg.dpam_start,
            "mask_threshold": float(self.cfg.mask_threshold),
            "memory_regions": str(self.cfg.memory_regions),
            "region_coverage": float(self.cfg.region_coverage),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "bf16": self._memory_bf16(device),
        }
        if (
            mask_resize != "float"
        ):  # absent for the default: memories cached before it was a setting stay valid
            settings["mask_resize"] = mask_resize
        return settings

    def _memory_bf16(self, device: torch.device) -> bool:
        return bool(self.cfg.memory_bf16) and device.type == "cuda"

    def memory_path(
        self, train_samples: list[Sample], cache_dir: Path, device: torch.device, mask_resize: str = "float"
    ) -> tuple[Path, str]:
        key = M.cache_key(train_samples, self.identity(), self.memory_settings(device, mask_resize))
        return Path(cache_dir) / f"entroad_memory_{key[:20]}.pt", key

    def prepare(self, data: AuxiliaryData | None, cache_dir: Path, device: torch.device) -> None:
        """Build (or reuse from ``cache_dir``) the memory from the auxiliary set's batches the DataModule provides."""
        train_samples = list(data.train_samples) if data is not None else []
        if not train_samples:
            if self.memory.built:  # test-only runs carry the memory in the checkpoint
                return
            raise ValueError("EntroAD needs the auxiliary training set (data.train) to build its memory")
        mask_resize = str(data.mask_resize)
        path, key = self.memory_path(train_samples, cache_dir, device, mask_resize)
        mem = M.load_cached(path, key)
        if mem is None:
            log.info("EntroAD: building the memory from %d auxiliary images → %s", len(train_samples), path)
            loader = data.auxiliary_dataloader(int(self.cfg.memory_batch_size), int(self.cfg.memory_workers))
            mem = M.collect_memory(
                tqdm(loader, desc="EntroAD memory", leave=False),
                lambda x: self._encode_memory(x, device),
                self.kernels,
                float(self.cfg.mask_threshold),
                device,
                str(self.cfg.memory_regions),
                float(self.cfg.region_coverage),
            )
            M.save_cached(path, key, mem)
        else:
            log.info("EntroAD: reusing the memory cached at %s", path)
        expected = {M.path_hash(s.image_path) for s in train_samples}
        if set(mem.source_hash.tolist()) != expected:  # the memory holds the training set and nothing else
            raise RuntimeError(f"EntroAD memory at {path} does not match the auxiliary samples; delete it")
        self.memory.set(mem)

    @torch.no_grad()
    def _encode_memory(self, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor, tuple[int, int]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self._memory_bf16(device)):
            f = self.clip.visual(images, taps=(self.taps[-1],), dpam_start=self.cfg.dpam_start, pre_proj=True)
        return f.global_embedding.float(), f.pre_proj_tokens[0].float(), f.grid

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, batch: Batch | None = None) -> AnomalyOutput:
        if not self.memory.built:
            raise RuntimeError(
                "EntroAD memory is empty: train (prepare builds it) or load a checkpoint that holds it"
            )
        if not self.training and batch is not None:
            self.memory.check_disjoint(batch.path)
        retrieval_only = self.training and self.stage == "retrieval"
        want_attn = not retrieval_only and self.cfg.entropy != "none"
        with torch.no_grad():
            # Only the head mean of the attention is used: never materialise [B, heads, 1+N, 1+N] per tap.
            feats = self.clip.visual(
                images,
                taps=self.taps,
                dpam_start=self.cfg.dpam_start,
                attn_taps=want_attn,
                attn_reduce="mean_heads",
                pre_proj=True,
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == "retrieval"):
            img_probs, patch_probs = self.retrieve(
                feats.global_embedding, feats.pre_proj_tokens[-1], feats.grid
            )
        p_img = img_probs[:, 1]
        loss_inputs = {
            "retrieval_probs": patch_probs,
            "image_logits": img_probs / float(self.cfg.image_temperature),
        }
        if retrieval_only:
            amap = upsample(tokens_to_grid(patch_probs[..., 1], feats.grid), tuple(images.shape[-2:]))
            return AnomalyOutput(amap, p_img.float(), {"p_img": p_img.detach()}, loss_inputs)
        return self._prompt_forward(images, feats, patch_probs[..., 1].detach(), p_img.detach(), loss_inputs)

    def retrieve(
        self, global_embedding: Tensor, pre_proj: Tensor, grid: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Image [B, 2] and patch [B, N, 2] {normal, anomalous} probabilities read from the memory.

        Similarity dropout applies in both training stages: the training images are in the memory, so without it
        stage 2 would route on near-perfect self-retrieved ``p`` that a target image never gets.
        """
        with torch.autocast(global_embedding.device.type, enabled=False):
            # float32 whatever the autocast: bf16 cosines tie at the dropout quantile and coarsen the map.
            return self._retrieve_fp32(global_embedding, pre_proj, grid)

    def _retrieve_fp32(
        self, global_embedding: Tensor, pre_proj: Tensor, grid: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        mem, r = self.memory, self.retrieval
        dropout = self.training and bool(self.cfg.sim_dropout)
        q_img = F.normalize(global_embedding.float(), dim=-1)
        img = retrieve(
            q_img,
            r.image_q(q_img),
            r.image_k(mem.image_keys),
            mem.image_keys,
            mem.image_values,
            float(self.cfg.image_dropout_q) if dropout else None,
        )
        q_patch = F.normalize(neighbour_average(pre_proj.float(), grid, self.kernels), dim=-1)
        patch = retrieve(
            q_patch,
            r.patch_q(q_patch),
            r.patch_k(mem.patch_keys),
            mem.patch_keys,
            mem.patch_values,
            float(self.cfg.patch_dropout_q) if dropout else None,
        )
        return img, patch

    def entropy_map(self, attentions: list[Tensor] | None, like: Tensor) -> Tensor:
        """ê [B, N] in [0, 1]; the ``none`` ablation gives a constant 0.5."""
        if self.cfg.entropy == "none":
            return torch.full_like(like, 0.5, dtype=torch.float32)
        return structural_entropy(
            attentions, self.cfg.entropy, int(self.cfg.two_level_k), int(self.cfg.two_level_iters)
        )

    def patch_embeddings(self, pre_proj: Tensor, grid: tuple[int, int]) -> Tensor:
        """z [B, N, D] (float32): tap-24 ``ln_post`` tokens projected, neighbour-averaged, then normalised.

        As MRAD: the projected tokens are averaged before any normalisation (averaging unit vectors would weight
        the neighbours differently).
        """
        with torch.autocast(pre_proj.device.type, enabled=False):
            projected = pre_proj.float() @ self.clip.visual.vit.proj.float()
            return F.normalize(neighbour_average(projected, grid, self.kernels), dim=-1)

    def routed_tokens(self, p: Tensor, e_hat: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Routed (normal, anomalous) tokens per branch [B, S, 2, D], routing weights [B, 2, N], gate [B]."""
        cfg = self.cfg
        w_n, w_a = route_weights(p, e_hat, float(cfg.route_temperature), cfg.route_norm)
        if cfg.entropy_split and self.n_branches == 2:
            # [R] spec: branch A pools p·(1 − s) (low-entropy, localised), branch B pools p·s (diffuse).
            s = entropy_split(e_hat, float(cfg.split_temperature))
            w_a_branch = torch.stack(
                [normalise_routes(p * (1 - s), cfg.route_norm), normalise_routes(p * s, cfg.route_norm)], 1
            )
        else:
            w_a_branch = w_a.unsqueeze(1).expand(-1, self.n_branches, -1)
        t_n = pool(w_n, z)  # [B, D], shared by the branches
        t_raw = torch.einsum("bsn,bnd->bsd", w_a_branch.to(z.dtype), z)
        if cfg.gate:
            g = confidence_gate(p, e_hat, float(cfg.gate_tau), float(cfg.gate_k0), float(cfg.gate_k1))
        else:
            g = torch.ones_like(p[:, 0])
        t_a = g.to(z.dtype)[:, None, None] * t_raw
        tokens = torch.stack([t_n.unsqueeze(1).expand_as(t_a), t_a], 2)
        return tokens, torch.stack([w_n, w_a_branch[:, 0]], 1), g

    def _prompt_forward(
        self, images: Tensor, feats: Any, p: Tensor, p_img: Tensor, loss_inputs: dict[str, Tensor]
    ) -> AnomalyOutput:
        grid = feats.grid
        # Entropy, routing and gate in float32 whatever the autocast (cheap next to the encoders).
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            e_hat = self.entropy_map(feats.attentions, p)
            z = self.patch_embeddings(feats.pre_proj_tokens[-1], grid)
            tokens, routes, gate = self.routed_tokens(p.float(), e_hat, z)
        text = self.prompts(self.clip.text, self.bias(tokens))  # [B, S, 2, D]: one text-encoder call
        # Maps in float32: bf16 logits divided by 0.07 are too coarse.
        with torch.autocast(images.device.type, enabled=False):
            logits = torch.einsum("bnd,bscd->bscn", z, text.float()) / float(self.cfg.temperature)
        probs = logits.softmax(2)  # [B, S, 2, N]
        loss_inputs["branch_probs"] = probs
        amap = self.fuse(probs, grid, tuple(images.shape[-2:]))
        if not self.training:
            amap = gaussian_blur(amap, float(self.cfg.smoothing_sigma))
        w = float(self.cfg.score_map_weight)
        score = (
            w * image_score(amap, self.cfg.score_rule, float(self.cfg.topk_frac)) + (1 - w) * p_img.float()
        )
        extras = {
            "entropy_map": tokens_to_grid(e_hat, grid).detach(),
            "routing_weights": routes.detach(),
            "gate": gate.detach(),
            "p_img": p_img.detach(),
        }
        return AnomalyOutput(amap, score.float(), extras, loss_inputs)

    def fuse(self, probs: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """Branch maps M_b = (S_a + 1 − S_n)/2, bilinear to ``size``, fused by fixed or confidence weights."""
        b, s = probs.shape[:2]
        up = upsample(tokens_to_grid(probs.flatten(1, 2).transpose(1, 2), grid), size).view(b, s, 2, *size)
        maps = (up[:, :, 1] + 1.0 - up[:, :, 0]) / 2
        if self.cfg.confidence_fusion:
            ent = -(
                torch.special.xlogy(up[:, :, 0], up[:, :, 0]) + torch.special.xlogy(up[:, :, 1], up[:, :, 1])
            )
            # A small share of the fixed weights keeps Σ c > 0 where no branch is confident (both at 0.5): the map
            # falls back to the fixed fusion there instead of collapsing to 0.
            fixed = self.branch_weights.to(maps.dtype).view(1, s, 1, 1)
            c = (1.0 - ent / math.log(2.0)).clamp_min(0.0) + _FUSION_EPS * fixed
            return (c * maps).sum(1) / c.sum(1)
        return torch.einsum("bshw,s->bhw", maps, self.branch_weights.to(maps.dtype))

    # --- loss ------------------------------------------------------------------------------------------------------
    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:
        gt = batch.gt
        if gt is None:
            raise ValueError("entroad: the auxiliary training set must have pixel masks (batch.mask is None)")
        size = tuple(gt.shape[-2:])
        grid = _grid_of(output.loss_inputs["retrieval_probs"].shape[1], size)
        if self.stage == "retrieval":
            probs = upsample(tokens_to_grid(output.loss_inputs["retrieval_probs"], grid), size)
            seg = focal_loss(probs, gt) + dice_loss(probs[:, 1], gt)
            ce = F.cross_entropy(output.loss_inputs["image_logits"].float(), batch.label.long())
            return {"loss": seg + ce, "seg": seg.detach(), "ce": ce.detach()}
        probs = output.loss_inputs["branch_probs"]  # [B, S, 2, N]
        b, s = probs.shape[:2]
        maps = upsample(tokens_to_grid(probs.flatten(0, 1).transpose(1, 2), grid), size)  # [B*S, 2, H, W]
        per_branch = torch.stack(
            [segmentation_loss(maps.view(b, s, 2, *size)[:, i], gt, both_dice=True) for i in range(s)]
        )  # S ≤ 2 branches
        total = (per_branch * self.branch_weights.to(per_branch.dtype)).sum()
        out = {"loss": total, "branch_a": per_branch[0].detach()}
        if s > 1:
            out["branch_b"] = per_branch[1].detach()
        return out

    def log_stats(self, output: AnomalyOutput) -> dict[str, float]:
        return {k: output.extras[k].float().mean() for k in ("gate", "p_img") if k in output.extras}


def _grid_of(n: int, size: tuple[int, int]) -> tuple[int, int]:
    """Square patch grid of n tokens (inputs are square; checked)."""
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"entroad: {n} patch tokens do not form a square grid for input {size}")
    return side, side


def _check_config(cfg: Any) -> None:
    if sorted(cfg.stages) != sorted(STAGES):
        raise ValueError(f"method.stages: EntroAD has the stages {list(STAGES)}, got {list(cfg.stages)}")
    if list(cfg.stages) != list(STAGES):
        raise ValueError(
            f"method.stages: the retrieval stage must come before the prompt stage, got {list(cfg.stages)}"
        )
    if not cfg.taps:
        raise ValueError("method.taps: at least one block must be tapped")
    if len(cfg.branch_weights) != 2 or min(cfg.branch_weights) < 0 or sum(cfg.branch_weights) <= 0:
        raise ValueError(
            "method.branch_weights: two non-negative weights (branch A, branch B), not both 0, expected, "
            f"got {list(cfg.branch_weights)}"
        )
    if not 0.0 < float(cfg.region_coverage) <= 1.0:
        raise ValueError(f"method.region_coverage: a defect share in (0, 1], got {cfg.region_coverage}")
