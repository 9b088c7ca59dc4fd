"""Train / test / predict orchestration shared by the CLI and the benchmark runner."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from zsad import config as C
from zsad.module import ZSADModule

log = logging.getLogger("zsad")
# Frozen backbones are in eval mode on purpose (ZSADMethod.train keeps them there).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings(
    "ignore", message=r"The number of training batches .* is smaller than the logging interval"
)


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / C.run_name(cfg)


def build_datamodule(cfg: DictConfig, module: ZSADModule, with_train: bool = True):  # noqa: ANN201
    """The DataModule for a run: the method decides input size, normalisation and resize mode."""
    from data_modules.datamodule import DatasetSpec, ZSADDataModule

    def spec(ref: Any) -> DatasetSpec:
        root = ref.root or _default_root(cfg, ref.name)
        return DatasetSpec(
            name=ref.name, root=str(root), categories=list(ref.categories) if ref.categories else None
        )

    model = module.model
    _check_zero_shot(cfg)
    if with_train and cfg.data.train is None:
        raise C.ConfigError(
            "data.train is not set: training needs an auxiliary dataset (see experiments/protocols/)"
        )
    if not cfg.data.test and not with_train:
        raise C.ConfigError("data.test is empty: give at least one target dataset")
    return ZSADDataModule(
        train=spec(cfg.data.train) if (with_train and cfg.data.train is not None) else None,
        test=[spec(r) for r in cfg.data.test],
        image_size=model.input_size,
        mean=tuple(model.mean),
        std=tuple(model.std),
        interpolation=model.interpolation,
        batch_size=int(cfg.data.batch_size or cfg.method.batch_size),
        test_batch_size=int(cfg.data.test_batch_size),
        num_workers=int(cfg.data.num_workers),
        pin_memory=bool(cfg.data.pin_memory) and torch.cuda.is_available(),
        persistent_workers=bool(cfg.data.persistent_workers),
        seed=int(cfg.seed),
        cache_dir=cfg.data.cache_dir if cfg.data.cache_resized else None,
        class_name=str(cfg.data.class_name),
        mask_resize=str(cfg.data.mask_resize),
    )


def _check_zero_shot(cfg: DictConfig) -> None:
    """A target that is the auxiliary training set itself is not zero-shot: refuse it."""
    train = cfg.data.train
    if train is None:
        return
    for ref in cfg.data.test:
        same_root = (ref.root or "") == (train.root or "")
        if ref.name == train.name and same_root:
            raise C.ConfigError(
                f"data.test: target {ref.name!r} (root {ref.root or 'default'!r}) is the auxiliary training set; "
                "zero-shot evaluation needs datasets the model never saw (see experiments/protocols/)"
            )


def _default_root(cfg: DictConfig, name: str) -> Path:
    """Synthetic sets are generated on demand; real datasets need an explicit root."""
    from data_modules import synthetic

    if name in synthetic.DOMAINS:
        s = cfg.data.synthetic
        root = synthetic.ensure_synthetic(
            Path(s.root), seed=s.seed, size=s.size, n_test=s.n_test, n_train=s.n_train
        )
        return root / synthetic.DOMAINS[name]
    raise C.ConfigError(
        f"data: dataset {name!r} has no root; set its `root:` (or the ZSAD_DATA layout in the protocol YAML)"
    )


def make_logger(cfg: DictConfig, out: Path):  # noqa: ANN201
    if cfg.logger == "none":
        return False
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            tags=list(cfg.wandb.tags),
            name=C.run_name(cfg),
            save_dir=str(out),
            config=C.to_dict(cfg),
        )
    if cfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(out), name="logs", version="")
    raise C.ConfigError(f"logger: unknown logger {cfg.logger!r}; expected csv, wandb or none")


def make_trainer(
    cfg: DictConfig, out: Path, max_epochs: int | None = None, callbacks: list | None = None, logger=None
) -> L.Trainer:  # noqa: ANN001
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=max_epochs,
        limit_train_batches=t.limit_train_batches,
        limit_test_batches=t.limit_test_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=C.trainer_deterministic(t.deterministic),  # True | False | "warn"
        default_root_dir=str(out),
        logger=logger if logger is not None else False,
        callbacks=callbacks or [],
        enable_checkpointing=callbacks is not None
        and any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the DataModule shards by category itself (see CategoryBatchSampler)
        enable_model_summary=False,
    )


def _fast_matmul() -> None:
    """TF32 for the float32 heads and maps on Ampere+ GPUs (the frozen backbones run in bf16 under autocast)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def train(cfg: DictConfig, test_after: bool = True, resume: bool = True) -> Path:
    """Run every stage of the method for its fixed epochs, save a checkpoint per stage, then test the last state.

    With ``resume``, a stage whose final checkpoint exists is loaded and skipped, and a stage with a ``-last``
    checkpoint continues from it (optimizer and epoch included).
    """
    L.seed_everything(int(cfg.seed), workers=True)
    _fast_matmul()
    out = run_dir(cfg)
    C.save(cfg, out / "config.yaml")
    module = ZSADModule(cfg, cache_dir=Path(cfg.out_dir) / ".cache")
    dm = build_datamodule(cfg, module)
    logger = make_logger(cfg, out)
    ckpt_dir = out / "checkpoints"
    t0 = time.perf_counter()
    for stage in module.model.stages():
        final = ckpt_dir / f"{stage.name}.ckpt"
        if resume and final.is_file():
            log.info("stage %s: found %s, skipping", stage.name, final)
            module.set_stage(stage.name)
            module.load_trainable(final)
            module.model.on_stage_end(stage.name)
            continue
        module.set_stage(stage.name)
        epochs = int(cfg.trainer.max_epochs) if cfg.trainer.max_epochs is not None else stage.epochs
        last = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=f"{stage.name}-last",
            save_last=False,
            every_n_epochs=1,
            save_top_k=1,
            monitor=None,
        )
        trainer = make_trainer(cfg, out, max_epochs=epochs, callbacks=[last], logger=logger)
        partial = ckpt_dir / f"{stage.name}-last.ckpt"
        trainer.fit(module, datamodule=dm, ckpt_path=str(partial) if (resume and partial.is_file()) else None)
        trainer.save_checkpoint(final)
        module.model.on_stage_end(stage.name)
    module.train_s = time.perf_counter() - t0
    if test_after:
        test(cfg, module=module, datamodule=dm, logger=logger)
    return out


def test(cfg: DictConfig, module: ZSADModule | None = None, datamodule=None, logger=None) -> dict:  # noqa: ANN001
    """Evaluate on every target set; writes ``metrics.json`` (and a gallery) into the run folder."""
    from zsad.callbacks import Evaluator, Gallery

    out = run_dir(cfg)
    _fast_matmul()
    if module is None:
        C.save(cfg, out / "config.yaml")
        module = ZSADModule.from_checkpoint(cfg, cache_dir=Path(cfg.out_dir) / ".cache")
    dm = datamodule or build_datamodule(cfg, module, with_train=False)
    evaluator = Evaluator(out, legacy_aupro=bool(cfg.eval.legacy_aupro))
    callbacks = [evaluator, Gallery(out, per_category=int(cfg.eval.gallery_per_category))]
    trainer = make_trainer(
        cfg, out, callbacks=callbacks, logger=logger if logger is not None else make_logger(cfg, out)
    )
    trainer.test(module, datamodule=dm, verbose=False)
    # Under ddp_spawn the Evaluator ran in the child processes: its results come back through metrics.json.
    results = evaluator.results or json.loads((out / "metrics.json").read_text())
    if cfg.logger == "wandb" and trainer.is_global_zero:
        from zsad.wandb_log import log_results

        log_results(trainer.logger, out, results)
        trainer.logger.experiment.finish()  # flushes the summary a sweep agent reads
    return results
