"""Map utilities and shared losses against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from zsad.losses import dice_loss, focal_loss, router_z_loss, switch_balance_loss
from zsad.maps import gaussian_blur, image_score, tokens_to_grid, upsample


@pytest.mark.parametrize("sigma", [1.0, 4.0, 9.0])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 23, 30)).astype(np.float32)  # smaller than the kernel radius at sigma 9
    ref = np.stack([ndi.gaussian_filter(m.astype(np.float64), sigma) for m in maps])
    out = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    assert np.abs(out - ref).max() < 1e-5


def test_gaussian_blur_sigma_zero_is_identity():
    x = torch.randn(2, 5, 5)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_image_score_rules():
    m = torch.zeros(2, 10, 10)
    m[0, 0, :3] = torch.tensor([5.0, 3.0, 1.0])
    m[1] = -1.0
    assert image_score(m, "max").tolist() == [5.0, -1.0]
    # top 2 % of 100 pixels = 2 pixels
    assert image_score(m, "mean_topk", 0.02).tolist() == [4.0, -1.0]
    with pytest.raises(ValueError, match="unknown image-score rule"):
        image_score(m, "median")


def test_tokens_to_grid_and_upsample():
    t = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # B, N=2x3, C
    g = tokens_to_grid(t, (2, 3))
    assert g.shape == (2, 3, 2, 3) and g[1, 2, 1, 0] == t[1, 3, 2]
    up = upsample(g, 8)
    assert up.shape == (2, 3, 8, 8) and up.dtype == torch.float32


def test_focal_loss_matches_hand_formula():
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).reshape(
        1, 2, 1, 2
    )  # pixel0: p=(0.9,0.1), pixel1: (0.2,0.8)
    target = torch.tensor([[[0, 0]]])  # both normal
    eps = 1e-5
    pt = torch.tensor([0.9 * (1 - eps) + 0.1 * eps, 0.2 * (1 - eps) + 0.8 * eps]) + eps
    expected = (-((1 - pt) ** 2) * pt.log()).mean()
    assert torch.allclose(focal_loss(probs, target), expected, atol=1e-7)


def test_dice_loss_perfect_and_disjoint():
    g = torch.zeros(2, 4, 4)
    g[:, :2] = 1
    assert dice_loss(g, g).item() == pytest.approx(0.0, abs=1e-7)
    # disjoint: 1 - smooth/(|p|+|g|+smooth) = 1 - 1/17 per sample
    assert dice_loss(1 - g, g).item() == pytest.approx(1 - 1 / 17, abs=1e-6)


def test_switch_balance_uniform_and_collapse():
    t, e = 60, 6
    probs = torch.full((t, e), 1 / e)
    assign = torch.zeros(t, e)
    assign[torch.arange(t), torch.arange(t) % e] = 1
    assert switch_balance_loss(probs, assign).item() == pytest.approx(1.0)
    collapsed_p = torch.zeros(t, e)
    collapsed_p[:, 0] = 1
    collapsed_a = torch.zeros(t, e)
    collapsed_a[:, 0] = 1
    assert switch_balance_loss(collapsed_p, collapsed_a).item() == pytest.approx(e)


def test_router_z_loss():
    logits = torch.zeros(4, 3)
    assert router_z_loss(logits).item() == pytest.approx(math.log(3) ** 2)


def test_maps_stay_float32_under_autocast():
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gaussian_blur(x[:, 0], 2.0).dtype == torch.float32
        assert upsample(x, 16).dtype == torch.float32
