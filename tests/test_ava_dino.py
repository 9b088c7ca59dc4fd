"""AVA-DINO: parameter count, routing, regulariser, prototypes, standardisation, cache, loss, training, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import compose
from zsad.maps import gaussian_blur
from zsad.methods.ava_dino import (
    AvaDino,
    AvaDinoConfig,
    AvaDinoHeads,
    routing_loss,
    stack_prompts,
    standardise,
)
from zsad.methods.base import build_optimizer
from zsad.prompts.ensemble import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, state_sentences

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
TINY_D, TINY_DT, TINY_H, TINY_L = 64, 32, 16, 4  # tiny DINOv3 width, tiny CLIP text embed dim, hidden, taps


def expected_trainable(
    d: int, dt: int, h: int, taps: int, shared=False, cls_adapt=True, learn_tau=False
) -> int:
    """Parameters AVA-DINO trains, from the spec: every one of them receives a gradient."""
    sets = 1 if shared else taps
    adapter = d * h + h * d  # W1 (D→h) + W2 (h→D), no biases
    n = sets * 2 * adapter  # patch adapters A_n, A_a
    if cls_adapt:
        n += sets * 2 * adapter  # CLS adapters C_n, C_a
    n += 2 * dt * dt  # prompt adapters: only the hidden layer W1 (d_t→d_t) is used
    n += d * dt  # P (text → DINO), no bias
    return n + int(learn_tau)


def _cfg(**method):
    cfg = OmegaConf.structured(AvaDinoConfig(image_size=64, taps=[1, 2, 3, 4], hidden=TINY_H))
    cfg.vision.name, cfg.vision.pretrained = "tiny", "none"
    cfg.text.name, cfg.text.pretrained = "tiny", "none"
    for k, v in method.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def _model(seed: int = 0, **method) -> AvaDino:
    torch.manual_seed(seed)
    return AvaDino(_cfg(**method))


def _batch(names=("bottle",) * 4) -> Batch:
    g = torch.Generator().manual_seed(1)
    b = len(names)
    mask = torch.zeros(b, 1, 64, 64, dtype=torch.bool)
    mask[b // 2 :, :, 8:40, 16:48] = True
    labels = torch.tensor([0] * (b // 2) + [1] * (b - b // 2))
    return Batch(
        torch.randn(b, 3, 64, 64, generator=g), mask, labels, ["c"] * b, list(names), ["d"] * b, ["p"] * b
    )


# --- parameter count ---------------------------------------------------------------------------------------------


def test_paper_trainable_count_without_building_backbones():
    with torch.device("meta"):  # shapes only: no ViT-L, no 27 M floats allocated
        heads = AvaDinoHeads(width=1024, text_dim=768, hidden=768, n_taps=4)
    n = sum(p.numel() for p in heads.parameters() if p.requires_grad)
    assert n == expected_trainable(1024, 768, 768, 4)
    assert 27.0e6 < n < 27.2e6  # the spec's ≈ 27.1 M that receive gradients
    # the reference also declares W2 of both prompt adapters (never used): 28.3 M
    assert round((n + 2 * 768 * 768) / 1e6, 1) == 28.3


@pytest.mark.parametrize(
    ("switches", "formula"),
    [
        (dict(shared_adapters=True), dict(shared=True)),
        (dict(cls_adapt=False), dict(cls_adapt=False)),
        (dict(learn_tau=True), dict(learn_tau=True)),
        (dict(routing="uniform"), dict()),
    ],
)
def test_ablation_trainable_counts(switches, formula):
    with torch.device("meta"):
        heads = AvaDinoHeads(width=384, text_dim=768, hidden=768, n_taps=4, **switches)
    assert sum(p.numel() for p in heads.parameters()) == expected_trainable(384, 768, 768, 4, **formula)


def test_every_trainable_parameter_receives_gradient_and_backbones_none():
    m = _model()
    m.set_stage("main")
    m.train()
    batch = _batch()
    m.loss(m(batch.image, batch), batch)["loss"].backward()
    trainable = m.trainable_candidates()
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert sum(p.numel() for p in with_grad) == sum(p.numel() for p in trainable)
    assert sum(p.numel() for p in trainable) == expected_trainable(TINY_D, TINY_DT, TINY_H, TINY_L)
    assert all(p.grad is None and not p.requires_grad for p in [*m.vision.parameters(), *m.text.parameters()])
    assert not any(k.startswith(("vision.", "text.")) for k in m.trainable_state_dict())


# --- routing -------------------------------------------------------------------------------------------------------


def _heads(seed=0, **kw) -> AvaDinoHeads:
    torch.manual_seed(seed)
    return AvaDinoHeads(width=8, text_dim=6, hidden=4, n_taps=3, **kw)


def _routing_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 8, generator=g), torch.randn(5, 2, 6, generator=g)


def test_routing_is_softmax_of_cosines_over_tau_and_sharpens():
    cls, text = _routing_inputs()
    sharp, soft = _heads(tau=0.05), _heads(tau=1.0)  # same seed: same P
    w = _heads(tau=0.1).route(cls, text)
    assert w.shape == (5, 3, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 3))
    p = _heads().text_proj.weight  # [8, 6]
    u = F.normalize(text @ p.T, dim=-1)  # [5, 2, 8]
    cos = (F.normalize(cls, dim=-1)[:, :, None, :] * u[:, None]).sum(-1)  # [5, 3, 2]
    torch.testing.assert_close(w, torch.softmax(cos / 0.1, dim=-1))
    w_sharp, w_soft = sharp.route(cls, text), soft.route(cls, text)
    assert (w_sharp.amax(-1) > w_soft.amax(-1)).all()
    assert (w_sharp.argmax(-1) == w_soft.argmax(-1)).all()


def test_uniform_routing_is_half_half():
    cls, text = _routing_inputs()
    w = _heads(routing="uniform").route(cls, text)
    assert torch.equal(w, torch.full((5, 3, 2), 0.5))


def test_learned_tau_gets_gradient():
    cls, text = _routing_inputs()
    heads = _heads(learn_tau=True, tau=0.1)
    assert float(heads.tau.detach()) == pytest.approx(0.1)
    heads.route(cls, text)[..., 1].pow(2).sum().backward()
    assert heads.log_tau.grad is not None and heads.log_tau.grad.abs() > 0


def test_unknown_routing_names_the_key():
    with pytest.raises(ValueError, match="method.routing"):
        _heads(routing="topk")


def test_routing_regulariser_formula_by_hand():
    # B = 2 images, L = 2 taps: w̄ = mean over taps
    w = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.1, 0.9]]])
    y = torch.tensor([0, 1])
    # w̄_n = [0.7, 0.2], w̄_a = [0.3, 0.8]
    # MSE(w̄_n, 1 - y) = ((0.7-1)² + (0.2-0)²)/2 = (0.09 + 0.04)/2 = 0.065
    # MSE(w̄_a, y)     = ((0.3-0)² + (0.8-1)²)/2 = (0.09 + 0.04)/2 = 0.065
    assert float(routing_loss(w, y)) == pytest.approx(0.13, abs=1e-6)


# --- prototypes and standardisation ----------------------------------------------------------------------------


def test_interleave_bug_reproduces_the_reference_reshape():
    a_n = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    a_a = torch.tensor([[4.0, 5.0, 6.0, 7.0]])
    assert torch.equal(stack_prompts(a_n, a_a), torch.tensor([[[0.0, 1, 2, 3], [4, 5, 6, 7]]]))
    # cat = [0..7]; .view(1, 4, 2) rows are (0,1), (2,3), (4,5), (6,7); column 0 = evens, column 1 = odds
    assert torch.equal(stack_prompts(a_n, a_a, True), torch.tensor([[[0.0, 2, 4, 6], [1, 3, 5, 7]]]))


def test_prototypes_with_and_without_interleave_bug():
    text = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(5))
    ok, bug = _heads(), _heads(interleave_bug=True)  # same weights
    a_n = F.leaky_relu(text[:, 0] @ ok.prompt_adapters[0].down.weight.T, 0.01)
    a_a = F.leaky_relu(text[:, 1] @ ok.prompt_adapters[1].down.weight.T, 0.01)
    p = ok.text_proj.weight
    torch.testing.assert_close(ok.prototypes(text), torch.stack([a_n @ p.T, a_a @ p.T], 1))
    cat = torch.cat([a_n, a_a], dim=1)
    torch.testing.assert_close(bug.prototypes(text), torch.stack([cat[:, 0::2] @ p.T, cat[:, 1::2] @ p.T], 1))


def test_standardise_per_image_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 5, generator=g) * torch.rand(2, 3, 1, 5, generator=g) * 9 + 4 * torch.randn(
        2, 3, 1, 5
    )
    z = standardise(x)
    torch.testing.assert_close(z.mean(dim=2), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=2), torch.ones(2, 3, 5), atol=1e-4, rtol=0)


def test_heads_see_standardised_patches():
    """Per-image per-channel affine changes of the patch tokens leave every patch-derived logit unchanged."""
    g = torch.Generator().manual_seed(2)
    patches, cls, text = (
        torch.randn(2, 3, 16, 8, generator=g),
        torch.randn(2, 3, 8, generator=g),
        torch.randn(2, 2, 6),
    )
    scale, shift = torch.rand(2, 1, 1, 8, generator=g) + 0.5, torch.randn(2, 1, 1, 8, generator=g)
    heads = _heads()
    a, b = heads(patches, cls, text), heads(patches * scale + shift, cls, text)
    torch.testing.assert_close(a["cm"], b["cm"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(a["aacm"], b["aacm"], atol=1e-4, rtol=1e-4)


# --- the ensemble text cache -----------------------------------------------------------------------------------


def test_prompt_ensemble_lists():
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 5
    assert len(TEMPLATES) == 35 == len(set(TEMPLATES))
    assert TEMPLATES[0] == "a bad photo of a {}." and TEMPLATES[-1] == "this is one {} in the scene."
    s = state_sentences("pcb", ANOMALOUS_STATES)
    assert (
        len(s) == 5 * 35
        and s[0] == "a bad photo of a damaged pcb."
        and s[-1] == "this is one pcb with damage in the scene."
    )


def test_text_features_computed_once_per_class_name():
    m = _model()
    m.eval()
    b1 = _batch(("bottle", "bottle", "cable", "bottle"))
    m(b1.image, b1)
    assert m.text_cache.encode_calls == 1 and set(m.text_cache.features) == {"bottle", "cable"}
    m(b1.image, b1)
    m(b1.image[:2], _batch(("cable", "bottle")))
    assert m.text_cache.encode_calls == 1  # nothing new: no encode
    m(b1.image[:2], _batch(("screw", "bottle")))
    assert m.text_cache.encode_calls == 2
    # the cached pair is the renormalised mean of the normalised sentence embeddings of each state class
    enc = m.text.text
    for row, states in enumerate((NORMAL_STATES, ANOMALOUS_STATES)):
        e = F.normalize(enc.encode(enc.tokenize(state_sentences("cable", states))), dim=-1)
        torch.testing.assert_close(m.text_cache.features["cable"][row], F.normalize(e.mean(0), dim=0))
    feats = m.text_features(["cable", "bottle", "cable"], torch.device("cpu"))
    assert feats.shape == (3, 2, TINY_DT) and torch.equal(feats[0], feats[2])


def test_text_cache_is_float32_under_autocast_and_moves_once():
    fp32, amp = _model(), _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amp.text_features(["cable"], torch.device("cpu"))
    torch.testing.assert_close(got, fp32.text_features(["cable"], torch.device("cpu")), atol=1e-6, rtol=1e-5)
    # a pair is moved to the compute device once and then served from there
    amp.text_features(["cable", "cable"], torch.device("meta"))
    assert amp.text_cache.features["cable"].device.type == "meta"


# --- forward, loss, training -------------------------------------------------------------------------------------


def test_forward_outputs_and_test_score():
    m = _model()
    batch = _batch()
    m.train()
    out_train = m(batch.image, batch)
    cm = out_train.loss_inputs["cm_probs"]
    assert cm.shape == (4, 2, 64, 64) and cm.dtype == torch.float32
    torch.testing.assert_close(cm.sum(1), torch.ones(4, 64, 64))
    aacm = out_train.loss_inputs["aacm_probs"]
    assert aacm.shape == (4, 2, 64, 64) and ((aacm >= 0) & (aacm <= 1)).all()
    m.eval()
    out = m(batch.image, batch)
    assert out.loss_inputs == {}
    torch.testing.assert_close(out.anomaly_map, cm[:, 1])
    torch.testing.assert_close(out.image_score, out.anomaly_map.flatten(1).amax(1))
    w = out.extras["routing_weights"]
    assert w.shape == (4, 4, 2) and not w.requires_grad
    stat = m.log_stats(out)["routing_w_anomalous"]
    assert torch.is_tensor(stat) and stat.ndim == 0  # no host sync inside the model
    assert float(stat) == pytest.approx(float(w[..., 1].mean()))
    smooth = _model(smoothing_sigma=2.0)
    smooth.eval()
    torch.testing.assert_close(smooth(batch.image, batch).anomaly_map, gaussian_blur(cm[:, 1], 2.0))


def _adapter(x: torch.Tensor, a) -> torch.Tensor:
    """A(x) = LReLU_0.01(W2 LReLU_0.01(W1 x)) from an adapter's weights."""
    return F.leaky_relu(F.leaky_relu(x @ a.down.weight.T, 0.01) @ a.up.weight.T, 0.01)


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("cls_adapt", [True, False])
def test_forward_and_loss_follow_the_spec_equation_by_equation(cls_adapt):
    """Re-derive every map, logit, routing weight and loss term of the spec from the backbone features."""
    m = _model(cls_adapt=cls_adapt)
    m.train()
    batch = _batch(("bottle", "bottle", "cable", "cable"))
    out = m(batch.image, batch)
    b, size = 4, 64
    feats = m.vision(batch.image, taps=m.taps)
    gh, gw = feats.grid
    t = m.text_features(list(batch.class_name), torch.device("cpu"))  # [B, 2, d_t]
    heads = m.heads
    p_w = heads.text_proj.weight  # P [D, d_t], shared by routing and prototypes
    u = F.normalize(t @ p_w.T, dim=-1)
    a_n = F.leaky_relu(t[:, 0] @ heads.prompt_adapters[0].down.weight.T, 0.01)
    a_a = F.leaky_relu(t[:, 1] @ heads.prompt_adapters[1].down.weight.T, 0.01)
    protos = torch.stack([a_n @ p_w.T, a_a @ p_w.T], 1)  # T, not normalised: [B, 2, D]
    cms, aacms, globs, ws = [], [], [], []
    for tap, (p, c) in enumerate(zip(feats.patch_tokens, feats.cls_tokens)):
        p = (p - p.mean(1, keepdim=True)) / (p.std(1, keepdim=True) + 1e-6)
        w = torch.softmax((F.normalize(c, dim=-1)[:, None] * u).sum(-1) / 0.1, dim=-1)  # [B, 2]
        pn, pa = heads.patch_adapters[tap]  # per tap, not shared
        p_hat = F.normalize(
            w[:, 0, None, None] * _adapter(p, pn) + w[:, 1, None, None] * _adapter(p, pa) + p, dim=-1
        )
        if cls_adapt:
            cn, ca = heads.cls_adapters[tap]
            c_hat = F.normalize(w[:, 0, None] * _adapter(c, cn) + w[:, 1, None] * _adapter(c, ca) + c, dim=-1)
        else:
            c_hat = F.normalize(c, dim=-1)
        s = (100 * p_hat @ protos.transpose(1, 2)).transpose(1, 2).reshape(b, 2, gh, gw)
        cms.append(torch.softmax(_up(s, size), dim=1))
        a = torch.sigmoid(_up((10 * (p_hat * c_hat[:, None]).sum(-1)).reshape(b, 1, gh, gw), size))
        aacms.append(torch.cat([1 - a, a], dim=1))
        globs.append(100 * (c_hat[:, None] * protos).sum(-1))
        ws.append(w)
    m_cm, m_aacm = torch.stack(cms).mean(0), torch.stack(aacms).mean(0)
    s_glob, w_all = torch.stack(globs).mean(0), torch.stack(ws, 1)
    li = out.loss_inputs
    torch.testing.assert_close(li["cm_probs"], m_cm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(li["aacm_probs"], m_aacm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(li["global"], s_glob, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.extras["routing_weights"], w_all)
    torch.testing.assert_close(out.anomaly_map, m_cm[:, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.image_score, m_cm[:, 1].flatten(1).amax(1), atol=1e-5, rtol=1e-4)

    gt, y = batch.mask[:, 0].float(), batch.label

    def focal(probs):
        one_hot = torch.stack([1 - gt, gt], 1).clamp(1e-5, 1 - 1e-5)
        pt = (one_hot * probs).sum(1) + 1e-5
        return (-((1 - pt) ** 2) * pt.log()).mean()

    def dice(prob):
        inter = (prob * gt).flatten(1).sum(1)
        return 1 - ((2 * inter + 1) / (prob.flatten(1).sum(1) + gt.flatten(1).sum(1) + 1)).mean()

    w_bar = w_all.mean(1)
    route = ((w_bar[:, 0] - (1 - y.float())) ** 2).mean() + ((w_bar[:, 1] - y.float()) ** 2).mean()
    total = (
        0.5 * (focal(m_cm) + dice(m_cm[:, 1]))
        + 0.25 * (focal(m_aacm) + dice(m_aacm[:, 1]))
        + 0.25 * F.cross_entropy(s_glob, y)
        + 0.1 * route
    )
    torch.testing.assert_close(m.loss(out, batch)["loss"], total, atol=1e-5, rtol=1e-4)


def test_heads_are_float32_under_bf16_autocast():
    """bf16 autocast (Lightning's bf16-mixed) must not reach the logits: 100·cos in bf16 has steps of 0.5."""
    g = torch.Generator().manual_seed(4)
    patches, cls, text = (
        torch.randn(2, 3, 16, 8, generator=g),
        torch.randn(2, 3, 8, generator=g),
        torch.randn(2, 2, 6, generator=g),
    )
    heads = _heads()
    ref = heads(patches, cls, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads(patches.bfloat16(), cls.bfloat16(), text)
        ref_bf16_in = heads(patches.bfloat16().float(), cls.bfloat16().float(), text)
    for key in ("cm", "global", "routing", "aacm"):
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key], ref_bf16_in[key], atol=1e-5, rtol=1e-5)
    assert not torch.equal(ref["cm"], ref_bf16_in["cm"])  # the inputs were rounded, the head was not


def test_loss_is_the_weighted_sum_of_its_terms():
    weights = {"w_cm": 0.7, "w_aacm": 0.2, "w_glob": 0.3, "w_route": 0.4}
    m = _model(**weights)
    m.train()
    batch = _batch()
    terms = m.loss(m(batch.image, batch), batch)
    assert set(terms) == {"loss", "focal_cm", "dice_cm", "focal_aacm", "dice_aacm", "ce_glob", "route"}
    expected = (
        0.7 * (terms["focal_cm"] + terms["dice_cm"])
        + 0.2 * (terms["focal_aacm"] + terms["dice_aacm"])
        + 0.3 * terms["ce_glob"]
        + 0.4 * terms["route"]
    )
    torch.testing.assert_close(terms["loss"], expected)


def test_switches_drop_their_terms():
    batch = _batch()
    m = _model(aacm=False, route_reg=False)
    m.train()
    out = m(batch.image, batch)
    assert "aacm_probs" not in out.loss_inputs
    t = m.loss(out, batch)
    assert float(t["focal_aacm"]) == 0.0 and float(t["dice_aacm"]) == 0.0 and float(t["route"].detach()) > 0
    torch.testing.assert_close(t["loss"], 0.5 * (t["focal_cm"] + t["dice_cm"]) + 0.25 * t["ce_glob"])
    u = _model(routing="uniform")
    u.train()
    out = u(batch.image, batch)
    assert torch.equal(out.extras["routing_weights"], torch.full((4, 4, 2), 0.5))
    nc = _model(cls_adapt=False)
    assert nc.heads.cls_adapters is None


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    m = _model()
    m.set_stage("main")
    m.train()
    batch = _batch(("bottle", "bottle", "cable", "cable"))
    optim = OmegaConf.merge(m.cfg.stages.main.optim, {"lr": 1e-3})
    opt, sched = build_optimizer(m.trainable_candidates(), optim, total_steps=8)
    losses = []
    for _ in range(8):
        loss = m.loss(m(batch.image, batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05


def test_identity_and_gelu_bug_switch():
    m = _model(faithful_gelu_bug=True)
    ident = m.identity()
    assert (
        ident["vision"]["name"] == "tiny"
        and ident["text"]["name"] == "tiny"
        and ident["taps"] == [1, 2, 3, 4]
    )
    assert ident["text"]["quick_gelu"] is False
    assert _model().identity()["text"]["quick_gelu"] is True
    assert m.frozen_modules == ("vision", "text") and m.interpolation == "bilinear"


def test_cache_filled_in_inference_mode_serves_training():
    m = _model()
    m.eval()
    batch = _batch()
    with torch.inference_mode():
        m(batch.image, batch)
    m.train()
    m.loss(m(batch.image, batch), batch)["loss"].backward()
    assert m.text_cache.encode_calls == 1 and m.heads.text_proj.weight.grad is not None


def test_loss_needs_training_mode_inputs():
    m = _model()
    m.eval()
    batch = _batch()
    with pytest.raises(RuntimeError, match="training mode"):
        m.loss(m(batch.image, batch), batch)


# --- configs ---------------------------------------------------------------------------------------------------------


def _leaves(node, prefix=""):
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def test_paper_yaml_equals_schema_defaults():
    cfg = compose([EXPERIMENTS / "methods" / "ava_dino.yaml"])
    assert OmegaConf.to_container(cfg.method) == OmegaConf.to_container(OmegaConf.structured(AvaDinoConfig()))
    assert cfg.method.vision.name == "vit_large_patch16_dinov3" and cfg.method.text.pretrained == "openai"


ABLATIONS = sorted((EXPERIMENTS / "ablations").glob("ava_dino_*.yaml"))


def test_all_ablations_present():
    names = {p.stem for p in ABLATIONS}
    wanted = {"single_adapter", "no_route_reg", "no_aacm", "no_cls_adapt", "learned_tau", "shared_adapters",
              "dinov3_s", "taps_deep", "faithful_gelu", "faithful_interleave"}  # fmt: skip
    assert {f"ava_dino_{n}" for n in wanted} <= names


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_layer_changes_only_its_keys(path):
    paper = compose([EXPERIMENTS / "methods" / "ava_dino.yaml"])
    cfg = compose([EXPERIMENTS / "methods" / "ava_dino.yaml", path])
    layer = OmegaConf.to_container(OmegaConf.load(path)["method"])
    layer.pop("name")
    changed = {
        k for k, v in _leaves(OmegaConf.to_container(cfg.method)).items()
        if _leaves(OmegaConf.to_container(paper.method))[k] != v
    }  # fmt: skip
    assert changed and changed == set(_leaves(layer))
    assert path.stem == f"ava_dino_{cfg.variant}"
    from zsad.config import run_name

    assert run_name(cfg) == f"ava_dino-{cfg.variant}-{cfg.protocol}-s{cfg.seed}"
