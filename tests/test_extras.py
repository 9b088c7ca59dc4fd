"""Method extras are kept, aggregated and drawn by their declared shape (``ExtraSpec``), never by a tensor's size.

The old Evaluator kept an extra for the gallery when its first dimension equalled the batch size: MPAMA's per-batch
table of expert shares [MoE layers, experts] was dropped at test time, taken for per-image rows when the batch size
equalled the number of MoE layers, and crashed the gallery (``KeyError: 'expert_share'``) when a category mixed
batch sizes. Each test below fails under that rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from test_metrics_evaluator import _collate, _dataset, _trainer
from torch.utils.data import DataLoader

from data_modules.types import Batch
from zsad.callbacks import Evaluator, Gallery
from zsad.metrics import METRIC_KEYS
from zsad.results.plots import read_gallery
from zsad.results.schema import validate_metrics_document
from zsad.types import ExtraSpec

LAYERS, EXPERTS = ("3", "6", "9"), ("zero", "frozen")
BATCH = len(LAYERS)  # batch size == number of MoE layers: the case the shape rule got wrong


def _share(batch: Batch) -> torch.Tensor:
    """A per-batch [layers, experts] table that differs from batch to batch (rows sum to 1)."""
    m = batch.image.mean((1, 2, 3))[: len(LAYERS)].mean()
    a = torch.stack([m, m / 2, m / 3])
    return torch.stack([a, 1 - a], 1)


def _routing(batch: Batch) -> torch.Tensor:
    """A per-image [taps, 2] table."""
    v = batch.image.mean((1, 2, 3))
    a = torch.stack([v, v / 2, v / 4], 1)  # [B, 3]
    return torch.stack([1 - a, a], 2)


SPECS = {
    "expert_share": ExtraSpec("batch_table", rows=LAYERS, cols=EXPERTS, row_name="block", col_name="expert"),
    "routing_weights": ExtraSpec("image_table", rows=("1", "2", "3"), cols=("normal", "anomalous")),
    "gate": ExtraSpec("image_scalar"),
    "entropy_map": ExtraSpec("image_map"),
    "per_patch": ExtraSpec("image_array"),
}


class ExtrasModule(lightning.LightningModule):
    """Maps from the image; every kind of extra; batches given by hand (sizes chosen by each test)."""

    def __init__(
        self, batches: list[Batch], specs: dict[str, ExtraSpec] | None = None, drop: tuple = ()
    ) -> None:
        super().__init__()
        self.dummy = torch.nn.Linear(1, 1)
        self.batches, self.specs, self.drop = batches, SPECS if specs is None else specs, drop

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        maps = batch.image.mean(1)
        scores = maps.amax((1, 2))
        extras = {
            "expert_share": _share(batch),
            "routing_weights": _routing(batch),
            "gate": scores * 2,
            "entropy_map": maps[:, ::2, ::2],
            "per_patch": maps.flatten(1)[:, None, :5].expand(-1, 2, -1),
        }
        extras = {k: v for k, v in extras.items() if (batch_idx, k) not in self.drop}
        return {"maps": maps, "scores": scores, "extras": extras}

    def extra_specs(self) -> dict[str, ExtraSpec]:
        return self.specs

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def run_metadata(self) -> dict:
        return {"method": "mpama", "protocol": "A", "train_on": "x", "seed": 0}


def _batches(sizes: list[int], labels_last_normal: bool = False) -> list[Batch]:
    """One category ``aa`` cut into batches of ``sizes``; with ``labels_last_normal`` only the last image is normal."""
    samples = _dataset("pix", {"aa": sum(sizes)}, with_masks=True, seed=0)
    if labels_last_normal:
        for i, s in enumerate(samples):
            s["label"] = int(i < len(samples) - 1)
            s["mask"] = s["mask"] if s["label"] else torch.zeros_like(s["mask"])
            if s["label"] and not s["mask"].any():
                s["mask"][0, 2:5, 2:6] = True
    out, start = [], 0
    for n in sizes:
        out.append(_collate(samples[start : start + n]))
        start += n
    return out


def _run(tmp_path: Path, module: lightning.LightningModule) -> tuple[dict, dict[str, np.ndarray]]:
    trainer = _trainer(
        tmp_path, devices=1, callbacks=[Evaluator(tmp_path / "run"), Gallery(tmp_path / "run")]
    )
    trainer.test(module)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    validate_metrics_document(doc)
    with np.load(tmp_path / "run" / "gallery" / "pix" / "aa.npz") as z:
        return doc, dict(z)


def _weighted_table(batches: list[Batch]) -> np.ndarray:
    """Σ_b n_b · table_b / Σ_b n_b, by hand."""
    total = sum(len(b) * _share(b).double().numpy() for b in batches)
    return total / sum(len(b) for b in batches)


# --- the declaration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "shape", "ok"),
    [
        (ExtraSpec("batch_table", rows=LAYERS, cols=EXPERTS), (3, 2), True),
        (ExtraSpec("batch_table", rows=LAYERS, cols=EXPERTS), (2, 2), False),
        (ExtraSpec("batch_table"), (3,), False),
        (ExtraSpec("image_scalar"), (3,), True),
        (ExtraSpec("image_scalar"), (3, 1), False),
        (ExtraSpec("image_scalar"), (4,), False),
        (ExtraSpec("image_map"), (3, 4, 4), True),
        (ExtraSpec("image_map"), (3, 16), False),
        (ExtraSpec("image_table", rows=("a", "b"), cols=("n", "a")), (3, 2, 2), True),
        (ExtraSpec("image_table", rows=("a", "b"), cols=("n", "a")), (3, 4, 2), False),
        (ExtraSpec("image_array"), (3, 2, 9), True),
        (ExtraSpec("image_array"), (2, 2, 9), False),
    ],
)
def test_spec_checks_the_declared_shape(spec, shape, ok):
    if ok:
        spec.check("x", torch.zeros(shape), batch_size=3)
    else:
        with pytest.raises(ValueError, match="extra 'x' is declared " + spec.kind):
            spec.check("x", torch.zeros(shape), batch_size=3)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        ExtraSpec("per_layer")


# --- the Evaluator -------------------------------------------------------------------------------------------------


def test_batch_table_when_batch_size_equals_the_number_of_layers(tmp_path):
    """B = 3 = MoE layers: the table is the category's batch-weighted mean, in metrics.json and the gallery."""
    batches = _batches([BATCH, BATCH])
    doc, z = _run(tmp_path, ExtrasModule(batches))
    want = _weighted_table(batches)
    entry = doc["datasets"]["pix"]["extras"]["expert_share"]
    assert entry["kind"] == "batch_table" and entry["rows"] == list(LAYERS) and entry["cols"] == list(EXPERTS)
    assert (entry["row_name"], entry["col_name"]) == ("block", "expert")
    np.testing.assert_allclose(entry["categories"]["aa"]["all"], want, rtol=1e-6)
    np.testing.assert_allclose(entry["mean"], want, rtol=1e-6)  # one category
    assert z["extra_expert_share"].shape == (3, 2)  # a table, not one row per gallery image
    np.testing.assert_allclose(z["extra_expert_share"], want, rtol=1e-6)
    assert json.loads(str(z["extras_spec"]))["expert_share"]["kind"] == "batch_table"


def test_mixed_batch_sizes_weight_each_batch_by_its_images(tmp_path):
    """Batches of 3, 3 and 1 with the only normal image in the last: the gallery shows images of both sizes."""
    batches = _batches([3, 3, 1], labels_last_normal=True)
    doc, z = _run(tmp_path, ExtrasModule(batches))
    want = _weighted_table(batches)
    assert not np.allclose(want, np.mean([_share(b).numpy() for b in batches], 0))  # weighting matters here
    np.testing.assert_allclose(
        doc["datasets"]["pix"]["extras"]["expert_share"]["categories"]["aa"]["all"], want
    )
    np.testing.assert_allclose(z["extra_expert_share"], want, rtol=1e-6)
    assert z["labels"].tolist() == [1, 0] and z["index"].tolist() == [0, 6]  # one image from each batch size
    assert z["extra_gate"].shape == (2,) and z["extra_routing_weights"].shape == (2, 3, 2)


def test_per_image_extras_by_label(tmp_path):
    batches = _batches([3, 3, 1], labels_last_normal=True)
    doc, z = _run(tmp_path, ExtrasModule(batches))
    ex = doc["datasets"]["pix"]["extras"]
    gate = torch.cat([2 * b.image.mean(1).amax((1, 2)) for b in batches]).double()
    labels = torch.cat([b.label for b in batches])
    got = ex["gate"]["categories"]["aa"]
    assert got["all"] == pytest.approx(float(gate.mean()))
    assert got["anomalous"] == pytest.approx(float(gate[labels == 1].mean()))
    assert got["normal"] == pytest.approx(float(gate[6]))
    routing = torch.cat([_routing(b) for b in batches]).double()
    np.testing.assert_allclose(
        ex["routing_weights"]["categories"]["aa"]["normal"], routing[6].numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(ex["routing_weights"]["mean"], routing.mean(0).numpy(), rtol=1e-6)
    # maps and arrays are gallery-only
    assert set(ex) == {"gate", "routing_weights", "expert_share"}
    assert z["extra_entropy_map"].shape == (2, 6, 6) and z["extra_per_patch"].shape == (2, 2, 5)
    spec = json.loads(str(z["extras_spec"]))
    assert {k: v["kind"] for k, v in spec.items()} == {k: s.kind for k, s in SPECS.items()}


def test_undeclared_extra_is_an_error_naming_it(tmp_path):
    specs = {k: v for k, v in SPECS.items() if k != "expert_share"}
    trainer = _trainer(
        tmp_path, devices=1, callbacks=[Evaluator(tmp_path / "run"), Gallery(tmp_path / "run")]
    )
    with pytest.raises(ValueError, match="extra 'expert_share' of ExtrasModule is not declared"):
        trainer.test(ExtrasModule(_batches([3]), specs))


def test_extra_of_another_shape_than_declared_is_an_error_naming_it(tmp_path):
    specs = {**SPECS, "expert_share": ExtraSpec("batch_table", rows=("3", "6"), cols=EXPERTS)}
    trainer = _trainer(
        tmp_path, devices=1, callbacks=[Evaluator(tmp_path / "run"), Gallery(tmp_path / "run")]
    )
    with pytest.raises(ValueError, match=r"extra 'expert_share' is declared batch_table .* shape \[3, 2\]"):
        trainer.test(ExtrasModule(_batches([3]), specs))


def test_per_image_extra_missing_from_some_batches_is_an_error(tmp_path):
    trainer = _trainer(
        tmp_path, devices=1, callbacks=[Evaluator(tmp_path / "run"), Gallery(tmp_path / "run")]
    )
    with pytest.raises(ValueError, match=r"extra\(s\) \['gate'\] came with only some batches"):
        trainer.test(ExtrasModule(_batches([3, 1]), drop={(1, "gate")}))


def test_metrics_json_extras_are_validated():
    doc = {
        "method": "m", "protocol": "A", "train_on": "x", "seed": 0, "backbone": None, "versions": {},
        "config": {}, "timing": {"test_s": 1.0, "images_per_s": 1.0, "device": "cpu"},
        "datasets": {"pix": {
            "categories": {"aa": dict.fromkeys(METRIC_KEYS)},
            "mean": dict.fromkeys(METRIC_KEYS),
            "n_categories_in_mean": dict.fromkeys(METRIC_KEYS, 0),
            "n_images": 3,
            "extras": {"expert_share": {
                "kind": "batch_table", "rows": ["3", "6"], "cols": ["zero", "l0"], "row_name": "block",
                "col_name": "expert", "categories": {"aa": {"all": [[0.5, 0.5], [0.25, 0.75]]}},
                "mean": [[0.5, 0.5], [0.25, 0.75]],
            }},
        }},
    }  # fmt: skip
    validate_metrics_document(doc)
    extras = doc["datasets"]["pix"]["extras"]["expert_share"]
    extras["categories"]["aa"]["all"] = [[0.5, 0.5]]  # one row for two MoE layers
    with pytest.raises(ValueError, match=r"extras.expert_share.categories.aa.all must be a 2×2 table"):
        validate_metrics_document(doc)
    extras["categories"] = {"zz": {"all": [[0.5, 0.5], [0.25, 0.75]]}}
    with pytest.raises(ValueError, match="unknown: {'zz'}"):
        validate_metrics_document(doc)


# --- the gallery reader --------------------------------------------------------------------------------------------


def test_gallery_reads_extras_by_declaration(tmp_path):
    batches = _batches([3, 3, 1], labels_last_normal=True)
    _run(tmp_path, ExtrasModule(batches))
    items = read_gallery(tmp_path / "run", "pix")
    assert len(items) == 2
    for it in items.values():
        share = it.tables["expert_share"]
        assert share.per_category and share.rows == list(LAYERS) and share.cols == list(EXPERTS)
        np.testing.assert_allclose(share.values, _weighted_table(batches), rtol=1e-6)
        routing = it.tables["routing_weights"]
        assert not routing.per_category and routing.values.shape == (3, 2)
        assert set(it.scalars) == {"gate"} and set(it.extra_maps) == {"entropy_map"}
    normal = next(it for it in items.values() if it.label == 0)
    np.testing.assert_allclose(normal.tables["routing_weights"].values, _routing(batches[2])[0], atol=1e-3)


# --- MPAMA end to end --------------------------------------------------------------------------------------------


def test_mpama_expert_shares_reach_metrics_json_at_test_time(tmp_path):
    """The tiny MPAMA after stage mpa: per-layer shares of the category in metrics.json (3 MoE layers, B = 3, 1)."""
    from tests_support import batch_of

    from zsad.config import EXPERIMENTS, compose
    from zsad.module import ZSADModule
    from zsad.registry import tiny_overrides

    cfg = compose(
        [EXPERIMENTS / "methods" / "mpama.yaml"],
        [*tiny_overrides("mpama"), "method.image_size=56", "method.taps=[2,3,4]", "method.dpam_start=2"],
    )
    torch.manual_seed(0)
    module = ZSADModule(cfg)
    module.set_stage("moe")
    spec = module.extra_specs()["expert_share"]
    blocks, names = tuple(str(b) for b in module.model.moe_blocks), tuple(module.model.moe.names)
    assert spec.kind == "batch_table" and spec.rows == blocks and spec.cols == names and len(blocks) == 3
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 1):  # B = 3 = MoE layers, then a batch of another size
        b = batch_of(torch.randn(n, 3, 56, 56, generator=g))
        b.index = b.index + sum(len(x) for x in batches)
        b.path = [f"{int(i)}.png" for i in b.index]
        batches.append(b)
    module.model.eval()
    with torch.no_grad():
        tables = [module.model(b.image, b).extras["expert_share"].double() for b in batches]
    want = (3 * tables[0] + tables[1]) / 4

    trainer = _trainer(
        tmp_path, devices=1, callbacks=[Evaluator(tmp_path / "run"), Gallery(tmp_path / "run")]
    )
    trainer.test(module, dataloaders=DataLoader(batches, batch_size=None))
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    entry = doc["datasets"]["ds"]["extras"]["expert_share"]
    assert entry["rows"] == list(blocks) and entry["cols"] == list(names)
    np.testing.assert_allclose(entry["categories"]["cat"]["all"], want.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sum(entry["categories"]["cat"]["all"], 1), 1.0, rtol=1e-6)


def test_gallery_figure_draws_the_tables(tmp_path):
    """The leaderboard gallery has a heat-map column per table extra (image_table and batch_table)."""
    from PIL import Image

    from zsad.results import group_runs, load_run
    from zsad.results.plots import gallery

    _run(tmp_path, ExtrasModule(_batches([3, 3, 1], labels_last_normal=True)))
    groups = group_runs([load_run(tmp_path / "run" / "metrics.json")])
    ((protocol, gs),) = groups.items()
    narrow = gallery(gs, protocol, "pix", tmp_path / "g.png")
    assert narrow is not None
    with Image.open(narrow) as im:
        width = im.width
    # image, ground truth, the map, the entropy map, then routing_weights and expert_share: 6 columns
    assert width == pytest.approx(6 * 1.75 * 100, abs=2)
