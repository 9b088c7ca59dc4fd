"""Result files: category means, the ``metrics.json`` document (``specs/protocol.md`` §4) and gallery files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zsad.metrics.functional import METRIC_KEYS

#: Top-level keys of ``metrics.json`` besides ``datasets`` and ``timing``; filled from the run's metadata.
METADATA_KEYS = ("method", "protocol", "train_on", "seed", "backbone", "versions", "config")
TIMING_KEYS = ("test_s", "images_per_s", "device")


def category_means(categories: Mapping[str, Mapping[str, float | None]]) -> tuple[dict, dict]:
    """Unweighted mean of each metric over the categories where it is defined.

    Returns:
        ``(mean, n_categories_in_mean)``: per key the mean (``None`` if no category defines it) and how many
        categories entered it.
    """
    mean: dict[str, float | None] = {}
    count: dict[str, int] = {}
    for key in METRIC_KEYS:
        values = [c[key] for c in categories.values() if c.get(key) is not None]
        mean[key] = math.fsum(values) / len(values) if values else None
        count[key] = len(values)
    return mean, count


#: Kinds of extras that ``metrics.json`` aggregates (``zsad.types.EXTRA_KINDS``; the others live in the gallery).
AGGREGATED_EXTRA_KINDS = ("image_scalar", "image_table", "batch_table")


def _elementwise_mean(values: list[Any]) -> Any:
    """Mean of equal-shaped floats or nested lists of floats."""
    if isinstance(values[0], list):
        return [_elementwise_mean([v[i] for v in values]) for i in range(len(values[0]))]
    return math.fsum(values) / len(values)


def extras_means(extras: Mapping[str, dict[str, Any]]) -> None:
    """Adds ``mean`` (unweighted over categories, of each category's ``all`` value) to every extra entry."""
    for entry in extras.values():
        entry["mean"] = _elementwise_mean([c["all"] for c in entry["categories"].values()])


def build_metrics_document(
    datasets: Mapping[str, Mapping[str, Any]], timing: Mapping[str, Any], metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The ``metrics.json`` content: metadata keys (``None`` when unknown), ``datasets`` and ``timing``.

    Args:
        datasets: per dataset ``{"categories", "mean", "n_categories_in_mean", "n_images"}``.
        timing: at least ``test_s``, ``images_per_s``, ``device``.
        metadata: the run's own description (``ZSADModule.run_metadata()``); its ``timing`` entries (e.g.
            ``train_s``) are merged under ours, its other keys are copied as they are.
    """
    meta = dict(metadata or {})
    doc: dict[str, Any] = {key: meta.pop(key, None) for key in METADATA_KEYS}
    doc["timing"] = {**dict(meta.pop("timing", None) or {}), **timing}
    doc.update(meta)
    doc["datasets"] = {name: dict(d) for name, d in datasets.items()}
    return doc


def _check_metric_dict(where: str, values: Any) -> None:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be an object of metric values, got {type(values).__name__}")
    for key in METRIC_KEYS:
        if key not in values:
            raise ValueError(f"{where} lacks the metric key {key!r}")
        v = values[key]
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{where}.{key} must be a finite number or null, got {v!r}")


def _check_extra_value(where: str, value: Any, table: bool, rows: int, cols: int) -> None:
    if table:
        ok = (
            isinstance(value, list)
            and (rows == 0 or len(value) == rows)
            and all(isinstance(r, list) and (cols == 0 or len(r) == cols) for r in value)
        )
        flat = [v for r in value for v in r] if ok else []
    else:
        ok, flat = True, [value]
    if not ok or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in flat):
        shape = f"a {rows or 'R'}×{cols or 'C'} table of finite numbers" if table else "a finite number"
        raise ValueError(f"{where} must be {shape}, got {value!r}")


def _check_extras(where: str, extras: Any, categories: Mapping[str, Any]) -> None:
    """``datasets.<name>.extras``: per extra its declaration, per category {all, normal, anomalous}, a mean."""
    if not isinstance(extras, Mapping):
        raise ValueError(f"{where} must be an object keyed by extra name")
    for name, e in extras.items():
        at = f"{where}.{name}"
        for key in ("kind", "rows", "cols", "categories", "mean"):
            if not isinstance(e, Mapping) or key not in e:
                raise ValueError(f"{at} lacks the key {key!r}")
        if e["kind"] not in AGGREGATED_EXTRA_KINDS:
            raise ValueError(f"{at}.kind must be one of {AGGREGATED_EXTRA_KINDS}, got {e['kind']!r}")
        table, rows, cols = e["kind"] != "image_scalar", len(e["rows"]), len(e["cols"])
        unknown = set(e["categories"]) - set(categories)
        if not isinstance(e["categories"], Mapping) or unknown:
            raise ValueError(f"{at}.categories must be keyed by the dataset's categories; unknown: {unknown}")
        for cat, value in e["categories"].items():
            if not isinstance(value, Mapping) or "all" not in value:
                raise ValueError(f"{at}.categories.{cat} must be an object with 'all'")
            for part, v in value.items():
                if part not in ("all", "normal", "anomalous"):
                    raise ValueError(f"{at}.categories.{cat}: unknown part {part!r}")
                if v is not None or part == "all":
                    _check_extra_value(f"{at}.categories.{cat}.{part}", v, table, rows, cols)
        _check_extra_value(f"{at}.mean", e["mean"], table, rows, cols)


def validate_metrics_document(doc: Any) -> None:
    """Raises ``ValueError`` naming the first key of ``doc`` that breaks the ``metrics.json`` schema."""
    if not isinstance(doc, Mapping):
        raise ValueError("metrics.json must hold a JSON object")
    for key in (*METADATA_KEYS, "datasets", "timing"):
        if key not in doc:
            raise ValueError(f"metrics.json lacks the key {key!r}")
    timing = doc["timing"]
    if not isinstance(timing, Mapping) or any(k not in timing for k in TIMING_KEYS):
        raise ValueError(f"metrics.json: timing must be an object with {TIMING_KEYS}, got {timing!r}")
    if not isinstance(doc["datasets"], Mapping):
        raise ValueError("metrics.json: datasets must be an object keyed by dataset name")
    for name, d in doc["datasets"].items():
        where = f"metrics.json: datasets.{name}"
        for key in ("categories", "mean", "n_categories_in_mean", "n_images"):
            if not isinstance(d, Mapping) or key not in d:
                raise ValueError(f"{where} lacks the key {key!r}")
        if not isinstance(d["categories"], Mapping) or not d["categories"]:
            raise ValueError(f"{where}.categories must be a non-empty object")
        for cat, values in d["categories"].items():
            _check_metric_dict(f"{where}.categories.{cat}", values)
        _check_metric_dict(f"{where}.mean", d["mean"])
        counts = d["n_categories_in_mean"]
        if not isinstance(counts, Mapping) or any(not isinstance(counts.get(k), int) for k in METRIC_KEYS):
            raise ValueError(f"{where}.n_categories_in_mean must give an int per metric key")
        if not isinstance(d["n_images"], int) or d["n_images"] <= 0:
            raise ValueError(f"{where}.n_images must be a positive int, got {d['n_images']!r}")
        if "extras" in d:  # optional: the method's declared extras, aggregated
            _check_extras(f"{where}.extras", d["extras"], d["categories"])


def write_metrics_json(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Validates and writes ``doc``; NaN is refused (undefined values are ``null``)."""
    validate_metrics_document(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n")
    return path


def write_gallery(path: str | Path, arrays: Mapping[str, np.ndarray], paths: list[str]) -> Path:
    """One compressed ``.npz`` of a category's first images (``paths``, ``maps``, ``masks`` …) for later pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, paths=np.asarray(paths, dtype=str), **arrays)
    return path
