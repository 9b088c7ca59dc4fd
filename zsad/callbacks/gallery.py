"""The Gallery callback: keeps a few images per category of a test run and writes them for the plots.

Kept apart from the Evaluator (which computes the metrics) as anomalib keeps its Visualizer apart: a run without
pictures leaves it out, and neither callback knows the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from zsad.callbacks.collect import (
    add_batch_table,
    all_gather_objects,
    batch_index,
    declared_extras,
    gather_tables,
    spec_json,
    unpack_outputs,
)
from zsad.types import ExtraSpec


def _lowest_per_label(items: list[dict], k: int) -> list[dict]:
    """The k lowest-index items of each label (so the gallery can show anomalous and normal images)."""
    out: list[dict] = []
    for label in (1, 0):
        out += sorted((it for it in items if it["label"] == label), key=lambda it: it["index"])[:k]
    return out


def _balanced(items: list[dict], k: int) -> list[dict]:
    """k items alternating anomalous / normal (lowest index first), topped up from whichever label remains."""
    by_label = {
        lab: sorted((it for it in items if it["label"] == lab), key=lambda it: it["index"]) for lab in (1, 0)
    }
    chosen: list[dict] = []
    while len(chosen) < k and (by_label[1] or by_label[0]):
        for lab in (1, 0):
            if by_label[lab] and len(chosen) < k:
                chosen.append(by_label[lab].pop(0))
    return chosen


def write_gallery(path: str | Path, arrays: Mapping[str, np.ndarray], paths: list[str]) -> Path:
    """One compressed ``.npz`` of a category's first images (``paths``, ``maps``, ``masks`` …) for later pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, paths=np.asarray(paths, dtype=str), **arrays)
    return path


class Gallery(Callback):
    """Writes ``<out_dir>/gallery/<dataset>/<category>.npz`` with the first ``per_category`` images of each category.

    The images are the lowest dataset indices of each label, alternating anomalous and normal: ``paths``, ``maps``
    (float16), ``masks`` (uint8, only for sets with masks), ``labels``, ``scores``, ``index``, ``extra_<name>``
    (float16) for each per-image extra and, for each ``batch_table`` extra, the category's table averaged over its
    batches weighted by their size (float32), and ``extras_spec`` (JSON: each written extra's declaration). Each
    rank keeps only its own lowest-index items (a handful, on the CPU); rank 0 writes after the test epoch.
    ``zsad.results.plots`` draws them. The outputs are read as the Evaluator reads them (``zsad.callbacks.collect``);
    checking them is the Evaluator's job.

    Args:
        out_dir: folder of the run; ``None`` uses the trainer's ``default_root_dir``.
        per_category: images per category (0 writes nothing).
    """

    def __init__(self, out_dir: str | Path | None = None, per_category: int = 2) -> None:
        super().__init__()
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.per_category = per_category
        self._reset()

    def _reset(self) -> None:
        self._specs: dict[str, ExtraSpec] = {}
        self._items: dict[tuple[str, str], list[dict]] = {}
        self._seen: dict[tuple[int, str, str], int] = {}
        self._tables: dict[tuple[str, str], dict[str, list]] = {}

    def on_test_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._reset()
        self._specs = declared_extras(pl_module)

    def on_test_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.per_category <= 0:
            return
        maps, scores, extras = unpack_outputs(outputs)
        key = (batch.dataset[0], batch.category[0])
        seen_key = (dataloader_idx, *key)
        n_seen = self._seen.get(seen_key, 0)
        index = batch_index(batch, n_seen, maps.device)
        b = maps.shape[0]
        self._seen[seen_key] = n_seen + b
        tables = self._tables.setdefault(key, {})
        specs = {n: self._specs[n] for n in extras if n in self._specs}  # the Evaluator refuses the others
        for name, spec in specs.items():
            if spec.kind == "batch_table":
                tables[name] = add_batch_table(tables.get(name), extras[name], b)
        mask = None if batch.mask is None else batch.mask[:, 0]
        per_image = {n: extras[n] for n, spec in specs.items() if spec.per_image}
        items = self._items.setdefault(key, [])
        for i in torch.argsort(index).tolist():
            items.append(self._item(batch, i, index, maps, scores, mask, per_image))
        self._items[key] = _lowest_per_label(items, self.per_category)

    @staticmethod
    def _item(
        batch: Any,
        i: int,
        index: Tensor,
        maps: Tensor,
        scores: Tensor,
        mask: Tensor | None,
        per_image: Mapping[str, Tensor],
    ) -> dict[str, Any]:
        item = {
            "index": int(index[i]),
            "path": batch.path[i],
            "map": maps[i].detach().float().half().cpu().numpy(),
            "label": int(batch.label[i]),
            "score": float(scores[i].float()),
            "extras": {n: t[i].detach().float().half().cpu().numpy() for n, t in per_image.items()},
        }
        if mask is not None:
            item["mask"] = mask[i].detach().to(torch.uint8).cpu().numpy()
        return item

    def on_test_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self.per_category <= 0:
            return
        gathered = all_gather_objects(self._items)
        keys = list(dict.fromkeys(k for part in gathered for k in part))
        for key in keys:  # every rank walks the same keys: gather_tables is a collective
            tables = gather_tables(self._tables.get(key, {}))
            items = [it for part in gathered for it in part.get(key, [])]
            if trainer.is_global_zero:
                self._write(trainer, key, items, tables)
        self._reset()

    def _write(
        self, trainer: lightning.Trainer, key: tuple[str, str], items: list[dict], tables: Mapping[str, Any]
    ) -> None:
        dataset, category = key
        unique = list({it["index"]: it for it in items}.values())
        chosen = _balanced(unique, self.per_category)
        arrays: dict[str, np.ndarray] = {
            "maps": np.stack([it["map"] for it in chosen]),
            "labels": np.asarray([it["label"] for it in chosen], dtype=np.uint8),
            "scores": np.asarray([it["score"] for it in chosen], dtype=np.float32),
            "index": np.asarray([it["index"] for it in chosen], dtype=np.int64),
        }
        if "mask" in chosen[0]:
            arrays["masks"] = np.stack([it["mask"] for it in chosen])
        for name in chosen[0]["extras"]:
            arrays[f"extra_{name}"] = np.stack([it["extras"][name] for it in chosen])
        for name, table in tables.items():  # the category's table, not an image's
            arrays[f"extra_{name}"] = table.astype(np.float32)
        written = {n: s for n, s in self._specs.items() if f"extra_{n}" in arrays}
        arrays["extras_spec"] = np.asarray(json.dumps(spec_json(written)))
        out = self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir)
        safe = category.replace("/", "_")
        write_gallery(out / "gallery" / dataset / f"{safe}.npz", arrays, [it["path"] for it in chosen])
