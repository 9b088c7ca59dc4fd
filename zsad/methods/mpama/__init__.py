"""MPA / MPAMA: multi-granularity prompts (stage 1) and a token-wise mixture of experts (stage 2)."""

from zsad.methods.mpama.moe import NoisyTopKRouter, Routing, SharedExperts, TokenMoE, routing_stats
from zsad.methods.mpama.mpa import MPA, MPAConfig, cross_level_bridge
from zsad.methods.mpama.mpama import MPAMA, MPAMAConfig

__all__ = [
    "MPA",
    "MPAMA",
    "MPAConfig",
    "MPAMAConfig",
    "NoisyTopKRouter",
    "Routing",
    "SharedExperts",
    "TokenMoE",
    "cross_level_bridge",
    "routing_stats",
]
