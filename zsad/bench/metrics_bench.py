"""Benchmark of the metrics layer on VisA-sized synthetic maps (not a test).

    python -m zsad.bench.metrics_bench [--n 2162 --size 518 --categories 12 --device auto --out FILE]

Each category gets smooth random maps with blob-shaped defects (1-3 ellipses on about 55 % of the images, as in
VisA) and a signal near them. Every metric is timed per category on each device (CPU, and CUDA when present for
``--device auto``), summed over categories. Prints a markdown table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zsad.metrics import auroc, binary_metrics, connected_components, evaluate, pixel_metrics

VISA_TEST_IMAGES = 2162


def synthetic_category(
    n: int, size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps [n, size, size] float32, masks uint8, scores [n] and labels [n] of one synthetic category."""
    maps, masks = [], []
    for a in range(0, n, 16):  # in slices, to bound the temporaries
        b = min(16, n - a)
        anomalous = torch.rand(b, generator=generator) < 0.55
        grid = torch.linspace(0, 1, size)
        yy, xx = grid[:, None], grid[None, :]
        centre = torch.rand(b, 3, 2, generator=generator)
        radius = 0.01 + 0.08 * torch.rand(b, 3, 2, generator=generator) ** 2
        used = torch.arange(3)[None] < torch.randint(1, 4, (b, 1), generator=generator)
        inside = ((yy - centre[..., 0, None, None]) / radius[..., 0, None, None]) ** 2 + (
            (xx - centre[..., 1, None, None]) / radius[..., 1, None, None]
        ) ** 2 <= 1
        mask = (inside & used[..., None, None]).any(1) & anomalous[:, None, None]
        low = torch.rand(b, 1, 16, 16, generator=generator)
        smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        signal = F.avg_pool2d(mask[:, None].float(), 31, stride=1, padding=15)[:, 0]
        noise = 0.05 * torch.randn(b, size, size, generator=generator)
        maps.append((0.6 * smooth + 0.8 * signal + noise).to(device))
        masks.append(mask.to(device, torch.uint8))
    m, g = torch.cat(maps), torch.cat(masks)
    labels = g.flatten(1).amax(1)
    scores = m.flatten(1).amax(1) + 0.1 * torch.randn(n, generator=generator).to(device)
    return m, g, scores, labels


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _rss_gib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark so that the next reading covers only the metrics (Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _time_category(
    maps: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> dict[str, float]:
    if device.type == "cuda":  # the first call pays CUDA initialisation; keep it out of the numbers
        evaluate(maps[:2], masks[:2], scores[:2], labels[:2])
    runs = {
        "image AUROC+AP+F1max": partial(binary_metrics, scores, labels),
        "pixel AUROC alone": partial(auroc, maps, masks),
        "connected components (CPU)": partial(connected_components, masks),
        "pixel AUROC+AP+F1max+AUPRO": partial(pixel_metrics, maps, masks, legacy_aupro=False),
        "pixel all + legacy AUPRO": partial(pixel_metrics, maps, masks, legacy_aupro=True),
        "evaluate() (everything)": partial(evaluate, maps, masks, scores, labels),
    }
    return {name: _timed(fn, device) for name, fn in runs.items()}


def bench_device(args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per metric, summed over categories, on one device."""
    sizes = [args.n // args.categories + (i < args.n % args.categories) for i in range(args.categories)]
    generator = torch.Generator().manual_seed(0)
    totals: dict[str, float] = {}
    metrics_peak_rss = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for n in tqdm(sizes, desc=f"metrics bench ({device.type})", unit="category"):
        maps, masks, scores, labels = synthetic_category(n, args.size, generator, device)
        resettable = _reset_peak_rss()
        for name, seconds in _time_category(maps, masks, scores, labels, device).items():
            totals[name] = totals.get(name, 0.0) + seconds
        if resettable:
            metrics_peak_rss = max(metrics_peak_rss, _rss_gib("VmHWM") or 0.0)
        del maps, masks, scores, labels
    # Peak RSS while the metrics ran (the category's data included), not the generator's temporaries.
    out = {
        "seconds": totals,
        "category_sizes": sizes,
        "peak_host_mem_during_metrics_gib": metrics_peak_rss or None,
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run(n: int, size: int, categories: int, device: str | torch.device) -> dict:
    """Time the metrics on ``n`` synthetic maps at ``size``² over ``categories`` on one device (for the harness).

    Returns ``bench_device``'s dict plus ``n``, ``size``, ``categories``, ``device``, the extrapolation factor to a
    full VisA test set, ``evaluate_s`` (the full evaluation, measured) and ``evaluate_visa_s`` (extrapolated).
    """
    if n < categories:
        raise ValueError(f"metrics bench: n ({n}) must be at least categories ({categories})")
    device = torch.device(device)
    out = bench_device(argparse.Namespace(n=n, size=size, categories=categories), device)
    scale = VISA_TEST_IMAGES / n * (518 / size) ** 2  # metric cost grows with pixels
    seconds = out["seconds"]["evaluate() (everything)"]
    return {
        **out,
        "n": n,
        "size": size,
        "categories": categories,
        "device": str(device),
        "extrapolation_factor_to_visa_518": scale,
        "evaluate_s": seconds,
        "evaluate_visa_s": seconds * scale,
    }


def _table(results: dict, args: argparse.Namespace) -> str:
    scale = VISA_TEST_IMAGES / args.n
    devices = list(results)
    head = (
        "| metric | " + " | ".join(f"{d} s (n={args.n}) | {d} s, full VisA (extrap.)" for d in devices) + " |"
    )
    lines = [head, "|---" + "|---:" * (2 * len(devices)) + "|"]
    for name in results[devices[0]]["seconds"]:
        cells = []
        for d in devices:
            s = results[d]["seconds"][name]
            cells += [f"{s:.3f}", f"{s * scale:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=VISA_TEST_IMAGES, help="images in all (VisA test: 2162)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels")
    parser.add_argument("--categories", type=int, default=12)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/metrics_bench.json"))
    args = parser.parse_args(argv)
    if args.n < args.categories:
        parser.error(f"--n ({args.n}) must be at least --categories ({args.categories})")
    gpu = torch.cuda.is_available()
    if args.device == "cuda" and not gpu:
        parser.error("--device cuda: no CUDA device is available")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu", "cuda"] if gpu else ["cpu"]}[args.device]

    results = {d: bench_device(args, torch.device(d)) for d in devices}
    report = {
        "n_images": args.n,
        "size": args.size,
        "categories": args.categories,
        "pixels": args.n * args.size**2,
        "largest_category_pixels": max(results[devices[0]]["category_sizes"]) * args.size**2,
        "gpu_present": gpu,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "peak_host_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "extrapolation_factor_to_visa": VISA_TEST_IMAGES / args.n,
        "results": results,
    }
    table = _table(results, args)
    print(table)
    print(
        f"\npixels: {report['pixels']:,} ({args.n} maps at {args.size}²); GPU present: {gpu}; "
        f"peak host memory: {report['peak_host_mem_gib']:.2f} GiB; torch threads: {report['torch_threads']}"
    )
    for d in devices:
        if results[d]["peak_host_mem_during_metrics_gib"]:
            print(
                f"{d}: peak host memory while computing metrics {results[d]['peak_host_mem_during_metrics_gib']:.2f} GiB"
            )
        if "peak_gpu_mem_gib" in results[d]:
            print(f"{results[d]['gpu']}: peak GPU memory {results[d]['peak_gpu_mem_gib']:.2f} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "table": table}, indent=1, allow_nan=False) + "\n")
    return report


if __name__ == "__main__":
    main()
