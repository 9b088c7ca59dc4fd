"""Token-level operations of EntroAD: neighbour averaging, retrieval, routing weights, confidence gate.

All functions are batched over images and patches (spec ``entroad.md`` § Stage 1, Routed tokens, Confidence gate).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from zsad.maps import tokens_to_grid

RouteNorm = Literal["l1", "softmax"]
ROUTE_NORMS = get_args(RouteNorm)
_EPS = 1e-12


def neighbour_average(tokens: Tensor, grid: tuple[int, int], kernels: tuple[int, ...] = (1, 3, 5)) -> Tensor:
    """Mean over ``kernels`` of the k×k box average of each patch token on the patch grid.

    Borders average only the patches that exist (``count_include_pad=False``), so a border token is not pulled
    towards zero. Kernel 1 is the token itself.

    Args:
        tokens: [B, N, C] patch tokens, N = gh·gw.
        grid: (gh, gw).
        kernels: odd box sizes.

    Returns:
        [B, N, C] in the input dtype.
    """
    x = tokens_to_grid(tokens, grid)
    out = torch.zeros_like(x)
    for k in kernels:  # 3 kernels; each pool is batched over images and channels
        if k % 2 != 1:
            raise ValueError(f"method.kernels: neighbour-averaging kernels must be odd, got {k}")
        out = out + (x if k == 1 else F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False))
    out = out / len(kernels)
    return out.flatten(2).transpose(1, 2)


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Quantile ``q`` along the last dim with linear interpolation (``torch.quantile``'s default rule).

    ``torch.quantile`` refuses inputs over 2^24 elements; patch-to-memory similarities of a batch exceed that, so
    this uses two ``kthvalue`` calls instead. Returns [..., 1].
    """
    m = x.shape[-1]
    pos = q * (m - 1)
    lo, hi = int(pos), min(int(pos) + 1, m - 1)
    v_lo = x.kthvalue(lo + 1, dim=-1, keepdim=True).values
    if hi == lo:
        return v_lo
    v_hi = x.kthvalue(hi + 1, dim=-1, keepdim=True).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def retrieve(
    query: Tensor, q_proj: Tensor, keys_proj: Tensor, keys: Tensor, values: Tensor, drop_q: float | None
) -> Tensor:
    """Memory read-out ``softmax_keys(⟨W_q q, W_k K⟩) · V`` with optional similarity dropout.

    Args:
        query: [..., C] normalised raw queries (for the dropout's raw cosines).
        q_proj: [..., D] projected queries.
        keys_proj: [M, D] projected keys.
        keys: [M, C] normalised raw keys.
        values: [M, 2] one-hot {normal, anomalous} values.
        drop_q: mask every key whose raw cosine exceeds this row quantile (training: the memory and the training
            set coincide, so a sample would otherwise retrieve itself); ``None`` disables.

    Returns:
        [..., 2] probabilities {normal, anomalous} (no temperature, as MRAD).
    """
    logits = q_proj @ keys_proj.t()
    if drop_q is not None:
        raw = query @ keys.t()
        logits = logits.masked_fill(raw > row_quantile(raw, drop_q), float("-inf"))
    return logits.float().softmax(-1) @ values.float()


def route_weights(
    p: Tensor, e_hat: Tensor, temperature: float = 0.1, norm: str = "l1"
) -> tuple[Tensor, Tensor]:
    """Routing weights over patches: ``r^a = p·ê^{1/T}``, ``r^n = (1-p)(1-ê)^{1/T}``, normalised over patches.

    ``l1`` (default, [R]): ``w = r / Σ r`` (a tiny floor keeps the weights a distribution when every ``r`` is 0).
    ``softmax`` (the re-derivation's literal rule): ``w = softmax_i(r_i)``; with ``r ∈ [0, 1]`` this is close to
    uniform over many patches.

    Args:
        p: [B, N] patch anomaly probability.
        e_hat: [B, N] normalised entropy in [0, 1].

    Returns:
        (w_normal, w_anomalous), each [B, N], non-negative, summing to 1 over N.
    """
    inv_t = 1.0 / temperature
    r_a = p * e_hat.pow(inv_t)
    r_n = (1.0 - p) * (1.0 - e_hat).pow(inv_t)
    return normalise_routes(r_n, norm), normalise_routes(r_a, norm)


def normalise_routes(r: Tensor, norm: str) -> Tensor:
    """Normalise non-negative route scores [B, N] over N by ``l1`` or ``softmax``."""
    if norm == "l1":
        r = r.clamp_min(0.0) + _EPS
        return r / r.sum(-1, keepdim=True)
    if norm == "softmax":
        return r.softmax(-1)
    raise ValueError(
        f"method.route_norm: unknown normalisation {norm!r}; expected one of {', '.join(ROUTE_NORMS)}"
    )


def pool(weights: Tensor, z: Tensor) -> Tensor:
    """Weighted sum ``Σ_i w_i z_i``: [B, N] × [B, N, D] → [B, D]."""
    return torch.einsum("bn,bnd->bd", weights.to(z.dtype), z)


def confidence_gate(p: Tensor, e_hat: Tensor, tau: float = 0.5, k0: float = 5.0, k1: float = 50.0) -> Tensor:
    """``g = sigmoid(max_i p_i - τ) · (k0 + k1 · std_i(ê))`` per image → [B] (population std over patches)."""
    p_max = p.amax(-1)
    return torch.sigmoid(p_max - tau) * (k0 + k1 * e_hat.std(-1, correction=0))


def entropy_split(e_hat: Tensor, temperature: float = 0.1) -> Tensor:
    """Split gate ``s_i = sigmoid((ê_i - mean ê) / T_s)`` [B, N]: high-entropy (diffuse) patches → branch B."""
    return torch.sigmoid((e_hat - e_hat.mean(-1, keepdim=True)) / temperature)
