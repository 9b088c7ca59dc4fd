"""The ``metrics.json`` document (``specs/protocol.md`` §4): its keys, how it is built, validated, written and read.

The one place that knows the file's shape. Pure Python (no torch, nothing else of zsad), so result folders can be
read anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The metric keys (spec §3), in the order every table and file uses.
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_legacy")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS
MAIN_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")  # what papers report
SECOND_KEYS = ("pixel_ap", "image_f1max", "pixel_f1max", "pixel_aupro_legacy")
SHORT = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "P-AUPRO",
    "pixel_aupro_legacy": "P-AUPRO (legacy)",
}

#: Top-level keys of ``metrics.json`` besides ``datasets`` and ``timing``; filled from the run's metadata.
METADATA_KEYS = ("method", "protocol", "train_on", "seed", "backbone", "versions", "config")
TIMING_KEYS = ("test_s", "images_per_s", "device")
#: Kinds of extras that ``metrics.json`` aggregates (``zsad.types.EXTRA_KINDS``; the others live in the gallery).
AGGREGATED_EXTRA_KINDS = ("image_scalar", "image_table", "batch_table")


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


# ---------------------------------------------------------------------------------------------------------------
# validation


def _check_metric_dict(where: str, values: Any) -> None:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be an object of metric values, got {type(values).__name__}")
    for key in METRIC_KEYS:
        if key not in values:
            raise ValueError(f"{where} lacks the metric key {key!r}")
        v = values[key]
        if v is not None and (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not 0.0 <= v <= 1.0
        ):
            raise ValueError(f"{where}.{key} = {v!r}; expected a fraction in [0,1] or null")


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


def validate_metrics_document(doc: Any, source: str = "metrics.json") -> None:
    """Raises ``ValueError`` naming ``source`` and the first key of ``doc`` that breaks the ``metrics.json`` schema.

    Metric values are fractions in [0, 1] or ``null`` (undefined); a category's values appear as
    ``datasets.<dataset>.<category>.<key>`` in the message.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"{source} must hold a JSON object")
    for key in (*METADATA_KEYS, "datasets", "timing"):
        if key not in doc:
            raise ValueError(f"{source} lacks the key {key!r} (spec §4)")
    timing = doc["timing"]
    if not isinstance(timing, Mapping) or any(k not in timing for k in TIMING_KEYS):
        raise ValueError(f"{source}: timing must be an object with {TIMING_KEYS}, got {timing!r}")
    if not isinstance(doc["datasets"], Mapping):
        raise ValueError(f"{source}: datasets must be an object keyed by dataset name")
    for name, d in doc["datasets"].items():
        where = f"{source}: datasets.{name}"
        for key in ("categories", "mean", "n_categories_in_mean", "n_images"):
            if not isinstance(d, Mapping) or key not in d:
                raise ValueError(f"{where} lacks the key {key!r}")
        if not isinstance(d["categories"], Mapping) or not d["categories"]:
            raise ValueError(f"{where}.categories must be a non-empty object")
        for cat, values in d["categories"].items():
            _check_metric_dict(f"{where}.{cat}", values)
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


# ---------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class Run:
    """One evaluated run, as read from its ``metrics.json``."""

    path: Path
    label: str  # the leaderboard row (method name, or an ablation's name)
    method: str
    protocol: str
    seed: int
    data: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def datasets(self) -> dict[str, Any]:
        return self.data["datasets"]

    @property
    def timing(self) -> dict[str, Any]:
        return self.data.get("timing") or {}


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read and validate one ``metrics.json``.

    Raises:
        ValueError: the file is not JSON or breaks the schema (the message names the file and the key).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read metrics.json: {e}") from e
    validate_metrics_document(data, source=str(path))
    return Run(
        path=Path(path),
        label=label or str(data["method"]) + (f"_{data['variant']}" if data.get("variant") else ""),
        method=str(data["method"]),
        protocol=str(data["protocol"]),
        seed=int(data["seed"]),
        data=data,
    )


WEIGHT_KEYS = ("pretrained", "weights")
RANDOM_TOKENS = {"none", "random", "random init", ""}


def _walk_weights(node: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    """Every ``pretrained``/``weights`` leaf in a nested dict, with the dotted key of its parent."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in WEIGHT_KEYS and not isinstance(v, (dict, list)):
                yield prefix, str(v)
            elif isinstance(v, dict):
                yield from _walk_weights(v, f"{prefix}.{k}" if prefix else str(k))


def weight_sources(run: Run) -> list[tuple[str, str]]:
    """(backbone, weight source) pairs: from ``metrics.backbone`` (the model's identity), else the config."""
    found = list(_walk_weights(run.data.get("backbone") or {}))
    if not found:
        found = [
            (k.removeprefix("method").lstrip("."), v)
            for k, v in _walk_weights((run.data.get("config") or {}).get("method") or {}, "method")
        ]
    return found


def weights_of(run: Run) -> str:
    """The weight source of a run's backbones as one string (``none`` = random initialisation)."""
    found = weight_sources(run)
    if not found:
        return "unknown"
    if len({v for _, v in found}) == 1:
        return found[0][1]
    return ", ".join(f"{k or 'backbone'}={v}" for k, v in found)


def is_random(run: Run) -> bool:
    """True when any backbone of the run was built with random weights (``pretrained: none``)."""
    return any(v.strip().lower() in RANDOM_TOKENS or "random" in v.lower() for _, v in weight_sources(run))
