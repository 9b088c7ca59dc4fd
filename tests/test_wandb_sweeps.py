"""W&B: sweep files name real config keys; an offline W&B run receives the tables, means and gallery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from zsad.config import EXPERIMENTS, compose

SWEEPS = sorted((EXPERIMENTS / "sweeps").glob("*.yaml"))


def test_every_method_has_a_sweep():
    from zsad.registry import REGISTRY

    assert {p.stem for p in SWEEPS} == set(REGISTRY)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_parameters_exist_in_the_schema(path):
    spec = yaml.safe_load(path.read_text())
    cmd = spec["command"]
    assert "${args_no_hyphens}" in cmd and "logger=wandb" in cmd and "protocol=validation" in cmd
    method_yaml = next(c for c in cmd if c.startswith("experiments/methods/"))
    base = compose([Path(EXPERIMENTS.parent / method_yaml)], ["protocol=validation"])
    assert spec["metric"]["name"].startswith("test/mean/")
    for key, domain in spec["parameters"].items():
        assert OmegaConf.select(base, key, default="__absent__") != "__absent__", (
            f"{path.name}: {key} not in schema"
        )
        # every value the sweep can pass must compose (types checked by the schema)
        for value in domain.get("values", [domain.get("min"), domain.get("max")]):
            compose([Path(EXPERIMENTS.parent / method_yaml)], ["protocol=validation", f"{key}={value}"])


def test_offline_wandb_run_gets_tables_means_and_gallery(tmp_path, dummy_method, monkeypatch):
    from tests_support import dummy_config

    from zsad.run import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = dummy_config(tmp_path, "logger=wandb", "eval.gallery_per_category=2")
    out = train(cfg)
    files = list((out / "wandb").glob("offline-run-*/files"))
    assert len(files) == 1
    media = files[0] / "media"
    tables = list(media.rglob("*.table.json"))
    assert tables, "per-category table not logged"
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["dataset", "category", "image_auroc"]
    assert {row[1] for row in table["data"]} >= {"mean", "bottle"}
    assert list(media.rglob("*.png")), "gallery not logged"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {row[1] for row in table["data"]} == set(
        metrics["datasets"]["synthetic_objects"]["categories"]
    ) | {"mean"}


def test_dataset_means_skip_undefined():
    from zsad.wandb_log import dataset_means

    results = {
        "datasets": {
            "a": {"mean": {"image_auroc": 0.8, "pixel_aupro": None}},
            "b": {"mean": {"image_auroc": 0.6, "pixel_aupro": 0.5}},
        }
    }
    means = dataset_means(results)
    assert means["test/mean/image_auroc"] == pytest.approx(0.7)
    assert means["test/mean/pixel_aupro"] == pytest.approx(0.5)  # only where defined
    assert "test/mean/pixel_ap" not in means
