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
