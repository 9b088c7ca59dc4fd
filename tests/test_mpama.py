"""MPA / MPAMA on the tiny CLIP preset: levels, bridge, routers, experts, balance, stages, learning, configs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import EXPERIMENTS, compose
from zsad.methods.mpama import (
    MPA,
    MPAMA,
    MPAConfig,
    MPAMAConfig,
    NoisyTopKRouter,
    TokenMoE,
)
from zsad.registry import build_method

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


# --- MPA ---------------------------------------------------------------------------------------------------------


def test_mpa_bad_bridge_and_kernels_are_rejected():
    with pytest.raises(ValueError, match="method.kernels"):
        tiny_mpa(kernels=[1, 4])
    with pytest.raises(ValueError, match="method.bridge"):
        tiny_mpa(bridge="score_max", score_rule="max")


def test_mpa_encodes_all_prompt_sets_in_one_text_call(monkeypatch):
    model = tiny_mpa().train()
    calls = count_text_calls(model, monkeypatch)
    batch = tiny_batch()
    model.loss(model(batch.image, batch), batch)["loss"].backward()
    assert calls[0] == 1  # all P + 1 prompt sets in one text-encoder call per step


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


def test_router_is_float32_under_bf16_autocast():
    """bf16 routing logits would tie in the top-k: under autocast they equal the float32 computation."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(64, 6, 2, noisy=False)
    u = torch.randn(50, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(u.bfloat16())
    want = u.bfloat16().float() @ router.w_gate.weight.t()
    torch.testing.assert_close(r.logits, want, atol=1e-6, rtol=1e-6)


def test_moe_every_vv_block_puts_a_router_in_every_vv_block_up_to_the_last_tap():
    model = tiny_mpama(taps=[2, 4], moe_every_vv_block=True)
    assert model.moe_blocks == [2, 3, 4] and len(model.moe.routers) == 3
    assert tiny_mpama(taps=[2, 4]).moe_blocks == [2, 4]
    model.on_stage_end("mpa")
    model.set_stage("moe")
    blocks: list[int] = []
    original = model._slot_moe

    def spy(records, block_idx, block, x):
        out = original(records, block_idx, block, x)
        if out is not None:
            blocks.append(block_idx)
        return out

    model._slot_moe = spy
    batch = tiny_batch()
    with torch.no_grad():
        model.eval()(batch.image, batch)
    assert blocks == [2, 3, 4]


def test_bad_moe_layers_are_rejected():
    with pytest.raises(ValueError, match="method.moe_layers"):
        tiny_mpama(moe_layers=[1])  # before dpam_start: no V-V path there
    with pytest.raises(ValueError, match="method.moe_every_vv_block"):
        tiny_mpama(moe_layers=[3], moe_every_vv_block=True)
    with pytest.raises(ValueError, match="moe_every_vv_block"):
        tiny_mpama(moe_placement="after", use_frozen_expert=False, moe_every_vv_block=True)
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
    method: sorted(p.stem for p in (EXPERIMENTS / "ablations").glob(f"{method}_*.yaml"))
    for method in ("mpa", "mpama")
}
TINY_OVERRIDES = [
    "method.clip.name=tiny",
    "method.clip.pretrained=none",
    "method.image_size=56",
    "method.taps=[2,3,4]",
    "method.dpam_start=2",
]


def test_method_yamls_are_the_spec_configs():
    """The schema defaults (the one home of the paper configs) hold the spec's numbers (mpama.md on clip_substrate.md)."""
    for schema in (MPAConfig, MPAMAConfig):
        m = OmegaConf.structured(schema())
        assert m.clip.name == "ViT-L-14-336-quickgelu" and m.clip.pretrained == "openai"
        assert (m.image_size, list(m.taps), m.dpam_start, m.temperature, m.smoothing_sigma) == (
            518,
            [6, 12, 18, 24],
            6,
            0.07,
            4.0,
        )
        assert (m.n_ctx, m.deep_depth, m.deep_len, m.both_dice, m.seg_weight) == (12, 9, 4, True, 1.0)
        assert (list(m.kernels), m.bridge, m.score_rule, m.batch_size) == ([1, 3, 5], "max", "global", 8)
        mpa = m.stages.mpa
        assert (mpa.epochs, mpa.optim.name, mpa.optim.lr, list(mpa.optim.betas)) == (
            15,
            "adam",
            1e-3,
            [0.5, 0.999],
        )
    m = compose([EXPERIMENTS / "methods" / "mpama.yaml"]).method
    assert (m.n_experts, m.expert_hidden, m.expert_scale, m.top_k) == (4, 64, 0.1, 2)
    assert (m.use_zero_expert, m.use_frozen_expert, m.router_noise, m.balance_alpha) == (
        True,
        True,
        True,
        0.01,
    )
    assert (m.moe_placement, m.moe_layers, m.moe_every_vv_block, m.joint) == ("slot", None, False, False)
    assert (m.stages.moe.epochs, m.stages.moe.optim.lr) == (5, 1e-4)


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
