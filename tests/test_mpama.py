"""MPA / MPAMA on the tiny CLIP preset: levels, bridge, routers, experts, balance, stages, learning, configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import EXPERIMENTS, compose
from zsad.losses import segmentation_loss
from zsad.maps import upsample
from zsad.methods.anomalyclip import pool_level
from zsad.methods.mpama import (
    MPA,
    MPAMA,
    MPAConfig,
    MPAMAConfig,
    NoisyTopKRouter,
    TokenMoE,
    cross_level_bridge,
    routing_stats,
)
from zsad.methods.mpama.mpama import frozen_mlp
from zsad.methods.registry import build_method

SIZE = 56  # 4 × 4 patches of 14 px
TINY = dict(image_size=SIZE, taps=[2, 3, 4], dpam_start=2, smoothing_sigma=0.0)


def tiny_cfg(schema, **kw):
    cfg = OmegaConf.structured(schema(**{**TINY, **kw}))
    cfg.clip.name, cfg.clip.pretrained = "tiny", "none"
    return cfg


def tiny_mpa(**kw) -> MPA:
    torch.manual_seed(0)
    return MPA(tiny_cfg(MPAConfig, **kw))


def tiny_mpama(**kw) -> MPAMA:
    torch.manual_seed(0)
    return MPAMA(tiny_cfg(MPAMAConfig, **kw))


def tiny_batch(b: int = 2, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(b, 1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, 8:30, 12:40] = True
    label = torch.tensor([1] + [0] * (b - 1))
    return Batch(images, mask, label, ["c"] * b, ["object"] * b, ["d"] * b, [f"p{i}" for i in range(b)])


def count_text_calls(model, monkeypatch) -> list[int]:
    calls = [0]
    original = model.clip.text.encode_embeddings

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model.clip.text, "encode_embeddings", counted)
    return calls


def train_steps(model, batch, steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model.loss(model(batch.image, batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def eval_loss(model, batch) -> float:
    """Loss without router noise (eval mode), so that before/after compare the same function."""
    model.eval()
    with torch.no_grad():
        return float(model.loss(model(batch.image, batch), batch)["loss"])


# --- MPA ---------------------------------------------------------------------------------------------------------


def test_bridge_is_an_elementwise_max():
    g = torch.tensor([[0.1, -2.0, 0.5], [1.0, 0.0, -1.0]])
    local = torch.tensor([[[0.3, -3.0, 0.2], [0.0, 0.5, -2.0]], [[-1.0, 1.0, 0.4], [2.0, -1.0, 0.0]]])
    expected = torch.tensor([[0.3, 1.0, 0.5], [2.0, 0.5, 0.0]])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(cross_level_bridge(g, local), expected)


def test_mpa_levels_use_their_own_prompts_and_pooling():
    model = tiny_mpa(kernels=[1, 3]).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        feats = model.clip.visual(batch.image, taps=(2, 3, 4), dpam_start=2)
        text = model.prompts(model.clip.text)  # [P + 1 = 3, 2, D]
    probs = out.loss_inputs["probs"]
    assert probs.shape == (2, 3, 2, 2, 4, 4)
    for t, z in enumerate(feats.patch_tokens):
        grid = z.transpose(1, 2).reshape(2, -1, 4, 4)
        for p, r in enumerate([1, 3]):
            pooled = pool_level(grid, r)
            s = torch.softmax(torch.einsum("bdhw,cd->bchw", pooled, text[p]) / 0.07, dim=1)
            assert torch.allclose(probs[:, t, p], s, atol=1e-5)
    bridged = cross_level_bridge(text[2], text[:2])
    g = F.normalize(feats.global_embedding, dim=-1)
    assert torch.allclose(out.image_score, torch.softmax(g @ bridged.t() / 0.07, -1)[:, 1], atol=1e-5)


def test_mpa_bridge_switches():
    batch = tiny_batch()
    none = tiny_mpa(bridge="none").eval()
    with torch.no_grad():
        out = none(batch.image, batch)
        text = none.prompts(none.clip.text)
        g = F.normalize(none.clip.visual(batch.image, taps=(4,), dpam_start=2).global_embedding, dim=-1)
    assert torch.allclose(out.loss_inputs["logits"], g @ text[3].t() / 0.07, atol=1e-4)
    score = tiny_mpa(bridge="score_max").eval()
    with torch.no_grad():
        out = score(batch.image, batch)
    top = out.anomaly_map.flatten(1).topk(max(1, round(SIZE * SIZE * 0.01)), dim=1).values.mean(1)
    glob = out.loss_inputs["logits"].softmax(-1)[:, 1]
    assert torch.allclose(out.image_score, torch.maximum(glob, top))
    with pytest.raises(ValueError, match="method.bridge"):
        tiny_mpa(bridge="mean")
    with pytest.raises(ValueError, match="method.kernels"):
        tiny_mpa(kernels=[1, 4])


def test_mpa_loss_sums_taps_and_levels(monkeypatch):
    model = tiny_mpa().train()
    calls = count_text_calls(model, monkeypatch)
    batch = tiny_batch()
    out = model(batch.image, batch)
    assert calls[0] == 1  # all P + 1 prompt sets in one text-encoder call
    terms = model.loss(out, batch)
    probs = out.loss_inputs["probs"]
    seg = sum(segmentation_loss(upsample(probs[:, t, p], SIZE), batch.gt) for t in range(3) for p in range(3))
    assert torch.allclose(terms["seg"], seg, atol=1e-4)


def test_mpa_training_lowers_the_loss():
    model = tiny_mpa()
    model.set_stage("mpa")
    batch = tiny_batch()
    before = eval_loss(model, batch)
    train_steps(model, batch, steps=6, lr=1e-2)
    assert eval_loss(model, batch) < before - 1e-3


# --- MoE parts ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_gates_sum_to_one_with_k_nonzeros(k):
    torch.manual_seed(0)
    router = NoisyTopKRouter(16, 6, k)
    u = torch.randn(50, 16)
    for mode in (True, False):
        r = router.train(mode)(u)
        assert torch.allclose(r.gates.sum(-1), torch.ones(50))
        assert ((r.gates > 0).sum(-1) == k).all() and torch.equal(r.gates > 0, r.mask)
        # the kept experts are the k largest logits
        kth = r.logits.topk(k, -1).values[:, -1:]
        assert torch.equal(r.mask, r.logits >= kth)
    eval_r = router.eval()
    assert torch.equal(eval_r(u).gates, eval_r(u).gates)  # no noise at eval


def test_moe_output_is_the_gated_sum_and_the_zero_expert_adds_nothing():
    torch.manual_seed(0)
    moe = TokenMoE(dim=8, n_layers=2, n_learnable=3, hidden=4, scale=0.1, top_k=2, frozen_expert=False)
    with torch.no_grad():
        moe.experts.up.normal_()  # non-zero experts (Up is zero-initialised)
        moe.experts.up_bias.normal_()
    u = torch.randn(40, 8)
    out, r = moe.eval()(1, u)
    assert moe.names == ["zero", "l0", "l1", "l2"]
    expected = sum(r.gates[:, 1 + k, None] * moe.experts.expert(k, u) for k in range(3))
    assert torch.allclose(out, expected, atol=1e-6)
    # tokens whose top-2 includes the zero expert get exactly the other expert's share
    with torch.no_grad():
        moe.routers[0].w_gate.weight.zero_()
        moe.routers[0].w_gate.weight[0, 0] = 100.0  # zero expert first for every token with u[:, 0] > 0
    u = torch.randn(40, 8).abs()
    out, r = moe(0, u)
    assert r.mask[:, 0].all()
    other = sum(r.gates[:, 1 + k, None] * moe.experts.expert(k, u) for k in range(3))
    assert torch.allclose(out, other, atol=1e-6)
    only_zero = TokenMoE(dim=8, n_layers=1, n_learnable=1, hidden=4, scale=0.1, top_k=1, frozen_expert=False)
    with torch.no_grad():
        only_zero.experts.up.normal_()
        only_zero.routers[0].w_gate.weight.zero_()
        only_zero.routers[0].w_gate.weight[0, 0] = 100.0
    out, _ = only_zero.eval()(0, u)
    assert torch.equal(out, torch.zeros_like(u))


def test_frozen_expert_equals_the_block_mlp():
    model = tiny_mpama(top_k=1)
    block = model.clip.visual.blocks[2]
    moe = model.moe.eval()
    col = moe.frozen_col
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(model.clip.visual.width, generator=g)
    with torch.no_grad():
        moe.routers[0].w_gate.weight.zero_()
        moe.routers[0].w_gate.weight[col] = direction  # frozen expert wins where u · direction > 0
        u = block.ln_2(torch.randn(30, model.clip.visual.width, generator=g))
        out, r = moe(0, u, lambda t: frozen_mlp(block, t))
    to_frozen = r.mask[:, col]
    assert torch.equal(to_frozen, u @ direction > 0) and 0 < int(to_frozen.sum()) < 30
    assert torch.allclose(out[to_frozen], block.mlp(u[to_frozen]), atol=1e-5)
    assert torch.equal(
        out[~to_frozen], torch.zeros_like(out[~to_frozen])
    )  # other experts start at zero (Up = 0)


def test_dense_frozen_dispatch_equals_the_gather():
    """The sync-free dense dispatch (frozen MLP on every token × its gate) gives the gather's output and grads."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    results = []
    for dispatch in ("gather", "dense"):
        torch.manual_seed(1)
        moe = TokenMoE(
            dim=8, n_layers=1, n_learnable=2, hidden=4, scale=0.1, top_k=2, frozen_dispatch=dispatch
        )
        with torch.no_grad():
            moe.experts.up.normal_()
        u = torch.randn(64, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out, r = moe.eval()(0, u, mlp)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        results.append((out.detach(), r.mask, u.grad, moe.routers[0].w_gate.weight.grad))
    (o1, m1, gu1, gw1), (o2, m2, gu2, gw2) = results
    assert torch.equal(m1, m2) and 0 < int(m1[:, 1].sum()) < 64  # some, not all, tokens use the frozen expert
    assert torch.allclose(o1, o2, atol=1e-6)
    assert torch.allclose(gu1, gu2, atol=1e-6) and torch.allclose(gw1, gw2, atol=1e-6)
    with pytest.raises(ValueError, match="method.frozen_dispatch"):
        TokenMoE(dim=8, n_layers=1, n_learnable=1, hidden=4, scale=0.1, top_k=1, frozen_dispatch="sparse")


def test_dense_dispatch_model_matches_gather_in_the_slot():
    batch = tiny_batch()
    outs = []
    for dispatch in ("gather", "dense"):
        model = tiny_mpama(frozen_dispatch=dispatch)
        model.on_stage_end("mpa")
        model.set_stage("moe")
        with torch.no_grad():
            outs.append(model.eval()(batch.image, batch))
    assert torch.allclose(outs[0].anomaly_map, outs[1].anomaly_map, atol=1e-5)
    assert torch.equal(outs[0].extras["expert_share"], outs[1].extras["expert_share"])


def test_balance_is_one_under_uniform_routing_and_grows_under_collapse():
    moe = TokenMoE(dim=8, n_layers=2, n_learnable=4, hidden=4, scale=0.1, top_k=2, frozen_expert=False).eval()
    u = torch.randn(64, 8)
    with torch.no_grad():
        for router in moe.routers:
            router.w_gate.weight.zero_()  # equal logits: uniform router probabilities
    routings = [moe(i, u)[1] for i in range(2)]
    balance, z_loss, shares = routing_stats(routings)
    assert torch.allclose(balance, torch.tensor(1.0))
    assert torch.allclose(z_loss, torch.tensor(5.0).log() ** 2)
    assert shares.shape == (2, 5) and torch.allclose(shares.sum(1), torch.ones(2))
    ones = torch.ones(64, 8)
    with torch.no_grad():
        for router in moe.routers:
            router.w_gate.weight[1] = 5.0  # expert l0 dominates every token
    collapsed, _, shares = routing_stats([moe(i, ones)[1] for i in range(2)])
    assert collapsed > 2.0 and shares[:, 1].min() >= 0.5


def test_model_loss_adds_alpha_times_balance():
    model = tiny_mpama(balance_alpha=0.25, router_noise=False)
    model.on_stage_end("mpa")
    model.set_stage("moe")
    with torch.no_grad():
        for router in model.moe.routers:
            router.w_gate.weight.zero_()
    batch = tiny_batch()
    out = model.train()(batch.image, batch)
    terms = model.loss(out, batch)
    # stage moe optimises (and logs as `loss`) the segmentation terms and α·balance; the constant image CE is apart
    assert torch.allclose(terms["loss"], terms["seg"] + terms["balance"], atol=1e-5)
    assert out.extras["expert_share"].shape == (3, 6)
    stats = model.log_stats(out)
    assert set(stats) == {
        f"share/l{b}/{e}" for b in (2, 3, 4) for e in ["zero", "frozen", "l0", "l1", "l2", "l3"]
    }
    # device tensors (no host sync per step) holding the table's entries: layer block 3, expert "frozen"
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in stats.values())
    assert torch.equal(stats["share/l3/frozen"], out.extras["expert_share"][1, 1])


# --- MPAMA stages --------------------------------------------------------------------------------------------------


def test_slot_moe_changes_only_the_vv_tokens_of_later_blocks():
    model = tiny_mpama(moe_layers=[3])
    batch = tiny_batch()
    model.on_stage_end("mpa")
    model.eval()
    with torch.no_grad():
        model.set_stage("mpa")
        plain = model(batch.image, batch)
        model.set_stage("moe")
        moe = model(batch.image, batch)
    p0, p1 = plain.loss_inputs["probs"], moe.loss_inputs["probs"]
    assert torch.equal(p0[:, 0], p1[:, 0])  # tap 2 precedes the MoE block 3
    assert not torch.allclose(p0[:, 1], p1[:, 1])  # the frozen expert adds the block MLP at block 3
    assert torch.equal(
        plain.loss_inputs["logits"], moe.loss_inputs["logits"]
    )  # CLS / original path untouched


def test_stage_two_trains_only_routers_and_experts(monkeypatch):
    model = tiny_mpama()
    batch = tiny_batch()
    model.set_stage("mpa")
    assert not any(p.requires_grad for p in model.moe.parameters())
    model.on_stage_end("mpa")
    model.set_stage("moe")
    calls = count_text_calls(model, monkeypatch)
    assert not any(p.requires_grad for p in model.prompts.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, batch, steps=2, lr=1e-3)  # two steps: Down gets a gradient once Up ≠ 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert calls[0] == 0  # stage 2 never runs the text encoder
    assert all(k.startswith("moe.") for k in changed)
    for key in ["moe.experts.down", "moe.experts.up", *[f"moe.routers.{i}.w_gate.weight" for i in range(3)]]:
        assert key in changed


def test_mpama_stage_two_lowers_the_loss():
    model = tiny_mpama()
    batch = tiny_batch()
    model.on_stage_end("mpa")
    model.set_stage("moe")
    before = eval_loss(model, batch)
    train_steps(model, batch, steps=8, lr=1e-2)
    assert eval_loss(model, batch) < before - 1e-3


def test_stages_and_joint_switch():
    model = tiny_mpama()
    assert [(s.name, s.epochs, s.optim.lr) for s in model.stages()] == [("mpa", 15, 1e-3), ("moe", 5, 1e-4)]
    joint = tiny_mpama(joint=True)
    assert [s.name for s in joint.stages()] == ["joint"]
    joint.set_stage("joint")
    assert all(p.requires_grad for p in [*joint.prompts.parameters(), *joint.moe.parameters()])
    batch = tiny_batch()
    out = joint.train()(batch.image, batch)
    joint.loss(out, batch)["loss"].backward()
    assert joint.prompts.ctx.grad.abs().sum() > 0 and joint.moe.routers[0].w_gate.weight.grad.abs().sum() > 0


def test_after_placement_routes_projected_tokens():
    model = tiny_mpama(moe_placement="after", use_frozen_expert=False)
    assert model.moe.names == ["zero", "l0", "l1", "l2", "l3"]
    assert model.moe.experts.up.shape[-1] == model.clip.visual.embed_dim
    model.on_stage_end("mpa")
    model.set_stage("moe")
    batch = tiny_batch()
    out = model.train()(batch.image, batch)
    model.loss(out, batch)["loss"].backward()
    assert out.extras["expert_share"].shape == (3, 5)
    assert model.moe.experts.up.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="use_frozen_expert"):
        tiny_mpama(moe_placement="after")


def test_after_placement_tokens_are_unit_before_pooling():
    """F^l = normalise(f + MoE(f)): the levels average unit tokens, as for the plain V-V tokens."""
    model = tiny_mpama(moe_placement="after", use_frozen_expert=False, kernels=[3])
    model.on_stage_end("mpa")
    model.set_stage("moe")
    with torch.no_grad():
        model.moe.experts.up.normal_()  # a non-trivial adapter (Up starts at zero)
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        feats = model.clip.visual(batch.image, taps=(2, 3, 4), dpam_start=2)
        records: list = []
        tokens = model.tap_tokens(feats, records)
        out = model(batch.image, batch)
    assert len(records) == 3
    for f, f_new in zip(feats.patch_tokens, tokens):
        assert torch.allclose(f_new.norm(dim=-1), torch.ones(f_new.shape[:2]), atol=1e-5)
        assert not torch.allclose(f_new, f, atol=1e-3)
    text = model.prompts(model.clip.text)
    for t, z in enumerate(tokens):
        pooled = pool_level(z.transpose(1, 2).reshape(2, -1, 4, 4), 3)
        s = torch.softmax(torch.einsum("bdhw,cd->bchw", pooled, text[0]) / 0.07, dim=1)
        assert torch.allclose(out.loss_inputs["probs"][:, t, 0], s, atol=1e-5)


def test_stage_two_head_stays_float32_under_bf16_autocast():
    model = tiny_mpama()
    model.on_stage_end("mpa")
    model.set_stage("moe")
    batch = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(batch.image, batch)
        terms = model.loss(out, batch)
    assert out.anomaly_map.dtype == torch.float32 and out.loss_inputs["probs"].dtype == torch.float32
    assert terms["loss"].dtype == torch.float32 and out.extras["expert_share"].dtype == torch.float32


def test_bad_moe_layers_are_rejected():
    with pytest.raises(ValueError, match="method.moe_layers"):
        tiny_mpama(moe_layers=[1])  # before dpam_start: no V-V path there
    with pytest.raises(ValueError, match="method.top_k"):
        tiny_mpama(top_k=7)


def test_eval_text_cache_after_stage_one(monkeypatch):
    model = tiny_mpama()
    model.set_stage("mpa")
    calls = count_text_calls(model, monkeypatch)
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        model(batch.image, batch)
        model(batch.image, batch)
    assert calls[0] == 1


# --- configs: every YAML composes and builds ----------------------------------------------------------------------

ABLATIONS = {
    "mpa": [
        "mpa_levels1",
        "mpa_levels2",
        "mpa_levels4",
        "mpa_kernels_wide",
        "mpa_no_bridge",
        "mpa_bridge_score",
    ],
    "mpama": [
        "mpama_experts1",
        "mpama_experts2",
        "mpama_experts8",
        "mpama_top1",
        "mpama_no_zero_expert",
        "mpama_no_frozen_expert",
        "mpama_alpha0",
        "mpama_after_extraction",
        "mpama_joint",
        "mpama_zloss",
        "mpama_no_router_noise",
    ],
}
TINY_OVERRIDES = [
    "method.clip.name=tiny",
    "method.clip.pretrained=none",
    "method.image_size=56",
    "method.taps=[2,3,4]",
    "method.dpam_start=2",
]


def test_method_yamls_are_the_paper_configs():
    for name, schema in (("mpa", MPAConfig), ("mpama", MPAMAConfig)):
        cfg = compose([EXPERIMENTS / "methods" / f"{name}.yaml"])
        assert cfg.method.clip.name == "ViT-L-14-336-quickgelu" and cfg.method.clip.pretrained == "openai"
        assert OmegaConf.to_container(cfg.method) == OmegaConf.to_container(OmegaConf.structured(schema()))


@pytest.mark.parametrize("method,ablation", [(m, a) for m, abls in ABLATIONS.items() for a in abls])
def test_ablation_yamls_compose_and_build(method, ablation):
    layers = [EXPERIMENTS / "methods" / f"{method}.yaml", EXPERIMENTS / "ablations" / f"{ablation}.yaml"]
    base = compose(layers[:1])
    cfg = compose(layers, TINY_OVERRIDES)
    diff = {
        k
        for k in base.method
        if OmegaConf.to_container(base.method)[k] != OmegaConf.to_container(cfg.method)[k]
    }
    assert diff - {"clip", "image_size", "taps", "dpam_start"}, f"{ablation} changes nothing"
    model = build_method(cfg.method)
    assert [s.name for s in model.stages()] == (
        ["mpa"] if method == "mpa" else ["joint"] if ablation == "mpama_joint" else ["mpa", "moe"]
    )
