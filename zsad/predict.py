"""``zsad predict``: heatmap overlays (and a scores table) for a folder of images, from a trained checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from data_modules.dataset import ZSADDataset, collate
from data_modules.imageio import is_image_file, load_image
from data_modules.types import Sample
from zsad import config as C
from zsad.module import ZSADModule


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [H,W] map (min-max scaled for display only) over an RGB uint8 image with the jet colour map."""
    from matplotlib import colormaps

    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    color = (colormaps["jet"](norm)[..., :3] * 255).astype(np.float32)
    return (alpha * color + (1 - alpha) * image.astype(np.float32)).clip(0, 255).astype(np.uint8)


def predict(
    cfg: DictConfig, images: Path, out: Path, class_name: str = "object", batch_size: int = 8
) -> list[Path]:
    if not images.is_dir():
        raise C.ConfigError(f"--images: {images} is not a folder")
    files = sorted(
        p for p in images.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p)
    )
    if not files:
        raise C.ConfigError(f"--images: no image files (png/jpg/bmp/tif) in {images}")
    module = ZSADModule.from_checkpoint(cfg, cache_dir=Path(cfg.out_dir) / ".cache").eval()
    model = module.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    samples = [Sample("predict", "predict", p.resolve(), None, 0, "unknown", class_name) for p in files]
    ds = ZSADDataset(samples, model.input_size, model.mean, model.std, model.interpolation, with_masks=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = []
    with torch.inference_mode():
        for batch in loader:
            batch = batch.to(device)
            res = model(batch.image, batch)
            maps = res.anomaly_map.float().cpu().numpy()
            for path, m, score in zip(batch.path, maps, res.image_score.float().cpu().tolist()):
                img = load_image(
                    path
                )  # overlays at the image's own resolution: the map is resized, not the image
                m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.BILINEAR))
                target = out / f"{Path(path).stem}_heatmap.png"
                Image.fromarray(np.concatenate([img, overlay(img, m)], axis=1)).save(target)
                written.append(target)
                rows.append({"image": path, "score": score, "overlay": str(target)})
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "score", "overlay"])
        w.writeheader()
        w.writerows(rows)
    return written
