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
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zsad.results.throughput import check_targets, to_markdown
from zsad.versions import versions

METHODS = ["anomalyclip", "mpa", "mpama", "entroad", "ava_dino"]
# Rows measured by default besides the paper configurations: <method>:<ablation> layers experiments/ablations/
# <method>_<ablation>.yaml on the method (here: DINOv3 weights stored in bf16, DESIGN.md's 279 → 344 img/s row).
DEFAULT_ROWS = [*METHODS, "ava_dino:vision_bf16"]


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
# CPU input sides of the tiny presets: the smallest multiples of the patch (14 CLIP, 16 DINOv3) with a 4×4 grid.
CPU_SIZES = {"ava_dino": 64}
CPU_SIZE = 56
# Size of EntroAD's random memory on the GPU: MVTec AD's test set, the auxiliary set of the paper's VisA protocol.
ENTROAD_MEMORY_IMAGES = 1725


@dataclass
class Settings:
    """How one harness run measures every method."""

    device: str
    tiny: bool
    image_size: int | None  # None: the method's paper size (on the CPU: CPU_SIZES)
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
    from zsad.methods.registry import tiny_overrides

    if tiny:
        over = tiny_overrides(method)
    elif method == "ava_dino":
        over = ["method.vision.pretrained=none", "method.text.pretrained=none"]
    else:
        over = ["method.clip.pretrained=none"]
    if image_size:
        over.append(f"method.image_size={image_size}")
    return over


def build_model(method: str, tiny: bool, image_size: int | None, ablation: str | None = None):  # noqa: ANN201
    """The method at its paper configuration with random weights (or its tiny preset)."""
    from zsad.config import EXPERIMENTS, compose
    from zsad.methods.registry import build_method

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


def vision_module(model: nn.Module) -> nn.Module:
    """The frozen vision tower of a method (CLIP ``clip.visual`` or AVA-DINO's ``vision``)."""
    clip = getattr(model, "clip", None)
    if clip is not None and getattr(clip, "visual", None) is not None:
        return clip.visual
    vision = getattr(model, "vision", None)
    if isinstance(vision, nn.Module):
        return vision
    raise ValueError(
        f"{type(model).__name__}: no frozen vision tower found (expected .clip.visual or .vision)"
    )


def patch_conv(model: nn.Module) -> nn.Conv2d:
    """The patch-embedding convolution of the vision tower (its first Conv2d)."""
    conv = next((m for m in vision_module(model).modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__}: the vision tower has no patch-embedding Conv2d")
    return conv


# --------------------------------------------------------------------------------------------------------------
# Instruments: backbone hooks, FLOP counting, compile, channels-last
# --------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):  # noqa: ANN202 — a context manager
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@contextmanager
def frozen_call_hooks(
    model: nn.Module, on_enter: Callable[[], None], on_exit: Callable[[], None]
) -> Iterator[None]:
    """Call ``on_enter``/``on_exit`` around every outermost call into a module of the frozen backbones.

    Hooks go on every module of ``model.frozen_modules`` (the towers are entered through helpers such as
    ``CLIPText.encode_embeddings`` that call inner modules, not the tower's own forward); a depth counter keeps only
    the outermost call. Glue tensor ops between two inner module calls of a helper are not counted. The hooks are
    always removed, also when the forward raises.
    """
    depth = [0]

    def pre(*_: Any) -> None:
        if depth[0] == 0:
            on_enter()
        depth[0] += 1

    def post(*_: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            on_exit()

    handles = []
    try:
        for name in model.frozen_modules:
            for m in getattr(model, name).modules():
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def backbone_timer(model: nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Seconds spent inside the frozen backbones (``spent[0]``), synchronising the device around each call."""
    spent, start = [0.0], [0.0]

    def enter() -> None:
        _sync(device)
        start[0] = time.perf_counter()

    def leave() -> None:
        _sync(device)
        spent[0] += time.perf_counter() - start[0]

    with frozen_call_hooks(model, enter, leave):
        yield spent


def count_flops(model: nn.Module, data: Any, bf16: bool) -> tuple[int, int]:  # noqa: ANN401
    """(FLOPs of one inference forward, FLOPs inside the frozen backbones) for the whole batch.

    Counted by ``FlopCounterMode`` (matmuls, convolutions and fused attention kernels; CPU SDPA kernels are not
    registered there, so CPU counts miss the attention core).
    """
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    inside, mark = [0], [0]

    def enter() -> None:
        mark[0] = fc.get_total_flops()

    def leave() -> None:
        inside[0] += fc.get_total_flops() - mark[0]

    device = data.image.device
    with torch.inference_mode(), _autocast(device, bf16), frozen_call_hooks(model, enter, leave), fc:
        model(data.image, data)
    return fc.get_total_flops(), inside[0]


@contextmanager
def compiled_vision(model: nn.Module, backend: str | Callable = "inductor") -> Iterator[nn.Module]:
    """Run the frozen vision tower's forward under ``torch.compile`` inside the block, eager again after it.

    Only ``forward`` is replaced (an instance attribute), so module hooks stay outside the compiled graph and the
    tower's weights, cache and identity are untouched.
    """
    vision = vision_module(model)
    vision.forward = torch.compile(vision.forward, backend=backend)
    try:
        yield vision
    finally:
        del vision.forward  # back to the class's eager forward


@contextmanager
def channels_last_patch_embed(model: nn.Module) -> Iterator[nn.Conv2d]:
    """The patch-embedding conv's weight in channels-last layout inside the block (contiguous again after it)."""
    conv = patch_conv(model)
    conv.to(memory_format=torch.channels_last)
    try:
        yield conv
    finally:
        conv.to(memory_format=torch.contiguous_format)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def with_backoff(fn: Callable[[int], dict], batch: int, device: torch.device) -> dict:
    """``fn(batch)``, halving the batch on CUDA out-of-memory until it fits (the result records the batch used)."""
    while True:
        try:
            return {"batch": batch, **fn(batch)}
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if device.type != "cuda" or not _is_oom(e) or batch <= 1:
                raise
        torch.cuda.empty_cache()
        batch //= 2


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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
    size = s.image_size or (CPU_SIZES.get(method, CPU_SIZE) if s.device == "cpu" else None)
    model, cfg = build_model(method, s.tiny, size, ablation)
    if method == "entroad":
        fill_random_memory(model, s.memory_images)
    train_batch = s.train_batch or int(cfg.method.batch_size)
    try:
        return measure_model(model, row, s, train_batch)
    finally:
        del model
        if torch.device(s.device).type == "cuda":
            torch.cuda.empty_cache()


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
