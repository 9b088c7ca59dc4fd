"""Every YAML in experiments/ composes; every method and ablation file trains and tests in a fast dev run.

Method and ablation files run end to end (tiny random-weight presets, the synthetic benchmark, a couple of batches,
metrics.json written); protocol, trainer and bench files compose against every method; sweeps are checked in
tests/test_wandb_sweeps.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zsad.config import EXPERIMENTS, compose
from zsad.registry import REGISTRY, tiny_overrides

METHOD_FILES = sorted((EXPERIMENTS / "methods").glob("*.yaml"))
ABLATION_FILES = sorted((EXPERIMENTS / "ablations").glob("*.yaml"))
PROTOCOL_FILES = sorted((EXPERIMENTS / "protocols").glob("*.yaml"))
TRAINER_FILES = sorted((EXPERIMENTS / "trainer").glob("*.yaml"))


def _method_of(path: Path) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(path).method.name)


def test_every_method_has_a_paper_config():
    assert {p.stem for p in METHOD_FILES} == set(REGISTRY)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data_modules.synthetic import ensure_synthetic

    return ensure_synthetic(
        tmp_path_factory.mktemp("synth"), seed=0, show_progress=False, size=64, n_test=4, n_train=1
    )


def _dev_run(
    layers: list[Path], method: str, synth: Path, tmp_path: Path, *extra: str, keep: tuple[str, ...] = ()
) -> dict:
    """Train + test with the tiny presets; ``keep`` names config keys whose tiny override is left out."""
    from zsad.run import train

    tiny = [o for o in tiny_overrides(method) if not o.startswith(tuple(f"{k}=" for k in keep))]
    over = [
        *tiny,
        "protocol=synthetic",
        f"data.synthetic.root={synth}",
        "data.synthetic.size=64",
        "data.synthetic.n_test=4",
        "data.synthetic.n_train=1",
        "method.image_size=112",  # a multiple of both patch sizes (14 and 16)
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "data.batch_size=4",
        "logger=none",
        "eval.gallery_per_category=0",
        f"out_dir={tmp_path}",
        *extra,
    ]
    cfg = compose(layers, over)
    out = train(cfg)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_method_config_fast_dev_run(path, synth, tmp_path):
    method = _method_of(path)
    metrics = _dev_run([path], method, synth, tmp_path)
    ds = metrics["datasets"]["synthetic_objects"]
    assert metrics["method"] == method and len(ds["categories"]) == 5
    assert ds["n_images"] == 20
    assert all(0.0 <= ds["mean"][k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATION_FILES, ids=[p.stem for p in ABLATION_FILES])
def test_ablation_fast_dev_run(path, synth, tmp_path):
    method = _method_of(path)
    assert path.stem.startswith(f"{method}_"), "an ablation file is named <method>_<what>.yaml"
    layers = [EXPERIMENTS / "methods" / f"{method}.yaml", path]
    # An ablation that swaps the DINOv3 size runs that real architecture (random weights), not the tiny preset.
    keep = ("method.vision.name", "method.taps") if method == "ava_dino" and "dinov3" in path.stem else ()
    metrics = _dev_run(layers, method, synth, tmp_path, keep=keep)
    if keep:
        assert metrics["backbone"]["vision"]["name"] == compose(layers).method.vision.name
    assert metrics["variant"] == path.stem[len(method) + 1 :]
    assert metrics["datasets"]["synthetic_objects"]["n_images"] == 20


@pytest.mark.parametrize(
    "path", PROTOCOL_FILES + TRAINER_FILES, ids=[p.stem for p in PROTOCOL_FILES + TRAINER_FILES]
)
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_protocol_and_trainer_files_compose(path, method):
    cfg = compose([EXPERIMENTS / "methods" / f"{method}.yaml", path])
    if path.parent.name == "protocols":
        assert cfg.protocol == path.stem and cfg.data.train is not None and len(cfg.data.test) >= 1
        assert cfg.data.train.name not in {
            t.name for t in cfg.data.test
        }  # zero-shot: never test on the train set
    else:
        assert cfg.trainer.accelerator in {"cpu", "gpu"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ava_dino", "mpama", "entroad"])
def test_bf16_mixed_training_and_evaluation(method, synth, tmp_path, monkeypatch):
    """precision=bf16-mixed end to end (Lightning's autocast on CPU): the Evaluator only ever sees float32 maps."""
    from zsad.callbacks import Evaluator

    seen: list[torch.dtype] = []
    original = Evaluator.on_test_batch_end

    def spy(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        seen.append(outputs["maps"].dtype)
        return original(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(Evaluator, "on_test_batch_end", spy)
    layers = [EXPERIMENTS / "methods" / f"{method}.yaml"]
    metrics = _dev_run(
        layers, method, synth, tmp_path, "trainer.precision=bf16-mixed", "trainer.limit_train_batches=1"
    )
    assert seen and set(seen) == {torch.float32}
    assert 0.0 <= metrics["datasets"]["synthetic_objects"]["mean"]["pixel_auroc"] <= 1.0
