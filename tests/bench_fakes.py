"""Hand-written run folders (metrics.json, gallery npz, tiny PNG images) for the leaderboard and grid tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
    "pixel_aupro_legacy",
)


def metrics(values: dict[str, dict[str, dict[str, float | None]]]) -> dict:
    """datasets → categories → metric values; the mean is computed here over defined values (as the Evaluator does)."""
    out = {}
    for d, cats in values.items():
        mean, counts = {}, {}
        for k in KEYS:
            defined = [c[k] for c in cats.values() if c.get(k) is not None]
            mean[k] = sum(defined) / len(defined) if defined else None
            counts[k] = len(defined)
        out[d] = {
            "categories": cats,
            "mean": mean,
            "n_categories_in_mean": counts,
            "n_images": 10 * len(cats),
        }
    return out


def write_run(
    root: Path,
    method: str,
    protocol: str,
    seed: int,
    values: dict,
    weights: str = "none",
    train_s: float = 12.0,
    images_per_s: float = 40.0,
) -> Path:
    """A run folder with a metrics.json in the spec §4 schema; returns the metrics.json path."""
    run = root / f"{method}-{protocol}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    data = {
        "method": method,
        "protocol": protocol,
        "train_on": "synth_a",
        "seed": seed,
        "backbone": {"vision": "tiny", "text": "tiny", "weights": weights},
        "datasets": metrics(values),
        "timing": {"train_s": train_s, "test_s": 1.5, "images_per_s": images_per_s, "device": "cpu"},
        "versions": {"zsad": "0.1.0", "torch": "2.x", "git": "abc1234"},
        "config": {
            "method": {"name": method, "vision": {"name": "tiny", "pretrained": weights}},
            "data": {
                "train": {"name": "synth_a", "root": "data/synthetic/a"},
                "test": [{"name": "synth_b", "root": "data/synthetic/b"}],
            },
        },
    }
    path = run / "metrics.json"
    path.write_text(json.dumps(data))
    return path


def write_gallery(
    run_dir: Path, dataset: str, category: str, images: list[Path], extras: dict | None = None
) -> Path:
    """A gallery npz with 16×16 maps: the first image anomalous with a square defect, the others normal."""
    n = len(images)
    rng = np.random.default_rng(len(str(run_dir)))
    masks = np.zeros((n, 16, 16), bool)
    masks[0, 4:9, 6:11] = True
    maps = rng.random((n, 16, 16)).astype(np.float32) * 0.3 + masks * 0.7
    out = run_dir / "gallery" / dataset
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{category}.npz"
    arrays = {
        "paths": np.array([str(p) for p in images]),
        "maps": maps,
        "masks": masks,
        "labels": np.array([1] + [0] * (n - 1)),
        "scores": maps.reshape(n, -1).max(1),
    }
    arrays.update(extras or {})
    np.savez(path, **arrays)
    return path


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.zeros((32, 32, 3), np.uint8)
        arr[..., i % 3] = 180
        arr[8:18, 12:22] = 255 if i == 0 else arr[8:18, 12:22]
        p = folder / f"{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
