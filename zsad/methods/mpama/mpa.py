"""MPA (stage 1 of MPAMA): one learnable prompt pair per perception level plus a global pair and a bridge.

Level p compares its own prompt pair with the tapped V-V tokens average-pooled over r_p × r_p (see
``zsad.methods.anomalyclip.pool_level``). The global pair meets the local pairs in the cross-level bridge
t_c^G = normalise(max_elementwise(g_c, t_c^1, …, t_c^P)), which scores the global embedding (``bridge: max``).
``bridge: none`` scores it with g_c alone; ``bridge: score_max`` fuses at the score level instead:
max(global anomalous probability against g, mean of the top ``topk_frac`` of the map).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from zsad.config import OptimConfig, StageConfig
from zsad.maps import image_score
from zsad.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig

Bridge = Literal["max", "none", "score_max"]
BRIDGES = get_args(Bridge)


@dataclass
class MPAConfig(AnomalyCLIPConfig):
    """MPA: multi-granularity prompts on the CLIP substrate (``specs/mpama.md``, stage 1)."""

    name: str = "mpa"
    stages: dict[str, StageConfig] = field(
        default_factory=lambda: {
            "mpa": StageConfig(epochs=15, optim=OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999]))
        }
    )
    kernels: list[int] = field(default_factory=lambda: [1, 3, 5])  # one perception level per odd kernel
    bridge: Bridge = "max"


def cross_level_bridge(global_pair: Tensor, local_pairs: Tensor) -> Tensor:
    """t^G = normalise(element-wise max over {g, t^1..t^P}): [2, D] from [2, D] and [P, 2, D]."""
    stacked = torch.cat([global_pair[None], local_pairs], 0)
    return F.normalize(stacked.amax(0), dim=-1)


class MPA(AnomalyCLIP):
    """AnomalyCLIP's maths with P perception levels, P local prompt pairs, a global pair and a bridge."""

    def _check_config(self) -> None:
        super()._check_config()
        cfg = self.cfg
        kernels = list(cfg.kernels)
        if not kernels or any(int(k) < 1 or int(k) % 2 == 0 for k in kernels):
            raise ValueError(f"method.kernels: expected a non-empty list of odd kernels ≥ 1, got {kernels}")
        if cfg.bridge == "score_max" and cfg.score_rule != "global":
            raise ValueError(
                "method.bridge: score_max defines the image score itself; set method.score_rule to 'global'"
            )

    def kernels(self) -> list[int]:
        return [int(k) for k in self.cfg.kernels]

    def n_prompt_sets(self) -> int:
        return len(self.cfg.kernels) + 1  # P local pairs, then the global pair

    def split_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        n_levels = len(self.cfg.kernels)
        local, global_pair = text[:n_levels], text[n_levels]
        if self.cfg.bridge == "max":
            global_pair = cross_level_bridge(global_pair, local)
        return local, global_pair

    def score(self, amap: Tensor, global_prob: Tensor) -> Tensor:
        if self.cfg.bridge == "score_max":
            return torch.maximum(global_prob, image_score(amap, "mean_topk", float(self.cfg.topk_frac)))
        return super().score(amap, global_prob)
