"""A tiny two-stage method for framework tests (ZSADModule, checkpoints, DDP, config)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zsad.config import BackboneConfig, MethodConfig, OptimConfig, StageConfig
from zsad.losses import dice_loss
from zsad.methods.base import ZSADMethod
from zsad.types import AnomalyOutput, ExtraSpec


@dataclass
class DummyConfig(MethodConfig):
    name: str = "dummy"
    image_size: int = 32
    batch_size: int = 4
    smoothing_sigma: float = 0.0
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="conv", pretrained="none"))
    width: int = 8
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {
            "first": StageConfig(epochs=1, optim=OptimConfig(name="adam", lr=1e-2)),
            "second": StageConfig(epochs=1, optim=OptimConfig(name="adamw", lr=1e-2, warmup_frac=0.5)),
        }
    )


class Dummy(ZSADMethod):
    """Frozen random conv 'backbone' + a 1x1 head (stage first) + a bias map (stage second)."""

    frozen_modules = ("backbone",)
    EXTRAS = {"mean_prob": ExtraSpec("image_scalar")}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        g = torch.Generator().manual_seed(
            123
        )  # same frozen weights in every process, as pretrained ones would be
        self.backbone = nn.Conv2d(3, cfg.width, 3, padding=1)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.randn(self.backbone.weight.shape, generator=g) * 0.3)
            self.backbone.bias.zero_()
        self.backbone.requires_grad_(False)
        self.head = nn.Conv2d(cfg.width, 1, 1)
        self.offset = nn.Parameter(torch.zeros(1))

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.head.requires_grad_(name == "first")
        self.offset.requires_grad_(name == "second")

    def forward(self, images, batch):
        with torch.no_grad():
            f = self.backbone(images).relu()
        logits = self.head(f)[:, 0] + self.offset
        prob = logits.sigmoid()
        return AnomalyOutput(
            prob.float(),
            prob.flatten(1).amax(1).float(),
            {"mean_prob": prob.mean((1, 2))},
            {"logits": logits},
        )

    def loss(self, output, batch):
        gt = batch.gt
        bce = F.binary_cross_entropy_with_logits(output.loss_inputs["logits"], gt)
        dice = dice_loss(output.anomaly_map, gt)
        return {"loss": bce + dice, "bce": bce, "dice": dice}

    def identity(self):
        return {
            "backbone": self.cfg.backbone.name,
            "pretrained": self.cfg.backbone.pretrained,
            "image_size": self.input_size,
        }
