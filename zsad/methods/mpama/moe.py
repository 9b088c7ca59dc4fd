"""Token-wise mixture of experts for MPAMA's stage 2: noisy top-k routers and a shared expert pool.

Expert layout (columns of every router): ``zero`` (if enabled), ``frozen`` (if enabled), then the K learnable
experts ``l0 .. l{K-1}``. The learnable experts are shared by every MoE layer; each layer has its own router.

Dispatch (why it looks like this):
- The K learnable bottleneck experts are evaluated for *all* tokens in two matmuls ([T, W] × [W, K·r] and
  [T, K·r] × [K·r, W], gates folded in before the up-projection). With r = 64 and K = 4 the inner size K·r = 256 is
  16× smaller than the frozen MLP's 4W hidden size, so computing experts a token was not routed to costs less than
  any gather/scatter would save, and there is no Python loop over experts.
- The frozen expert (the block's own MLP, 4W hidden) is the expensive one. Two dispatches, same result:
  ``gather`` (default) runs it only on the tokens routed to it (one gather, one ``index_add``); the index list needs
  one ``nonzero`` host sync per MoE layer. ``dense`` runs it on every token and multiplies by its gate (zero for
  tokens not routed there): no sync, no data-dependent shapes (CUDA graphs / ``torch.compile`` without breaks),
  but it pays for the MLP on all tokens. Trade-off at ViT-L, 518², batch 8 (≈11k tokens): one MLP is ≈ 2/3 of a
  block's FLOPs, so with the frozen expert on ≈ 1/3–1/2 of the tokens ``gather`` saves ≈ 1/2–2/3 of 4 MLPs
  (≈ 5–7 % of the backbone forward, about 1–2 ms on an H100 in bf16), while a sync stalls the launch queue for
  tens of µs per layer once the GPU is busy: ``gather`` is the cheaper one in eager mode, ``dense`` the one to
  pick for compiled/graph-captured runs (config ``method.frozen_dispatch``).
- The zero expert needs no compute: its gate only takes a top-k slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsad.losses import router_z_loss, switch_balance_loss

FrozenDispatch = Literal["gather", "dense"]
FROZEN_DISPATCH = get_args(FrozenDispatch)


class Routing(NamedTuple):
    """One router call over T tokens and E experts.

    Attributes:
        gates: [T, E] float32, softmax over the top-k logits, zero elsewhere (rows sum to 1).
        mask: [T, E] bool, the top-k experts of each token.
        probs: [T, E] float32, full softmax of the routing logits (the Switch balance loss's P).
        logits: [T, E] float32 routing logits (noisy in training).
    """

    gates: Tensor
    mask: Tensor
    probs: Tensor
    logits: Tensor


class NoisyTopKRouter(nn.Module):
    """h = W_r u; in training h += ε · softplus(W_noise u), ε ~ N(0, 1); top-k of h, softmax over them.

    Routing runs in float32 (outside autocast): bf16 logits create ties in the top-k.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, noisy: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"method.top_k: must be in 1..{n_experts} (the number of experts), got {top_k}")
        self.top_k = top_k
        self.noisy = noisy
        self.w_gate = nn.Linear(dim, n_experts, bias=False)
        self.w_noise = nn.Linear(dim, n_experts, bias=False)
        nn.init.zeros_(self.w_noise.weight)  # initial noise scale softplus(0) ≈ 0.69 for every expert

    def forward(self, u: Tensor) -> Routing:
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.float()
            logits = F.linear(u, self.w_gate.weight.float())
            if self.training and self.noisy:
                std = F.softplus(F.linear(u, self.w_noise.weight.float()))
                logits = logits + torch.randn_like(logits) * std
            top, idx = logits.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
            mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
            return Routing(gates, mask, logits.softmax(-1), logits)


class SharedExperts(nn.Module):
    """K bottleneck adapters E_k(u) = s · Up_k(GELU(Down_k(u))), Up zero-initialised, mixed in one pass.

    Attributes:
        down: [K, dim, hidden]; down_bias: [K, hidden]; up: [K, hidden, dim] (zeros); up_bias: [K, dim] (zeros).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default range for the down-projection
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden).uniform_(-bound, bound))
        self.down_bias = nn.Parameter(torch.empty(n_experts, hidden).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(n_experts, hidden, dim))
        self.up_bias = nn.Parameter(torch.zeros(n_experts, dim))

    def expert(self, k: int, u: Tensor) -> Tensor:
        """E_k(u) alone ([T, dim] → [T, dim]); for tests and plots."""
        h = F.gelu(u @ self.down[k] + self.down_bias[k])
        return self.scale * (h @ self.up[k] + self.up_bias[k])

    def mix(self, u: Tensor, gates: Tensor) -> Tensor:
        """Σ_k gates[:, k] · E_k(u) for every token: u [T, dim], gates [T, K] → [T, dim]."""
        h = F.gelu(torch.einsum("td,kdh->tkh", u, self.down) + self.down_bias)
        h = h * gates[..., None].to(h.dtype)
        out = torch.einsum("tkh,khd->td", h, self.up) + gates.to(h.dtype) @ self.up_bias
        return self.scale * out


class TokenMoE(nn.Module):
    """One router per MoE layer over the zero, frozen and shared learnable experts.

    Args:
        dim: token width the experts read and write.
        n_layers: number of MoE layers (routers).
        n_learnable: K, size of the shared learnable pool.
        hidden: bottleneck width r of a learnable expert.
        scale: output scale s of a learnable expert.
        top_k: experts per token.
        zero_expert, frozen_expert: include the zero / frozen expert.
        noisy: add router noise in training.
        frozen_dispatch: ``gather`` (frozen expert on its routed tokens only; one host sync per call) or ``dense``
            (on every token, gated; sync-free). Same output and gradients.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int,
        n_learnable: int,
        hidden: int,
        scale: float,
        top_k: int,
        zero_expert: bool = True,
        frozen_expert: bool = True,
        noisy: bool = True,
        frozen_dispatch: str = "gather",
    ) -> None:
        super().__init__()
        if frozen_dispatch not in FROZEN_DISPATCH:
            raise ValueError(
                f"method.frozen_dispatch: {frozen_dispatch!r}; expected one of {FROZEN_DISPATCH}"
            )
        self.frozen_dispatch = frozen_dispatch
        if n_learnable < 0 or hidden < 1:
            raise ValueError(
                f"method.n_experts must be ≥ 0 and method.expert_hidden ≥ 1, got {n_learnable}, {hidden}"
            )
        self.names = (["zero"] if zero_expert else []) + (["frozen"] if frozen_expert else [])
        self.names += [f"l{k}" for k in range(n_learnable)]
        if not self.names:
            raise ValueError("method: the MoE has no experts (n_experts = 0 and no zero/frozen expert)")
        self.frozen_col = self.names.index("frozen") if frozen_expert else None
        self.learn_start = len(self.names) - n_learnable
        self.routers = nn.ModuleList(
            NoisyTopKRouter(dim, len(self.names), top_k, noisy) for _ in range(n_layers)
        )
        self.experts = SharedExperts(n_learnable, dim, hidden, scale) if n_learnable else None

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def forward(
        self, layer: int, u: Tensor, frozen: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Routing]:
        """Σ_{e ∈ top-k(u)} g_e(u) · E_e(u) for tokens u [T, dim], with the router of MoE layer ``layer``.

        ``frozen`` is the frozen expert of this layer (required when the layout has one).
        """
        routing = self.routers[layer](u)
        out = torch.zeros_like(u)
        if self.experts is not None:
            out = out + self.experts.mix(u, routing.gates[:, self.learn_start :])
        if self.frozen_col is not None:
            if frozen is None:
                raise ValueError("TokenMoE: this layout has a frozen expert but no frozen MLP was given")
            out = self._frozen(out, u, routing, frozen)
        return out, routing

    def _frozen(self, out: Tensor, u: Tensor, routing: Routing, frozen: Callable[[Tensor], Tensor]) -> Tensor:
        col = self.frozen_col
        gate = routing.gates[:, col, None]
        if self.frozen_dispatch == "dense":
            return out + (frozen(u) * gate).to(out.dtype)  # gate is 0 where the token was not routed here
        sel = routing.mask[:, col].nonzero().squeeze(1)  # the one host sync of the gather dispatch
        if sel.numel() == 0:
            return out
        y = frozen(u.index_select(0, sel)) * gate.index_select(0, sel)
        return out.index_add(0, sel, y.to(out.dtype))


def routing_stats(routings: list[Routing]) -> tuple[Tensor, Tensor, Tensor]:
    """(Switch balance E·Σ f_e P̄_e, router z-loss, per-layer expert shares [L, E]) of one forward.

    The balance and z terms are means over layers (so a perfectly balanced model has balance 1 at any depth).
    A share is the fraction of token-slot assignments (top-k slots) an expert received: rows sum to 1.
    """
    balance = torch.stack([switch_balance_loss(r.probs, r.mask) for r in routings]).mean()
    z_loss = torch.stack([router_z_loss(r.logits) for r in routings]).mean()
    shares = torch.stack([r.mask.float().sum(0) / r.mask.sum().clamp_min(1) for r in routings])
    return balance, z_loss, shares.detach()
