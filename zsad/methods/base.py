"""The contract every method model fulfils. ``ZSADModule`` knows nothing beyond it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from data_modules.types import Batch, Sample
from zsad.backbones.base import (  # the normalisation constants are re-exported here for older imports
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,  # noqa: F401
    IMAGENET_STD,  # noqa: F401
    Backbone,
)
from zsad.types import AnomalyOutput, ExtraSpec


@dataclass
class Stage:
    """One training stage: name, epochs and optimiser settings (``cfg.method.stages[name]``)."""

    name: str
    epochs: int
    optim: Any


@runtime_checkable
class AuxiliaryData(Protocol):
    """The auxiliary (training) set as the DataModule holds it (``data_modules.datamodule.ZSADDataModule``).

    Attributes:
        train_samples: its samples (empty in a test-only run).
        mask_resize: how its masks are resized (``data.mask_resize``): the one data option that changes its batches
            beyond the method's own preprocessing.
    """

    train_samples: list[Sample]
    mask_resize: str

    def auxiliary_dataloader(
        self, batch_size: int | None = None, num_workers: int | None = None
    ) -> Iterable[Batch]:
        """Its batches for one pass, in sample order, with masks, preprocessed as the training batches."""
        ...


class ZSADMethod(nn.Module):
    """Base class of a method: a pure ``nn.Module`` with frozen backbones and trainable adapters/prompts.

    Subclasses implement ``forward`` and ``loss`` and list their frozen submodules in ``frozen_modules`` (attribute
    names): those are excluded from the optimiser and from checkpoints, and kept in eval mode.
    Multi-stage methods (MPAMA, EntroAD) override ``set_stage`` to choose what trains in each stage.
    """

    frozen_modules: tuple[str, ...] = ()
    # The data layer's preprocessing; a method on a vision backbone copies its backbone's (``vision_backbone``).
    interpolation: str = "bicubic"  # image resize used by the data layer
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    #: The extras ``forward`` may return, by name (see ``extra_specs``).
    EXTRAS: ClassVar[dict[str, ExtraSpec]] = {}

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage = self.stages()[0].name if self.stages() else "main"

    # --- data interface -------------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return int(self.cfg.image_size)

    # --- the two calls ZSADModule makes ----------------------------------------------------------------------
    def forward(self, images: Tensor, batch: Batch) -> AnomalyOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, output: AnomalyOutput, batch: Batch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Loss terms; the key ``loss`` holds the total that is optimised."""
        raise NotImplementedError

    # --- training stages -------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage(name, int(s.epochs), s.optim) for name, s in self.cfg.stages.items()]

    def set_stage(self, name: str) -> None:
        """Select what trains in stage ``name``. Default: every non-frozen parameter."""
        if name not in [s.name for s in self.stages()]:
            raise ValueError(
                f"{type(self).__name__} has no stage {name!r}; stages: {[s.name for s in self.stages()]}"
            )
        self.stage = name
        for p in self.trainable_candidates():
            p.requires_grad_(True)

    def trainable_candidates(self) -> list[nn.Parameter]:
        """Every parameter outside the frozen modules."""
        frozen = {id(p) for m in self.frozen_modules for p in getattr(self, m).parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def prepare(self, data: AuxiliaryData | None, cache_dir: Path, device: torch.device) -> None:
        """Hook run once before training with the DataModule (``None`` when it holds no auxiliary set): EntroAD
        builds its memory here from the batches ``data.auxiliary_dataloader`` provides. Default: nothing."""

    def on_stage_end(self, name: str) -> None:
        """Hook run after a stage's fit (MPAMA caches its frozen prompts' text features here)."""

    # --- frozen parts ------------------------------------------------------------------------------------------
    @property
    def vision_backbone(self) -> Backbone | None:
        """The frozen vision backbone (a ``zsad.backbones.base.Backbone``) the benches time and hook; ``None``
        for a method without one. Every method on a backbone overrides this."""
        return None

    def adopt_preprocessing(self, backbone: Backbone) -> None:
        """Take the data layer's normalisation and resize from the vision backbone the weights belong to."""
        self.mean = tuple(float(m) for m in backbone.mean)
        self.std = tuple(float(s) for s in backbone.std)
        self.interpolation = str(backbone.interpolation)

    def train(self, mode: bool = True) -> ZSADMethod:
        super().train(mode)
        for m in self.frozen_modules:  # frozen is frozen: no dropout/BN updates, whatever Lightning asks
            getattr(self, m).eval()
        return self

    def identity(self) -> dict[str, Any]:
        """Backbone identity stored with checkpoints: a checkpoint refuses to load onto another backbone."""
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, Tensor]:
        prefixes = tuple(f"{m}." for m in self.frozen_modules)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        prefixes = tuple(f"{m}." for m in self.frozen_modules)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing}, unexpected {unexpected}"
            )

    def extra_specs(self) -> dict[str, ExtraSpec]:
        """The declared shape of every extra ``forward`` may return; the Evaluator refuses any other.

        Default: the class's ``EXTRAS``. Override where labels depend on the config (MoE layers, taps).
        """
        return dict(self.EXTRAS)

    def log_stats(self, output: AnomalyOutput) -> dict[str, Tensor | float]:
        """Scalars to log each training step besides the loss terms (routing shares …). Default none."""
        return {}


def build_optimizer(params: list[nn.Parameter], optim: Any, total_steps: int):  # noqa: ANN201
    """Adam/AdamW with optional linear warm-up over ``optim.warmup_frac`` of the steps, then constant."""
    kw = dict(lr=float(optim.lr), betas=tuple(optim.betas), weight_decay=float(optim.weight_decay))
    if optim.name == "adam":
        opt = torch.optim.Adam(params, **kw)
    elif optim.name == "adamw":
        opt = torch.optim.AdamW(params, **kw)
    else:
        raise ValueError(f"optim.name: unknown optimiser {optim.name!r}; expected adam or adamw")
    warm = max(0, int(round(float(optim.warmup_frac) * total_steps)))
    if warm == 0:
        return opt, None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    return opt, sched
