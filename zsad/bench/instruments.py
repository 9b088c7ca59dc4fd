"""Instruments of the throughput harness: the frozen towers, backbone hooks and timers, FLOP counting, the
``torch.compile`` and channels-last variants, out-of-memory back-off and peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def vision_module(model: nn.Module) -> nn.Module:
    """The frozen vision tower of a method: its ``vision_backbone`` (``zsad.methods.base.ZSADMethod``)."""
    vision = getattr(model, "vision_backbone", None)
    if not isinstance(vision, nn.Module):
        raise ValueError(
            f"{type(model).__name__}: no frozen vision backbone (ZSADMethod.vision_backbone is None)"
        )
    return vision


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
