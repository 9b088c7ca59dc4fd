"""MPAMA: MPA + token-wise MoE adaptation of the visual side (``specs/mpama.md``, stage 2).

Placement ``slot`` (default): at each MoE block l of the DPAM V-V path the MoE fills the MLP slot that the V-V
path skips: x ← x + VVAttn(LN1(x_ori)) + Σ_{e ∈ top-k} g_e(u) E_e(u), u = LN2_l(x), patch tokens only (CLS
untouched); it enters through the backbone's ``vv_mlp`` callback. Placement ``after``: the MoE acts on each tapped,
projected token f' = normalise(f + Σ g_e E_e(f)) (no frozen expert there: the block MLP lives in the width, not the joint
space).

Stages: ``mpa`` trains the prompts only (no MoE in the forward); ``moe`` freezes the prompts, whose text features
``on_stage_end("mpa")`` cached, and trains routers and experts only on the segmentation terms + balance (+ z) loss —
the image CE is constant there and only logged; ``joint: true`` replaces both by one stage
``joint`` that trains everything from the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.types import Batch
from zsad.backbones.base import VisionFeatures
from zsad.config import OptimConfig, StageConfig
from zsad.methods.base import Stage
from zsad.methods.mpama.moe import FrozenDispatch, Routing, TokenMoE, routing_stats
from zsad.methods.mpama.mpa import MPA, MPAConfig
from zsad.types import AnomalyOutput, ExtraSpec

MoePlacement = Literal["slot", "after"]
PLACEMENTS = get_args(MoePlacement)
MOE_STAGES = ("moe", "joint")


@dataclass
class MPAMAConfig(MPAConfig):
    """MPAMA: MPA (stage ``mpa``) then a mixture of experts on the visual side (stage ``moe``)."""

    name: str = "mpama"
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {
            "mpa": StageConfig(epochs=15, optim=OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999])),
            "moe": StageConfig(epochs=5, optim=OptimConfig(name="adam", lr=1e-4, betas=[0.5, 0.999])),
        }
    )
    n_experts: int = 4  # K learnable experts in the shared pool
    expert_hidden: int = 64  # bottleneck width r
    expert_scale: float = 0.1  # s
    top_k: int = 2
    use_zero_expert: bool = True
    use_frozen_expert: bool = True
    router_noise: bool = True
    balance_alpha: float = 0.01  # α of the Switch load-balance loss (0 = off)
    z_loss_weight: float = 0.0  # router z-loss weight (the spec's optional 1e-3)
    moe_placement: MoePlacement = (
        "slot"  # slot (MLP slot of the V-V path) | after (on the projected tapped tokens)
    )
    moe_layers: list[int] | None = None  # 1-based blocks with a MoE (slot placement); null = the taps
    # Slot placement in every V-V block dpam_start .. last tap (ViT-L: 6..24, 19 routers) instead of the taps; a
    # depth-free spelling of moe_layers that also holds on the 4-block tiny preset.
    moe_every_vv_block: bool = False
    # Frozen-expert dispatch: gather (routed tokens only, one host sync per layer) | dense (sync-free, same result).
    frozen_dispatch: FrozenDispatch = "gather"
    joint: bool = False  # one stage `joint` training prompts and MoE together (ablation)


class MPAMA(MPA):
    """MPA with a token-wise MoE (zero, frozen and shared learnable experts) on the visual side."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        placement = cfg.moe_placement
        self.moe_blocks = self._moe_block_list()
        self._check_moe_config()
        visual = self.clip.visual
        self.moe = TokenMoE(
            dim=visual.width if placement == "slot" else visual.embed_dim,
            n_layers=len(self.moe_blocks),
            n_learnable=int(cfg.n_experts),
            hidden=int(cfg.expert_hidden),
            scale=float(cfg.expert_scale),
            top_k=int(cfg.top_k),
            zero_expert=bool(cfg.use_zero_expert),
            frozen_expert=bool(cfg.use_frozen_expert),
            noisy=bool(cfg.router_noise),
            frozen_dispatch=str(cfg.frozen_dispatch),
        )
        self._moe_pos = {block: i for i, block in enumerate(self.moe_blocks)}
        # Text features of the frozen prompts (stage moe); rebuilt from the prompts, so not saved.
        self.register_buffer("frozen_text", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_frozen_text())

    def _moe_block_list(self) -> list[int]:
        """1-based blocks with a MoE: the taps (placement after, or by default), ``moe_layers``, or every V-V block."""
        cfg = self.cfg
        taps = [int(t) for t in cfg.taps]
        if cfg.moe_every_vv_block and cfg.moe_layers:
            raise ValueError("method.moe_every_vv_block: set it or method.moe_layers, not both")
        if cfg.moe_placement == "after":
            return taps
        if cfg.moe_every_vv_block and cfg.dpam_start is not None:
            return list(range(int(cfg.dpam_start), max(taps) + 1))
        return [int(b) for b in cfg.moe_layers] if cfg.moe_layers else taps

    def _check_moe_config(self) -> None:
        cfg = self.cfg
        if cfg.moe_placement == "after":
            if cfg.use_frozen_expert:
                raise ValueError(
                    "method.use_frozen_expert: the frozen expert (a block MLP) cannot act on projected tokens; "
                    "set it to false with moe_placement: after"
                )
            if cfg.moe_every_vv_block or (
                cfg.moe_layers and [int(b) for b in cfg.moe_layers] != self.moe_blocks
            ):
                raise ValueError(
                    "method.moe_layers / moe_every_vv_block: with moe_placement: after the MoE layers are the taps"
                )
            return
        start, last = cfg.dpam_start, max(int(t) for t in cfg.taps)
        if start is None:
            raise ValueError("method.dpam_start: the slot placement needs the V-V path (set dpam_start)")
        bad = [b for b in self.moe_blocks if not start <= b <= last]
        if bad or len(set(self.moe_blocks)) != len(self.moe_blocks):
            raise ValueError(
                f"method.moe_layers: blocks {self.moe_blocks} must be distinct V-V blocks in {start}..{last} "
                "(dpam_start .. last tap)"
            )

    # --- stages ----------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        stages = self.cfg.stages
        allowed = {"mpa", "moe", "joint"}
        if set(stages) - allowed:
            raise ValueError(
                f"method.stages: unknown stage(s) {sorted(set(stages) - allowed)}; expected {allowed}"
            )
        if self.cfg.joint:
            joint = stages["joint"] if "joint" in stages else stages["mpa"]
            return [Stage("joint", int(joint.epochs), joint.optim)]
        missing = [s for s in ("mpa", "moe") if s not in stages]
        if missing:
            raise ValueError(f"method.stages: missing stage(s) {missing} (or set method.joint: true)")
        return [Stage(name, int(stages[name].epochs), stages[name].optim) for name in ("mpa", "moe")]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.moe.requires_grad_(name in MOE_STAGES)
        self.prompts.requires_grad_(name != "moe")

    def on_stage_end(self, name: str) -> None:
        if name == "mpa":
            self.clear_frozen_text()
            self.frozen_prompt_features()

    @property
    def moe_active(self) -> bool:
        return self.stage in MOE_STAGES

    # --- text: frozen after stage mpa ----------------------------------------------------------------------------
    def frozen_prompt_features(self) -> Tensor:
        """The frozen prompts' features, encoded once (after stage mpa, or lazily after a weight load)."""
        if self.frozen_text is None:
            with torch.inference_mode(False), torch.no_grad():
                self.frozen_text = self.encode_prompts()
        return self.frozen_text

    def clear_frozen_text(self) -> None:
        self.frozen_text = None

    def text_features(self) -> Tensor:
        if self.stage == "moe":
            return self.frozen_prompt_features()
        return super().text_features()

    # --- vision: the MoE in the V-V MLP slot or after extraction -------------------------------------------------
    def vision_features(self, images: Tensor, records: list) -> VisionFeatures:
        if not (self.moe_active and self.cfg.moe_placement == "slot"):
            return super().vision_features(images, records)
        return self.clip.visual(
            images,
            taps=tuple(int(t) for t in self.cfg.taps),
            dpam_start=self.cfg.dpam_start,
            vv_mlp=partial(self._slot_moe, records),
        )

    def _slot_moe(self, records: list[Routing], block_idx: int, block: nn.Module, x: Tensor) -> Tensor | None:
        """``vv_mlp`` callback: the MoE residual for the patch tokens of V-V block ``block_idx``, zero for CLS."""
        pos = self._moe_pos.get(block_idx)
        if pos is None:
            return None
        u = block.ln_2(x[:, 1:])
        frozen = partial(frozen_mlp, block) if self.moe.frozen_col is not None else None
        delta, routing = self.moe(pos, u.flatten(0, 1), frozen)
        records.append(routing)
        return F.pad(delta.view_as(u), (0, 0, 1, 0))

    def tap_tokens(self, feats: VisionFeatures, records: list) -> list[Tensor]:
        tokens = super().tap_tokens(feats, records)
        if not (self.moe_active and self.cfg.moe_placement == "after"):
            return tokens
        out = []
        for pos, f in enumerate(tokens):
            delta, routing = self.moe(pos, f.flatten(0, 1))
            records.append(routing)
            # F^l must be unit tokens before the levels average them (pool_level renormalises only after).
            out.append(F.normalize(f + delta.view_as(f), dim=-1))
        return out

    # --- routing statistics and loss -------------------------------------------------------------------------------
    def routing_outputs(self, records: list[Routing]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not records:
            return {}, {}
        balance, z_loss, shares = routing_stats(records)
        return {"expert_share": shares}, {"balance": balance, "z_loss": z_loss}

    def image_ce_trains(self) -> bool:
        # Stage moe: the CE reads the CLS of the frozen original path and the cached prompt features, so it is a
        # constant; adding it would only offset the logged loss (it stays logged as ``ce``).
        return self.stage != "moe"

    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:
        terms = super().loss(output, batch)
        if "balance" not in output.loss_inputs:
            return terms
        balance = float(self.cfg.balance_alpha) * output.loss_inputs["balance"]
        z_loss = float(self.cfg.z_loss_weight) * output.loss_inputs["z_loss"]
        terms["loss"] = terms["loss"] + balance + z_loss
        terms["balance"] = balance.detach()
        terms["z_loss"] = z_loss.detach()
        return terms

    def extra_specs(self) -> dict[str, ExtraSpec]:
        """``expert_share`` [MoE layers, experts]: one table per batch (rows sum to 1), never per image."""
        rows = tuple(str(b) for b in self.moe_blocks)
        spec = ExtraSpec(
            "batch_table", rows=rows, cols=tuple(self.moe.names), row_name="block", col_name="expert"
        )
        return {"expert_share": spec}

    def log_stats(self, output: AnomalyOutput) -> dict[str, Tensor | float]:
        """Per-layer expert token shares: ``share/l{block}/{expert}`` (expert ∈ zero, frozen, l0 …).

        0-d device tensors (views of the [L, E] table): logging them needs no host sync per step.
        """
        shares = output.extras.get("expert_share")
        if shares is None:
            return {}
        return {
            f"share/l{block}/{name}": shares[i, e]
            for i, block in enumerate(self.moe_blocks)
            for e, name in enumerate(self.moe.names)
        }


def frozen_mlp(block: nn.Module, u: Tensor) -> Tensor:
    """The frozen expert: CLIP block's own pretrained MLP (and its layer scale) on LN2-normalised tokens."""
    return block.ls_2(block.mlp(u))
