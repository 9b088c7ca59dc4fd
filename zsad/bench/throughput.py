"""``make bench-gpu``: throughput of every method at its paper size (random weights), plus data loading and metrics.

For each method: training-step images/s (every stage), inference images/s (bf16 autocast on GPU, batch 32 or the
largest that fits), peak GPU memory, the fraction of inference time spent in the frozen backbone(s), the forward's
FLOPs and model FLOP utilisation (MFU) against the card's dense bf16 peak — of the whole forward and of the frozen
backbone part alone. Optional variants: the frozen vision forward under ``torch.compile`` (``--compile``) and a
channels-last patch-embedding input (``--channels-last``), each measured against the eager/contiguous baseline.
Also data-loading images/s from disk at 518² through the real DataModule (workers, pinned memory; with and without
the pre-resized cache) and the metric time of a VisA-sized evaluation (``zsad.bench.metrics_bench``).

On a machine without a GPU (or with ``--cpu``) the same harness runs the tiny presets with small batches and a small
subset, so CI exercises it, and the table says plainly that no GPU was present. Output: ``<out>.md`` and
``<out>.json`` with the device, versions and commit.

    python -m zsad.bench.throughput --out results/throughput [--methods ava_dino,mpama] [--compile] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsad.bench.instruments import (
    _autocast,
    _peak_gb,
    _reset_peak,
    _sync,
    backbone_timer,
    channels_last_patch_embed,
    compiled_vision,
    count_flops,
    with_backoff,
)
from zsad.bench.loading import measure_loading
from zsad.registry import REGISTRY
from zsad.results.throughput import check_targets as judge_targets
from zsad.results.throughput import to_markdown
from zsad.versions import versions

METHODS = [name for name, e in REGISTRY.items() if e.throughput]
# Rows measured by default besides the paper configurations: <method>:<ablation> layers experiments/ablations/
# <method>_<ablation>.yaml on the method (the registry's throughput_ablations).
DEFAULT_ROWS = [*METHODS, *(f"{m}:{a}" for m in METHODS for a in REGISTRY[m].throughput_ablations)]


def split_row(row: str) -> tuple[str, str | None]:
    """``mpama:top1`` → (``mpama``, ``top1``); a plain method name has no ablation layer."""
    method, _, ablation = row.partition(":")
    return method, ablation or None


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of cards we may meet; MFU is reported against these.
BF16_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}
# Size of EntroAD's random memory on the GPU: MVTec AD's test set, the auxiliary set of the paper's VisA protocol.
ENTROAD_MEMORY_IMAGES = 1725


@dataclass
class Settings:
    """How one harness run measures every method."""

    device: str
    tiny: bool
    image_size: int | None  # None: the method's paper size (on the CPU: the registry's cpu_size)
    infer_batch: int
    train_batch: int | None  # None: the method's configured (paper) batch size
    steps: int
    warmup: int
    bf16: bool
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False
    memory_images: int = ENTROAD_MEMORY_IMAGES


# --------------------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------------------


def bench_overrides(method: str, tiny: bool, image_size: int | None) -> list[str]:
    """Config overrides: random weights (tiny presets on CPU) and an optional input size."""
    e = REGISTRY[method]
    over = e.tiny_overrides() if tiny else e.random_overrides()
    if image_size:
        over.append(f"method.image_size={image_size}")
    return over


def build_model(method: str, tiny: bool, image_size: int | None, ablation: str | None = None):  # noqa: ANN201
    """The method at its paper configuration with random weights (or its tiny preset)."""
    from zsad.config import EXPERIMENTS, compose
    from zsad.registry import build_method

    layers = [EXPERIMENTS / "methods" / f"{method}.yaml"]
    if ablation:
        layers.append(EXPERIMENTS / "ablations" / f"{method}_{ablation}.yaml")
    cfg = compose(layers, bench_overrides(method, tiny, image_size))
    return build_method(cfg.method), cfg


def fill_random_memory(model: nn.Module, n_images: int, seed: int = 0) -> None:
    """Give EntroAD a random memory of ``n_images`` images (2 patch keys each): speed does not depend on its content."""
    from zsad.methods.entroad.memory import MemoryTensors, path_hash

    mem = model.memory
    g = torch.Generator().manual_seed(seed)
    d, w = mem.image_keys.shape[1], mem.patch_keys.shape[1]
    labels = (torch.arange(n_images) % 2).long()
    model.memory.set(
        MemoryTensors(
            image_keys=torch.nn.functional.normalize(torch.randn(n_images, d, generator=g), dim=-1),
            image_values=torch.nn.functional.one_hot(labels, 2).float(),
            patch_keys=torch.nn.functional.normalize(torch.randn(2 * n_images, w, generator=g), dim=-1),
            patch_values=torch.nn.functional.one_hot(torch.arange(2 * n_images) % 2, 2).float(),
            source_hash=torch.tensor([path_hash(f"memory/{i}.png") for i in range(n_images)]),
        )
    )


def fake_batch(size: int, n: int, device: torch.device, channels_last: bool = False):  # noqa: ANN201 — Batch
    """``n`` random images with half of them anomalous (a square defect), on ``device``."""
    from data_modules.types import Batch

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, size, size, dtype=torch.bool)
    mask[: (n + 1) // 2, :, size // 4 : size // 2, size // 4 : size // 2] = True
    batch = Batch(
        image=torch.randn(n, 3, size, size, generator=g),
        mask=mask,
        label=(torch.arange(n) < (n + 1) // 2).long(),
        category=["bottle"] * n,
        class_name=["bottle"] * n,
        dataset=["bench"] * n,
        path=[f"bench/{i}.png" for i in range(n)],
        index=torch.arange(n),
    ).to(device)
    if channels_last:
        batch.image = batch.image.contiguous(memory_format=torch.channels_last)
    return batch


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


def _time_inference(model: nn.Module, data: Any, s: Settings, device: torch.device) -> float:  # noqa: ANN401
    """Images/s of ``s.steps`` inference forwards after ``s.warmup`` warm-up forwards."""
    with torch.inference_mode(), _autocast(device, s.bf16):
        for _ in range(s.warmup):
            out = model(data.image, data)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(s.steps):
            out = model(data.image, data)
        _sync(device)
        dt = time.perf_counter() - t0
    if out.anomaly_map.dtype != torch.float32 or out.image_score.dtype != torch.float32:
        raise TypeError(f"{type(model).__name__}: maps and scores must be float32 under autocast")
    return len(data) * s.steps / dt


def measure_inference(model: nn.Module, s: Settings, device: torch.device) -> dict:
    """Inference images/s, peak memory, backbone share, FLOPs and MFU at the largest batch that fits."""
    model.eval()

    def run(batch: int) -> dict:
        data = fake_batch(model.input_size, batch, device)
        _reset_peak(device)
        img_s = _time_inference(model, data, s, device)
        out = {"img_s": img_s, "peak_gb": _peak_gb(device)}
        with torch.inference_mode(), _autocast(device, s.bf16), backbone_timer(model, device) as spent:
            _sync(device)
            t0 = time.perf_counter()
            model(data.image, data)
            _sync(device)
            total = time.perf_counter() - t0
        out["backbone_frac"] = min(1.0, spent[0] / total)
        out["backbone_s_per_img"] = spent[0] / batch
        flops, backbone_flops = count_flops(model, data, s.bf16)
        out["gflops_per_img"] = flops / batch / 1e9
        out["backbone_gflops_per_img"] = backbone_flops / batch / 1e9
        return out

    return with_backoff(run, s.infer_batch, device)


def measure_variant(
    model: nn.Module, s: Settings, device: torch.device, batch: int, variant: str
) -> dict[str, float]:
    """Inference images/s with the vision forward compiled or the patch embedding channels-last."""
    data = fake_batch(model.input_size, batch, device, channels_last=variant == "channels_last")
    if variant == "compile":
        with compiled_vision(model, s.compile_backend):
            t0 = time.perf_counter()
            _time_inference(model, data, Settings(**{**asdict(s), "steps": 1, "warmup": 1}), device)
            compile_s = time.perf_counter() - t0
            return {"img_s": _time_inference(model, data, s, device), "compile_s": compile_s}
    if variant == "channels_last":
        with channels_last_patch_embed(model):
            return {"img_s": _time_inference(model, data, s, device)}
    raise ValueError(f"unknown variant {variant!r}; expected compile or channels_last")


def measure_training(model: nn.Module, s: Settings, device: torch.device, batch: int) -> dict[str, dict]:
    """Training-step images/s and peak memory of every stage (in order; stage-end hooks run between stages)."""
    from zsad.methods.base import build_optimizer

    result: dict[str, dict] = {}
    for stage in model.stages():
        model.set_stage(stage.name)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(model).__name__} stage {stage.name!r} has no trainable parameters")

        def run(b: int, params: list = params, stage: Any = stage) -> dict:  # noqa: ANN401
            model.zero_grad(set_to_none=True)  # a retry after out-of-memory starts without stale gradients
            opt, _ = build_optimizer(params, stage.optim, 1000)
            data = fake_batch(model.input_size, b, device)

            def step() -> None:
                with _autocast(device, s.bf16):
                    out = model(data.image, data)
                    loss = model.loss(out, data)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            _reset_peak(device)
            for _ in range(s.warmup):
                step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(s.steps):
                step()
            _sync(device)
            return {"img_s": b * s.steps / (time.perf_counter() - t0), "peak_gb": _peak_gb(device)}

        result[stage.name] = with_backoff(run, batch, device)
        model.on_stage_end(stage.name)
    model.eval()
    return result


def _card_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(
        (v for k, v in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None
    )


def measure_model(model: nn.Module, method: str, s: Settings, train_batch: int) -> dict:
    """Every per-method number of the table for an already built model (moved to ``s.device`` here)."""
    device = torch.device(s.device)
    model.to(device)
    row: dict[str, Any] = {"method": method, "image_size": model.input_size, "backbone": model.identity()}
    inf = measure_inference(model, s, device)
    row.update(
        infer_batch=inf["batch"],
        infer_img_s=inf["img_s"],
        infer_peak_gb=inf["peak_gb"],
        backbone_frac=inf["backbone_frac"],
        gflops_per_img=inf["gflops_per_img"],
        backbone_gflops_per_img=inf["backbone_gflops_per_img"],
        backbone_tflops_s=inf["backbone_gflops_per_img"] / inf["backbone_s_per_img"] / 1e3
        if inf["backbone_s_per_img"] > 0
        else None,
    )
    peak = _card_peak(device) if s.bf16 else None
    row["mfu_forward"] = row["gflops_per_img"] * row["infer_img_s"] / (peak * 1e3) if peak else None
    row["mfu_backbone"] = row["backbone_tflops_s"] / peak if peak and row["backbone_tflops_s"] else None
    variants = (["compile"] if s.compile else []) + (["channels_last"] if s.channels_last else [])
    row["variants"] = {v: measure_variant(model, s, device, inf["batch"], v) for v in variants}
    stages = measure_training(model, s, device, train_batch)
    row["train"] = stages
    row["train_batch"] = min(v["batch"] for v in stages.values())
    row["train_img_s"] = min(v["img_s"] for v in stages.values())  # the slowest stage bounds a run
    peaks = [v["peak_gb"] for v in stages.values() if v["peak_gb"] is not None]
    row["train_peak_gb"] = max(peaks) if peaks else None
    return row


def measure_method(row: str, s: Settings) -> dict:
    """Build ``row`` (a method, or ``method:ablation``; random weights at paper size, or tiny) and measure it."""
    torch.manual_seed(0)
    method, ablation = split_row(row)
    size = s.image_size or (REGISTRY[method].cpu_size if s.device == "cpu" else None)
    model, cfg = build_model(method, s.tiny, size, ablation)
    if REGISTRY[method].memory:
        fill_random_memory(model, s.memory_images)
    train_batch = s.train_batch or int(cfg.method.batch_size)
    try:
        return measure_model(model, row, s, train_batch)
    finally:
        del model
        if torch.device(s.device).type == "cuda":
            torch.cuda.empty_cache()


def method_targets() -> dict[str, dict[str, float]]:
    """Issue 9's per-method targets from the registry: report key → method → minimum."""
    out: dict[str, dict[str, float]] = {}
    for name, e in REGISTRY.items():
        for key, target in e.targets:
            out.setdefault(key, {})[name] = target
    return out


def check_targets(report: dict) -> list[dict]:
    """Issue 9's targets (the per-method ones from the registry) against the measured rows."""
    return judge_targets(report, method_targets())


def measure_metrics(n: int, size: int, categories: int, device: str) -> dict:
    """Metric time of an evaluation of ``n`` maps at ``size``² (VisA: 2162 maps, 12 categories, 518²)."""
    from zsad.bench.metrics_bench import run as metrics_run

    return metrics_run(n=n, size=size, categories=categories, device=device)


def _settings(args: argparse.Namespace, gpu: bool) -> Settings:
    tiny = args.tiny or not gpu
    return Settings(
        device="cuda" if gpu else "cpu",
        tiny=tiny,
        image_size=args.image_size,
        infer_batch=args.batch if gpu else min(args.batch, 2),
        train_batch=args.train_batch if gpu else min(args.train_batch or 2, 2),
        steps=args.steps if gpu else 1,
        warmup=args.warmup if gpu else 1,
        bf16=gpu and not args.fp32,
        compile=args.compile,
        compile_backend=args.compile_backend,
        channels_last=args.channels_last,
        memory_images=ENTROAD_MEMORY_IMAGES if not tiny else 16,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="results/throughput", help="output path without extension (.md and .json)"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated rows: methods {METHODS}, or method:ablation (experiments/ablations/<method>_<ablation>.yaml)",
    )
    p.add_argument("--batch", type=int, default=32, help="inference batch (halved on out-of-memory)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: the method's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per measurement")
    p.add_argument("--cpu", action="store_true", help="force the CPU (tiny presets, small batches)")
    p.add_argument("--tiny", action="store_true", help="tiny presets on the GPU too (a quick check)")
    p.add_argument(
        "--image-size", type=int, default=None, help="input side (default: paper size; CPU: 56/64)"
    )
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument(
        "--compile", action="store_true", help="also measure the vision forward under torch.compile"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    p.add_argument(
        "--channels-last", action="store_true", help="also measure a channels-last patch embedding"
    )
    p.add_argument("--skip-loading", action="store_true")
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument(
        "--load-images", type=int, default=None, help="images for the loading bench (GPU 512, CPU 4)"
    )
    p.add_argument("--load-size", type=int, default=518)
    p.add_argument("--workers", type=int, default=8, help="loader workers (GPU; CPU runs use 0)")
    p.add_argument(
        "--metric-maps", type=int, default=None, help="maps for the metric bench (GPU: VisA's 2162)"
    )
    p.add_argument("--metric-size", type=int, default=None, help="map side for the metric bench (GPU: 518)")
    args = p.parse_args(argv)
    from zsad.config import EXPERIMENTS

    def known(row: str) -> bool:
        method, ablation = split_row(row)
        return method in METHODS and (
            ablation is None or (EXPERIMENTS / "ablations" / f"{method}_{ablation}.yaml").is_file()
        )

    unknown = [m for m in args.methods.split(",") if m and not known(m)]
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected some of {METHODS}")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be ≥ 1 and --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    s = _settings(args, gpu)
    report: dict[str, Any] = {
        "gpu": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (no GPU present)",
        "cuda_present": torch.cuda.is_available(),
        "versions": versions(),
        "commit": versions().get("git", "unknown"),
        "bf16": s.bf16,
        "bf16_peak_tflops": _card_peak(torch.device(s.device)),
        "settings": asdict(s),
        "methods": [],
        "method_targets": method_targets(),  # so that the report can be judged again without the registry
    }
    for m in [x for x in args.methods.split(",") if x]:
        try:
            row = measure_method(m, s)
        except Exception as e:  # noqa: BLE001 — one failing method must not hide the others' numbers
            row = {"method": m, "error": f"{type(e).__name__}: {e}"}
        report["methods"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "backbone"}, default=str), flush=True)
    if not args.skip_loading:
        report["loading"] = measure_loading(
            n=args.load_images or (512 if gpu else 4),
            size=args.load_size if gpu else min(args.load_size, 64),
            workers=args.workers if gpu else 0,
            batch=32 if gpu else 2,
            source_side=900 if gpu else 96,
        )
    if not args.skip_metrics:
        report["metrics"] = measure_metrics(
            n=args.metric_maps or (2162 if gpu else 8),
            size=args.metric_size or (518 if gpu else 32),
            categories=12 if gpu else 2,
            device="cuda" if gpu else "cpu",
        )
    report["targets"] = check_targets(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")
    md = to_markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if not any("error" in r for r in report["methods"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
