"""AVA-DINO: parameter counts, gradients, the text cache, precision, checkpoints identity, ablation files.

Every equation of the spec is pinned in ``tests/test_ava_dino_equations.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import compose
from zsad.maps import gaussian_blur
from zsad.methods.ava_dino import AvaDino, AvaDinoConfig, AvaDinoHeads
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


# --- heads (every equation: tests/test_ava_dino_equations.py) ------------------------------------------------------


def _heads(seed=0, **kw) -> AvaDinoHeads:
    torch.manual_seed(seed)
    return AvaDinoHeads(width=8, text_dim=6, hidden=4, n_taps=3, **kw)


def test_unknown_routing_names_the_key():
    with pytest.raises(ValueError, match="method.routing"):
        _heads(routing="topk")


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


def test_smoothing_and_routing_log_stats():
    """σ > 0 blurs M_cm[anomalous] before the max; the logged share is the mean anomalous routing weight."""
    m, smooth = _model(), _model(smoothing_sigma=2.0)  # same seed: same heads
    m.eval()
    smooth.eval()
    batch = _batch()
    out = m(batch.image, batch)
    blurred = smooth(batch.image, batch)
    torch.testing.assert_close(blurred.anomaly_map, gaussian_blur(out.anomaly_map, 2.0))
    torch.testing.assert_close(blurred.image_score, blurred.anomaly_map.flatten(1).amax(1))
    w = out.extras["routing_weights"]
    assert w.shape == (4, 4, 2) and not w.requires_grad
    stat = m.log_stats(out)["routing_w_anomalous"]
    assert torch.is_tensor(stat) and stat.ndim == 0  # no host sync inside the model
    assert float(stat) == pytest.approx(float(w[..., 1].mean()))


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


ABLATIONS = sorted((EXPERIMENTS / "ablations").glob("ava_dino_*.yaml"))
# Where the defaults differ from the official code (specs/ava_dino.md; parity README §6): the faithful file switches
# exactly these and states every other value at its default.
FAITHFUL_SWITCHES = {
    "method.faithful_gelu_bug",
    "method.faithful_interleave_bug",
    "data.class_name",
    "data.mask_resize",
}


def test_all_ablations_present():
    names = {p.stem for p in ABLATIONS}
    wanted = {"single_adapter", "no_route_reg", "no_aacm", "no_cls_adapt", "learned_tau", "shared_adapters",
              "dinov3_s", "taps_deep", "faithful_gelu", "faithful_interleave", "faithful"}  # fmt: skip
    assert {f"ava_dino_{n}" for n in wanted} <= names


def _method_and_data(cfg) -> dict:
    return _leaves({"method": OmegaConf.to_container(cfg.method), "data": OmegaConf.to_container(cfg.data)})


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_layer_changes_only_its_keys(path):
    paper = _method_and_data(compose([EXPERIMENTS / "methods" / "ava_dino.yaml"]))
    cfg = compose([EXPERIMENTS / "methods" / "ava_dino.yaml", path])
    raw = OmegaConf.to_container(OmegaConf.load(path))
    layer = set(_leaves({k: raw[k] for k in ("method", "data") if k in raw})) - {"method.name"}
    changed = {k for k, v in _method_and_data(cfg).items() if paper[k] != v}
    assert changed and changed <= layer
    assert changed == (FAITHFUL_SWITCHES if path.stem == "ava_dino_faithful" else layer)
    assert path.stem == f"ava_dino_{cfg.variant}"
    from zsad.config import run_name

    assert run_name(cfg) == f"ava_dino-{cfg.variant}-{cfg.protocol}-s{cfg.seed}"
