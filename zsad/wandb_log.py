"""What a W&B run receives besides Lightning's scalars: per-category tables, cross-dataset means, the gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zsad.results.aggregate import dataset_means, group_runs
from zsad.results.schema import METRIC_KEYS, load_run

__all__ = ["category_rows", "dataset_means", "log_results"]


def category_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One row per dataset × category (and a ``mean`` row per dataset): dataset, category, every metric."""
    rows = []
    for ds, data in results["datasets"].items():
        for cat, vals in data["categories"].items():
            rows.append([ds, cat, *[vals.get(k) for k in METRIC_KEYS]])
        rows.append([ds, "mean", *[data["mean"].get(k) for k in METRIC_KEYS]])
    return rows


def log_results(logger: Any, run_dir: Path, results: dict[str, Any]) -> None:
    """Log the per-category table, the cross-dataset means and the heatmap gallery to a WandbLogger's run."""
    import wandb

    from zsad.results.plots import gallery

    exp = logger.experiment
    means = dataset_means(results)
    payload: dict[str, Any] = dict(means)
    payload["test/per_category"] = wandb.Table(
        columns=["dataset", "category", *METRIC_KEYS], data=category_rows(results)
    )
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        groups = group_runs([load_run(metrics_file)])
        for protocol, gs in groups.items():
            for ds in results["datasets"]:
                (run_dir / "plots").mkdir(parents=True, exist_ok=True)
                png = gallery(gs, protocol, ds, run_dir / "plots" / f"gallery_{ds}.png")
                if png is not None:
                    payload[f"gallery/{ds}"] = wandb.Image(str(png))
    exp.log(payload)
    for key, value in means.items():
        exp.summary[key] = value
