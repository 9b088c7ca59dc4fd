"""Data-loading throughput: images/s of the real test DataModule path from disk, with and without the cache."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _write_images(root: Path, n: int, side: int) -> None:
    """``n`` PNGs of ``side``² with smooth structure plus noise (compresses like a photo, not like white noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    good = root / "a" / "test" / "good"
    good.mkdir(parents=True)
    (root / "a" / "train" / "good").mkdir(parents=True)
    for i in range(n):
        low = rng.integers(0, 255, (side // 32 + 1, side // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (side, side, 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(good / f"{i:04d}.png", compress_level=6)


def measure_loading(
    n: int, size: int, workers: int, batch: int, source_side: int = 900, passes: int = 2
) -> dict:
    """Images/s of the real test DataModule path (decode + resize + normalise, workers, pinned memory).

    Timed over ``passes`` passes through the loader; the best pass is reported (the first one pays worker start).
    Then the same with the pre-resized cache (its one-off build time reported separately).
    """
    from data_modules.datamodule import DatasetSpec, ZSADDataModule

    def best_pass(dm: ZSADDataModule) -> tuple[float, int]:
        loader = dm.test_dataloader()[0]
        rates, seen = [], 0
        for _ in range(passes):
            t0 = time.perf_counter()
            seen = sum(len(b) for b in loader)
            rates.append(seen / (time.perf_counter() - t0))
        return max(rates), seen

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loadbench"
        _write_images(root, n, source_side)
        common = dict(
            train=None,
            test=[DatasetSpec("folder", str(root))],
            image_size=size,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            test_batch_size=batch,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        plain, seen = best_pass(ZSADDataModule(**common))
        dm = ZSADDataModule(**common, cache_dir=Path(tmp) / "cache")
        t0 = time.perf_counter()
        dm.setup("test")
        dm.test_dataloader()  # builds the cache
        build_s = time.perf_counter() - t0
        cached, _ = best_pass(dm)
    return {
        "images": seen,
        "source_side": source_side,
        "size": size,
        "workers": workers,
        "batch": batch,
        "img_s": plain,
        "cached_img_s": cached,
        "cache_build_s": build_s,
    }
