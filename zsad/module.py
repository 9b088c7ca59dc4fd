"""``ZSADModule``: the one LightningModule that trains and evaluates any method.

It knows nothing method-specific beyond ``model(images, batch) -> AnomalyOutput`` and
``model.loss(output, batch) -> dict``. Frozen backbones are excluded from the optimiser and from checkpoints: a
checkpoint holds the trainable weights, the config and the backbone identity, and refuses to load onto another
backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from data_modules.types import Batch
from zsad.dist import destroy_process_group_at_exit
from zsad.methods.base import AuxiliaryData, ZSADMethod, build_optimizer
from zsad.registry import build_method
from zsad.types import AnomalyOutput, ExtraSpec


class CheckpointMismatch(RuntimeError):
    """A checkpoint was made with another method or backbone than the one it is being loaded onto."""


class ZSADModule(L.LightningModule):
    """Trains the current stage of a method and feeds the Evaluator on test.

    Args:
        cfg: the composed run config (``zsad.config.compose``).
        cache_dir: where methods may cache derived data (EntroAD's memory).
    """

    def __init__(self, cfg: DictConfig | dict, cache_dir: str | Path = ".cache/zsad") -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.save_hyperparameters({"config": OmegaConf.to_container(self.cfg, resolve=True)})
        self.model: ZSADMethod = build_method(self.cfg.method)
        self.cache_dir = Path(cache_dir)
        self.stage_name = self.model.stage
        self.train_s = 0.0
        self._prepared = False

    # --- stages ------------------------------------------------------------------------------------------------
    def set_stage(self, name: str) -> None:
        self.model.set_stage(name)
        self.stage_name = name

    def current_stage(self):  # noqa: ANN201
        return next(s for s in self.model.stages() if s.name == self.stage_name)

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    def on_fit_start(self) -> None:
        if not self._prepared:
            dm = getattr(self.trainer, "datamodule", None)
            data = (
                dm if isinstance(dm, AuxiliaryData) else None
            )  # the auxiliary set's batches come from the DataModule
            # Under DDP rank 0 prepares first (EntroAD builds and caches its memory); the others then find the cache.
            if self.trainer.world_size > 1 and not self.trainer.is_global_zero:
                self.trainer.strategy.barrier("zsad-prepare")
                self.model.prepare(data, self.cache_dir, self.device)
            else:
                self.model.prepare(data, self.cache_dir, self.device)
                if self.trainer.world_size > 1:
                    self.trainer.strategy.barrier("zsad-prepare")
            self._prepared = True

    # --- steps -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, batch: Batch) -> AnomalyOutput:
        return self.model(images, batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.model(batch.image, batch)
        losses = self.model.loss(out, batch)
        n = len(batch)
        for key, value in losses.items():
            self.log(f"train/{self.stage_name}/{key}", value.detach(), batch_size=n, prog_bar=key == "loss")
        for key, value in self.model.log_stats(out).items():
            # tensors stay on the device: no host sync per step
            value = value.detach() if torch.is_tensor(value) else float(value)
            self.log(f"train/{self.stage_name}/{key}", value, batch_size=n)
        return losses["loss"]

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        out = self.model(batch.image, batch)
        extras = {k: v.detach() for k, v in out.extras.items() if torch.is_tensor(v)}
        return {"maps": out.anomaly_map.float(), "scores": out.image_score.float(), "extras": extras}

    def extra_specs(self) -> dict[str, ExtraSpec]:
        """The method's declared extras: the Evaluator keeps, aggregates and draws each by its kind."""
        return self.model.extra_specs()

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> AnomalyOutput:
        return self.model(batch.image, batch)

    def configure_optimizers(self):  # noqa: ANN201
        stage = self.current_stage()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"stage {stage.name!r} of {self.cfg.method.name} has no trainable parameters")
        opt, sched = build_optimizer(params, stage.optim, int(self.trainer.estimated_stepping_batches))
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: trainable state + config + backbone identity -----------------------------------------------
    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"model.{m}." for m in self.model.frozen_modules)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefixes = self._frozen_prefixes()
        return OrderedDict((k, v) for k, v in full.items() if not k.startswith(prefixes))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):  # noqa: ANN201
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith(self._frozen_prefixes())]
        if strict and (missing or unexpected):
            raise CheckpointMismatch(
                f"checkpoint does not fit {self.cfg.method.name}: missing {missing}, unexpected {unexpected}"
            )
        return missing, unexpected

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["zsad"] = {
            "method": self.cfg.method.name,
            "identity": self.model.identity(),
            "stage": self.stage_name,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_identity(checkpoint, self.cfg.method.name, self.model.identity())

    @classmethod
    def from_checkpoint(cls, cfg: DictConfig, cache_dir: str | Path = ".cache/zsad") -> ZSADModule:
        """The module of ``cfg.checkpoint`` ready to evaluate: built, loaded, stages replayed up to the saved one.

        Seeds first: with ``pretrained: none`` the random frozen backbone must equal the training run's.
        """
        from zsad.config import ConfigError

        if not cfg.checkpoint:
            raise ConfigError("checkpoint: evaluation needs checkpoint=PATH (a zsad training checkpoint)")
        L.seed_everything(int(cfg.seed), workers=True)
        module = cls(cfg, cache_dir=cache_dir)
        stage = module.load_trainable(cfg.checkpoint)["zsad"]["stage"]
        for s in module.model.stages():  # as training ran them: select the stage, then its end-of-stage hook
            module.set_stage(s.name)
            module.model.on_stage_end(s.name)
            if s.name == stage:
                break
        return module

    def load_trainable(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint's trainable weights (after checking method and backbone identity)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(ckpt)
        self.load_state_dict(ckpt["state_dict"])
        return ckpt

    # --- metadata for metrics.json ------------------------------------------------------------------------------
    def run_metadata(self) -> dict[str, Any]:
        from zsad.versions import versions

        train = self.cfg.data.train
        return {
            "method": self.cfg.method.name,
            "variant": self.cfg.variant,
            "protocol": self.cfg.protocol,
            "train_on": train.name if train is not None else None,
            "seed": int(self.cfg.seed),
            "backbone": self.model.identity(),
            "timing": {"train_s": round(self.train_s, 3)},
            "versions": versions(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }


# A CLIP vision tower's identity gained these keys in issue 12, when the defaults moved to the reference codes'
# behaviour; a checkpoint saved before carries neither and was made with these values.
LEGACY_CLIP_VISION = {"pos_interp": "bicubic", "global_ln_post": True}


def _saved_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity a checkpoint was saved with, with the keys older versions did not write filled in."""
    if identity.get("kind") == "clip" and identity.get("image_size") is not None:
        return {**LEGACY_CLIP_VISION, **identity}
    return identity


def check_identity(checkpoint: dict[str, Any], method: str, identity: dict[str, Any]) -> None:
    """Refuse a checkpoint of another method or backbone, naming both."""
    meta = checkpoint.get("zsad")
    if meta is None:
        raise CheckpointMismatch("not a zsad checkpoint (no 'zsad' metadata)")
    if meta["method"] != method:
        raise CheckpointMismatch(f"checkpoint is for method {meta['method']!r}, not {method!r}")
    saved = _saved_identity(meta["identity"])
    if saved != identity:
        diff = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
        hint = ""
        if any(k in LEGACY_CLIP_VISION for k in diff):
            hint = (
                f" — set method.clip.pos_interp={saved.get('pos_interp')} "
                f"method.clip.global_ln_post={str(saved.get('global_ln_post')).lower()} to load it "
                "(checkpoints from before issue 12 are bicubic + ln_post)"
            )
        raise CheckpointMismatch(
            f"checkpoint backbone {saved} differs from this model's {identity} in {diff}{hint}"
        )
