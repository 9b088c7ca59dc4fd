"""``make bench-gpu``: throughput of every method at its paper size (random weights), plus data loading and metrics.

For each method: training-step images/s, inference images/s (bf16 autocast on GPU), peak GPU memory, the fraction of
inference time spent in the frozen backbone(s), and model FLOP utilisation of the frozen vision forward against the
card's bf16 peak. Also data-loading images/s from disk at 518² and the metric time of a VisA-sized evaluation.

On a machine without a GPU it runs the same harness with the tiny presets, small batches and a small subset (so CI
exercises it) and says so in the table. Output: ``<out>.md`` and ``<out>.json`` with device, versions and commit.

    python -m zsad.bench.throughput --out results/throughput [--methods ava_dino,mpama] [--batch 32] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsad.versions import versions

METHODS = ["anomalyclip", "mpa", "mpama", "entroad", "ava_dino"]
# Dense bf16 tensor-core peaks (TFLOP/s) of cards we may meet; MFU is reported against these.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def random_weight_overrides(method: str) -> list[str]:
    if method == "ava_dino":
        return ["method.vision.pretrained=none", "method.text.pretrained=none"]
    return ["method.clip.pretrained=none"]


def build_model(method: str, tiny: bool, image_size: int | None):  # noqa: ANN201
    from zsad.config import EXPERIMENTS, compose
    from zsad.methods.registry import build_method

    from zsad.methods.registry import tiny_overrides

    over = tiny_overrides(method) if tiny else random_weight_overrides(method)
    if image_size:
        over.append(f"method.image_size={image_size}")
    cfg = compose([EXPERIMENTS / "methods" / f"{method}.yaml"], over)
    return build_method(cfg.method), cfg


def fake_batch(model, n: int, device: torch.device):  # noqa: ANN001, ANN201
    from data_modules.types import Batch

    s = model.input_size
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, s, s, dtype=torch.bool)
    mask[: n // 2, :, s // 4 : s // 2, s // 4 : s // 2] = True
    batch = Batch(
        image=torch.randn(n, 3, s, s, generator=g),
        mask=mask,
        label=(torch.arange(n) < n // 2).long(),
        category=["bottle"] * n,
        class_name=["bottle"] * n,
        dataset=["bench"] * n,
        path=[f"{i}.png" for i in range(n)],
        index=torch.arange(n),
    )
    return batch.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):  # noqa: ANN202
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextmanager
def backbone_timer(model, device: torch.device):  # noqa: ANN001, ANN201
    """Time the outermost calls into the frozen modules (and their direct children) with forward hooks."""
    spent = [0.0]
    depth = [0]
    start = [0.0]

    def pre(*_: Any) -> None:
        if depth[0] == 0:
            _sync(device)
            start[0] = time.perf_counter()
        depth[0] += 1

    def post(*_: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            _sync(device)
            spent[0] += time.perf_counter() - start[0]

    handles = []
    for name in model.frozen_modules:
        mod = getattr(model, name)
        for m in [mod, *mod.children()]:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield spent
    finally:
        for h in handles:  # hooks are always removed
            h.remove()


def measure_method(
    method: str, device: torch.device, batch: int, steps: int, tiny: bool, image_size: int | None, bf16: bool
) -> dict:
    from zsad.methods.base import build_optimizer

    model, cfg = build_model(method, tiny, image_size)
    model.to(device)
    row: dict[str, Any] = {
        "method": method,
        "image_size": model.input_size,
        "batch": batch,
        "backbone": model.identity(),
    }
    data = fake_batch(model, batch, device)
    # inference
    model.eval()
    with torch.inference_mode(), _autocast(device, bf16):
        for _ in range(2):
            model(data.image, data)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(data.image, data)
        _sync(device)
        dt = time.perf_counter() - t0
    row["infer_img_s"] = batch * steps / dt
    row["infer_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    assert out.anomaly_map.dtype == torch.float32
    with torch.inference_mode(), _autocast(device, bf16), backbone_timer(model, device) as spent:
        _sync(device)
        t0 = time.perf_counter()
        model(data.image, data)
        _sync(device)
        total = time.perf_counter() - t0
    row["backbone_frac"] = spent[0] / total if total > 0 else None
    row["mfu"] = vision_mfu(model, data, device, row["infer_img_s"], bf16)
    # training (the method's first stage)
    stage = model.stages()[0]
    model.set_stage(stage.name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(params, stage.optim, 100)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with _autocast(device, bf16):
            out = model(data.image, data)
            loss = model.loss(out, data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    row["train_img_s"] = batch * steps / (time.perf_counter() - t0)
    row["train_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt, data
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def vision_mfu(model, data, device: torch.device, img_s: float, bf16: bool) -> float | None:  # noqa: ANN001
    """FLOPs of the method's forward counted once (FlopCounterMode) × images/s ÷ the card's bf16 peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), _autocast(device, bf16), FlopCounterMode(display=False) as fc:
        model(data.image[:1], _slice(data, 1))
    return fc.get_total_flops() * img_s / (peak * 1e12)


def _slice(batch, n: int):  # noqa: ANN001, ANN202
    from data_modules.types import Batch

    return Batch(
        batch.image[:n],
        None if batch.mask is None else batch.mask[:n],
        batch.label[:n],
        batch.category[:n],
        batch.class_name[:n],
        batch.dataset[:n],
        batch.path[:n],
        batch.index[:n],
    )


def measure_loading(n: int, size: int, workers: int, batch: int) -> dict:
    """Decode + resize + normalise PNGs from disk through the real DataModule path."""
    from PIL import Image

    from data_modules.datamodule import DatasetSpec, ZSADDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loadbench"
        rng = np.random.default_rng(0)
        for cat in ("a",):
            d = root / cat / "test" / "good"
            d.mkdir(parents=True)
            (root / cat / "train" / "good").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(
                    d / f"{i:03d}.png", compress_level=1
                )
        dm = ZSADDataModule(
            train=None,
            test=[DatasetSpec("folder", str(root))],
            image_size=size,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            test_batch_size=batch,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )
        dm.setup("test")
        loader = dm.test_dataloader()[0]
        t0 = time.perf_counter()
        seen = sum(len(b) for b in loader)
        dt = time.perf_counter() - t0
    return {"images": seen, "size": size, "workers": workers, "img_s": seen / dt}


def measure_metrics(n: int, size: int, categories: int, device: str) -> dict:
    from zsad.bench.metrics_bench import run as metrics_run

    return metrics_run(n=n, size=size, categories=categories, device=device)


def to_markdown(report: dict) -> str:
    lines = [f"# Throughput — {report['device']}", ""]
    if not report["gpu"]:
        lines += [
            "**No GPU was present**: tiny presets, small batches, CPU fp32. These rows test the harness; they are not "
            "speed figures for the paper-size models.",
            "",
        ]
    lines += [
        f"Random weights (speed does not depend on the weights). Versions: {report['versions']}",
        "",
        "| method | input | batch | train img/s | infer img/s | backbone share | MFU (vision fwd, bf16 peak) | peak GB train / infer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["methods"]:
        if "error" in r:
            lines.append(f"| {r['method']} | – | – | error: {r['error'][:80]} | | | | |")
            continue
        pk = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        frac = "–" if r["backbone_frac"] is None else f"{100 * r['backbone_frac']:.0f} %"
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.0f} %"
        lines.append(
            f"| {r['method']} | {r['image_size']}² | {r['batch']} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | {frac} | {mfu} | {pk(r['train_peak_gb'])} / {pk(r['infer_peak_gb'])} |"
        )
    ld = report.get("loading")
    if ld:
        lines += [
            "",
            f"Data loading from disk (900² PNG → {ld['size']}², {ld['workers']} workers): **{ld['img_s']:.1f} images/s** over {ld['images']} images.",
        ]
    mt = report.get("metrics")
    if mt:
        lines += ["", f"Metrics: {mt.get('summary', json.dumps(mt)[:300])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        default="results/throughput",
        help="output path without extension (.md and .json are written)",
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="force the CPU (tiny presets)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--skip-loading", action="store_true")
    p.add_argument("--skip-metrics", action="store_true")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    tiny = not gpu
    batch, steps = (args.batch, args.steps) if gpu else (2, 1)
    report: dict[str, Any] = {
        "gpu": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (no GPU present)",
        "versions": versions(),
        "bf16": gpu and not args.fp32,
        "methods": [],
    }
    for m in [s for s in args.methods.split(",") if s]:
        try:
            row = measure_method(
                m,
                device,
                batch,
                steps,
                tiny=tiny,
                image_size=None if gpu else 112,
                bf16=gpu and not args.fp32,
            )
        except Exception as e:  # noqa: BLE001 — one failing method must not hide the others' numbers
            if gpu and "out of memory" in str(e).lower() and batch > 1:
                torch.cuda.empty_cache()
                row = measure_method(
                    m, device, batch // 2, steps, tiny=tiny, image_size=None, bf16=not args.fp32
                )
            else:
                row = {"method": m, "error": f"{type(e).__name__}: {e}"}
        report["methods"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "backbone"}, default=str), flush=True)
    if not args.skip_loading:
        report["loading"] = measure_loading(
            n=64 if gpu else 8, size=518, workers=8 if gpu else 0, batch=32 if gpu else 4
        )
    if not args.skip_metrics:
        report["metrics"] = measure_metrics(
            n=2162 if gpu else 48,
            size=518 if gpu else 128,
            categories=12 if gpu else 2,
            device="cuda" if gpu else "cpu",
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
