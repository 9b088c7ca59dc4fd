"""Exact metrics (functional core) and the Evaluator callback that collects and writes them."""

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

__all__ = [
    "DEFAULT_CHUNK",
    "FPR_LIMIT",
    "IMAGE_KEYS",
    "METRIC_KEYS",
    "PIXEL_KEYS",
    "aupro",
    "aupro_legacy",
    "auroc",
    "average_precision",
    "binary_metrics",
    "connected_components",
    "evaluate",
    "f1_max",
    "pixel_metrics",
]
