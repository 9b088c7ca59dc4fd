"""Exact metrics (functional core) and the Evaluator callback that collects and writes them."""

from zsad.metrics.evaluator import Evaluator
from zsad.metrics.functional import (
    DEFAULT_CHUNK,
    FPR_LIMIT,
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
    aupro,
    aupro_legacy,
    auroc,
    average_precision,
    binary_metrics,
    connected_components,
    evaluate,
    f1_max,
    pixel_metrics,
)
from zsad.metrics.results import category_means, validate_metrics_document, write_metrics_json

__all__ = [
    "DEFAULT_CHUNK",
    "Evaluator",
    "FPR_LIMIT",
    "IMAGE_KEYS",
    "METRIC_KEYS",
    "PIXEL_KEYS",
    "aupro",
    "aupro_legacy",
    "auroc",
    "average_precision",
    "binary_metrics",
    "category_means",
    "connected_components",
    "evaluate",
    "f1_max",
    "pixel_metrics",
    "validate_metrics_document",
    "write_metrics_json",
]
