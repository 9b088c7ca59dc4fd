"""Independent reference maths for the CLIP-substrate methods (AnomalyCLIP, MPA, MPAMA) and their tiny builders.

Everything here is written from ``specs/clip_substrate.md`` and ``specs/mpama.md`` with plain loops, explicit
formulas and open_clip's own modules, never by calling zsad's heads, losses or prompt learner: the equation tests
compare zsad against these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.ndimage import gaussian_filter
from torch import Tensor

from data_modules.types import Batch

SIZE = 56  # 4 × 4 patches of 14 px on the tiny preset
GRID = (4, 4)
TAPS = (2, 3, 4)
TINY = dict(image_size=SIZE, taps=list(TAPS), dpam_start=2, smoothing_sigma=0.0)
T = 0.07  # the spec's temperature


def tiny_cfg(schema: type, **kw: Any):  # noqa: ANN201 — a DictConfig
    """The method's schema on the tiny random-weight CLIP (4 blocks, width 64, joint dim 32), 56² input."""
    cfg = OmegaConf.structured(schema(**{**TINY, **kw}))
    cfg.clip.name, cfg.clip.pretrained = "tiny", "none"
    return cfg


def tiny_batch(b: int = 2, seed: int = 1) -> Batch:
    """Random images; image 0 anomalous with a rectangular defect, the others normal."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(b, 1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, 8:30, 12:40] = True
    label = torch.tensor([1] + [0] * (b - 1))
    return Batch(images, mask, label, ["c"] * b, ["object"] * b, ["d"] * b, [f"p{i}" for i in range(b)])


# --- text side -------------------------------------------------------------------------------------------------


def ref_text_encode(tower: Any, embeds: Tensor, eot: Tensor, deep: Tensor | None) -> Tensor:
    """open_clip's own text blocks; before layer j = 1..K positions 1..n of every prompt become ``deep[j-1]``."""
    x = embeds + tower.positional_embedding[: embeds.shape[1]]
    for j, block in enumerate(tower.transformer.resblocks):
        if deep is not None and 1 <= j <= deep.shape[0]:
            x = x.clone()
            x[:, 1 : 1 + deep.shape[1]] = deep[j - 1]
        x = block(x, attn_mask=tower.attn_mask)
    pooled = tower.ln_final(x)[torch.arange(x.shape[0]), eot] @ tower.text_projection
    return pooled / pooled.norm(dim=-1, keepdim=True)


def ref_prompt_features(
    tower: Any,
    ctx: Tensor,
    deep: Tensor | None,
    bias: Tensor | None = None,
    words=("object.", "damaged object."),
) -> Tensor:
    """Features of ``[SOS] ctx_1..ctx_n <words> [EOT]`` per set and class: [S, 2, D], or [B, S, 2, D] with a bias.

    ``ctx`` [S, 2, n, W]; ``bias`` [B, S, 2, W] is added to *every* one of the n context vectors of its prompt.
    """
    n = ctx.shape[2]
    tokens = open_clip.tokenize([" ".join(["X"] * n) + " " + w for w in words])  # "X" is one BPE token
    words_emb = tower.token_embedding(tokens)  # [2, 77, W]
    eot = tokens.argmax(-1)
    has_bias = bias is not None
    if bias is None:
        bias = torch.zeros(1, *ctx.shape[:2], ctx.shape[-1])
    out = torch.empty(bias.shape[0], ctx.shape[0], 2, tower.text_projection.shape[1])
    for b in range(bias.shape[0]):
        for s in range(ctx.shape[0]):
            embeds = words_emb.clone()
            for c in range(2):
                for i in range(n):
                    embeds[c, 1 + i] = ctx[s, c, i] + bias[b, s, c]
            out[b, s] = ref_text_encode(tower, embeds, eot, deep)
    return out if has_bias else out[0]


# --- maps and losses -------------------------------------------------------------------------------------------


def ref_two_class_softmax(tokens: Tensor, pair: Tensor, temperature: float = T) -> Tensor:
    """[..., N, D] unit tokens and a (normal, anomalous) pair [2, D] → [..., N, 2] probabilities, written out."""
    logits = torch.stack([(tokens * pair[c]).sum(-1) for c in range(2)], -1) / temperature
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def ref_pool(fmap: Tensor, r: int) -> Tensor:
    """Mean over the r × r neighbourhood that lies inside the grid (padding not counted), then L2 over D."""
    _, _, h, w = fmap.shape
    out = torch.empty_like(fmap)
    for i in range(h):
        for j in range(w):
            win = fmap[:, :, max(0, i - r // 2) : i + r // 2 + 1, max(0, j - r // 2) : j + r // 2 + 1]
            out[:, :, i, j] = win.sum((2, 3)) / (win.shape[2] * win.shape[3])
    return out / out.norm(dim=1, keepdim=True)


def grid_of(tokens: Tensor) -> Tensor:
    """[B, N, D] → [B, D, gh, gw] (row-major patches)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *GRID)


def ref_level_probs(tokens: list[Tensor], kernels: list[int], pairs: Tensor) -> Tensor:
    """[B, L, P, 2, gh, gw]: level p pools tap l's tokens with kernel r_p and compares them with ``pairs[p]``."""
    out = []
    for z in tokens:
        levels = []
        for p, r in enumerate(kernels):
            pooled = ref_pool(grid_of(z.double()), r).permute(0, 2, 3, 1)  # [B, gh, gw, D]
            levels.append(ref_two_class_softmax(pooled, pairs[p].double()).permute(0, 3, 1, 2))
        out.append(torch.stack(levels, 1))
    return torch.stack(out, 1).float()


def bilinear(x: Tensor, size: int = SIZE) -> Tensor:
    """[B, C, h, w] → [B, C, size, size], bilinear, align_corners=False (the reference code's resize)."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)


def ref_test_map(probs: Tensor, sigma: float, reduce: str = "mean") -> Tensor:
    """Every (tap, level) map (S_a + 1 − S_n)/2 resized to SIZE, reduced, then scipy's Gaussian per image."""
    b, n_taps, n_levels = probs.shape[:3]
    maps = []
    for t in range(n_taps):
        for p in range(n_levels):
            s = bilinear(probs[:, t, p])
            maps.append((s[:, 1] + 1 - s[:, 0]) / 2)
    m = torch.stack(maps).sum(0)
    m = m if reduce == "sum" else m / len(maps)
    if sigma > 0:
        m = torch.from_numpy(np.stack([gaussian_filter(x, sigma=sigma) for x in m.double().numpy()]))
    return m.float()


def ref_focal(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Focal loss on probabilities: clamped one-hot, p_t = Σ_c onehot_c·p_c + smooth, mean of −(1−p_t)^γ log p_t."""
    c = probs.shape[1]
    pt = torch.full_like(probs[:, 0], smooth)
    for k in range(c):
        hi, lo = (torch.tensor(v, dtype=probs.dtype) for v in (1.0 - smooth, smooth / (c - 1)))
        onehot = torch.where(target == k, hi, lo)
        pt = pt + onehot * probs[:, k]
    return (-((1 - pt) ** gamma) * torch.log(pt)).mean()


def ref_dice(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 − mean over samples of (2 Σ p·t + 1) / (Σ p + Σ t + 1)."""
    scores = []
    for p, t in zip(prob, target):
        scores.append((2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth))
    return 1 - torch.stack(scores).mean()


def ref_seg_loss(probs: Tensor, gt: Tensor, both_dice: bool = True) -> Tensor:
    """Σ over taps and levels of Focal(S, G) + Dice(S_a, G) [+ Dice(S_n, 1 − G)], maps resized to the mask."""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(probs.shape[1]):
        for p in range(probs.shape[2]):
            s = bilinear(probs[:, t, p]).double()
            g = gt.double()
            total = total + ref_focal(s, g) + ref_dice(s[:, 1], g)
            if both_dice:
                total = total + ref_dice(s[:, 0], 1 - g)
    return total


def ref_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean of −log softmax(logits)[label], written out."""
    logits = logits.double()
    lse = torch.tensor(
        [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()], dtype=torch.float64
    )
    return (lse - logits[torch.arange(len(labels)), labels].cpu()).mean()


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)
