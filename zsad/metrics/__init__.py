"""Exact metrics: the functional core (the callbacks that collect and write them live in ``zsad.callbacks``)."""

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
from zsad.results.schema import (
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
)  # re-exported: the one list lives in results

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
