"""Results without torch: the ``metrics.json`` schema, aggregation (means, mean ± std over seeds), rendering.

The lowest layer of zsad: it imports nothing else of zsad and no torch, so result folders can be read, checked and
rendered anywhere. ``schema`` knows the file, ``aggregate`` holds the one mean, ``render`` the one table model
(markdown, HTML, CSV, console), ``leaderboard`` and ``throughput`` build the two reports, ``plots`` draws
(matplotlib, loaded only when a plot is drawn).
"""

from zsad.results.aggregate import (
    Group,
    Stat,
    category_means,
    dataset_means,
    extras_means,
    group_runs,
    mean,
    stat,
)
from zsad.results.render import Cell, Section, Table, summary_table, table_console, table_markdown
from zsad.results.schema import (
    IMAGE_KEYS,
    MAIN_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
    SHORT,
    Run,
    build_metrics_document,
    load_run,
    validate_metrics_document,
    write_metrics_json,
)

__all__ = [
    "IMAGE_KEYS",
    "MAIN_KEYS",
    "METRIC_KEYS",
    "PIXEL_KEYS",
    "SHORT",
    "Cell",
    "Group",
    "Run",
    "Section",
    "Stat",
    "Table",
    "build_metrics_document",
    "category_means",
    "dataset_means",
    "extras_means",
    "group_runs",
    "load_run",
    "mean",
    "stat",
    "summary_table",
    "table_console",
    "table_markdown",
    "validate_metrics_document",
    "write_metrics_json",
]
