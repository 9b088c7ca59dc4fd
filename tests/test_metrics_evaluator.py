"""The Evaluator callback inside real ``Trainer.test`` runs, in one process and under DDP (two CPU ranks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data_modules.types import Batch
from zsad.callbacks import Evaluator, Gallery
from zsad.metrics import evaluate
from zsad.results.schema import validate_metrics_document
from zsad.types import ExtraSpec

H = W = 12
BATCH = 3


def _dataset(name: str, categories: dict[str, int], with_masks: bool, seed: int) -> list[dict]:
    """Samples (as dicts of tensors) of a tiny dataset, ordered by category; ``index`` runs over the dataset."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for category, n in categories.items():
        for i in range(n):
            mask = torch.zeros(1, H, W, dtype=torch.bool)
            label = int(i % 3 != 0) if category != "clean" else 0
            if label:
                r, c = torch.randint(0, H - 4, (2,), generator=g).tolist()
                mask[0, r : r + 3, c : c + 4] = True
            image = torch.rand(3, H, W, generator=g) + 0.3 * mask.float()
            samples.append(
                {
                    "image": image,
                    "mask": mask if with_masks else None,
                    "label": label,
                    "category": category,
                    "dataset": name,
                    "path": f"/data/{name}/{category}/{i:03d}.png",
                    "index": len(samples),
                }
            )
    return samples


def _collate(items: list[dict]) -> Batch:
    masks = [it["mask"] for it in items]
    return Batch(
        image=torch.stack([it["image"] for it in items]),
        mask=None if masks[0] is None else torch.stack(masks),
        label=torch.tensor([it["label"] for it in items]),
        category=[it["category"] for it in items],
        class_name=[it["category"] for it in items],
        dataset=[it["dataset"] for it in items],
        path=[it["path"] for it in items],
        index=torch.tensor([it["index"] for it in items]),
    )


def _shard(samples: list[dict], rank: int, world: int) -> list[Batch]:
    """Per category: a round-robin share padded by repeats (as DDP samplers do), batched within the category."""
    batches = []
    for category in dict.fromkeys(s["category"] for s in samples):
        items = [s for s in samples if s["category"] == category]
        padded = items + items[: (-len(items)) % world]
        share = padded[rank::world]
        batches += [_collate(share[i : i + BATCH]) for i in range(0, len(share), BATCH)]
    return batches


def _all_data() -> list[list[dict]]:
    return [
        _dataset("pix", {"aa": 7, "bb": 5, "clean": 4}, with_masks=True, seed=0),
        _dataset("img", {"only": 8}, with_masks=False, seed=1),
    ]


def _model_outputs(image: Tensor) -> tuple[Tensor, Tensor]:
    maps = image.mean(1)
    return maps, maps.amax((1, 2))


class TinyModule(lightning.LightningModule):
    """Returns maps and scores computed from the image; data sharded by hand per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Linear(1, 1)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        maps, scores = _model_outputs(batch.image)
        extras = {"gate": scores * 2, "expert_share": torch.ones(4, 2), "entropy_map": maps[:, ::2, ::2]}
        return {"maps": maps, "scores": scores, "extras": extras}

    def extra_specs(self) -> dict[str, ExtraSpec]:
        return {
            "gate": ExtraSpec("image_scalar"),
            "expert_share": ExtraSpec("batch_table"),
            "entropy_map": ExtraSpec("image_map"),
        }

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return [DataLoader(_shard(d, rank, world), batch_size=None) for d in _all_data()]

    def run_metadata(self) -> dict:
        return {"method": "tiny", "protocol": "A", "train_on": "none", "seed": 0, "timing": {"train_s": 1.5}}


def _expected(samples: list[dict], category: str) -> dict:
    items = [s for s in samples if s["category"] == category]
    maps, scores = _model_outputs(torch.stack([s["image"] for s in items]))
    masks = None if items[0]["mask"] is None else torch.stack([s["mask"][0] for s in items])
    return evaluate(maps, masks, scores, torch.tensor([s["label"] for s in items]))


def _check_document(doc: dict) -> None:
    validate_metrics_document(doc)
    assert doc["method"] == "tiny" and doc["timing"]["train_s"] == 1.5 and doc["timing"]["test_s"] > 0
    assert doc["versions"]["torch"] == torch.__version__
    for samples in _all_data():
        name = samples[0]["dataset"]
        data = doc["datasets"][name]
        assert data["n_images"] == len(samples)  # DDP padding repeats were removed
        for category in data["categories"]:
            want = _expected(samples, category)
            for key, value in want.items():
                got = data["categories"][category][key]
                assert (got is None) == (value is None), (name, category, key)
                if value is not None:
                    assert got == pytest.approx(value, abs=1e-12), (name, category, key)
    pix = doc["datasets"]["pix"]
    assert set(pix["categories"]) == {"aa", "bb", "clean"}
    assert pix["categories"]["clean"]["pixel_auroc"] is None  # no positives: undefined, not 0
    assert pix["n_categories_in_mean"]["pixel_auroc"] == 2 and pix["n_categories_in_mean"]["image_ap"] == 2
    mean = (pix["categories"]["aa"]["pixel_aupro"] + pix["categories"]["bb"]["pixel_aupro"]) / 2
    assert pix["mean"]["pixel_aupro"] == pytest.approx(mean, abs=1e-12)
    img = doc["datasets"]["img"]
    assert img["mean"]["pixel_auroc"] is None and img["n_categories_in_mean"]["pixel_auroc"] == 0
    # declared extras: the per-image gate averaged over the de-duplicated images, the per-batch table kept
    for samples in _all_data():
        data = doc["datasets"][samples[0]["dataset"]]
        for category in data["categories"]:
            items = [s for s in samples if s["category"] == category]
            _, scores = _model_outputs(torch.stack([s["image"] for s in items]))
            gate = data["extras"]["gate"]["categories"][category]
            assert gate["all"] == pytest.approx(float(2 * scores.double().mean()), rel=1e-6)
            assert data["extras"]["expert_share"]["categories"][category]["all"] == [[1.0, 1.0]] * 4
    assert "entropy_map" not in pix["extras"]  # maps are gallery-only
    assert img["mean"]["image_auroc"] == img["categories"]["only"]["image_auroc"]


def _check_gallery(out: Path) -> None:
    with np.load(out / "gallery" / "pix" / "aa.npz") as z:
        # one anomalous and one normal image, each the lowest index of its label (labels: i % 3 != 0)
        assert list(z["paths"]) == ["/data/pix/aa/001.png", "/data/pix/aa/000.png"]
        assert z["maps"].shape == (2, H, W) and z["maps"].dtype == np.float16
        assert z["masks"].shape == (2, H, W) and z["labels"].tolist() == [1, 0]
        assert z["extra_gate"].shape == (2,) and z["extra_entropy_map"].shape == (2, H // 2, W // 2)
        assert z["extra_expert_share"].shape == (4, 2)  # the category's table, not an image's
        np.testing.assert_allclose(z["extra_gate"], 2 * z["scores"], rtol=1e-3)
    with np.load(out / "gallery" / "img" / "only.npz") as z:
        assert "masks" not in z.files and list(z["index"]) == [1, 0]  # anomalous first, then normal


def _trainer(tmp_path: Path, **kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        use_distributed_sampler=False,
        **kwargs,
    )


def test_evaluator_single_process(tmp_path: Path) -> None:
    evaluator = Evaluator(tmp_path / "run")
    trainer = _trainer(tmp_path, devices=1, callbacks=[evaluator, Gallery(tmp_path / "run")])
    trainer.test(TinyModule())
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _check_document(doc)
    assert evaluator.results["datasets"] == doc["datasets"]
    logged = trainer.callback_metrics["test/pix/pixel_aupro"]
    assert float(logged) == pytest.approx(doc["datasets"]["pix"]["mean"]["pixel_aupro"], abs=1e-6)
    _check_gallery(tmp_path / "run")


class MixedCategoryModule(TinyModule):
    def test_dataloader(self) -> DataLoader:
        samples = _all_data()[0]
        return DataLoader([_collate(samples[5:9])], batch_size=None)  # crosses aa -> bb


def test_evaluator_rejects_batches_spanning_categories(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, devices=1, callbacks=[Evaluator(tmp_path), Gallery(tmp_path)])
    with pytest.raises(ValueError, match="spans several categories"):
        trainer.test(MixedCategoryModule())


@pytest.mark.slow
def test_evaluator_ddp_two_ranks_matches_one_process(tmp_path: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    trainer = _trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[Evaluator(tmp_path / "ddp"), Gallery(tmp_path / "ddp")],
    )
    trainer.test(TinyModule())
    doc = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    _check_document(doc)  # the same numbers as evaluate() on the whole, un-sharded data
    assert doc["timing"]["device"].endswith("x2")
    _check_gallery(tmp_path / "ddp")
