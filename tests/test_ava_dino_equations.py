"""AVA-DINO, one test per equation of ``specs/ava_dino.md``, each against an independent computation.

The expectations are computed here in float64 with plain loops or ``einsum`` from the module's *parameters* (never
by calling the code under test): standardisation, adapters, prompt adapters, prototypes, routing, fusion, the three
logit kinds, upsampling (our own align_corners=True interpolation matrix, not ``F.interpolate``), the tap means,
the scores, every loss term and the ablation switches. Sizes are tiny (D=8, d_t=6, h=5, 3 taps, 3×3 patches).

Weights are re-drawn at small scales so that the logits stay in the soft part of their softmax/sigmoid (random
init gives 100·cos logits saturated at 0/1, where a wrong equation would not show).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from data_modules.types import Batch
from zsad.backbones.base import VisionFeatures
from zsad.config import compose
from zsad.methods.ava_dino import (
    AvaDino,
    AvaDinoConfig,
    AvaDinoHeads,
    BottleneckAdapter,
    PromptAdapter,
    routing_loss,
    stack_prompts,
    standardise,
)
from zsad.types import AnomalyOutput

D, DT, HID, L = 8, 6, 5, 3  # DINO width, text width, adapter hidden, taps
GRID = (3, 3)  # N = 9 patches
SIZE = 13  # map size: align_corners matters at 3 → 13; 169 pixels, so a top-1 % score (2 px) is not the max
B = 3
TAU = 0.1
EXPERIMENTS = "experiments/methods/ava_dino.yaml"


# --- independent building blocks -----------------------------------------------------------------------------------


def lrelu(z: Tensor) -> Tensor:
    """LeakyReLU with slope 0.01, written out."""
    return torch.where(z > 0, z, 0.01 * z)


def hand_adapter(x: Tensor, down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(h, y) of A(x) = LReLU(W2 · LReLU(W1 x)), W1 = ``down`` [h, D], W2 = ``up`` [D, h]."""
    h = lrelu(torch.einsum("...i,ji->...j", x, down.double()))
    return h, lrelu(torch.einsum("...j,ij->...i", h, up.double()))


def hand_standardise(p: Tensor) -> Tensor:
    """(p − mean_N p) / (std_N p + 1e-6) per image, tap and channel; unbiased std; a plain loop."""
    out = torch.empty_like(p, dtype=torch.float64)
    b_, l_, n, d = p.shape
    for b in range(b_):
        for tap in range(l_):
            for ch in range(d):
                v = [float(p[b, tap, i, ch]) for i in range(n)]
                mean = sum(v) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
                for i in range(n):
                    out[b, tap, i, ch] = (v[i] - mean) / (std + 1e-6)
    return out


def interp_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] linear interpolation weights with align_corners=True: source = i·(n_in − 1)/(n_out − 1)."""
    r = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1)
        i0 = min(int(math.floor(src)), n_in - 2)
        frac = src - i0
        r[i, i0] += 1 - frac
        r[i, i0 + 1] += frac
    return r


def hand_upsample(x: Tensor, size: int) -> Tensor:
    """Bilinear (align_corners=True) resize of [..., h, w] to size×size, as two interpolation matrices."""
    ry, rx = interp_matrix(x.shape[-2], size), interp_matrix(x.shape[-1], size)
    return torch.einsum("Yy,...yx,Xx->...YX", ry, x.double(), rx)


def softmax2(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two-class softmax written out."""
    m = torch.maximum(a, b)
    ea, eb = torch.exp(a - m), torch.exp(b - m)
    return ea / (ea + eb), eb / (ea + eb)


def unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum(-1, keepdim=True))


# --- inputs ------------------------------------------------------------------------------------------------------


def heads(seed: int = 0, **switches) -> AvaDinoHeads:
    """Tiny heads with every weight re-drawn at a small scale (P small so that 100·p̂·T stays in 1..5)."""
    torch.manual_seed(seed)
    h = AvaDinoHeads(width=D, text_dim=DT, hidden=HID, n_taps=L, tau=TAU, **switches)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in h.named_parameters():
            if name == "log_tau":
                continue
            scale = 0.02 if name == "text_proj.weight" else 0.6
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return h


def features(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(patches [B, L, N, D] with per-channel offsets and scales, CLS [B, L, D], unit text [B, 2, d_t])."""
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    patches = torch.randn(B, L, n, D, generator=g) * (0.5 + torch.rand(B, L, 1, D, generator=g) * 3)
    patches = patches + 2 * torch.randn(B, L, 1, D, generator=g)
    cls = torch.randn(B, L, D, generator=g) * 2
    # anomalous text close to the normal one (as CLIP's are): the routing cosines differ by ~0.1, soft weights
    t_n = unit(torch.randn(B, DT, generator=g))
    text = torch.stack([t_n, unit(t_n + 0.3 * torch.randn(B, DT, generator=g))], 1)
    return patches, cls, text


@torch.no_grad()
def hand_logits(
    h: AvaDinoHeads,
    patches: Tensor,
    cls: Tensor,
    text: Tensor,
    *,
    uniform: bool = False,
    cls_adapt: bool = True,
    shared: bool = False,
    interleave: bool = False,
    tau: float = TAU,
) -> dict[str, Tensor]:
    """The spec's per-tap logits, float64, from the weights of ``h`` (never calling it)."""
    p_w = h.text_proj.weight.double()  # P [D, d_t]
    x = hand_standardise(patches)
    c, t = cls.double(), text.double()
    # routing: softmax over (normal, anomalous) of cos(c_l, P t_c) / τ, with the *raw* ensemble text
    w = torch.empty(B, L, 2, dtype=torch.float64)
    for b in range(B):
        for tap in range(L):
            c_hat = c[b, tap] / c[b, tap].norm()
            cos = [float(c_hat @ unit(p_w @ t[b, k])) for k in range(2)]
            e = [math.exp(v / tau) for v in cos]
            w[b, tap] = torch.tensor([e[0] / sum(e), e[1] / sum(e)]) if not uniform else 0.5
    # prototypes: T = [P a_n, P a_a], a_c = LReLU(W1_c t_c) (hidden of the prompt adapter only)
    a_n = lrelu(t[:, 0] @ h.prompt_adapters[0].down.weight.double().T)
    a_a = lrelu(t[:, 1] @ h.prompt_adapters[1].down.weight.double().T)
    if interleave:  # cat([a_n, a_a], 1).view(B, d_t, 2): column c takes elements c, c+2, c+4 …
        cat = torch.cat([a_n, a_a], 1)
        a_n, a_a = cat[:, 0::2], cat[:, 1::2]
    protos = torch.stack([a_n @ p_w.T, a_a @ p_w.T], 1)  # [B, 2, D]
    cm, aacm, glob = [], [], []
    for tap in range(L):
        k = 0 if shared else tap
        pn, pa = h.patch_adapters[k]
        xt = x[:, tap]
        wn, wa = w[:, tap, 0, None, None], w[:, tap, 1, None, None]
        p_hat = unit(
            wn * hand_adapter(xt, pn.down.weight, pn.up.weight)[1]
            + wa * hand_adapter(xt, pa.down.weight, pa.up.weight)[1]
            + xt
        )
        ct = c[:, tap]
        if cls_adapt:
            cn, ca = h.cls_adapters[k]
            c_hat = unit(
                w[:, tap, 0, None] * hand_adapter(ct, cn.down.weight, cn.up.weight)[1]
                + w[:, tap, 1, None] * hand_adapter(ct, ca.down.weight, ca.up.weight)[1]
                + ct
            )
        else:
            c_hat = unit(ct)
        cm.append(100 * torch.einsum("bnd,bcd->bnc", p_hat, protos))
        aacm.append(10 * torch.einsum("bnd,bd->bn", p_hat, c_hat))
        glob.append(100 * torch.einsum("bd,bcd->bc", c_hat, protos))
    return {
        "cm": torch.stack(cm, 1),
        "aacm": torch.stack(aacm, 1),
        "global": torch.stack(glob, 1),
        "routing": w,
    }


def close(got: Tensor, want: Tensor, atol: float = 2e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


# --- standardisation, adapters, prototypes --------------------------------------------------------------------------


def test_standardisation_unbiased_std_plus_eps_per_image_tap_channel():
    patches, _, _ = features()
    patches[0, 1, :, 2] = 1e-6 * torch.arange(9.0)  # std = 2.74e-6: the eps (1e-6, outside the root) shows
    got = standardise(patches)
    close(got, hand_standardise(patches), atol=1e-4)
    # the near-constant channel on its own, to a tighter tolerance: (x − m) / (2.74e-6 + 1e-6)
    close(got[0, 1, :, 2], hand_standardise(patches)[0, 1, :, 2], atol=2e-3, rtol=1e-3)
    assert float(got[0, 1, -1, 2]) == pytest.approx(4e-6 / (math.sqrt(7.5) * 1e-6 + 1e-6), rel=1e-2)


def test_bottleneck_adapter_is_two_leaky_relu_layers_without_bias():
    a = BottleneckAdapter(4, 3)
    assert a.down.bias is None and a.up.bias is None
    with torch.no_grad():
        a.down.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0.5, 0.5, 0, 1.0]]))
        a.up.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0], [0, 0, -2.0]]))
    x = torch.tensor([[2.0, 3.0, 5.0, -4.0]])
    # W1 x = [2, -3, 2.5 - 4 = -1.5] → h = [2, -0.03, -0.015]
    # W2 h = [2, -0.03, -2, 0.03] → y = [2, -0.0003, -0.02, 0.03]
    h, y = a(x)
    close(h, torch.tensor([[2.0, -0.03, -0.015]]), atol=1e-7)
    close(y, torch.tensor([[2.0, -0.0003, -0.02, 0.03]]), atol=1e-7)


def test_prompt_adapter_returns_the_hidden_only():
    pa = PromptAdapter(3)
    assert [n for n, _ in pa.named_parameters()] == ["down.weight"]  # W2 is not built: it gets no gradient
    with torch.no_grad():
        pa.down.weight.copy_(torch.tensor([[1.0, 2, 0], [0, -1, 0], [0, 0, 3]]))
    # W1 t = [1 + 4, -2, -3] → LReLU → [5, -0.02, -0.03]
    close(pa(torch.tensor([[1.0, 2.0, -1.0]])), torch.tensor([[5.0, -0.02, -0.03]]), atol=1e-7)


@pytest.mark.parametrize("interleave", [False, True])
def test_prototypes_are_P_times_adapted_text(interleave):
    _, _, text = features()
    h = heads(interleave_bug=interleave).requires_grad_(False)
    p_w = h.text_proj.weight.double()
    want = torch.empty(B, 2, D, dtype=torch.float64)
    for b in range(B):
        a = [lrelu(h.prompt_adapters[c].down.weight.double() @ text[b, c].double()) for c in range(2)]
        if interleave:
            flat = torch.cat(a)  # reference: cat([a_n, a_a]).view(d_t, 2) → column c = flat[c::2]
            a = [
                torch.tensor([float(flat[2 * i + c]) for i in range(DT)], dtype=torch.float64)
                for c in range(2)
            ]
        for c in range(2):
            for i in range(D):
                want[b, c, i] = sum(float(p_w[i, k]) * float(a[c][k]) for k in range(DT))
    close(h.prototypes(text), want, atol=1e-6)


def test_interleave_view_by_hand():
    a_n, a_a = torch.tensor([[0.0, 1, 2, 3]]), torch.tensor([[4.0, 5, 6, 7]])
    assert stack_prompts(a_n, a_a).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    # cat = 0..7, view(1, 4, 2) rows (0,1) (2,3) (4,5) (6,7): column 0 = evens, column 1 = odds
    assert stack_prompts(a_n, a_a, interleave_bug=True).tolist() == [[[0, 2, 4, 6], [1, 3, 5, 7]]]


# --- routing and fusion -------------------------------------------------------------------------------------------


def test_routing_is_softmax_of_cosines_with_raw_text_over_tau():
    patches, cls, text = features()
    h = heads()
    want = hand_logits(h, patches, cls, text)["routing"]
    close(h.route(cls, text), want, atol=1e-6)
    close(h(patches, cls, text)["routing"], want, atol=1e-6)
    soft = ((want > 0.05) & (want < 0.95)).double().mean()
    assert soft > 0.5  # mostly soft weights: the test sees τ and the cosines


def test_fusion_is_weighted_adapters_plus_residual_then_normalised():
    h = heads().requires_grad_(False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, D, generator=g)
    w = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    pair = h.patch_adapters[1]
    want = torch.empty(2, 4, D, dtype=torch.float64)
    for b in range(2):
        for i in range(4):
            f = (
                float(w[b, 0]) * hand_adapter(x[b, i].double(), pair[0].down.weight, pair[0].up.weight)[1]
                + float(w[b, 1]) * hand_adapter(x[b, i].double(), pair[1].down.weight, pair[1].up.weight)[1]
                + x[b, i].double()
            )
            want[b, i] = f / f.norm()
    close(AvaDinoHeads.fuse(x, pair, w), want, atol=1e-6)


# --- per-tap logits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cm", "aacm", "global"])
def test_per_tap_logits(key):
    """cm = 100·p̂·T, aacm = 10·p̂·ĉ', global = 100·ĉ'·T, with per-tap patch and CLS adapters."""
    patches, cls, text = features()
    h = heads()
    got, want = h(patches, cls, text)[key], hand_logits(h, patches, cls, text)[key]
    close(got, want, atol=1e-4)
    assert 0.3 < float(want.abs().mean()) < 8  # logits in the range where their scale matters


# --- the forward: upsampling, softmax, tap means, scores ----------------------------------------------------------


class FixedVision(nn.Module):
    """Stands in for DINOv3: returns fixed per-tap features (the backbone is not under test here)."""

    def __init__(self, patches: Tensor, cls: Tensor) -> None:
        super().__init__()
        self.patches, self.cls = patches, cls

    def forward(self, images: Tensor, taps: tuple[int, ...]) -> VisionFeatures:
        assert len(taps) == L
        return VisionFeatures(
            patch_tokens=list(self.patches.unbind(1)), grid=GRID, cls_tokens=list(self.cls.unbind(1))
        )


def method(switches: dict | None = None, **cfg) -> tuple[AvaDino, dict[str, Tensor]]:
    """A real AvaDino (tiny backbones) whose vision, text and heads are replaced by the fixed test ones."""
    c = OmegaConf.structured(AvaDinoConfig(image_size=SIZE, taps=[1, 2, 3], hidden=HID))
    c.vision.name, c.vision.pretrained = "tiny", "none"
    c.text.name, c.text.pretrained = "tiny", "none"
    for k, v in cfg.items():
        OmegaConf.update(c, k, v)
    m = AvaDino(c)
    patches, cls, text = features()
    m.vision = FixedVision(patches, cls)
    m.heads = heads(**(switches or {}))
    m.text_features = lambda names, device: text  # the cached ensemble text (tested in test_ava_dino.py)
    return m, {"patches": patches, "cls": cls, "text": text}


def hand_maps(m: AvaDino, inp: dict[str, Tensor], **hand) -> dict[str, Tensor]:
    """M_cm, M_aacm (tap means of softmax/sigmoid of upsampled logits) and s_glob (tap mean of logits)."""
    lg = hand_logits(m.heads, inp["patches"], inp["cls"], inp["text"], **hand)
    gh, gw = GRID
    cm = hand_upsample(lg["cm"].permute(0, 1, 3, 2).reshape(B, L, 2, gh, gw), SIZE)  # upsample the logits …
    p_n, p_a = softmax2(cm[:, :, 0], cm[:, :, 1])  # … then softmax over the two classes …
    m_cm = torch.stack([p_n.mean(1), p_a.mean(1)], 1)  # … then the mean over taps
    a = 1 / (1 + torch.exp(-hand_upsample(lg["aacm"].reshape(B, L, gh, gw), SIZE)))
    m_aacm = torch.stack([(1 - a).mean(1), a.mean(1)], 1)
    return {"cm_probs": m_cm, "aacm_probs": m_aacm, "global": lg["global"].mean(1), "routing": lg["routing"]}


def _batch(b: int = B) -> Batch:
    mask = torch.zeros(b, 1, SIZE, SIZE, dtype=torch.bool)
    mask[1:, :, 2:5, 1:4] = True
    mask[-1, :, 0, :] = True
    label = torch.tensor([0] + [1] * (b - 1))
    return Batch(torch.zeros(b, 3, SIZE, SIZE), mask, label, ["c"] * b, ["obj"] * b, ["d"] * b, ["p"] * b)


@pytest.mark.parametrize("key", ["cm_probs", "aacm_probs", "global"])
def test_training_maps_upsample_logits_then_softmax_then_tap_mean(key):
    m, inp = method()
    m.train()
    out = m(torch.zeros(B, 3, SIZE, SIZE), _batch())
    close(out.loss_inputs[key], hand_maps(m, inp)[key], atol=1e-5)


def test_test_time_pixel_score_is_M_cm_anomalous_and_image_score_its_max():
    m, inp = method()
    m.eval()
    out = m(torch.zeros(B, 3, SIZE, SIZE), _batch())
    want = hand_maps(m, inp)["cm_probs"][:, 1]
    close(out.anomaly_map, want, atol=1e-5)
    close(out.image_score, torch.tensor([float(want[b].max()) for b in range(B)]), atol=1e-5)
    close(out.extras["routing_weights"], hand_maps(m, inp)["routing"], atol=1e-6)


# --- losses -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hand_focal(probs: Tensor, gt: Tensor) -> float:
    """Mean over pixels of −(1 − p_t)² log p_t, p_t = Σ_c clamp(onehot, 1e-5, 1 − 1e-5)_c P_c + 1e-5."""
    total, count = 0.0, 0
    for b in range(probs.shape[0]):
        for i in range(probs.shape[-2]):
            for j in range(probs.shape[-1]):
                y = int(gt[b, i, j])
                oh = [1e-5, 1e-5]
                oh[y] = 1 - 1e-5
                pt = oh[0] * float(probs[b, 0, i, j]) + oh[1] * float(probs[b, 1, i, j]) + 1e-5
                total += -((1 - pt) ** 2) * math.log(pt)
                count += 1
    return total / count


@torch.no_grad()
def hand_dice(prob: Tensor, gt: Tensor) -> float:
    """1 − mean_b (2 Σ p g + 1) / (Σ p + Σ g + 1)."""
    dices = []
    for b in range(prob.shape[0]):
        p, g = prob[b].double(), gt[b].double()
        dices.append((2 * float((p * g).sum()) + 1) / (float(p.sum()) + float(g.sum()) + 1))
    return 1 - sum(dices) / len(dices)


@torch.no_grad()
def hand_ce(logits: Tensor, y: Tensor) -> float:
    return sum(
        -float(logits[b, int(y[b])]) + math.log(sum(math.exp(float(v)) for v in logits[b]))
        for b in range(len(y))
    ) / len(y)


@torch.no_grad()
def hand_route(w: Tensor, y: Tensor) -> float:
    """MSE(w̄_n, 1 − y) + MSE(w̄_a, y), w̄ the mean over taps."""
    b_, l_ = w.shape[:2]
    wn = [sum(float(w[b, t, 0]) for t in range(l_)) / l_ for b in range(b_)]
    wa = [sum(float(w[b, t, 1]) for t in range(l_)) / l_ for b in range(b_)]
    yy = [float(v) for v in y]
    return (
        sum((wn[b] - (1 - yy[b])) ** 2 for b in range(b_)) / b_
        + sum((wa[b] - yy[b]) ** 2 for b in range(b_)) / b_
    )


def loss_inputs(seed: int = 5) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    cm = torch.softmax(torch.randn(B, 2, SIZE, SIZE, generator=g) * 2, 1)
    a = torch.rand(B, 1, SIZE, SIZE, generator=g)
    return {
        "cm_probs": cm,
        "aacm_probs": torch.cat([1 - a, a], 1),
        "global": torch.randn(B, 2, generator=g) * 3,
        "routing": torch.softmax(torch.randn(B, L, 2, generator=g), -1),
    }


def _loss(li: dict[str, Tensor], batch: Batch, **cfg) -> dict[str, Tensor]:
    """AvaDino.loss on given inputs; it reads only ``self.cfg`` (no backbone needed)."""
    c = OmegaConf.merge(OmegaConf.structured(AvaDinoConfig()), cfg)
    out = AnomalyOutput(li["cm_probs"][:, 1], li["cm_probs"][:, 1].flatten(1).amax(1), {}, li)
    return AvaDino.loss(SimpleNamespace(cfg=c), out, batch)


def test_loss_terms_by_hand():
    li, batch = loss_inputs(), _batch()
    gt, y = batch.mask[:, 0].float(), batch.label
    t = _loss(li, batch)
    assert float(t["focal_cm"]) == pytest.approx(hand_focal(li["cm_probs"], gt), rel=1e-5)
    assert float(t["dice_cm"]) == pytest.approx(hand_dice(li["cm_probs"][:, 1], gt), rel=1e-5)
    assert float(t["focal_aacm"]) == pytest.approx(hand_focal(li["aacm_probs"], gt), rel=1e-5)
    assert float(t["dice_aacm"]) == pytest.approx(hand_dice(li["aacm_probs"][:, 1], gt), rel=1e-5)
    assert float(t["ce_glob"]) == pytest.approx(hand_ce(li["global"], y), rel=1e-5)
    assert float(t["route"]) == pytest.approx(hand_route(li["routing"], y), rel=1e-5)


def test_routing_loss_hand_values():
    # 2 images, 3 taps: w̄_n = [0.6, 0.3], w̄_a = [0.4, 0.7]; y = [0, 1]
    w = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], [[0.2, 0.8], [0.5, 0.5], [0.2, 0.8]]])
    # MSE(w̄_n, 1 − y) = ((0.6 − 1)² + (0.3 − 0)²) / 2 = 0.125; MSE(w̄_a, y) = (0.4² + 0.3²) / 2 = 0.125
    assert float(routing_loss(w, torch.tensor([0, 1]))) == pytest.approx(0.25, abs=1e-6)
    # y = [1, 1]: ((0.6)² + 0.3²)/2 + ((0.6)² + 0.3²)/2 = 0.45
    assert float(routing_loss(w, torch.tensor([1, 1]))) == pytest.approx(0.45, abs=1e-6)


@pytest.mark.parametrize(
    "weights",
    [{}, {"w_cm": 0.7, "w_aacm": 0.2, "w_glob": 0.3, "w_route": 0.4}],
    ids=["spec_defaults", "configured"],
)
def test_total_loss_weights(weights):
    """Defaults 0.5·cm + 0.25·aacm + 0.25·CE + 0.1·route; each weight is its config key."""
    li, batch = loss_inputs(), _batch()
    gt, y = batch.mask[:, 0].float(), batch.label
    w = {"w_cm": 0.5, "w_aacm": 0.25, "w_glob": 0.25, "w_route": 0.1, **weights}
    want = (
        w["w_cm"] * (hand_focal(li["cm_probs"], gt) + hand_dice(li["cm_probs"][:, 1], gt))
        + w["w_aacm"] * (hand_focal(li["aacm_probs"], gt) + hand_dice(li["aacm_probs"][:, 1], gt))
        + w["w_glob"] * hand_ce(li["global"], y)
        + w["w_route"] * hand_route(li["routing"], y)
    )
    assert float(_loss(li, batch, **weights)["loss"]) == pytest.approx(want, rel=1e-5)


def test_loss_switches_no_route_reg_and_no_aacm():
    li, batch = loss_inputs(), _batch()
    gt, y = batch.mask[:, 0].float(), batch.label
    base = 0.5 * (hand_focal(li["cm_probs"], gt) + hand_dice(li["cm_probs"][:, 1], gt)) + 0.25 * hand_ce(
        li["global"], y
    )
    aacm = 0.25 * (hand_focal(li["aacm_probs"], gt) + hand_dice(li["aacm_probs"][:, 1], gt))
    assert float(_loss(li, batch, route_reg=False)["loss"]) == pytest.approx(base + aacm, rel=1e-5)
    no_aacm = {k: v for k, v in li.items() if k != "aacm_probs"}  # the forward builds none with aacm: false
    t = _loss(no_aacm, batch, aacm=False)
    assert float(t["loss"]) == pytest.approx(base + 0.1 * hand_route(li["routing"], y), rel=1e-5)
    # and the forward indeed builds none
    m, _ = method(aacm=False)
    m.train()
    assert "aacm_probs" not in m(torch.zeros(B, 3, SIZE, SIZE), _batch()).loss_inputs


# --- ablation switches ----------------------------------------------------------------------------------------------


def test_uniform_routing_is_half_half_and_drops_the_route_term():
    m, inp = method({"routing": "uniform"}, routing="uniform")
    m.train()
    batch = _batch()
    out = m(torch.zeros(B, 3, SIZE, SIZE), batch)
    assert torch.equal(out.loss_inputs["routing"], torch.full((B, L, 2), 0.5))
    want = hand_maps(m, inp, uniform=True)
    close(out.loss_inputs["cm_probs"], want["cm_probs"], atol=1e-5)
    gt, y = batch.mask[:, 0].float(), batch.label
    li = out.loss_inputs
    total = (
        0.5 * (hand_focal(li["cm_probs"], gt) + hand_dice(li["cm_probs"][:, 1], gt))
        + 0.25 * (hand_focal(li["aacm_probs"], gt) + hand_dice(li["aacm_probs"][:, 1], gt))
        + 0.25 * hand_ce(li["global"].detach(), y)
    )  # no 0.1·route: constant weights have nothing to regularise
    assert float(m.loss(out, batch)["loss"].detach()) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("key", ["cm", "aacm", "global"])
def test_no_cls_adaptation_uses_the_normalised_raw_cls(key):
    patches, cls, text = features()
    h = heads(cls_adapt=False)
    assert h.cls_adapters is None
    close(h(patches, cls, text)[key], hand_logits(h, patches, cls, text, cls_adapt=False)[key], atol=1e-4)


@pytest.mark.parametrize("key", ["cm", "aacm", "global"])
def test_shared_adapters_use_one_set_at_every_tap(key):
    patches, cls, text = features()
    h = heads(shared_adapters=True)
    assert len(h.patch_adapters) == 1 and len(h.cls_adapters) == 1
    close(h(patches, cls, text)[key], hand_logits(h, patches, cls, text, shared=True)[key], atol=1e-4)


def test_learned_tau_is_the_exp_of_its_parameter_and_trains():
    patches, cls, text = features()
    h = heads(learn_tau=True)
    assert float(h.log_tau) == pytest.approx(math.log(TAU))
    with torch.no_grad():
        h.log_tau.fill_(math.log(0.37))
    close(h.route(cls, text), hand_logits(h, patches, cls, text, tau=0.37)["routing"], atol=1e-6)
    h.route(cls, text)[..., 1].pow(2).sum().backward()
    assert h.log_tau.grad is not None and float(h.log_tau.grad.abs()) > 0


# --- the paper configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["paper_yaml", "schema_defaults"])
def test_paper_configuration_holds_the_spec_values(source):
    """The spec's numbers, written here: a changed YAML value or schema default fails."""
    m = compose([EXPERIMENTS]).method if source == "paper_yaml" else OmegaConf.structured(AvaDinoConfig())
    assert m.image_size == 512 and list(m.taps) == [6, 12, 18, 24] and m.hidden == 768
    assert m.tau == 0.1 and not m.learn_tau and m.routing == "text"
    assert (m.w_cm, m.w_aacm, m.w_glob, m.w_route) == (0.5, 0.25, 0.25, 0.1)
    assert m.smoothing_sigma == 0.0 and m.score_rule == "max"
    assert m.route_reg and m.aacm and m.cls_adapt and not m.shared_adapters
    assert not m.faithful_gelu_bug and not m.faithful_interleave_bug
    assert m.vision.name == "vit_large_patch16_dinov3" and m.vision.pretrained == "lvd1689m"
    assert m.text.name == "ViT-L-14-336-quickgelu" and m.text.pretrained == "openai"
    main = m.stages.main
    assert main.epochs == 10 and m.batch_size == 16
    assert (main.optim.name, main.optim.lr, main.optim.weight_decay, main.optim.warmup_frac) == (
        "adamw",
        1e-4,
        1e-2,
        0.03,
    )
