"""bf16 autocast (the GPU setting) and fp32 give the same maps within a derived tolerance (tiny presets, CPU bf16).

The tolerance. Each method's map is a class probability ``p = softmax(s · cos)`` over {normal, anomalous}, i.e.
``p = σ(Δ)`` with ``Δ = s · (cos_a − cos_n)`` (AnomalyCLIP: s = 1/0.07; AVA-DINO: s = 100), then averaged over taps
and Gaussian-smoothed (both only shrink errors). ``|dσ/dΔ| ≤ 1/4``. bf16 stores a value with relative error at most
u = 2⁻⁸; a cosine of two unit vectors each perturbed by at most u moves by at most ≈ 2u, so Δ moves by at most
4·s·u and p by at most s·u to first order: 0.056 for AnomalyCLIP, 0.39 for AVA-DINO — the worst case for one
rounding of the final features (what remains of the earlier blocks' rounding after normalisation is of the same
order; measured: 0.006 and 0.014). We assert ``max |Δp| ≤ s·u / 4`` (0.014 and 0.098), a quarter of the worst case,
because rounding errors are not all aligned with the one direction that maximises the cosine change.

Metrics are rank-based (AUROC, AP, F1max, AUPRO depend only on the order of the pixels), so the criterion that
matters is the ordering: Spearman rank correlation of the pixel maps > 0.999.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from zsad.bench.throughput import build_model, fake_batch

U_BF16 = 2.0**-8
# logit scale s of the map's softmax per method
SCALE = {"anomalyclip": 1 / 0.07, "ava_dino": 100.0}


@pytest.mark.parametrize("method", ["anomalyclip", "ava_dino"])
@torch.no_grad()
def test_bf16_autocast_maps_agree_with_fp32(method):
    torch.manual_seed(0)
    model, cfg = build_model(method, tiny=True, image_size=112)
    if method == "anomalyclip":
        assert float(cfg.method.temperature) == pytest.approx(0.07)
    model.eval()
    data = fake_batch(112, 2, torch.device("cpu"))
    fp32 = model(data.image, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(data.image, data)
    for out in (fp32, bf16):
        assert out.anomaly_map.dtype == torch.float32 and out.image_score.dtype == torch.float32
    a, b = fp32.anomaly_map.flatten(), bf16.anomaly_map.flatten()
    assert a.std() > 0.05  # a map with structure: the rank comparison is not over ties
    assert not torch.equal(a, b)  # autocast really changed the computation
    bound = SCALE[method] * U_BF16 / 4
    assert (a - b).abs().max() <= bound
    assert spearmanr(a.numpy(), b.numpy()).statistic > 0.999
    assert (fp32.image_score - bf16.image_score).abs().max() <= bound


def test_ava_dino_bf16_vision_weights_agree_with_fp32():
    """vision_bf16 stores DINOv3 in bf16: maps stay float32 and rank pixels like the fp32 model."""
    from zsad.config import EXPERIMENTS, compose
    from zsad.registry import build_method, tiny_overrides

    over = [*tiny_overrides("ava_dino"), "method.image_size=64"]
    torch.manual_seed(0)
    ref = build_method(compose([EXPERIMENTS / "methods" / "ava_dino.yaml"], over).method).eval()
    torch.manual_seed(0)
    fast = build_method(
        compose([EXPERIMENTS / "methods" / "ava_dino.yaml"], [*over, "method.vision_bf16=true"]).method
    )
    fast.eval()
    fast.load_state_dict(ref.state_dict())  # same weights, then rounded to bf16 by the load into bf16 params
    assert next(fast.vision.parameters()).dtype == torch.bfloat16
    assert next(fast.heads.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 64, 64)
    from tests_support import batch_of

    b = batch_of(x, class_name="bottle")
    with torch.inference_mode():
        a, f = ref(x, b), fast(x, b)
    assert f.anomaly_map.dtype == torch.float32
    ra = a.anomaly_map.flatten().argsort().argsort().float()
    rf = f.anomaly_map.flatten().argsort().argsort().float()
    rho = torch.corrcoef(torch.stack([ra, rf]))[0, 1]
    assert rho > 0.99
