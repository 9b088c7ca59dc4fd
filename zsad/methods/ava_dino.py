"""AVA-DINO: anomaly-aware vision-language adapters on a frozen DINOv3 and a frozen CLIP text tower.

Spec: ``specs/ava_dino.md``. Every equation lives in :class:`AvaDinoHeads` (the trainable part, buildable without
any backbone) and in :meth:`AvaDino.forward` / :meth:`AvaDino.loss` (upsampling, averaging, losses).

Notation: B batch, L taps, N patches, D DINO width, d_t CLIP text width, h adapter hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.types import Batch
from zsad.backbones.base import Backbone
from zsad.backbones.clip import build_clip
from zsad.backbones.dinov3 import build_dinov3
from zsad.config import BackboneConfig, MapScoreRule, MethodConfig, OptimConfig, StageConfig
from zsad.losses import dice_loss, focal_loss
from zsad.maps import gaussian_blur, image_score, upsample
from zsad.methods.base import ZSADMethod
from zsad.prompts.ensemble import EnsembleTextCache
from zsad.types import AnomalyOutput, ExtraSpec

CM_SCALE = 100.0  # cross-modal and global logit scale (CLIP's)
AACM_SCALE = 10.0  # patch · fused-CLS logit scale of the calibration map
LRELU_SLOPE = 0.01
STD_EPS = 1e-6
Routing = Literal["text", "uniform"]
ROUTINGS = get_args(Routing)


@dataclass
class AvaDinoConfig(MethodConfig):
    """AVA-DINO hyper-parameters; defaults are the paper's (reference code's) values."""

    name: str = "ava_dino"
    image_size: int = 512
    batch_size: int = 16
    smoothing_sigma: float = 0.0  # the reference does not smooth
    score_rule: MapScoreRule = "max"
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {
            "main": StageConfig(
                epochs=10,
                optim=OptimConfig(
                    name="adamw", lr=1e-4, betas=[0.9, 0.999], weight_decay=1e-2, warmup_frac=0.03
                ),
            )
        }
    )
    vision: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="vit_large_patch16_dinov3", pretrained="lvd1689m")
    )
    text: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="ViT-L-14-336-quickgelu", pretrained="openai")
    )
    taps: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based DINOv3 blocks
    tau: float = 0.1  # routing temperature (initial value when learn_tau)
    hidden: int = 768  # bottleneck width of the visual adapters
    w_cm: float = 0.5
    w_aacm: float = 0.25
    w_glob: float = 0.25
    w_route: float = 0.1
    # ablations
    routing: Routing = "text"  # text | uniform (single adapter: w = 0.5 / 0.5)
    route_reg: bool = True
    aacm: bool = True
    cls_adapt: bool = True
    learn_tau: bool = False
    shared_adapters: bool = False
    # reproduce the reference implementation's bugs
    faithful_gelu_bug: bool = False  # text tower with GELU instead of QuickGELU
    faithful_interleave_bug: bool = False  # prototypes through cat([a_n, a_a], 1).view(B, d_t, 2)
    # Store the frozen DINOv3 weights in bf16 and run it under bf16 autocast whatever the trainer's precision
    # (no per-step weight casts: DESIGN.md measured 279 → 344 img/s for ViT-L/16 at 512² on an H100). Heads stay fp32.
    vision_bf16: bool = False


class BottleneckAdapter(nn.Module):
    """A(x) = LReLU(W2 · LReLU(W1 x)), no biases; returns the hidden h and the output y."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.leaky_relu(self.down(x), LRELU_SLOPE)
        return h, F.leaky_relu(self.up(h), LRELU_SLOPE)


class PromptAdapter(nn.Module):
    """The hidden half of a d_t → d_t → d_t bottleneck: only h is used, so W2 is not built (it gets no gradient)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.down(x), LRELU_SLOPE)


def standardise(patches: Tensor) -> Tensor:
    """Per-image, per-channel standardisation over the N patches of [..., N, D] (unbiased std, as the reference)."""
    patches = patches.float()
    mean = patches.mean(dim=-2, keepdim=True)
    std = patches.std(dim=-2, keepdim=True)
    return (patches - mean) / (std + STD_EPS)


def stack_prompts(a_n: Tensor, a_a: Tensor, interleave_bug: bool = False) -> Tensor:
    """[B, 2, d] prompt-adapted text (normal, anomalous).

    With ``interleave_bug`` the reference's ``cat([a_n, a_a], 1).view(B, d, 2)`` is reproduced: column c of the view
    takes every second element (offset c) of the concatenation, so each "prototype" mixes halves of both texts.
    """
    if not interleave_bug:
        return torch.stack([a_n, a_a], dim=1)
    b, d = a_n.shape
    return torch.cat([a_n, a_a], dim=1).view(b, d, 2).transpose(1, 2)


def routing_loss(weights: Tensor, labels: Tensor) -> Tensor:
    """L_route = MSE(w̄_n, 1 − y) + MSE(w̄_a, y), w̄ = mean over taps of the routing weights [B, L, 2]."""
    w_bar = weights.float().mean(dim=1)
    y = labels.float()
    return F.mse_loss(w_bar[:, 0], 1.0 - y) + F.mse_loss(w_bar[:, 1], y)


class AvaDinoHeads(nn.Module):
    """Everything AVA-DINO trains: P, per-tap patch/CLS adapter pairs, prompt adapters, optionally log τ.

    Args:
        width: D, the DINO token width.
        text_dim: d_t, the CLIP text embedding width.
        hidden: h, the visual adapters' bottleneck width.
        n_taps: L.
        tau: routing temperature (fixed, or the initial value when ``learn_tau``).
        routing: ``text`` (text-guided) or ``uniform`` (w = 0.5 / 0.5).
        cls_adapt: adapt the CLS token (else the fused CLS is the normalised raw CLS).
        learn_tau: τ is a trainable parameter (log-parametrised).
        shared_adapters: one adapter set for every tap instead of one per tap.
        interleave_bug: build prototypes as the reference's reshape does.
    """

    def __init__(
        self,
        width: int,
        text_dim: int,
        hidden: int,
        n_taps: int,
        tau: float = 0.1,
        routing: str = "text",
        cls_adapt: bool = True,
        learn_tau: bool = False,
        shared_adapters: bool = False,
        interleave_bug: bool = False,
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"method.routing: unknown routing {routing!r}; expected one of {ROUTINGS}")
        if tau <= 0:
            raise ValueError(f"method.tau must be > 0, got {tau}")
        self.n_taps, self.routing, self.interleave_bug = n_taps, routing, interleave_bug
        sets = 1 if shared_adapters else n_taps
        self.text_proj = nn.Linear(text_dim, width, bias=False)  # P: text → DINO space
        self.patch_adapters = nn.ModuleList(
            [nn.ModuleList([BottleneckAdapter(width, hidden) for _ in range(2)]) for _ in range(sets)]
        )
        self.cls_adapters = (
            nn.ModuleList(
                [nn.ModuleList([BottleneckAdapter(width, hidden) for _ in range(2)]) for _ in range(sets)]
            )
            if cls_adapt
            else None
        )
        self.prompt_adapters = nn.ModuleList([PromptAdapter(text_dim) for _ in range(2)])
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau))) if learn_tau else None
        self._tau = float(tau)

    @property
    def tau(self) -> Tensor | float:
        return self.log_tau.exp() if self.log_tau is not None else self._tau

    def route(self, cls: Tensor, text: Tensor) -> Tensor:
        """Routing weights [B, L, 2] = softmax_c(ĉ_l · u_c / τ), u_c = P t_c / ‖P t_c‖.

        Args:
            cls: [B, L, D] raw CLS tokens per tap.
            text: [B, 2, d_t] ensemble text features (normal, anomalous).
        """
        if self.routing == "uniform":
            return cls.new_full((*cls.shape[:2], 2), 0.5, dtype=torch.float32)
        c_hat = F.normalize(cls.float(), dim=-1)
        u = F.normalize(self.text_proj(text).float(), dim=-1)
        return torch.softmax(torch.einsum("bld,bcd->blc", c_hat, u) / self.tau, dim=-1)

    def prototypes(self, text: Tensor) -> Tensor:
        """T = [P a_n, P a_a] as [B, 2, D] (not normalised), a_c = h(PA_c(t_c))."""
        a_n = self.prompt_adapters[0](text[:, 0])
        a_a = self.prompt_adapters[1](text[:, 1])
        return self.text_proj(stack_prompts(a_n, a_a, self.interleave_bug))

    @staticmethod
    def fuse(x: Tensor, pair: nn.ModuleList, w: Tensor) -> Tensor:
        """f̂ = normalise(w_n A_n(x) + w_a A_a(x) + x); ``w`` [B, 2] broadcasts over the token dims of x."""
        w = w.view(w.shape[0], *([1] * (x.ndim - 2)), 2).to(x.dtype)
        y = w[..., 0:1] * pair[0](x)[1] + w[..., 1:2] * pair[1](x)[1] + x
        return F.normalize(y, dim=-1)

    def forward(self, patches: Tensor, cls: Tensor, text: Tensor, aacm: bool = True) -> dict[str, Tensor]:
        """Low-resolution logits of every tap.

        Args:
            patches: [B, L, N, D] patch tokens after the final norm (standardised here).
            cls: [B, L, D] CLS tokens after the final norm.
            text: [B, 2, d_t] ensemble text features.
            aacm: also compute the calibration-map logits.

        Returns:
            ``cm`` [B, L, N, 2] (100 · p̂ Tᵀ), ``aacm`` [B, L, N] (10 · p̂ · ĉ', only when asked), ``global``
            [B, L, 2] (100 · ĉ' Tᵀ), ``routing`` [B, L, 2].
        """
        # fp32 whatever autocast is active: bf16 logits of scale 100 are quantised in steps of 0.5 and would
        # turn the maps into ties (DESIGN: precision). Only the frozen backbones may run in bf16.
        with torch.autocast(device_type=patches.device.type, enabled=False):
            return self._logits(standardise(patches), cls.float(), text.float(), aacm)

    def _logits(self, p_std: Tensor, cls: Tensor, text: Tensor, aacm: bool) -> dict[str, Tensor]:
        w = self.route(cls, text)
        protos = self.prototypes(text)  # [B, 2, D]
        cm, aa, glob = [], [], []
        for tap in range(self.n_taps):
            k = tap if len(self.patch_adapters) > 1 else 0
            p_hat = self.fuse(p_std[:, tap], self.patch_adapters[k], w[:, tap])
            c = cls[:, tap]
            c_hat = (
                self.fuse(c, self.cls_adapters[k], w[:, tap])
                if self.cls_adapters is not None
                else F.normalize(c, dim=-1)
            )
            cm.append(CM_SCALE * p_hat @ protos.transpose(1, 2))
            glob.append(CM_SCALE * torch.einsum("bd,bcd->bc", c_hat, protos))
            if aacm:
                aa.append(AACM_SCALE * torch.einsum("bnd,bd->bn", p_hat, c_hat))
        out = {"cm": torch.stack(cm, 1), "global": torch.stack(glob, 1), "routing": w}
        if aacm:
            out["aacm"] = torch.stack(aa, 1)
        return out


class AvaDino(ZSADMethod):
    """AVA-DINO on the method contract: frozen ``vision`` (DINOv3) and ``text`` (CLIP text tower), trainable ``heads``."""

    frozen_modules = ("vision", "text")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.vision = build_dinov3(
            str(cfg.vision.name),
            str(cfg.vision.pretrained),
            int(cfg.image_size),
            config_key="method.vision.pretrained",
        )
        self.adopt_preprocessing(self.vision)  # ImageNet mean/std, bilinear resize
        self.text = build_clip(
            str(cfg.text.name),
            str(cfg.text.pretrained),
            vision=False,
            text=True,
            # The reference runs the OpenAI (QuickGELU-trained) text weights with GELU.
            force_quick_gelu=False if cfg.faithful_gelu_bug else None,
            config_key="method.text.pretrained",
        )
        if cfg.vision_bf16:
            self.vision.to(torch.bfloat16)
        self.taps = tuple(int(t) for t in cfg.taps)
        self.heads = AvaDinoHeads(
            width=self.vision.width,
            text_dim=_text_dim(self.text),
            hidden=int(cfg.hidden),
            n_taps=len(self.taps),
            tau=float(cfg.tau),
            routing=str(cfg.routing),
            cls_adapt=bool(cfg.cls_adapt),
            learn_tau=bool(cfg.learn_tau),
            shared_adapters=bool(cfg.shared_adapters),
            interleave_bug=bool(cfg.faithful_interleave_bug),
        )
        self.text_cache = EnsembleTextCache()

    def text_features(self, class_names: list[str], device: torch.device) -> Tensor:
        """[B, 2, d_t] cached ensemble features (normal, anomalous) per image's class name."""
        return self.text_cache(class_names, self.text.text, device)

    def forward(self, images: Tensor, batch: Batch) -> AnomalyOutput:
        size = tuple(images.shape[-2:])
        if self.cfg.vision_bf16:
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                feats = self.vision(images, taps=self.taps)
        else:
            feats = self.vision(images, taps=self.taps)
        patches = torch.stack(feats.patch_tokens, dim=1)  # [B, L, N, D]
        cls = torch.stack(feats.cls_tokens, dim=1)  # [B, L, D]
        text = self.text_features(list(batch.class_name), images.device)
        want_loss = self.training
        logits = self.heads(patches, cls, text, aacm=want_loss and bool(self.cfg.aacm))

        b, n_taps, n, _ = logits["cm"].shape
        cm = _to_maps(logits["cm"].permute(0, 1, 3, 2), feats.grid, size)  # [B, L, 2, H, W]
        cm_probs = torch.softmax(cm, dim=2).mean(dim=1)  # M_cm [B, 2, H, W]
        anomaly_map = gaussian_blur(cm_probs[:, 1], float(self.cfg.smoothing_sigma))
        score = image_score(anomaly_map, str(self.cfg.score_rule))
        extras = {"routing_weights": logits["routing"].detach()}
        loss_inputs: dict[str, Tensor] = {}
        if want_loss:
            loss_inputs = {
                "cm_probs": cm_probs,
                "global": logits["global"].mean(dim=1),
                "routing": logits["routing"],
            }
            if "aacm" in logits:
                a = torch.sigmoid(_to_maps(logits["aacm"][:, :, None], feats.grid, size))  # [B, L, 1, H, W]
                loss_inputs["aacm_probs"] = torch.cat([1.0 - a, a], dim=2).mean(dim=1)
        return AnomalyOutput(anomaly_map.float(), score.float(), extras, loss_inputs)

    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:
        cfg, li = self.cfg, output.loss_inputs
        if "cm_probs" not in li:
            raise RuntimeError(
                "AvaDino.loss needs the loss inputs of a forward in training mode (model.train())"
            )
        gt = batch.gt
        if gt is None:
            raise ValueError("AVA-DINO trains on pixel masks: the auxiliary dataset's batch has no mask")
        if gt.shape[-2:] != li["cm_probs"].shape[-2:]:
            raise ValueError(
                f"mask size {tuple(gt.shape[-2:])} != map size {tuple(li['cm_probs'].shape[-2:])}"
            )
        zero = li["cm_probs"].new_zeros(())
        terms = {
            "focal_cm": focal_loss(li["cm_probs"], gt),
            "dice_cm": dice_loss(li["cm_probs"][:, 1], gt),
            "focal_aacm": focal_loss(li["aacm_probs"], gt) if "aacm_probs" in li else zero,
            "dice_aacm": dice_loss(li["aacm_probs"][:, 1], gt) if "aacm_probs" in li else zero,
            "ce_glob": F.cross_entropy(li["global"].float(), batch.label.long()),
            "route": routing_loss(li["routing"], batch.label),
        }
        use_route = bool(cfg.route_reg) and cfg.routing == "text"
        total = (
            float(cfg.w_cm) * (terms["focal_cm"] + terms["dice_cm"])
            + float(cfg.w_aacm) * (terms["focal_aacm"] + terms["dice_aacm"])
            + float(cfg.w_glob) * terms["ce_glob"]
            + (float(cfg.w_route) * terms["route"] if use_route else zero)
        )
        return {"loss": total, **terms}

    @property
    def vision_backbone(self) -> Backbone:
        return self.vision

    def identity(self) -> dict[str, Any]:
        return {"vision": self.vision.identity(), "text": self.text.identity(), "taps": list(self.taps)}

    def extra_specs(self) -> dict[str, ExtraSpec]:
        """``routing_weights`` [B, taps, 2]: per image, the (normal, anomalous) adapter weights of every tap."""
        taps = tuple(str(t) for t in self.taps)
        spec = ExtraSpec(
            "image_table", rows=taps, cols=("normal", "anomalous"), row_name="tap", col_name="adapter"
        )
        return {"routing_weights": spec}

    def log_stats(self, output: AnomalyOutput) -> dict[str, Tensor]:
        """Mean anomalous routing weight of the batch, a 0-dim device tensor (no host sync here)."""
        w = output.extras.get("routing_weights")
        return {} if w is None else {"routing_w_anomalous": w[..., 1].float().mean()}


def _to_maps(logits: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """[B, L, C, N] per-tap patch logits → [B, L, C, H, W], bilinear with align_corners=True, float32."""
    b, n_taps, c, _ = logits.shape
    x = logits.float().reshape(b * n_taps, c, *grid)
    return upsample(x, size, align_corners=True).view(b, n_taps, c, *size)


def _text_dim(text: nn.Module) -> int:
    return int(text.text.embed_dim)
