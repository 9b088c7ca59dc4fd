"""The Evaluator callback: collects a test run's maps and scores per category and writes ``metrics.json``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

import zsad
from zsad.callbacks.collect import (
    CategoryState,
    add_batch_table,
    batch_index,
    declared_extras,
    device_name,
    gather_tables,
    spec_json,
    unpack_outputs,
)
from zsad.dist import destroy_process_group_at_exit
from zsad.metrics.functional import evaluate
from zsad.results.aggregate import category_means, extras_means
from zsad.results.schema import build_metrics_document, write_metrics_json
from zsad.types import ExtraSpec


@dataclass
class _CategoryBuffer:
    """What one rank has seen of the category being collected (tensors stay on the module's device)."""

    dataloader_idx: int
    dataset: str
    category: str
    state: CategoryState  # maps, scores, labels, index, masks?, extra_<name> rows: concatenated, synced by torchmetrics
    has_masks: bool
    n_seen: int = 0
    # Extras by their declared kind: image_scalar / image_table rows go into ``state`` (gathered and de-duplicated
    # with the maps); how many images each per-image extra came with; batch_table running [Σ b·table (float64), Σ b].
    n_rows: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, str]:
        return self.dataloader_idx, self.dataset, self.category


def _label_means(values: Tensor, labels: Tensor) -> dict[str, Any]:
    """Mean of per-image values [n, ...] over all images and per label (None where a label has no image)."""
    out: dict[str, Any] = {"all": values.double().mean(0).tolist()}
    for name, lab in (("normal", 0), ("anomalous", 1)):
        sel = labels == lab
        out[name] = values[sel].double().mean(0).tolist() if bool(sel.any()) else None
    return out


class Evaluator(Callback):
    """Computes the exact metrics of a ``Trainer.test`` run, per (dataset, category), and writes the results.

    The LightningModule's ``test_step`` returns ``{"maps": [B,H,W], "scores": [B], "extras": {...}}`` and the
    batch is a ``data_modules.types.Batch``. Test loaders are ordered by category and a batch never spans two, so
    a category is complete when the (dataloader, dataset, category) key changes: it is then gathered across
    ranks, de-duplicated by ``batch.index`` (DDP pads shares with repeats), evaluated on the module's device and
    freed. Memory is bounded by the largest category. Every rank computes the same numbers; rank 0 writes.

    Writes ``<out_dir>/metrics.json`` (``specs/protocol.md`` §4, merged with ``pl_module.run_metadata()`` when
    the module has it) through ``zsad.results`` and logs ``test/<dataset>/<metric>`` means. Pictures are the
    :class:`zsad.metrics.gallery.Gallery` callback's job.

    Extras are read by their declaration (``pl_module.extra_specs()``, a :class:`zsad.types.ExtraSpec` per name),
    never by their shape; an undeclared extra, or one of another shape than declared, is an error naming it.
    ``image_scalar`` and ``image_table`` extras are averaged per category (all images, normal, anomalous) and
    ``batch_table`` extras (MPAMA's expert shares per MoE layer) are averaged over the category's batches weighted
    by their size; both go to ``metrics.json`` under ``datasets.<name>.extras.<extra>``. Under DDP the per-batch
    tables include the few images a sampler repeats to pad the ranks (their rows cannot be told apart).

    Args:
        out_dir: folder of the result files; ``None`` uses the trainer's ``default_root_dir``.
        legacy_aupro: also compute ``pixel_aupro_legacy``.

    Attributes:
        results: the ``metrics.json`` content after ``test`` (also on ranks that do not write it).
    """

    def __init__(self, out_dir: str | Path | None = None, legacy_aupro: bool = True) -> None:
        super().__init__()
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.legacy_aupro = legacy_aupro
        self.results: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._specs: dict[str, ExtraSpec] = {}
        self._current: _CategoryBuffer | None = None
        self._finished: set[tuple[int, str, str]] = set()
        self._datasets: dict[str, dict[str, Any]] = {}
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------------------------ hooks
    def on_test_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        destroy_process_group_at_exit()
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
        maps, scores, extras = unpack_outputs(outputs)
        b = len(batch)
        if maps.ndim != 3 or maps.shape[0] != b or tuple(scores.shape) != (b,):
            raise ValueError(
                f"Evaluator: expected maps [B,H,W] and scores [B] with B={b}, got maps {tuple(maps.shape)} "
                f"and scores {tuple(scores.shape)}"
            )
        if len(set(batch.category)) != 1 or len(set(batch.dataset)) != 1:
            raise ValueError(
                f"Evaluator: batch {batch_idx} spans several categories {sorted(set(batch.category))}; "
                "test loaders must batch one category at a time"
            )
        self._check_extras(extras, b, pl_module)
        key = (dataloader_idx, batch.dataset[0], batch.category[0])
        if self._current is None or self._current.key != key:
            self._finish_category(trainer, pl_module)
            if key in self._finished:
                raise ValueError(
                    f"Evaluator: category {key[1]}/{key[2]} came back after it was evaluated; "
                    "test loaders must be ordered by category"
                )
            self._current = self._new_buffer(key, has_masks=batch.mask is not None)
        self._append(self._current, batch, maps, scores, extras)

    def on_test_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._finish_category(trainer, pl_module)
        for data in self._datasets.values():
            data["mean"], data["n_categories_in_mean"] = category_means(data["categories"])
            if "extras" in data:
                extras_means(data["extras"])
        for name, data in self._datasets.items():
            for key, value in data["mean"].items():
                if value is not None:
                    # Identical on every rank, so the synchronising mean is a no-op that keeps Lightning quiet.
                    pl_module.log(f"test/{name}/{key}", value, sync_dist=True, add_dataloader_idx=False)
        test_s = time.perf_counter() - self._t0
        n_images = sum(d["n_images"] for d in self._datasets.values())
        timing = {
            "test_s": test_s,
            "images_per_s": n_images / test_s,
            "device": device_name(pl_module.device),
        }
        metadata = pl_module.run_metadata() if callable(getattr(pl_module, "run_metadata", None)) else {}
        self.results = build_metrics_document(self._datasets, timing, _with_versions(metadata))
        if trainer.is_global_zero:
            write_metrics_json(self._out_dir(trainer) / "metrics.json", self.results)

    # ------------------------------------------------------------------------------------------ internals
    def _check_extras(self, extras: Mapping[str, Any], b: int, pl_module: lightning.LightningModule) -> None:
        for name, value in extras.items():
            spec = self._specs.get(name)
            if spec is None:
                raise ValueError(
                    f"Evaluator: extra {name!r} of {type(pl_module).__name__} is not declared; declare its shape "
                    f"in the method's EXTRAS / extra_specs() (zsad.types.ExtraSpec). Declared: {sorted(self._specs)}"
                )
            if not isinstance(value, Tensor):
                raise TypeError(f"Evaluator: extra {name!r} must be a tensor, got {type(value).__name__}")
            try:
                spec.check(name, value, b)
            except ValueError as e:
                raise ValueError(f"Evaluator: {e}") from None

    def _out_dir(self, trainer: lightning.Trainer) -> Path:
        return self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir)

    def _append(
        self, buf: _CategoryBuffer, batch: Any, maps: Tensor, scores: Tensor, extras: Mapping[str, Tensor]
    ) -> None:
        b = maps.shape[0]
        index = batch_index(batch, buf.n_seen, maps.device)
        buf.n_seen += b
        rows = {
            "maps": maps.detach().float(),
            "scores": scores.detach().float(),
            "labels": batch.label.detach().to(maps.device),
            "index": index,
        }
        if buf.has_masks:
            if batch.mask is None:
                raise ValueError(
                    f"Evaluator: {buf.dataset}/{buf.category} mixes batches with and without masks"
                )
            mask = batch.mask[:, 0]
            if mask.shape != maps.shape:
                raise ValueError(
                    f"Evaluator: {buf.dataset}/{buf.category}: masks {tuple(mask.shape)} do not match maps "
                    f"{tuple(maps.shape)}; maps must be at the evaluation resolution"
                )
            rows["masks"] = mask.detach().to(maps.device, torch.uint8)
        for name, value in extras.items():
            kind = self._specs[name].kind
            if self._specs[name].per_image:
                buf.n_rows[name] = buf.n_rows.get(name, 0) + b
            if kind in ("image_scalar", "image_table"):
                rows[f"extra_{name}"] = value.detach().float().to(maps.device)
            elif kind == "batch_table":
                buf.tables[name] = add_batch_table(buf.tables.get(name), value, b)
        buf.state.update(**rows)

    def _new_buffer(self, key: tuple[int, str, str], has_masks: bool) -> _CategoryBuffer:
        rows = sorted(n for n, s in self._specs.items() if s.kind in ("image_scalar", "image_table"))
        names = [
            "maps",
            "scores",
            "labels",
            "index",
            *(["masks"] if has_masks else []),
            *(f"extra_{n}" for n in rows),
        ]
        return _CategoryBuffer(*key, state=CategoryState(names), has_masks=has_masks)

    def _finish_category(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        buf, self._current = self._current, None
        if buf is None:
            return
        partial = sorted(n for n, k in buf.n_rows.items() if k != buf.n_seen)
        if partial:
            raise ValueError(
                f"Evaluator: {buf.dataset}/{buf.category}: per-image extra(s) {partial} came with only some "
                "batches; a method returns each of its extras for every batch or for none"
            )
        gathered = buf.state.compute()  # every rank's rows, repeats removed
        buf.state.reset()  # free the per-batch pieces
        maps, scores, labels, index = (gathered[k] for k in ("maps", "scores", "labels", "index"))
        masks = gathered.get("masks")
        metrics = evaluate(maps, masks, scores, labels, legacy_aupro=self.legacy_aupro)
        data = self._datasets.setdefault(buf.dataset, {"categories": {}, "n_images": 0})
        data["categories"][buf.category] = metrics
        data["n_images"] += int(index.numel())
        self._finished.add(buf.key)
        values = {
            k.removeprefix("extra_"): _label_means(t, labels)
            for k, t in gathered.items()
            if k.startswith("extra_")
        }
        tables = gather_tables(buf.tables)  # each batch_table, over all ranks, weighted by batch size
        buf.tables = {}
        values.update({n: {"all": t.tolist()} for n, t in tables.items()})
        for name, value in values.items():
            entry = data.setdefault("extras", {}).setdefault(
                name, {**spec_json(self._specs)[name], "categories": {}}
            )
            entry["categories"][buf.category] = value
        del gathered, maps, masks


def _with_versions(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The module's metadata with library versions filled in where it gives none."""
    meta = dict(metadata)
    versions = {"zsad": zsad.__version__, "torch": torch.__version__, "lightning": lightning.__version__}
    meta["versions"] = {**versions, **dict(meta.get("versions") or {})}
    return meta
