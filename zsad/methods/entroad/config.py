"""EntroAD's configuration: every constant of the spec, [S3]/[R] choices included, is a config value."""

from __future__ import annotations

from dataclasses import dataclass, field

from zsad.config import CLIPBackboneConfig, MapScoreRule, MethodConfig, OptimConfig, StageConfig
from zsad.methods.entroad.entropy import Entropy
from zsad.methods.entroad.memory import RegionRule
from zsad.methods.entroad.routing import RouteNorm


def _stages() -> dict[str, StageConfig]:
    adam = lambda: OptimConfig(name="adam", lr=4e-4, betas=[0.5, 0.999])  # noqa: E731
    return {"retrieval": StageConfig(epochs=1, optim=adam()), "prompt": StageConfig(epochs=5, optim=adam())}


@dataclass
class EntroADConfig(MethodConfig):
    """EntroAD (spec ``entroad.md``) on the CLIP substrate (``clip_substrate.md``), MRAD-style memory.

    Stages: ``retrieval`` (memory projections, 1 epoch) then ``prompt`` (prompt learners + bias MLPs, 5 epochs).
    """

    name: str = "entroad"
    image_size: int = 518
    batch_size: int = 8
    smoothing_sigma: float = 4.0
    score_rule: MapScoreRule = "mean_topk"  # map part of the image score
    stages: dict[str, StageConfig] = field(default_factory=_stages)
    clip: CLIPBackboneConfig = field(
        default_factory=lambda: CLIPBackboneConfig(name="ViT-L-14-336-quickgelu", pretrained="openai")
    )
    taps: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based; the last one is "tap 24"
    dpam_start: int | None = 2  # MRAD/EntroAD: V-V path from block 2
    kernels: list[int] = field(default_factory=lambda: [1, 3, 5])  # neighbour averaging (memory, queries, z)

    # --- memory (built from the auxiliary set only) -------------------------------------------------------------
    mask_threshold: float = (
        0.5  # pixel GT binarised at this value before the bilinear resize to the patch grid
    )
    # pure (MRAD: bilinear-resized mask == 1 / == 0, i.e. a patch takes its centre's label) | coverage (anomalous
    # where the defect covers >= region_coverage of the patch, normal where it covers none, in between neither)
    memory_regions: RegionRule = "pure"
    region_coverage: float = 0.5
    memory_batch_size: int = 16
    memory_workers: int = 4
    memory_bf16: bool = True  # bf16 autocast for the memory pass on CUDA (ignored on CPU)

    # --- stage 1: retrieval -------------------------------------------------------------------------------------
    sim_dropout: bool = True  # training only: drop keys above a quantile of the raw cosine
    patch_dropout_q: float = 0.8
    image_dropout_q: float = 0.95
    image_temperature: float = 0.07  # CE(image probabilities / T, y)

    # --- structural entropy -------------------------------------------------------------------------------------
    entropy: Entropy = "row_entropy"  # row_entropy | entropy_rate | two_level | none (ê ≡ 0.5)
    two_level_k: int = 8  # k-means modules of the two_level entropy
    two_level_iters: int = 5

    # --- routing and gate ---------------------------------------------------------------------------------------
    route_temperature: float = 0.1  # T in ê^{1/T}
    route_norm: RouteNorm = "l1"
    gate: bool = True  # false → g = 1
    gate_tau: float = 0.5
    gate_k0: float = 5.0
    gate_k1: float = 50.0

    # --- dual-branch prompts ------------------------------------------------------------------------------------
    n_ctx: int = 12
    deep_depth: int = 9
    deep_len: int = 4
    temperature: float = 0.07  # text-patch logits
    single_branch: bool = False
    branch_weights: list[float] = field(
        default_factory=lambda: [0.7, 0.3]
    )  # (A localised, B diffuse): loss + map
    entropy_split: bool = False
    split_temperature: float = 0.1
    confidence_fusion: bool = False  # per-pixel c_b = 1 - H(S_b)/ln 2 instead of the fixed branch weights

    # --- image score --------------------------------------------------------------------------------------------
    topk_frac: float = 0.01
    score_map_weight: float = 0.3  # score = w · mean_topk(M) + (1 - w) · p_img
