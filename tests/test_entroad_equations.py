"""EntroAD's equations (spec ``entroad.md``), each recomputed independently in the test.

Every expectation here is hand values or a plain loop / einsum written below — never a call of the function under
test. The reference forward (``_reference``) rebuilds the whole method from the frozen backbone's outputs and the
module's parameters: retrieval with similarity dropout, structural entropy, routing, gate, per-image prompt biases,
branch maps, fusion, smoothing and score. Tiny CLIP preset, 56² inputs (4 × 4 patches), CPU, float32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.ndimage import gaussian_filter

from data_modules.types import Batch
from zsad.methods.entroad import EntroAD, EntroADConfig
from zsad.methods.entroad.entropy import (
    entropy_rate,
    kmeans_modules,
    patch_attention,
    row_entropy,
    structural_entropy,
    two_level_entropy,
)
from zsad.methods.entroad.memory import MemoryTensors, path_hash
from zsad.methods.entroad.routing import confidence_gate, entropy_split, retrieve, route_weights
from zsad.types import AnomalyOutput

SIZE, SIDE = 56, 4  # 4 × 4 patches of 14 px
N = SIDE * SIDE
TINY = {
    "image_size": SIZE,
    "clip": {"name": "tiny", "pretrained": "none"},
    "taps": [2, 3, 4],
    "dpam_start": 2,
    "memory_workers": 0,
}
ATOL = 2e-5


# --- plain references -------------------------------------------------------------------------------------------


def _neighbour_average(x: torch.Tensor, kernels=(1, 3, 5)) -> torch.Tensor:
    """Loop over the grid: mean over kernels of the box mean of the patches that exist around each patch."""
    b, n, c = x.shape
    g = x.reshape(b, SIDE, SIDE, c)
    out = torch.zeros_like(g)
    for k in kernels:
        r = k // 2
        for i in range(SIDE):
            for j in range(SIDE):
                out[:, i, j] += g[:, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean((1, 2))
    return (out / len(kernels)).reshape(b, n, c)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.t() + layer.bias


def _read(query, q_proj, k_proj, keys, values, drop_q):
    """softmax over keys of ⟨W_q q, W_k K⟩ (no temperature) · V; optional dropout of keys above the raw quantile."""
    logits = q_proj @ k_proj.t()
    if drop_q is not None:
        raw = query @ keys.t()
        logits = logits.masked_fill(raw > torch.quantile(raw, drop_q, dim=-1, keepdim=True), float("-inf"))
    return (
        torch.exp(logits - logits.amax(-1, keepdim=True))
        @ values
        / torch.exp(logits - logits.amax(-1, keepdim=True)).sum(-1, keepdim=True)
    )


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    """-Σ_j p_ij ln p_ij with 0 ln 0 = 0, by a loop over entries."""
    out = torch.zeros(p.shape[:-1])
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in p.shape]):
        v = float(p[tuple(idx)])
        if v > 0:
            out[tuple(idx[:-1])] -= v * math.log(v)
    return out


def _tap_entropy(attn: torch.Tensor, cfg) -> torch.Tensor:
    """[B, heads, 1+N, 1+N] → per patch H_i of one tap: head mean, CLS row/column dropped, rows renormalised."""
    a = attn.mean(1)[:, 1:, 1:]
    p = a / a.sum(-1, keepdim=True)
    if cfg.entropy == "row_entropy":
        return -(p * p.log()).sum(-1)  # softmax probabilities are > 0
    w = (p + p.transpose(1, 2)) / 2
    d = w.sum(-1)
    q = w / d[..., None]
    if cfg.entropy == "entropy_rate":
        return d / d.sum(-1, keepdim=True) * -(q * q.log()).sum(-1)
    # two_level: Li–Pan partition-tree entropy over the k-means modules of the walk's rows.
    modules = kmeans_modules(q, int(cfg.two_level_k), int(cfg.two_level_iters))
    out = torch.zeros_like(d)
    vol = d.sum(-1)
    for b in range(p.shape[0]):
        for i in range(p.shape[1]):
            m = modules[b] == modules[b, i]
            v_m, cut = d[b][m].sum(), w[b][m][:, ~m].sum()
            node = -(d[b, i] / vol[b]) * torch.log(d[b, i] / v_m)
            out[b, i] = node - (d[b, i] / v_m) * (cut / vol[b]) * torch.log(v_m / vol[b])
    return out


def _minmax(h: torch.Tensor) -> torch.Tensor:
    lo, hi = h.min(-1, keepdim=True).values, h.max(-1, keepdim=True).values
    return (h - lo) / (hi - lo)


def _focal(probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Probability-space focal loss γ = 2 (reference convention: target clamped to [1e-5, 1-1e-5], p_t + 1e-5)."""
    t1 = gt.clamp(1e-5, 1 - 1e-5)
    pt = (1 - t1) * probs[:, 0] + t1 * probs[:, 1] + 1e-5
    return (-((1 - pt) ** 2) * torch.log(pt)).mean()


def _dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prob * target).flatten(1).sum(1)
    return 1 - ((2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()


# --- model and memory -----------------------------------------------------------------------------------------------


def _model(**over) -> EntroAD:
    """Tiny EntroAD with a hand memory and retrieval projections large enough that p spreads over (0, 1)."""
    torch.manual_seed(0)
    model = EntroAD(OmegaConf.merge(OmegaConf.structured(EntroADConfig), TINY, over))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        r = model.retrieval
        for layer in (r.image_q, r.image_k, r.patch_q, r.patch_k):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.6)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        # Prompt biases of a few units: the branch maps then differ visibly between images and branches.
        model.bias.weight.mul_(20.0)
        # Sharper random attention (q, k × 3): ê then spans ~0.5 nats instead of ~0.03, so its min-max does not
        # amplify float rounding into the tolerance.
        width = model.clip.visual.width
        for block in model.clip.visual.blocks:
            block.attn.in_proj_weight[: 2 * width] *= 3.0
    d, w = model.clip.visual.embed_dim, model.clip.visual.width
    with torch.no_grad():  # the memory holds the training images: the test images themselves are keys 0 and 1
        own = model.clip.visual(_images(), taps=(4,), dpam_start=2).global_embedding
    model.memory.set(
        MemoryTensors(
            image_keys=F.normalize(torch.cat([own, torch.randn(8, d, generator=g)]), dim=-1),
            image_values=F.one_hot(torch.arange(10) % 2, 2).float(),
            patch_keys=F.normalize(torch.randn(12, w, generator=g), dim=-1),
            patch_values=F.one_hot(torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0]), 2).float(),
            source_hash=torch.tensor([path_hash(f"memory/{i}.png") for i in range(10)]),
        )
    )
    return model


def _images(b: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _batch(images: torch.Tensor) -> Batch:
    b = images.shape[0]
    mask = torch.zeros(b, 1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, 5:30, 10:40] = True  # image 0 anomalous, image 1 normal
    label = torch.tensor([1] + [0] * (b - 1))
    names = [f"x{i}" for i in range(b)]
    return Batch(images, mask, label, names, names, names, [f"target/{i}.png" for i in range(b)])


def _reference(model: EntroAD, images: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
    """The whole prompt-stage forward from the spec, written out."""
    cfg = model.cfg
    vis, mem, r = model.clip.visual, model.memory, model.retrieval
    with torch.no_grad():
        f = vis(images, taps=model.taps, dpam_start=2, attn_taps=True, attn_reduce="none", pre_proj=True)
        pre = f.pre_proj_tokens[-1]  # tap 24 (here: the last tapped block)
        # Stage 1 retrieval; similarity dropout only in training (image 95th, patch 80th percentile by default).
        q_img = f.global_embedding / f.global_embedding.norm(dim=-1, keepdim=True)
        img_drop = float(cfg.image_dropout_q) if training and cfg.sim_dropout else None
        patch_drop = float(cfg.patch_dropout_q) if training and cfg.sim_dropout else None
        p_img2 = _read(
            q_img, _linear(r.image_q, q_img), _linear(r.image_k, mem.image_keys), mem.image_keys,
            mem.image_values, img_drop,
        )  # fmt: skip
        avg = _neighbour_average(pre)
        q_patch = avg / avg.norm(dim=-1, keepdim=True)
        p2 = _read(
            q_patch, _linear(r.patch_q, q_patch), _linear(r.patch_k, mem.patch_keys), mem.patch_keys,
            mem.patch_values, patch_drop,
        )  # fmt: skip
        p, p_img = p2[..., 1], p_img2[:, 1]
        # Structural entropy: mean over taps of the row entropy, min-max per image.
        if cfg.entropy == "none":
            e = torch.full_like(p, 0.5)
        else:
            e = _minmax(torch.stack([_tap_entropy(a, cfg) for a in f.attentions]).mean(0))
        # z: projected, neighbour-averaged, normalised tap-24 tokens.
        zz = _neighbour_average(pre @ vis.vit.proj)
        z = zz / zz.norm(dim=-1, keepdim=True)
        # Routing (L1), routed tokens, gate on t_raw only.
        inv_t = 1.0 / float(cfg.route_temperature)
        r_a, r_n = p * e**inv_t, (1 - p) * (1 - e) ** inv_t
        if cfg.route_norm == "l1":
            norm = lambda r: r / r.sum(-1, keepdim=True)  # noqa: E731
        else:
            norm = lambda r: torch.exp(r) / torch.exp(r).sum(-1, keepdim=True)  # noqa: E731
        w_a, w_n = norm(r_a), norm(r_n)
        t_n = torch.einsum("bn,bnd->bd", w_n, z)
        n_br = model.n_branches
        if cfg.entropy_split:
            s = torch.sigmoid((e - e.mean(-1, keepdim=True)) / float(cfg.split_temperature))
            ra_a, ra_b = p * (1 - s), p * s
            w_branch = torch.stack([norm(ra_a), norm(ra_b)], 1)
        else:
            w_branch = torch.stack([w_a] * n_br, 1)
        t_raw = torch.einsum("bsn,bnd->bsd", w_branch, z)
        if cfg.gate:
            k0, k1 = float(cfg.gate_k0), float(cfg.gate_k1)
            g = torch.sigmoid(p.max(-1).values - float(cfg.gate_tau)) * (k0 + k1 * e.std(-1, unbiased=False))
        else:
            g = torch.ones(p.shape[0])
        t_a = g[:, None, None] * t_raw
    # Per-image prompt bias b = Lin_{branch, class}(t), added to every context token of that prompt.
    W, bb = model.bias.weight, model.bias.bias  # [S, 2, width, D], [S, 2, width]
    bias_n = torch.einsum("bd,swd->bsw", t_n, W[:, 0]) + bb[:, 0]
    bias_a = torch.einsum("bsd,swd->bsw", t_a, W[:, 1]) + bb[:, 1]
    pl = model.prompts
    embeds, eots = [], []
    for i in range(images.shape[0]):
        for s_ in range(n_br):
            for c, bias in ((0, bias_n), (1, bias_a)):
                ctx = pl.ctx[s_, c] + bias[i, s_][None, :]  # all n_ctx positions
                embeds.append(torch.cat([pl.prefix[c], ctx, pl.suffix[c]]))
                eots.append(pl.eot_index[c])
    with torch.no_grad():
        text = model.clip.text.encode_embeddings(
            torch.stack(embeds), torch.stack(eots), deep_prompts=pl.deep
        ).view(images.shape[0], n_br, 2, -1)
        # Branch maps on tap 24: softmax over {normal, anomalous} of ⟨z, T⟩ / 0.07.
        probs = torch.softmax(torch.einsum("bnd,bscd->bscn", z, text) / 0.07, dim=2)
        up = F.interpolate(
            probs.reshape(-1, 2 * n_br, SIDE, SIDE), size=(SIZE, SIZE), mode="bilinear", align_corners=False
        ).view(-1, n_br, 2, SIZE, SIZE)
        maps = (up[:, :, 1] + 1 - up[:, :, 0]) / 2
        weights = [float(w) for w in cfg.branch_weights] if n_br == 2 else [1.0]
        amap = sum(weights[k] * maps[:, k] for k in range(n_br))
        if not training:
            amap = torch.stack([torch.from_numpy(gaussian_filter(m.numpy(), 4.0)) for m in amap]).float()
        k = round(SIZE * SIZE * 0.01)
        top = torch.stack([torch.sort(m.flatten(), descending=True).values[:k].mean() for m in amap])
        w_s = float(cfg.score_map_weight)
        score = w_s * top + (1 - w_s) * p_img
    return {
        "p": p, "p_img": p_img, "p2": p2, "p_img2": p_img2, "e": e, "z": z, "w_n": w_n, "w_a": w_branch,
        "t_n": t_n, "t_a": t_a, "g": g, "bias_n": bias_n, "bias_a": bias_a, "probs": probs, "amap": amap,
        "score": score, "text": text,
    }  # fmt: skip


def _run(model: EntroAD, images: torch.Tensor, training: bool, stage: str = "prompt"):
    """The model's forward, recording the routed tokens fed to the bias MLPs and the biases they produce."""
    model.set_stage(stage)
    model.train(training)
    seen = {}
    hooks = [
        model.bias.register_forward_hook(lambda m, a, o: seen.update(tokens=a[0].detach(), bias=o.detach())),
    ]
    try:
        with torch.no_grad():
            out = model(images, None)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _check_forward(model: EntroAD, images: torch.Tensor, training: bool) -> None:
    out, seen = _run(model, images, training)
    ref = _reference(model, images, training)
    assert ref["p"].std() > 0.1, "test set-up: p must spread for the routing equations to bite"
    close = lambda a, b: torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)  # noqa: E731
    close(out.extras["p_img"], ref["p_img"])
    close(out.extras["entropy_map"].flatten(1), ref["e"])
    close(out.extras["gate"], ref["g"])
    close(out.extras["routing_weights"][:, 0], ref["w_n"])
    close(out.extras["routing_weights"][:, 1], ref["w_a"][:, 0])
    close(
        seen["tokens"][:, :, 0], ref["t_n"][:, None].expand(-1, model.n_branches, -1)
    )  # normal: t_n, ungated
    close(seen["tokens"][:, :, 1], ref["t_a"])  # anomalous: g · t_raw
    # Biases are tens of units (scaled-up Linears): compare them relative to their size.
    torch.testing.assert_close(seen["bias"][:, :, 0], ref["bias_n"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(seen["bias"][:, :, 1], ref["bias_a"], atol=1e-3, rtol=1e-3)
    close(out.loss_inputs["branch_probs"], ref["probs"])
    close(out.loss_inputs["retrieval_probs"], ref["p2"])
    close(out.anomaly_map, ref["amap"])
    close(out.image_score, ref["score"])


# --- the whole forward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_forward_matches_the_spec_written_out(training):
    """Retrieval (dropout in training only), entropy, routing, gate, biases, branch maps, fusion, blur, score."""
    _check_forward(_model(), _images(), training)


@pytest.mark.parametrize(
    "over",
    [
        {"branch_weights": [0.2, 0.8], "score_map_weight": 0.6},
        {"patch_dropout_q": 0.5, "image_dropout_q": 0.6, "route_temperature": 0.5},
        {"entropy_split": True, "split_temperature": 0.3},
        {"entropy_split": True},
        {"route_norm": "softmax", "entropy_split": True},
        {"single_branch": True},
        {"gate": False},
        {"gate_tau": 0.2, "gate_k0": 2.0, "gate_k1": 9.0},
        {"entropy": "none"},
        {"entropy": "entropy_rate"},
        {"entropy": "two_level", "two_level_k": 3},
        {"sim_dropout": False},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_forward_follows_each_config_switch(over):
    """Every switch and constant of the spec reaches the maths (training forward: dropout and no blur)."""
    _check_forward(_model(**over), _images(), training=True)


def test_branches_and_images_really_differ():
    """Guards the reference test's power: swapped branch weights, maps or images would change the outputs."""
    ref = _reference(_model(), _images(), training=False)
    maps = (ref["probs"][:, :, 1] - ref["probs"][:, :, 0]).abs()
    assert (ref["probs"][:, 0] - ref["probs"][:, 1]).abs().max() > 0.05  # branch A ≠ branch B
    assert (ref["probs"][0] - ref["probs"][1]).abs().max() > 0.05  # image 0 ≠ image 1
    assert maps.max() > 0.1
    assert (ref["g"] - 1).abs().min() > 0.5 and (ref["t_n"] - ref["t_a"][:, 0]).abs().max() > 1e-2


def test_retrieval_stage_forward():
    """Stage 1: map = bilinear retrieval map, logits = image probabilities / 0.07, dropout in training."""
    model, images = _model(), _images()
    out, _ = _run(model, images, training=True, stage="retrieval")
    ref = _reference(model, images, training=True)
    torch.testing.assert_close(out.loss_inputs["retrieval_probs"], ref["p2"], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.loss_inputs["image_logits"], ref["p_img2"] / 0.07, atol=1e-4, rtol=1e-4)
    want = F.interpolate(ref["p"].view(-1, 1, SIDE, SIDE), size=(SIZE, SIZE), mode="bilinear")[:, 0]
    torch.testing.assert_close(out.anomaly_map, want, atol=ATOL, rtol=1e-4)
    # Without dropout the training image would retrieve differently: the dropout changes the probabilities.
    no_drop = _reference(_model(sim_dropout=False), images, training=True)
    assert (no_drop["p2"] - ref["p2"]).abs().max() > 1e-3
    assert (no_drop["p_img2"] - ref["p_img2"]).abs().max() > 1e-3


# --- structural entropy ---------------------------------------------------------------------------------------------


def _random_rows(b: int, n: int, seed: int) -> torch.Tensor:
    x = torch.rand(b, n, n, generator=torch.Generator().manual_seed(seed)) ** 3
    return x / x.sum(-1, keepdim=True)


def test_patch_attention_averages_heads_before_dropping_cls_and_renormalising():
    # Two heads with different CLS shares: averaging first, renormalising after, is not the same as the reverse.
    attn = torch.zeros(1, 2, 3, 3)
    attn[0, 0] = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    attn[0, 1] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.25, 0.75], [0.6, 0.4, 0.0]])
    # Head mean of the patch block: [[.375, .375], [.3, .4]] → rows / sums (.75, .7).
    want = torch.tensor([[[0.5, 0.5], [3 / 7, 4 / 7]]])
    torch.testing.assert_close(patch_attention(attn), want)
    torch.testing.assert_close(patch_attention(attn.mean(1)), want)  # head-averaged input


def test_row_entropy_by_loop():
    p = _random_rows(2, 5, 0)
    p[0, 1] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # zeros contribute 0
    torch.testing.assert_close(row_entropy(p), _entropy_rows(p))


def test_entropy_rate_by_loop():
    p = _random_rows(2, 5, 1)
    want = torch.zeros(2, 5)
    for b in range(2):
        w = [[(p[b, i, j] + p[b, j, i]) / 2 for j in range(5)] for i in range(5)]
        d = [sum(row) for row in w]
        for i in range(5):
            h = -sum(w[i][j] / d[i] * math.log(w[i][j] / d[i]) for j in range(5) if w[i][j] > 0)
            want[b, i] = d[i] / sum(d) * h
    torch.testing.assert_close(entropy_rate(p), want)


def test_two_level_entropy_by_loop():
    p = _random_rows(2, 6, 2)
    modules = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]])
    want = torch.zeros(2, 6)
    for b in range(2):
        w = (p[b] + p[b].t()) / 2
        d = w.sum(1)
        vol = float(d.sum())
        for i in range(6):
            m = modules[b] == modules[b, i]
            v_m = float(d[m].sum())
            cut = float(w[m][:, ~m].sum())  # edge weight leaving the module
            di = float(d[i])
            want[b, i] = -(di / vol) * math.log(di / v_m) - (di / v_m) * (cut / vol) * math.log(v_m / vol)
    torch.testing.assert_close(two_level_entropy(p, modules=modules), want)
    assert two_level_entropy(p, modules=modules).sum(-1).tolist() == pytest.approx(
        want.sum(-1).tolist(), abs=1e-6
    )


@pytest.mark.parametrize("kind", ["row_entropy", "entropy_rate", "two_level"])
def test_structural_entropy_is_the_minmax_of_the_tap_mean(kind):
    g = torch.Generator().manual_seed(4)
    # Two taps, two images, two heads, with CLS row and column; images on very different entropy scales.
    taps = [torch.rand(2, 2, 6, 6, generator=g) ** 4 for _ in range(2)]
    taps = [t / t.sum(-1, keepdim=True) for t in taps]
    taps[0][1] = taps[0][1] ** 0.05
    taps[0][1] /= taps[0][1].sum(-1, keepdim=True)
    per_tap = []
    for t in taps:
        a = t.mean(1)[:, 1:, 1:]
        p = a / a.sum(-1, keepdim=True)
        if kind == "row_entropy":
            per_tap.append(_entropy_rows(p))
        elif kind == "entropy_rate":
            w = (p + p.transpose(1, 2)) / 2
            d = w.sum(-1)
            per_tap.append(d / d.sum(-1, keepdim=True) * _entropy_rows(w / d[..., None]))
        else:  # the partition is k-means' on the walk's rows; the formula is pinned by the loop test above
            w = (p + p.transpose(1, 2)) / 2
            per_tap.append(two_level_entropy(p, modules=kmeans_modules(w / w.sum(-1, keepdim=True), 2, 5)))
    h = (per_tap[0] + per_tap[1]) / 2
    want = torch.stack([(row - row.min()) / (row.max() - row.min()) for row in h])
    torch.testing.assert_close(structural_entropy(taps, kind, k=2, iters=5), want, atol=1e-5, rtol=1e-5)


# --- routing, gate, split, retrieval --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_route_weights_by_hand(temperature):
    p = torch.tensor([[0.9, 0.2, 0.6, 0.0]])
    e = torch.tensor([[1.0, 0.3, 0.7, 0.5]])
    x = 1.0 / temperature
    r_a = [0.9 * 1.0**x, 0.2 * 0.3**x, 0.6 * 0.7**x, 0.0]
    r_n = [0.1 * 0.0**x, 0.8 * 0.7**x, 0.4 * 0.3**x, 1.0 * 0.5**x]
    w_n, w_a = route_weights(p, e, temperature, "l1")
    torch.testing.assert_close(w_a, torch.tensor([[v / sum(r_a) for v in r_a]]))
    torch.testing.assert_close(w_n, torch.tensor([[v / sum(r_n) for v in r_n]]))
    s_n, s_a = route_weights(p, e, temperature, "softmax")
    torch.testing.assert_close(
        s_a, torch.tensor([[math.exp(v) for v in r_a]]) / sum(math.exp(v) for v in r_a)
    )
    torch.testing.assert_close(
        s_n, torch.tensor([[math.exp(v) for v in r_n]]) / sum(math.exp(v) for v in r_n)
    )


def test_confidence_gate_by_hand():
    p = torch.tensor([[0.1, 0.3, 0.2, 0.0]])
    e = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # population std 0.5 (sample std 0.577)
    sig = 1.0 / (1.0 + math.exp(-(0.3 - 0.4)))
    assert confidence_gate(p, e, tau=0.4, k0=2.0, k1=3.0).item() == pytest.approx(sig * (2.0 + 3.0 * 0.5))


@pytest.mark.parametrize("temperature", [0.1, 0.3])
def test_entropy_split_by_hand(temperature):
    e = torch.tensor([[0.0, 0.2, 1.0]])  # mean 0.4
    want = [1.0 / (1.0 + math.exp(-(v - 0.4) / temperature)) for v in (0.0, 0.2, 1.0)]
    torch.testing.assert_close(entropy_split(e, temperature), torch.tensor([want]))


def test_retrieve_by_hand_without_temperature():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = torch.tensor([[0.8, 0.6]])
    q_proj, k_proj = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    logits = [1.0, 2.0, 3.0]  # ⟨W_q q, W_k k⟩, used as they are
    z = sum(math.exp(v) for v in logits)
    got = retrieve(q, q_proj, k_proj, keys, values, None)
    torch.testing.assert_close(got, torch.tensor([[math.exp(1) / z, (math.exp(2) + math.exp(3)) / z]]))
    # Raw cosines (0.8, 0.6, 0.96): the 50th percentile is 0.8, so only key 2 (0.96 > 0.8) is dropped.
    got = retrieve(q, q_proj, k_proj, keys, values, 0.5)
    z = math.exp(1) + math.exp(2)
    torch.testing.assert_close(got, torch.tensor([[math.exp(1) / z, math.exp(2) / z]]))


def test_routed_tokens_by_hand():
    model = _model()
    p = torch.tensor([[0.9, 0.1, 0.5, 0.5]])
    e = torch.tensor([[1.0, 0.0, 0.5, 0.25]])
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]])
    tokens, routes, g = model.routed_tokens(p, e, z)
    r_a = torch.tensor([0.9, 0.0, 0.5 * 0.5**10, 0.5 * 0.25**10])
    r_n = torch.tensor([0.0, 0.9, 0.5 * 0.5**10, 0.5 * 0.75**10])
    t_a_raw = (r_a / r_a.sum()) @ z[0]
    t_n = (r_n / r_n.sum()) @ z[0]
    std = float(torch.tensor([1.0, 0.0, 0.5, 0.25]).std(unbiased=False))
    gate = 1.0 / (1.0 + math.exp(-(0.9 - 0.5))) * (5.0 + 50.0 * std)
    assert g.item() == pytest.approx(gate, rel=1e-5)
    for s in range(2):  # both branches pool the same tokens without the split
        torch.testing.assert_close(tokens[0, s, 0], t_n)
        torch.testing.assert_close(tokens[0, s, 1], gate * t_a_raw)
    torch.testing.assert_close(routes[0], torch.stack([r_n / r_n.sum(), r_a / r_a.sum()]))
    # Split: branch A pools p(1 − s) (localised, low entropy), branch B p·s (diffuse); t_n stays shared.
    model = _model(entropy_split=True, split_temperature=0.2)
    tokens, _, _ = model.routed_tokens(p, e, z)
    s_ = torch.sigmoid((e[0] - e[0].mean()) / 0.2)
    for branch, r in ((0, p[0] * (1 - s_)), (1, p[0] * s_)):
        torch.testing.assert_close(tokens[0, branch, 1], gate * (r / r.sum()) @ z[0])
        torch.testing.assert_close(tokens[0, branch, 0], t_n)
    tokens, _, g = _model(gate=False).routed_tokens(p, e, z)
    assert g.item() == 1.0
    torch.testing.assert_close(tokens[0, 0, 1], t_a_raw)


def test_prompt_bias_is_added_to_every_context_token(monkeypatch):
    """The text encoder sees ctx[s, c] + Lin_{s,c}(t) at all n_ctx positions, one call for B × S × 2 prompts."""
    model = _model()
    text = model.clip.text
    seen = []
    original = text.encode_embeddings

    def spy(embeds, eot, deep_prompts=None):
        seen.append(embeds.detach().clone())
        return original(embeds, eot, deep_prompts=deep_prompts)

    monkeypatch.setattr(text, "encode_embeddings", spy)
    _, hooked = _run(model, _images(), training=False)
    assert len(seen) == 1
    n_ctx = model.prompts.n_ctx
    embeds = seen[0].view(2, 2, 2, -1, seen[0].shape[-1])  # [B, S, class, L, width]
    ctx = embeds[:, :, :, 1 : 1 + n_ctx]
    want = model.prompts.ctx.detach()[None] + hooked["bias"][:, :, :, None, :]
    torch.testing.assert_close(ctx, want)
    # And the bias of class c is Lin_{s,c} of the matching routed token (normal: t_n, anomalous: g·t_raw).
    w, b = model.bias.weight.detach(), model.bias.bias.detach()
    for s in range(2):
        for c in range(2):
            lin = hooked["tokens"][:, s, c] @ w[s, c].t() + b[s, c]
            torch.testing.assert_close(hooked["bias"][:, s, c], lin)
    assert (ctx[:, :, :, 0] - ctx[:, :, :, -1]).abs().max() > 0  # the contexts themselves differ per position


# --- fusion and score -----------------------------------------------------------------------------------------------


def _const_probs(values: list[tuple[float, float]]) -> torch.Tensor:
    """[1, S, 2, N] branch probabilities constant over patches: (S_n, S_a) per branch."""
    return torch.tensor(values).view(1, len(values), 2, 1).expand(1, len(values), 2, N).contiguous()


def test_fused_map_weights_by_hand():
    model = _model()
    probs = _const_probs([(0.2, 0.8), (0.6, 0.4)])  # M_A = (0.8 + 0.8)/2 = 0.8, M_B = (0.4 + 0.4)/2 = 0.4
    fused = model.fuse(probs, (SIDE, SIDE), (SIZE, SIZE))
    torch.testing.assert_close(fused, torch.full((1, SIZE, SIZE), 0.7 * 0.8 + 0.3 * 0.4))
    # M_b = (S_a + 1 − S_n)/2 with S_a + S_n ≠ 1 (pins the formula, not just the weights).
    probs = _const_probs([(0.1, 0.3), (0.5, 0.9)])
    want = 0.7 * (0.3 + 0.9) / 2 + 0.3 * (0.9 + 0.5) / 2
    torch.testing.assert_close(
        model.fuse(probs, (SIDE, SIDE), (SIZE, SIZE)), torch.full((1, SIZE, SIZE), want)
    )


def test_confidence_fusion_by_hand():
    model = _model(confidence_fusion=True)

    def conf(p: float) -> float:
        return 1.0 - (-(p * math.log(p) + (1 - p) * math.log(1 - p))) / math.log(2.0)

    probs = _const_probs([(0.1, 0.9), (0.3, 0.7)])
    c_a, c_b = conf(0.9), conf(0.7)
    want = (c_a * 0.9 + c_b * 0.7) / (c_a + c_b)
    got = model.fuse(probs, (SIDE, SIDE), (SIZE, SIZE))
    torch.testing.assert_close(got, torch.full((1, SIZE, SIZE), want), atol=1e-5, rtol=1e-5)
    # A confident branch beside one at 0.5: the confident branch alone.
    got = model.fuse(_const_probs([(0.2, 0.8), (0.5, 0.5)]), (SIDE, SIDE), (SIZE, SIZE))
    torch.testing.assert_close(got, torch.full((1, SIZE, SIZE), 0.8), atol=1e-5, rtol=1e-5)
    # Both branches at 0.5 (no confidence anywhere): the map is 0.5 (the fixed fusion), not 0.
    got = model.fuse(_const_probs([(0.5, 0.5), (0.5, 0.5)]), (SIDE, SIDE), (SIZE, SIZE))
    torch.testing.assert_close(got, torch.full((1, SIZE, SIZE), 0.5))


# --- losses -----------------------------------------------------------------------------------------------------------


def test_retrieval_stage_loss_by_formula():
    model, images = _model(), _images()
    batch = _batch(images)
    model.set_stage("retrieval")
    out, _ = _run(model, images, training=True, stage="retrieval")
    probs = out.loss_inputs["retrieval_probs"]  # [B, N, 2]
    up = F.interpolate(probs.transpose(1, 2).reshape(2, 2, SIDE, SIDE), size=(SIZE, SIZE), mode="bilinear")
    gt = batch.mask[:, 0].float()
    logits = out.loss_inputs["image_logits"]
    ce = -torch.log_softmax(logits, -1)[torch.arange(2), batch.label].mean()
    want = _focal(up, gt) + _dice(up[:, 1], gt) + ce
    got = model.loss(out, batch)
    assert got["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert got["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.1, 0.9]])
def test_prompt_stage_loss_by_formula(weights):
    model = _model(branch_weights=weights)
    model.set_stage("prompt")
    batch = _batch(_images())
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 2, N, generator=g)  # [B, S, N] anomalous probability: branches far apart
    a[:, 1] = a[:, 1] ** 4
    probs = torch.stack([1 - a, a], 2)  # [B, S, 2, N]
    out = AnomalyOutput(
        torch.zeros(2, SIZE, SIZE),
        torch.zeros(2),
        {},
        {"branch_probs": probs, "retrieval_probs": torch.zeros(2, N, 2)},
    )
    gt = batch.mask[:, 0].float()
    per_branch = []
    for s in range(2):
        up = F.interpolate(probs[:, s].reshape(2, 2, SIDE, SIDE), size=(SIZE, SIZE), mode="bilinear")
        per_branch.append(_focal(up, gt) + _dice(up[:, 1], gt) + _dice(up[:, 0], 1 - gt))
    assert abs(per_branch[0] - per_branch[1]) > 0.05  # swapped weights would show
    got = model.loss(out, batch)
    assert got["loss"].item() == pytest.approx(
        (weights[0] * per_branch[0] + weights[1] * per_branch[1]).item(), rel=1e-5
    )
    assert got["branch_a"].item() == pytest.approx(per_branch[0].item(), rel=1e-5)
    assert got["branch_b"].item() == pytest.approx(per_branch[1].item(), rel=1e-5)
    single = _model(single_branch=True)
    single.set_stage("prompt")
    out1 = AnomalyOutput(
        out.anomaly_map, out.image_score, {}, {**out.loss_inputs, "branch_probs": probs[:, :1]}
    )
    assert single.loss(out1, batch)["loss"].item() == pytest.approx(per_branch[0].item(), rel=1e-5)


# --- memory -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["pure", "coverage"])
def test_memory_keys_by_formula(rule):
    """Image keys: normalised global embeddings, one-hot labels. Patch keys: per image the normalised mean of the
    neighbour-averaged tap-24 ``ln_post`` tokens inside (anomalous) and outside (normal) the mask."""
    from zsad.methods.entroad.memory import collect_memory

    model = _model(memory_regions=rule, region_coverage=0.4)
    images = _images(3, seed=7)
    mask = torch.zeros(3, 1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, :20, :25] = True  # patches (0,0) (0,1) covered, (1,0) (1,1) partly: 6/14 rows, 11/14 columns
    mask[2, :, 30:, 30:] = True
    names = ["a", "b", "c"]
    batch = Batch(
        images, mask, torch.tensor([1, 0, 1]), names, names, names, [f"memory/{n}.png" for n in names]
    )
    cpu = torch.device("cpu")
    mem = collect_memory([batch], lambda x: model._encode_memory(x, cpu), (1, 3, 5), 0.5, cpu, rule, 0.4)
    with torch.no_grad():
        f = model.clip.visual(images, taps=(4,), dpam_start=2, pre_proj=True)
    torch.testing.assert_close(
        mem.image_keys, f.global_embedding / f.global_embedding.norm(dim=-1, keepdim=True)
    )
    assert mem.image_values.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    tokens = _neighbour_average(f.pre_proj_tokens[0])
    keys, values = [], []
    for b in range(3):
        normal, anomalous = [], []
        for i in range(SIDE):
            for j in range(SIDE):
                m = mask[b, 0].float()
                if rule == "pure":  # the 2 × 2 centre pixels of the 14 × 14 patch
                    v = m[i * 14 + 6 : i * 14 + 8, j * 14 + 6 : j * 14 + 8].mean()
                    is_a, is_n = v == 1, v == 0
                else:
                    v = m[i * 14 : i * 14 + 14, j * 14 : j * 14 + 14].mean()
                    is_a, is_n = v >= 0.4, v == 0
                (anomalous if is_a else normal if is_n else []).append(tokens[b, i * SIDE + j])
        for region, value in ((normal, [1.0, 0.0]), (anomalous, [0.0, 1.0])):
            if region:
                k = torch.stack(region).mean(0)
                keys.append(k / k.norm())
                values.append(value)
    torch.testing.assert_close(mem.patch_keys, torch.stack(keys), atol=1e-5, rtol=1e-5)
    assert mem.patch_values.tolist() == values
