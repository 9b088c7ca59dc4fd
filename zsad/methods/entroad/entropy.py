"""Patch-level structural entropy of the attention graph (EntroAD, spec ``entroad.md`` § Structural entropy).

Every function here is batched over images, runs without gradients and works in float32 whatever the autocast
dtype of the backbone (entropies of bf16 probabilities are too coarse to min-max normalise).

Notation: for one tap, ``P`` [B, N, N] is the patch-to-patch attention: the original-path q-k attention
probabilities averaged over heads, CLS row and column dropped, each row re-normalised to sum to 1.
Three per-patch definitions are available (config ``entropy``):

* ``row_entropy`` (default, [S3] Eq. 1–3): ``H_i = -Σ_j P_ij ln P_ij``.
* ``entropy_rate`` ([R]): symmetrise ``W = (P + Pᵀ)/2``, degrees ``d_i = Σ_j W_ij``, the random walk
  ``Q = D⁻¹W`` has stationary distribution ``π_i = d_i / Σ_k d_k``; ``H_i = π_i · (-Σ_j Q_ij ln Q_ij)``. The sum
  over i is the entropy rate of that walk (the one-dimensional structural entropy of Li & Pan weighted by the walk).
* ``two_level`` ([R], slow, ablation only): the two-dimensional (partition-tree) structural entropy of Li & Pan on
  ``W`` for a partition into ``k`` modules found by k-means on the rows of ``Q``. With ``vol(G) = Σ_i d_i``,
  ``V_j = vol(X_j)`` and ``g_j`` the weight of edges leaving module ``X_j``, the graph's entropy is
  ``H = -Σ_j Σ_{i∈X_j} (d_i/vol G) ln(d_i/V_j) - Σ_j (g_j/vol G) ln(V_j/vol G)``. The per-patch share is the
  node term plus the module term split over the module's nodes in proportion to degree:
  ``H_i = -(d_i/vol G) ln(d_i/V_m) - (d_i/V_m)(g_m/vol G) ln(V_m/vol G)`` with ``m`` the module of ``i``, so that
  ``Σ_i H_i = H``. Natural logarithms throughout.

Per tap the chosen ``H^l`` is computed, averaged over taps and min-max normalised per image to ``ê ∈ [0, 1]^N``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Entropy = Literal["row_entropy", "entropy_rate", "two_level", "none"]
ENTROPIES = get_args(Entropy)
_EPS = 1e-12


def patch_attention(attn: Tensor) -> Tensor:
    """Attention probabilities → row-stochastic [B, N, N] patch graph (float32).

    ``attn`` is either per head [B, heads, 1+N, 1+N] (averaged here) or already head-averaged [B, 1+N, 1+N]
    (the backbone's ``attn_reduce="mean_heads"``, which never holds all heads at once).
    """
    if attn.dim() not in (3, 4):
        raise ValueError(f"attention must be [B, heads, 1+N, 1+N] or [B, 1+N, 1+N], got {tuple(attn.shape)}")
    a = (attn.float().mean(1) if attn.dim() == 4 else attn.float())[:, 1:, 1:]
    return a / a.sum(-1, keepdim=True).clamp_min(_EPS)


def row_entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of a row-stochastic [B, N, N] matrix → [B, N]."""
    return -torch.special.xlogy(p, p).sum(-1)


def _symmetrise(p: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetrised weights ``W = (P + Pᵀ)/2`` and degrees ``d`` [B, N]."""
    w = 0.5 * (p + p.transpose(1, 2))
    return w, w.sum(-1)


def entropy_rate(p: Tensor) -> Tensor:
    """Per-patch ``π_i · H(Q_i·)`` of the random walk on the symmetrised graph (see module docstring) → [B, N]."""
    w, d = _symmetrise(p)
    q = w / d.unsqueeze(-1).clamp_min(_EPS)
    pi = d / d.sum(-1, keepdim=True).clamp_min(_EPS)
    return pi * row_entropy(q)


def kmeans_modules(x: Tensor, k: int, iters: int) -> Tensor:
    """Batched Lloyd k-means on points ``x`` [B, N, F] → module index [B, N] (long).

    Deterministic: centroids start at ``k`` evenly spaced points. An empty module keeps its previous centroid.
    """
    b, n, _ = x.shape
    k = max(1, min(k, n))
    init = torch.linspace(0, n - 1, k, device=x.device).round().long()
    centroids = x[:, init]  # [B, k, F]
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    for _ in range(max(1, iters)):
        assign = torch.cdist(x, centroids).argmin(-1)
        one_hot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # [B, N, k]
        counts = one_hot.sum(1)  # [B, k]
        sums = one_hot.transpose(1, 2) @ x  # [B, k, F]
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return assign


def two_level_entropy(p: Tensor, k: int = 8, iters: int = 5, modules: Tensor | None = None) -> Tensor:
    """Per-patch share of the two-level (partition-tree) structural entropy (see module docstring) → [B, N].

    Args:
        p: row-stochastic [B, N, N] patch attention.
        k: number of modules for k-means.
        iters: k-means iterations.
        modules: optional fixed module index [B, N] (tests give a hand-made partition).
    """
    w, d = _symmetrise(p)
    if modules is None:
        modules = kmeans_modules(w / d.unsqueeze(-1).clamp_min(_EPS), k, iters)
        # k-means yields at most this many modules: no host sync to count them (an empty one is never gathered).
        n_mod = max(1, min(k, p.shape[-1]))
    else:
        n_mod = int(modules.max()) + 1
    one_hot = torch.nn.functional.one_hot(modules, n_mod).to(w.dtype)  # [B, N, K]
    vol_g = d.sum(-1, keepdim=True).clamp_min(_EPS)  # [B, 1]
    vol_m = (one_hot * d.unsqueeze(-1)).sum(1)  # [B, K]
    members = one_hot.transpose(1, 2)  # [B, K, N]
    inner = ((members @ w) * members).sum(-1)  # edge weight with both ends inside each module [B, K]
    cut = (vol_m - inner).clamp_min(0.0)
    vol_i = torch.gather(vol_m, 1, modules).clamp_min(_EPS)  # volume of each node's module [B, N]
    cut_i = torch.gather(cut, 1, modules)
    node_term = -(d / vol_g) * torch.log(d.clamp_min(_EPS) / vol_i)
    module_term = -(d / vol_i) * (cut_i / vol_g) * torch.log(vol_i / vol_g)
    return node_term + module_term


def minmax(h: Tensor) -> Tensor:
    """Per-image min-max normalisation of [B, N] to [0, 1] (a constant row maps to 0)."""
    lo = h.amin(-1, keepdim=True)
    hi = h.amax(-1, keepdim=True)
    return (h - lo) / (hi - lo).clamp_min(_EPS)


@torch.no_grad()
def structural_entropy(
    attentions: list[Tensor], kind: str = "row_entropy", k: int = 8, iters: int = 5
) -> Tensor:
    """Normalised patch entropy ``ê`` [B, N] from the original-path attention at the taps.

    Args:
        attentions: one probability tensor per tap, [B, heads, 1+N, 1+N] or head-averaged [B, 1+N, 1+N].
        kind: ``row_entropy`` | ``entropy_rate`` | ``two_level`` (``none`` is handled by the caller).
        k, iters: k-means settings of ``two_level``.
    """
    if kind not in ENTROPIES[:3]:
        raise ValueError(f"method.entropy: unknown entropy {kind!r}; expected one of {', '.join(ENTROPIES)}")
    if not attentions:
        raise ValueError(
            "structural_entropy needs at least one tap's attention (backbone called without attn_taps?)"
        )
    per_tap = []
    # float32 even under bf16 autocast: the k-means and volume matmuls would otherwise drop to bf16.
    with torch.autocast(attentions[0].device.type, enabled=False):
        for attn in attentions:  # a handful of taps; everything inside is batched over images and patches
            p = patch_attention(attn)
            if kind == "row_entropy":
                per_tap.append(row_entropy(p))
            elif kind == "entropy_rate":
                per_tap.append(entropy_rate(p))
            else:
                per_tap.append(two_level_entropy(p, k, iters))
        return minmax(torch.stack(per_tap).mean(0))
