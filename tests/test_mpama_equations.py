"""Every equation of ``specs/mpama.md`` (MPA levels, bridge, losses; MoE router, experts, slot/after placement,
balance and z losses; what each stage trains), computed independently in the test (hand values, loops, explicit
formulas) on the tiny preset and compared with zsad.
"""

from __future__ import annotations

import math

import pytest
import torch
from clip_reference import (
    SIZE,
    TAPS,
    T,
    ref_ce,
    ref_level_probs,
    ref_prompt_features,
    ref_seg_loss,
    ref_test_map,
    tiny_batch,
    tiny_cfg,
    unit,
)

from zsad.methods.mpama import MPA, MPAMA, MPAConfig, MPAMAConfig, NoisyTopKRouter, TokenMoE, routing_stats
from zsad.methods.mpama.moe import Routing

# --- hand-written elementwise maths --------------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log(1 + torch.exp(x))


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def block_mlp(block, u: torch.Tensor) -> torch.Tensor:
    """The frozen expert: CLIP block's own MLP (QuickGELU in the OpenAI recipe the tiny preset follows)."""
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    return quick_gelu(u @ fc.weight.T + fc.bias) @ proj.weight.T + proj.bias


def learnable_expert(experts, k: int, u: torch.Tensor) -> torch.Tensor:
    """E_k(u) = s · Up_k(GELU(Down_k(u)))."""
    h = gelu(u @ experts.down[k] + experts.down_bias[k])
    return experts.scale * (h @ experts.up[k] + experts.up_bias[k])


def ref_topk_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's k largest logits, softmax over them, zero elsewhere (a loop over tokens)."""
    logits = logits.detach()
    gates = torch.zeros_like(logits)
    for t, row in enumerate(logits):
        idx = sorted(range(len(row)), key=lambda e: -float(row[e]))[:k]
        z = sum(math.exp(float(row[e])) for e in idx)
        for e in idx:
            gates[t, e] = math.exp(float(row[e])) / z
    return gates, gates > 0


def ref_moe(moe: TokenMoE, layer: int, u: torch.Tensor, frozen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{e ∈ top-k} g_e(u) E_e(u) with router ``layer``'s clean logits, token by token: (out, gates)."""
    logits = u @ moe.routers[layer].w_gate.weight.T
    gates, _ = ref_topk_gates(logits, moe.routers[layer].top_k)
    out = torch.zeros_like(u)
    for t in range(u.shape[0]):
        for e, name in enumerate(moe.names):
            if gates[t, e] == 0 or name == "zero":  # the zero expert takes a slot and adds nothing
                continue
            y = (
                frozen(u[t : t + 1])
                if name == "frozen"
                else learnable_expert(moe.experts, int(name[1:]), u[t : t + 1])
            )
            out[t] += gates[t, e] * y[0]
    return out, gates


def ref_balance(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E · Σ_e f_e P̄_e with f_e = (token-slot assignments to e) / (T·k) and P̄_e the mean router probability."""
    n_tokens, n_experts = probs.shape
    slots = int(mask.sum())
    total = 0.0
    for e in range(n_experts):
        f = int(mask[:, e].sum()) / slots
        p = float(probs[:, e].sum()) / n_tokens
        total += f * p
    return torch.tensor(n_experts * total)


# --- builders ------------------------------------------------------------------------------------------------------


def _randomise_prompts(model) -> None:
    with torch.no_grad():
        model.prompts.ctx.normal_(0, 0.5)
        model.prompts.deep.normal_(0, 0.5)


def tiny_mpa(**kw) -> MPA:
    torch.manual_seed(0)
    model = MPA(tiny_cfg(MPAConfig, **kw))
    _randomise_prompts(model)
    return model


def tiny_mpama(**kw) -> MPAMA:
    """MPAMA with non-trivial prompts, experts (Up starts at zero), s = 0.37 and LayerNorms (LN1 ≠ LN2 ≠ id)."""
    torch.manual_seed(0)
    model = MPAMA(tiny_cfg(MPAMAConfig, **{"expert_scale": 0.37, **kw}))
    _randomise_prompts(model)
    with torch.no_grad():
        for p in model.moe.parameters():
            p.normal_(0, 0.3)
        for block in model.clip.visual.blocks:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.2)
    return model


def text_pairs(model) -> torch.Tensor:
    """Independent features of every prompt set of the model: [P + 1, 2, D] (levels, then the global pair)."""
    with torch.no_grad():
        return ref_prompt_features(model.clip.text.tower, model.prompts.ctx, model.prompts.deep)


def ref_bridge(pairs: torch.Tensor) -> torch.Tensor:
    """t_c^G = normalise(element-wise max over g_c, t_c^1..t_c^P), written as a chain of maxima."""
    out = pairs[-1]
    for p in range(pairs.shape[0] - 1):
        out = torch.maximum(out, pairs[p])
    return unit(out)


def ref_global_logits(embedding: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    g = unit(embedding.double())
    return torch.stack([(g * pair[c].double()).sum(-1) for c in range(2)], -1).float() / T


def moe_stage(model: MPAMA) -> MPAMA:
    model.on_stage_end("mpa")
    model.set_stage("moe")
    return model


def capture_routings(model, monkeypatch) -> list[list[Routing]]:
    """Spy on ``routing_outputs``: the Routing records of each forward."""
    seen: list[list[Routing]] = []
    original = model.routing_outputs

    def spy(records):
        seen.append(list(records))
        return original(records)

    monkeypatch.setattr(model, "routing_outputs", spy)
    return seen


def count_text_calls(model, monkeypatch) -> list[int]:
    calls = [0]
    original = model.clip.text.encode_embeddings

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model.clip.text, "encode_embeddings", counted)
    return calls


# --- MPA: levels, bridge, score, loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_mpa_levels_bridge_map_and_score(sigma):
    """S^{l,p} = softmax_c(⟨AvgPool_{r_p}(F^l)_i renormalised, t_c^p⟩/T); the test map is the mean over l, p of
    (S_a + 1 − S_n)/2 (bilinear, Gaussian σ); the image score is the anomalous probability of g against t^G."""
    model = tiny_mpa(smoothing_sigma=sigma).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        feats = model.clip.visual(batch.image, taps=TAPS, dpam_start=2)
    pairs = text_pairs(model)
    probs = ref_level_probs(feats.patch_tokens, [1, 3, 5], pairs[:3])
    torch.testing.assert_close(out.loss_inputs["probs"], probs, atol=1e-5, rtol=1e-4)
    logits = ref_global_logits(feats.global_embedding, ref_bridge(pairs))
    torch.testing.assert_close(out.loss_inputs["logits"], logits, atol=1e-4, rtol=1e-4)
    e = torch.exp(logits.double())
    torch.testing.assert_close(out.image_score, (e[:, 1] / e.sum(1)).float(), atol=1e-5, rtol=1e-4)
    want = ref_test_map(probs, sigma, "mean")
    torch.testing.assert_close(out.anomaly_map, want, atol=1e-5, rtol=1e-4)


def test_bridge_hand_values():
    from zsad.methods.mpama import cross_level_bridge

    g = torch.tensor([[0.1, -2.0, 0.5], [1.0, 0.0, -1.0]])  # g wins [0, 2] and [1, 2]: it must take part
    local = torch.tensor([[[0.3, -3.0, 0.2], [0.0, 0.5, -2.0]], [[-1.0, 1.0, 0.4], [2.0, -1.0, -1.5]]])
    want = torch.tensor([[0.3, 1.0, 0.5], [2.0, 0.5, -1.0]])
    want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(cross_level_bridge(g, local), want)


def test_mpa_without_bridge_scores_with_the_global_pair_alone():
    model = tiny_mpa(bridge="none").eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        g = model.clip.visual(batch.image, taps=TAPS, dpam_start=2).global_embedding
    torch.testing.assert_close(
        out.loss_inputs["logits"], ref_global_logits(g, text_pairs(model)[3]), atol=1e-4, rtol=1e-4
    )


def test_mpa_score_level_bridge_is_max_of_global_probability_and_top_one_percent_mean():
    model = tiny_mpa(bridge="score_max", smoothing_sigma=1.0).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        g = model.clip.visual(batch.image, taps=TAPS, dpam_start=2).global_embedding
    logits = ref_global_logits(g, text_pairs(model)[3])  # the global pair alone scores g
    torch.testing.assert_close(out.loss_inputs["logits"], logits, atol=1e-4, rtol=1e-4)
    e = torch.exp(logits.double())
    glob = (e[:, 1] / e.sum(1)).tolist()
    for m, s, gp in zip(out.anomaly_map, out.image_score.tolist(), glob):
        top = sorted(m.flatten().tolist(), reverse=True)[: round(0.01 * SIZE * SIZE)]  # 31 of 3136 pixels
        assert s == pytest.approx(max(gp, sum(top) / len(top)), abs=1e-6)


def test_mpa_loss_sums_taps_and_levels_plus_bridged_image_ce():
    """λ Σ_l Σ_p [Focal + Dice(S_a, G) + Dice(S_n, 1 − G)] + CE(⟨g, t^G⟩/T, y), λ = 1.5 here."""
    model = tiny_mpa(seg_weight=1.5, kernels=[1, 3]).train()
    batch = tiny_batch()
    terms = model.loss(model(batch.image, batch), batch)
    with torch.no_grad():
        feats = model.clip.visual(batch.image, taps=TAPS, dpam_start=2)
    pairs = text_pairs(model)
    seg = ref_seg_loss(ref_level_probs(feats.patch_tokens, [1, 3], pairs[:2]), batch.gt)
    ce = ref_ce(ref_global_logits(feats.global_embedding, ref_bridge(pairs)), batch.label)
    assert float(terms["seg"]) == pytest.approx(float(seg), rel=2e-5)
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=2e-5)
    assert float(terms["loss"].detach()) == pytest.approx(1.5 * float(seg) + float(ce), rel=2e-5)


# --- MoE units: router, experts, balance, z-loss -------------------------------------------------------------------------


def test_router_logits_noise_topk_softmax(monkeypatch):
    """h = W_r u; training adds ε·softplus(W_noise u); keep the top-2, softmax over them, zero the rest."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 6, 2)
    with torch.no_grad():
        router.w_noise.weight.normal_(0, 1.0)  # softplus(W u) far from W u: negative pre-activations matter
    u = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(torch, "randn_like", lambda like, **kw: eps.to(like.dtype))
    clean = u @ router.w_gate.weight.T
    for training, noisy in ((True, True), (False, True), (True, False)):
        router.noisy = noisy
        r = router.train(training)(u)
        want = clean + eps * softplus(u @ router.w_noise.weight.T) if training and noisy else clean
        torch.testing.assert_close(r.logits, want, atol=1e-6, rtol=1e-5)
        gates, mask = ref_topk_gates(want, 2)
        torch.testing.assert_close(r.gates, gates, atol=1e-6, rtol=1e-5)
        assert torch.equal(r.mask, mask)
        e = torch.exp(want)
        torch.testing.assert_close(r.probs, e / e.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_topk_hand_values():
    router = NoisyTopKRouter(4, 4, 2, noisy=False).eval()
    with torch.no_grad():
        router.w_gate.weight.copy_(torch.eye(4))
    r = router(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
    a = math.e / (math.e + 1)  # softmax of (3, 2)
    torch.testing.assert_close(r.gates, torch.tensor([[0.0, a, 1 - a, 0.0]]))


def test_moe_is_the_gated_sum_of_zero_frozen_and_scaled_shared_bottleneck_experts():
    """Σ_{e ∈ TopK} g_e E_e(u): E_0 = 0, E_frozen = the given MLP, E_k = s·Up_k(GELU(Down_k u)) (s = 0.37),
    the K learnable experts shared by every layer, each layer with its own router."""
    torch.manual_seed(0)
    moe = TokenMoE(dim=8, n_layers=2, n_learnable=3, hidden=5, scale=0.37, top_k=2).eval()
    assert moe.names == ["zero", "frozen", "l0", "l1", "l2"]
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    u = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in (0, 1):
            out, r = moe(layer, u, mlp)
            want, gates = ref_moe(moe, layer, u, mlp)
            torch.testing.assert_close(r.gates, gates, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
            assert (gates > 0).sum(0).min() > 0  # every expert, zero and frozen included, is used somewhere


@pytest.mark.parametrize("dispatch", ["gather", "dense"])
def test_frozen_expert_is_the_block_mlp_on_ln2_tokens(dispatch):
    model = tiny_mpama(frozen_dispatch=dispatch, moe_layers=[3])
    moe, block = model.moe.eval(), model.clip.visual.blocks[2]
    u = torch.randn(30, model.clip.visual.width, generator=torch.Generator().manual_seed(0))
    from zsad.methods.mpama.mpama import frozen_mlp

    with torch.no_grad():
        torch.testing.assert_close(frozen_mlp(block, u), block_mlp(block, u), atol=1e-5, rtol=1e-4)
        out, _ = moe(0, u, lambda x: frozen_mlp(block, x))
        want, _ = ref_moe(moe, 0, u, lambda x: block_mlp(block, x))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_learnable_experts_start_at_zero_with_the_configured_bottleneck():
    torch.manual_seed(0)
    model = MPAMA(tiny_cfg(MPAMAConfig, n_experts=3, expert_hidden=7, moe_layers=[3, 4]))
    ex, width = model.moe.experts, model.clip.visual.width
    assert ex.down.shape == (3, width, 7) and ex.up.shape == (3, 7, width) and ex.scale == 0.1
    assert not ex.up.any() and not ex.up_bias.any()  # Up zero-initialised: stage 2 starts from MPA's maps
    assert model.moe.names == ["zero", "frozen", "l0", "l1", "l2"] and len(model.moe.routers) == 2
    assert model.moe.routers[0].w_gate.weight.shape == (5, width)


def test_balance_and_z_loss_hand_values():
    """L_bal = E · Σ_e f_e P̄_e (f over the T·k token slots, P̄ the full-softmax mean), averaged over layers;
    z = mean_t (logsumexp h)², averaged over layers; shares = f per layer. A wrong normalisation of f (by T, not
    T·k) doubles the value; P̄ from the top-k gates instead of the full softmax moves it too."""
    router = NoisyTopKRouter(3, 3, 2, noisy=False).eval()
    with torch.no_grad():
        router.w_gate.weight.copy_(torch.eye(3))
    h1 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    h2 = torch.tensor([[0.0, 0.5, 4.0], [0.0, 1.0, 2.0], [1.0, 0.0, 5.0], [0.5, 0.0, 3.0]])
    with torch.no_grad():
        layers = [router(h1), router(h2)]
    balance, z_loss, shares = routing_stats(layers)
    # top-2 sets — layer 1: {0,1} {1,2} {0,2} {0,1} → slots (3, 3, 2) of 8; layer 2: {1,2} {1,2} {0,2} {0,2} → (2, 2, 4)
    fs = [[3 / 8, 3 / 8, 2 / 8], [2 / 8, 2 / 8, 4 / 8]]
    bal, zs = [], []
    for f, h in zip(fs, (h1, h2)):
        rows = h.tolist()
        p_bar = [sum(math.exp(r[e]) / sum(math.exp(v) for v in r) for r in rows) / 4 for e in range(3)]
        bal.append(3 * sum(fe * pe for fe, pe in zip(f, p_bar)))
        zs.append(sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / 4)
    assert float(balance) == pytest.approx(sum(bal) / 2, rel=1e-6)
    assert float(z_loss) == pytest.approx(sum(zs) / 2, rel=1e-6)
    torch.testing.assert_close(shares, torch.tensor(fs))
    for r in layers:  # the inputs separate P̄ of the full softmax from P̄ of the gates
        assert abs(float(ref_balance(r.gates, r.mask)) - float(ref_balance(r.probs, r.mask))) > 1e-3


# --- MPAMA in the model: slot placement, after placement --------------------------------------------------------------


def test_slot_moe_reads_ln2_of_the_vv_tokens_and_leaves_cls_untouched():
    """The ``vv_mlp`` residual at MoE block l: [0 (CLS); Σ g_e E_e(u)], u = LN2_l(x) of the patch tokens, with the
    router of that MoE layer."""
    model = moe_stage(tiny_mpama(moe_layers=[3, 4])).eval()
    x = torch.randn(2, 17, model.clip.visual.width, generator=torch.Generator().manual_seed(0))
    for pos, block_idx in enumerate([3, 4]):
        block = model.clip.visual.blocks[block_idx - 1]
        records: list = []
        with torch.no_grad():
            delta = model._slot_moe(records, block_idx, block, x)
            u = layer_norm(x[:, 1:], block.ln_2).flatten(0, 1)
            want, gates = ref_moe(model.moe, pos, u, lambda t, b=block: block_mlp(b, t))
        assert len(records) == 1 and torch.equal(records[0].mask, gates > 0)
        assert torch.equal(delta[:, 0], torch.zeros_like(delta[:, 0]))
        torch.testing.assert_close(delta[:, 1:].flatten(0, 1), want, atol=1e-5, rtol=1e-4)
    assert model._slot_moe([], 2, model.clip.visual.blocks[1], x) is None  # no MoE at block 2


def test_slot_moe_residual_joins_the_vv_path_before_the_next_tap(monkeypatch):
    """x^l ← x^l + VVAttn^l(LN1(x_ori)) + MoE^l: VVAttn reads x_ori only, so the V-V input of block 4 moves by
    exactly block 3's MoE residual; tap l = normalise(ln_post(x^l) @ proj); CLS / global embedding untouched."""
    model = moe_stage(tiny_mpama(moe_layers=[3])).eval()
    seen: dict[int, torch.Tensor] = {}

    def vv_mlp(tag: str, block_idx: int, block, x):
        seen[(tag, block_idx)] = x.clone()
        if tag == "plain":
            return None
        d = model._slot_moe([], block_idx, block, x)
        if d is not None:
            seen[("delta", block_idx)] = d
        return d

    images = tiny_batch().image
    visual = model.clip.visual
    with torch.no_grad():
        plain = visual(images, taps=TAPS, dpam_start=2, vv_mlp=lambda *a: vv_mlp("plain", *a))
        moe = visual(images, taps=TAPS, dpam_start=2, vv_mlp=lambda *a: vv_mlp("moe", *a))
        out = model(images)
        model.set_stage("mpa")
        base = model(images)
    torch.testing.assert_close(
        seen[("moe", 3)], seen[("plain", 3)]
    )  # the MoE block reads the unchanged V-V input
    torch.testing.assert_close(
        seen[("moe", 4)] - seen[("plain", 4)], seen[("delta", 3)], atol=1e-5, rtol=1e-4
    )
    vit = visual.vit
    x3 = seen[("moe", 3)] + seen[("delta", 3)]
    tap3 = unit(layer_norm(x3[:, 1:], vit.ln_post) @ vit.proj)
    torch.testing.assert_close(moe.patch_tokens[1], tap3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.patch_tokens[0], plain.patch_tokens[0])  # tap 2 precedes the MoE
    torch.testing.assert_close(moe.global_embedding, plain.global_embedding)
    # the model's forward in stage moe is this backbone call
    pairs = text_pairs(model)
    probs = ref_level_probs(moe.patch_tokens, [1, 3, 5], pairs[:3])
    torch.testing.assert_close(out.loss_inputs["probs"], probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss_inputs["logits"], base.loss_inputs["logits"])
    assert not torch.allclose(out.loss_inputs["probs"][:, 1:], base.loss_inputs["probs"][:, 1:], atol=1e-3)


def test_after_placement_is_renormalised_residual_moe_on_each_tap():
    """f' = normalise(f + Σ g_e E_e(f)) on the projected tapped tokens, router l for tap l, then the levels."""
    model = moe_stage(tiny_mpama(moe_placement="after", use_frozen_expert=False)).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        feats = model.clip.visual(batch.image, taps=TAPS, dpam_start=2)
    tokens = []
    for pos, f in enumerate(feats.patch_tokens):
        delta, _ = ref_moe(model.moe, pos, f.flatten(0, 1))
        tokens.append(unit(f + delta.view_as(f)))
    probs = ref_level_probs(tokens, [1, 3, 5], text_pairs(model)[:3])
    torch.testing.assert_close(out.loss_inputs["probs"], probs, atol=1e-5, rtol=1e-4)
    want = ref_test_map(probs, 0.0, "mean")
    torch.testing.assert_close(out.anomaly_map, want, atol=1e-5, rtol=1e-4)


# --- stages: what trains, which loss terms -------------------------------------------------------------------------------


def _grads(model) -> dict[str, bool]:
    return {
        "prompts": any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompts.parameters()),
        "moe": any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.moe.parameters()),
        "clip": any(p.grad is not None for p in model.clip.parameters()),
    }


def test_stage_one_is_mpa_prompts_only_no_moe(monkeypatch):
    model = tiny_mpama(seg_weight=1.5)
    model.set_stage("mpa")
    seen = capture_routings(model, monkeypatch)
    batch = tiny_batch()
    out = model.train()(batch.image, batch)
    terms = model.loss(out, batch)
    terms["loss"].backward()
    assert seen == [[]] and "balance" not in terms  # no MoE in the forward, no MoE loss terms
    with torch.no_grad():
        feats = model.clip.visual(batch.image, taps=TAPS, dpam_start=2)
    pairs = text_pairs(model)
    seg = ref_seg_loss(ref_level_probs(feats.patch_tokens, [1, 3, 5], pairs[:3]), batch.gt)
    ce = ref_ce(ref_global_logits(feats.global_embedding, ref_bridge(pairs)), batch.label)
    assert float(terms["loss"].detach()) == pytest.approx(1.5 * float(seg) + float(ce), rel=2e-5)
    assert _grads(model) == {"prompts": True, "moe": False, "clip": False}


@pytest.mark.parametrize("placement", ["slot", "after"])
def test_stage_two_trains_moe_only_on_seg_plus_balance_plus_z(monkeypatch, placement):
    """Frozen prompts (cached text, no text encoder); loss = λ·seg + α·L_bal + w_z·z; the image CE, constant in this
    stage (CLS path and text both frozen), is logged as ``ce`` but is not part of the optimised loss."""
    kw = dict(use_frozen_expert=False) if placement == "after" else {}
    model = moe_stage(
        tiny_mpama(seg_weight=1.5, balance_alpha=0.3, z_loss_weight=0.02, moe_placement=placement, **kw)
    )
    calls = count_text_calls(model, monkeypatch)
    seen = capture_routings(model, monkeypatch)
    batch = tiny_batch()
    out = model.train()(batch.image, batch)
    terms = model.loss(out, batch)
    terms["loss"].backward()
    assert calls[0] == 0
    routings = seen[0]
    assert len(routings) == 3
    balance = sum(float(ref_balance(r.probs, r.mask)) for r in routings) / 3
    z = sum(float((torch.logsumexp(r.logits, -1) ** 2).mean()) for r in routings) / 3
    seg = ref_seg_loss(out.loss_inputs["probs"].detach(), batch.gt)
    with torch.no_grad():
        g = model.clip.visual(batch.image, taps=TAPS, dpam_start=2).global_embedding
    ce = ref_ce(ref_global_logits(g, ref_bridge(text_pairs(model))), batch.label)
    assert not out.loss_inputs["logits"].requires_grad  # why the CE is left out: nothing it reads trains
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=2e-5)
    assert float(terms["balance"]) == pytest.approx(0.3 * balance, rel=1e-5)
    assert float(terms["z_loss"]) == pytest.approx(0.02 * z, rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(
        1.5 * float(seg) + 0.3 * balance + 0.02 * z, rel=2e-5
    )
    assert _grads(model) == {"prompts": False, "moe": True, "clip": False}
    assert not any(p.requires_grad for p in model.prompts.parameters())


def test_joint_stage_trains_everything_on_all_terms(monkeypatch):
    model = tiny_mpama(joint=True, balance_alpha=0.3, z_loss_weight=0.02)
    model.set_stage("joint")
    seen = capture_routings(model, monkeypatch)
    batch = tiny_batch()
    out = model.train()(batch.image, batch)
    terms = model.loss(out, batch)
    terms["loss"].backward()
    routings = seen[0]
    balance = sum(float(ref_balance(r.probs, r.mask)) for r in routings) / 3
    z = sum(float((torch.logsumexp(r.logits, -1) ** 2).mean()) for r in routings) / 3
    seg = ref_seg_loss(out.loss_inputs["probs"].detach(), batch.gt)
    ce = ref_ce(out.loss_inputs["logits"].detach(), batch.label)
    want = float(seg) + float(ce) + 0.3 * balance + 0.02 * z
    assert float(terms["loss"].detach()) == pytest.approx(want, rel=2e-5)
    assert _grads(model) == {"prompts": True, "moe": True, "clip": False}


def test_stage_two_inference_is_deterministic_and_uses_the_frozen_prompts():
    """Eval: no router noise; the text features are those cached when stage mpa ended."""
    model = moe_stage(tiny_mpama()).eval()
    pairs = text_pairs(model)
    with torch.no_grad():
        model.prompts.ctx.add_(1.0)  # a prompt change after stage mpa must not reach stage moe's text
    batch = tiny_batch()
    with torch.no_grad():
        a, b = model(batch.image, batch), model(batch.image, batch)
        g = model.clip.visual(batch.image, taps=TAPS, dpam_start=2).global_embedding
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(
        a.loss_inputs["logits"], ref_global_logits(g, ref_bridge(pairs)), atol=1e-4, rtol=1e-4
    )
