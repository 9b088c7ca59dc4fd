"""Anomaly-map utilities on the device: upsampling, Gaussian smoothing, image-score rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _no_autocast(fn):  # noqa: ANN001, ANN202
    """Maps are float32 whatever autocast is active (bf16 maps create massive ties in the metrics)."""

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_no_autocast
def upsample(x: Tensor, size: int | tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of [B, C, h, w] (or [B, h, w]) maps to ``size``; computed in float32."""
    squeeze = x.ndim == 3
    x = x.float()
    if squeeze:
        x = x[:, None]
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return x[:, 0] if squeeze else x


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, N, C] patch tokens (or [B, N] scores) → [B, C, gh, gw] (or [B, gh, gw])."""
    gh, gw = grid
    if tokens.ndim == 2:
        return tokens.reshape(tokens.shape[0], gh, gw)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


def _gaussian_kernel(sigma: float, truncate: float, device: torch.device) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@_no_autocast
def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian smoothing of [B, H, W] maps on their device, float32.

    Matches ``scipy.ndimage.gaussian_filter(m, sigma)`` (kernel radius ``int(truncate·σ + 0.5)``, mode
    ``reflect`` = symmetric padding), which is what the reference code runs per image on the CPU.
    """
    if sigma <= 0:
        return maps.float()
    k = _gaussian_kernel(sigma, truncate, maps.device)
    r = (k.numel() - 1) // 2
    x = maps.float()[:, None]
    x = _symmetric_pad(x, r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def _symmetric_pad(x: Tensor, r: int) -> Tensor:
    """Pad the last two dims by r with scipy's 'reflect' rule (d c b a | a b c d), for any map size."""
    h, w = x.shape[-2:]
    iy = _reflect_index(torch.arange(-r, h + r, device=x.device), h)
    ix = _reflect_index(torch.arange(-r, w + r, device=x.device), w)
    return x[..., iy, :][..., :, ix]


def _reflect_index(i: Tensor, n: int) -> Tensor:
    period = 2 * n
    i = i % period
    return torch.where(i >= n, period - 1 - i, i)


def image_score(maps: Tensor, rule: str, topk_frac: float = 0.01) -> Tensor:
    """Reduce [B, H, W] maps to [B] image scores: ``max`` or ``mean_topk`` (mean of the top ``topk_frac`` pixels)."""
    flat = maps.float().flatten(1)
    if rule == "max":
        return flat.amax(1)
    if rule == "mean_topk":
        k = max(1, int(round(flat.shape[1] * topk_frac)))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown image-score rule {rule!r}; expected 'max' or 'mean_topk'")
