"""CUDA paths (skipped without a GPU): every method trains and evaluates on the device in bf16, maps stay float32,
and the device metrics equal the CPU ones. A GPU session runs these with `make test`."""

from __future__ import annotations

import pytest
import torch
from tests_support import batch_of

from zsad.config import EXPERIMENTS, compose
from zsad.registry import REGISTRY, build_method, tiny_overrides

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_method_step_and_eval_on_cuda_bf16(method):
    from zsad.methods.base import build_optimizer

    cfg = compose(
        [EXPERIMENTS / "methods" / f"{method}.yaml"], [*tiny_overrides(method), "method.image_size=112"]
    )
    model = build_method(cfg.method)
    if method == "entroad":
        from zsad.bench.throughput import fill_random_memory

        fill_random_memory(model, 16)  # speed and dtype paths do not depend on the memory's content
    model = model.cuda()
    x = torch.randn(4, 3, 112, 112, device="cuda")
    batch = batch_of(x.cpu(), class_name="bottle").to("cuda")
    stage = model.stages()[-1]
    model.set_stage(stage.name)
    model.train()
    opt, _ = build_optimizer([p for p in model.parameters() if p.requires_grad], stage.optim, 10)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(x, batch), batch)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, batch)
    assert out.anomaly_map.dtype == torch.float32 and out.anomaly_map.is_cuda
    assert out.image_score.dtype == torch.float32


def test_device_metrics_equal_cpu_metrics():
    from zsad.metrics import evaluate

    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 64, 64, generator=g)
    masks = torch.zeros(6, 64, 64, dtype=torch.uint8)
    masks[:3, 10:30, 12:40] = 1
    scores = torch.randn(6, generator=g)
    labels = masks.flatten(1).amax(1)
    cpu = evaluate(maps, masks, scores, labels)
    gpu = evaluate(maps.cuda(), masks.cuda(), scores.cuda(), labels.cuda())
    for k, v in cpu.items():
        assert (v is None and gpu[k] is None) or abs(v - gpu[k]) < 1e-9, k
