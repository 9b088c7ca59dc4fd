"""The Evaluator callback: collects a test run's maps and scores per category and writes ``metrics.json``."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

import zsad
from zsad.dist import destroy_process_group_at_exit
from zsad.metrics.functional import evaluate
from zsad.results.aggregate import category_means, extras_means
from zsad.results.schema import build_metrics_document, write_metrics_json
from zsad.types import AnomalyOutput, ExtraSpec


@dataclass
class _CategoryBuffer:
    """What one rank has seen of the category being collected (tensors stay on the module's device)."""

    dataloader_idx: int
    dataset: str
    category: str
    maps: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] | None = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    index: list[Tensor] = field(default_factory=list)
    gallery: list[dict[str, Any]] = field(default_factory=list)  # this rank's lowest-index items, on the CPU
    n_seen: int = 0
    # Extras by their declared kind: image_scalar / image_table rows per batch (gathered and de-duplicated with
    # the maps), how many images each per-image extra came with, batch_table running [Σ b·table (float64), Σ b].
    rows: dict[str, list[Tensor]] = field(default_factory=dict)
    n_rows: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, str]:
        return self.dataloader_idx, self.dataset, self.category


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(tensors: list[Tensor]) -> list[Tensor]:
    """Concatenates every rank's tensors along dim 0 (ranks may hold different row counts)."""
    world = _world_size()
    if world == 1:
        return tensors
    rows = tensors[0].shape[0]
    count = torch.tensor([rows], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[:rows] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return gathered


def _all_gather_objects(obj: Any) -> list[Any]:
    if _world_size() == 1:
        return [obj]
    out: list[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


def _unpack_outputs(outputs: Any) -> tuple[Tensor, Tensor, Mapping[str, Tensor]]:
    if isinstance(outputs, AnomalyOutput):
        return outputs.anomaly_map, outputs.image_score, outputs.extras
    if isinstance(outputs, Mapping) and "maps" in outputs and "scores" in outputs:
        return outputs["maps"], outputs["scores"], outputs.get("extras") or {}
    raise TypeError(
        "Evaluator: test_step must return {'maps': Tensor [B,H,W], 'scores': Tensor [B], 'extras': dict}, "
        f"got {type(outputs).__name__}"
    )


def _declared_extras(pl_module: Any) -> dict[str, ExtraSpec]:
    """The module's ``extra_specs()`` (ZSADModule forwards its method's), or none."""
    specs = pl_module.extra_specs() if callable(getattr(pl_module, "extra_specs", None)) else {}
    for name, spec in specs.items():
        if not isinstance(spec, ExtraSpec):
            raise TypeError(
                f"Evaluator: extra_specs()[{name!r}] must be a zsad.types.ExtraSpec, got {spec!r}"
            )
    return dict(specs)


def _spec_json(specs: Mapping[str, ExtraSpec]) -> dict[str, dict[str, Any]]:
    return {
        name: {"kind": s.kind, "rows": list(s.rows), "cols": list(s.cols), "row_name": s.row_name,
               "col_name": s.col_name}
        for name, s in specs.items()
    }  # fmt: skip


def _label_means(values: Tensor, labels: Tensor) -> dict[str, Any]:
    """Mean of per-image values [n, ...] over all images and per label (None where a label has no image)."""
    out: dict[str, Any] = {"all": values.double().mean(0).tolist()}
    for name, lab in (("normal", 0), ("anomalous", 1)):
        sel = labels == lab
        out[name] = values[sel].double().mean(0).tolist() if bool(sel.any()) else None
    return out


def _first_unique(index: Tensor) -> Tensor | None:
    """Positions keeping the first occurrence of each index, or None when nothing repeats."""
    sorted_index, perm = torch.sort(index, stable=True)
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return None if bool(keep.all()) else perm[keep]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor()})" if platform.processor() else "cpu"
    world = _world_size()
    return name + (f" x{world}" if world > 1 else "")


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


class Evaluator(Callback):
    """Computes the exact metrics of a ``Trainer.test`` run, per (dataset, category), and writes the results.

    The LightningModule's ``test_step`` returns ``{"maps": [B,H,W], "scores": [B], "extras": {...}}`` and the
    batch is a ``data_modules.types.Batch``. Test loaders are ordered by category and a batch never spans two, so
    a category is complete when the (dataloader, dataset, category) key changes: it is then gathered across
    ranks, de-duplicated by ``batch.index`` (DDP pads shares with repeats), evaluated on the module's device and
    freed. Memory is bounded by the largest category. Every rank computes the same numbers; rank 0 writes.

    Writes ``<out_dir>/metrics.json`` (``specs/protocol.md`` §4, merged with ``pl_module.run_metadata()`` when
    the module has it) and ``<out_dir>/gallery/<dataset>/<category>.npz`` holding the first
    ``gallery_per_category`` images (by dataset index) of each category: ``paths``, ``maps`` (float16),
    ``masks`` (uint8, only for sets with masks), ``labels``, ``scores`` and ``extra_<name>`` (float16) for each
    per-image extra and for each per-batch table (the category's, see below), and ``extras_spec`` (JSON: each
    extra's declaration). Logs ``test/<dataset>/<metric>`` means.

    Extras are read by their declaration (``pl_module.extra_specs()``, a :class:`zsad.types.ExtraSpec` per name),
    never by their shape; an undeclared extra, or one of another shape than declared, is an error naming it.
    ``image_scalar`` and ``image_table`` extras are averaged per category (all images, normal, anomalous) and
    ``batch_table`` extras (MPAMA's expert shares per MoE layer) are averaged over the category's batches weighted
    by their size; both go to ``metrics.json`` under ``datasets.<name>.extras.<extra>``. Under DDP the per-batch
    tables include the few images a sampler repeats to pad the ranks (their rows cannot be told apart).

    Args:
        out_dir: folder of the result files; ``None`` uses the trainer's ``default_root_dir``.
        gallery_per_category: images per category in the gallery (0 disables it).
        legacy_aupro: also compute ``pixel_aupro_legacy``.

    Attributes:
        results: the ``metrics.json`` content after ``test`` (also on ranks that do not write it).
    """

    def __init__(
        self, out_dir: str | Path | None = None, gallery_per_category: int = 2, legacy_aupro: bool = True
    ) -> None:
        super().__init__()
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.gallery_per_category = gallery_per_category
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
        self._specs = _declared_extras(pl_module)

    def on_test_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        maps, scores, extras = _unpack_outputs(outputs)
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
            self._current = _CategoryBuffer(*key, masks=None if batch.mask is None else [])
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
            "device": _device_name(pl_module.device),
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
        index = batch.index
        if index.numel() != b:
            if _world_size() > 1:
                raise ValueError("Evaluator: Batch.index must give every sample's dataset index under DDP")
            index = torch.arange(buf.n_seen, buf.n_seen + b)  # one process: arrival order is the identity
        index = index.to(maps.device)
        buf.n_seen += b
        buf.maps.append(maps.detach().float())
        buf.scores.append(scores.detach().float())
        buf.labels.append(batch.label.detach().to(maps.device))
        buf.index.append(index)
        mask = None
        if buf.masks is not None:
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
            buf.masks.append(mask.detach().to(maps.device, torch.uint8))
        for name, value in extras.items():
            kind = self._specs[name].kind
            if self._specs[name].per_image:
                buf.n_rows[name] = buf.n_rows.get(name, 0) + b
            if kind in ("image_scalar", "image_table"):
                buf.rows.setdefault(name, []).append(value.detach().float().to(maps.device))
            elif kind == "batch_table":
                weighted = value.detach().double() * b  # a batch's table stands for its b images
                acc = buf.tables.get(name)
                buf.tables[name] = [weighted, b] if acc is None else [acc[0] + weighted, acc[1] + b]
        self._keep_gallery(buf, batch, index, maps, scores, mask, extras)

    def _keep_gallery(
        self,
        buf: _CategoryBuffer,
        batch: Any,
        index: Tensor,
        maps: Tensor,
        scores: Tensor,
        mask: Tensor | None,
        extras: Mapping[str, Tensor],
    ) -> None:
        """Keeps this rank's ``gallery_per_category`` lowest-index items of each label (a handful, on the CPU)."""
        k = self.gallery_per_category
        if k <= 0:
            return
        per_image = {n: t for n, t in extras.items() if self._specs[n].per_image}
        for i in torch.argsort(index).tolist():
            item = {
                "index": int(index[i]),
                "path": batch.path[i],
                "map": maps[i].detach().half().cpu().numpy(),
                "label": int(batch.label[i]),
                "score": float(scores[i]),
                "extras": {n: t[i].detach().half().cpu().numpy() for n, t in per_image.items()},
            }
            if mask is not None:
                item["mask"] = mask[i].detach().to(torch.uint8).cpu().numpy()
            buf.gallery.append(item)
        buf.gallery = _lowest_per_label(buf.gallery, k)

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
        named = {"maps": buf.maps, "scores": buf.scores, "labels": buf.labels, "index": buf.index}
        if buf.masks is not None:
            named["masks"] = buf.masks
        named.update({f"extra/{n}": rows for n, rows in sorted(buf.rows.items())})
        buf.maps = buf.scores = buf.labels = buf.index = buf.masks = []  # free the per-batch pieces
        buf.rows = {}
        gathered = dict(zip(named, _all_gather_rows([torch.cat(parts) for parts in named.values()])))
        keep = _first_unique(gathered["index"])
        if keep is not None:
            gathered = {k: t[keep] for k, t in gathered.items()}
        maps, scores, labels, index = (gathered[k] for k in ("maps", "scores", "labels", "index"))
        masks = gathered.get("masks")
        metrics = evaluate(maps, masks, scores, labels, legacy_aupro=self.legacy_aupro)
        data = self._datasets.setdefault(buf.dataset, {"categories": {}, "n_images": 0})
        data["categories"][buf.category] = metrics
        data["n_images"] += int(index.numel())
        self._finished.add(buf.key)
        values = {
            k.removeprefix("extra/"): _label_means(t, labels)
            for k, t in gathered.items()
            if k.startswith("extra/")
        }
        tables = self._category_tables(buf)
        values.update({n: {"all": t.tolist()} for n, t in tables.items()})
        for name, value in values.items():
            entry = data.setdefault("extras", {}).setdefault(
                name, {**_spec_json(self._specs)[name], "categories": {}}
            )
            entry["categories"][buf.category] = value
        del gathered, maps, masks
        gallery = [it for part in _all_gather_objects(buf.gallery) for it in part]
        if trainer.is_global_zero and self.gallery_per_category > 0:
            self._write_gallery(trainer, buf, gallery, tables)

    def _category_tables(self, buf: _CategoryBuffer) -> dict[str, np.ndarray]:
        """Each batch_table extra averaged over the category's batches (all ranks), weighted by batch size."""
        local = {n: (acc.cpu().numpy(), count) for n, (acc, count) in buf.tables.items()}
        buf.tables = {}
        out: dict[str, np.ndarray] = {}
        for part in _all_gather_objects(local):
            for name, (acc, count) in part.items():
                total, n = out.get(name, (0.0, 0))
                out[name] = (total + acc, n + count)
        return {name: total / n for name, (total, n) in out.items()}

    def _write_gallery(
        self,
        trainer: lightning.Trainer,
        buf: _CategoryBuffer,
        items: list[dict],
        tables: Mapping[str, np.ndarray],
    ) -> None:
        unique = list({it["index"]: it for it in items}.values())
        chosen = _balanced(unique, self.gallery_per_category)
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
        arrays["extras_spec"] = np.asarray(json.dumps(_spec_json(written)))
        safe = buf.category.replace("/", "_")
        write_gallery(
            self._out_dir(trainer) / "gallery" / buf.dataset / f"{safe}.npz",
            arrays,
            [it["path"] for it in chosen],
        )


def write_gallery(path: str | Path, arrays: Mapping[str, np.ndarray], paths: list[str]) -> Path:
    """One compressed ``.npz`` of a category's first images (``paths``, ``maps``, ``masks`` …) for later pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, paths=np.asarray(paths, dtype=str), **arrays)
    return path


def _with_versions(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The module's metadata with library versions filled in where it gives none."""
    meta = dict(metadata)
    versions = {"zsad": zsad.__version__, "torch": torch.__version__, "lightning": lightning.__version__}
    meta["versions"] = {**versions, **dict(meta.get("versions") or {})}
    return meta
