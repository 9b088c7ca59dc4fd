"""What a W&B run receives besides Lightning's scalars: per-category tables, cross-dataset means, the gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zsad.metrics import METRIC_KEYS


def dataset_means(results: dict[str, Any]) -> dict[str, float]:
    """Mean over datasets of each metric's dataset mean (datasets where it is undefined are left out).

    Logged as ``test/mean/<metric>``: the single number a sweep optimises (on the validation protocol only).
    """
    out: dict[str, float] = {}
    for key in METRIC_KEYS:
        vals = [d["mean"][key] for d in results["datasets"].values() if d["mean"].get(key) is not None]
        if vals:
            out[f"test/mean/{key}"] = sum(vals) / len(vals)
    return out


def category_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for ds, data in results["datasets"].items():
        for cat, vals in data["categories"].items():
            rows.append([ds, cat, *[vals.get(k) for k in METRIC_KEYS]])
        rows.append([ds, "mean", *[data["mean"].get(k) for k in METRIC_KEYS]])
    return rows


def log_results(logger: Any, run_dir: Path, results: dict[str, Any]) -> None:
    """Log the per-category table, the cross-dataset means and the heatmap gallery to a WandbLogger's run."""
    import wandb

    from zsad.bench.leaderboard import group_runs, load_run
    from zsad.bench.plots import gallery

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
