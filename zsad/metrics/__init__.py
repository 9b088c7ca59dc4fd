"""Exact metrics (functional core), the Evaluator callback that collects and writes them, the Gallery callback."""

from zsad.metrics.evaluator import Evaluator
from zsad.metrics.functional import (
    DEFAULT_CHUNK,
    FPR_LIMIT,
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
from zsad.metrics.gallery import Gallery
from zsad.results.schema import (
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
)  # re-exported: the one list lives in results

__all__ = [
    "DEFAULT_CHUNK",
    "Evaluator",
    "FPR_LIMIT",
    "Gallery",
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
