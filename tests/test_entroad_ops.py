"""EntroAD's pure tensor operations: entropies, routing, gate, retrieval, memory pooling (hand-computed cases)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zsad.methods.entroad.entropy import (
    entropy_rate,
    kmeans_modules,
    patch_attention,
    row_entropy,
    structural_entropy,
    two_level_entropy,
)
from zsad.methods.entroad.memory import mask_pooled_keys, patch_regions
from zsad.methods.entroad.routing import (
    confidence_gate,
    neighbour_average,
    retrieve,
    route_weights,
    row_quantile,
)


def _attention_with_cls(p: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """Wrap a [B, N, N] patch graph into [B, heads, 1+N, 1+N] attention with CLS mass that must be dropped."""
    b, n, _ = p.shape
    a = torch.zeros(b, heads, n + 1, n + 1)
    a[:, :, 1:, 1:] = 0.5 * p.unsqueeze(1)
    a[:, :, 1:, 0] = 0.5  # half of every patch row goes to CLS
    a[:, :, 0, :] = 1.0 / (n + 1)
    return a


def test_row_entropy_uniform_is_log_n_and_one_hot_is_zero():
    n = 7
    uniform = torch.full((1, n, n), 1.0 / n)
    one_hot = torch.eye(n)[None]
    assert torch.allclose(row_entropy(uniform), torch.full((1, n), math.log(n)), atol=1e-6)
    assert torch.allclose(row_entropy(one_hot), torch.zeros(1, n), atol=1e-7)


def test_patch_attention_drops_cls_averages_heads_and_renormalises():
    p = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])
    q = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    attn = _attention_with_cls(p)
    attn[:, 1] = _attention_with_cls(q)[:, 0]  # a second head with another patch graph
    assert torch.allclose(patch_attention(attn), (p + q) / 2, atol=1e-6)


def test_entropy_rate_on_hand_made_graphs():
    # Path graph 0-1-2 as a random walk: pi = (1/4, 1/2, 1/4), only the middle node has a choice (ln 2).
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]])
    assert torch.allclose(entropy_rate(p), torch.tensor([[0.0, 0.5 * math.log(2), 0.0]]), atol=1e-6)
    # Asymmetric P = [[.5, .5], [0, 1]] → W = [[.5, .25], [.25, 1]], d = (.75, 1.25), Q = [[2/3, 1/3], [.2, .8]].
    p = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    h0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    h1 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert torch.allclose(entropy_rate(p), torch.tensor([[0.375 * h0, 0.625 * h1]]), atol=1e-6)


# Two 2-node communities joined by weak edges; symmetric and row-stochastic, so W = P and every degree is 1.
TWO_COMMUNITIES = torch.tensor(
    [[[0.5, 0.4, 0.1, 0.0], [0.4, 0.5, 0.0, 0.1], [0.1, 0.0, 0.5, 0.4], [0.0, 0.1, 0.4, 0.5]]]
)


def test_two_level_entropy_on_hand_made_partition():
    # vol G = 4, each module volume 2 and cut 0.2: H_i = -(1/4) ln(1/2) - (1/2)(0.2/4) ln(2/4) = 0.275 ln 2.
    modules = torch.tensor([[0, 0, 1, 1]])
    h = two_level_entropy(TWO_COMMUNITIES, modules=modules)
    assert torch.allclose(h, torch.full((1, 4), 0.275 * math.log(2)), atol=1e-6)
    assert h.sum().item() == pytest.approx(1.1 * math.log(2), abs=1e-6)  # Li–Pan two-dimensional entropy
    # One module: the module term vanishes and H is the one-dimensional structural entropy -Σ d/vol ln(d/vol).
    h1 = two_level_entropy(TWO_COMMUNITIES, modules=torch.zeros(1, 4, dtype=torch.long))
    assert h1.sum().item() == pytest.approx(math.log(4), abs=1e-6)


def test_kmeans_finds_the_two_communities():
    assign = kmeans_modules(TWO_COMMUNITIES, k=2, iters=3)[0]
    assert assign[0] == assign[1] and assign[2] == assign[3] and assign[0] != assign[2]
    h = two_level_entropy(TWO_COMMUNITIES, k=2, iters=3)
    assert torch.allclose(h, torch.full((1, 4), 0.275 * math.log(2)), atol=1e-6)


def test_structural_entropy_is_minmax_normalised_mean_over_taps():
    n = 4
    # Tap 1: patch 0 attends uniformly (ln 4), the others one-hot (0). Tap 2: patch 0 and 1 attend to two patches.
    tap1 = torch.eye(n)[None].clone()
    tap1[0, 0] = 1.0 / n
    tap2 = torch.eye(n)[None].clone()
    tap2[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    tap2[0, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    e = structural_entropy([_attention_with_cls(tap1), _attention_with_cls(tap2)], "row_entropy")
    # mean H = ((ln4 + ln2)/2, ln2/2, 0, 0) → min-max: (1, ln2/(ln4+ln2), 0, 0) = (1, 1/3, 0, 0).
    assert torch.allclose(e, torch.tensor([[1.0, 1.0 / 3.0, 0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="method.entropy"):
        structural_entropy([_attention_with_cls(tap1)], "bogus")


def test_route_weights_are_distributions_and_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    p, e = torch.rand(3, 50, generator=g), torch.rand(3, 50, generator=g)
    for norm in ("l1", "softmax"):
        w_n, w_a = route_weights(p, e, 0.1, norm)
        for w in (w_n, w_a):
            assert (w >= 0).all()
            assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-5)
    # All-normal retrieval (p = 0) still gives a distribution for the anomalous route.
    _, w_a = route_weights(torch.zeros(1, 5), torch.rand(1, 5, generator=g), 0.1, "l1")
    assert torch.allclose(w_a.sum(-1), torch.ones(1)) and (w_a >= 0).all()
    # Hand case: p = (1, .5, 0), ê = (1, .5, .8), T = .1 → r^a = (1, .5·.5^10, 0), r^n = (0, .5·.5^10, .2^10).
    p = torch.tensor([[1.0, 0.5, 0.0]])
    e = torch.tensor([[1.0, 0.5, 0.8]])
    w_n, w_a = route_weights(p, e, 0.1, "l1")
    r_a = torch.tensor([[1.0, 0.5 * 0.5**10, 0.0]])
    r_n = torch.tensor([[0.0, 0.5 * 0.5**10, 0.2**10]])
    assert torch.allclose(w_a, r_a / r_a.sum(), atol=1e-6)
    assert torch.allclose(w_n, r_n / r_n.sum(), atol=1e-6)


def test_l1_concentrates_where_softmax_is_nearly_uniform():
    n = 1369  # 37 × 37 patches
    p = torch.ones(1, n)
    e = torch.full((1, n), 0.5)
    e[0, 0] = 1.0  # one clearly high-entropy patch
    _, w_l1 = route_weights(p, e, 0.1, "l1")
    _, w_sm = route_weights(p, e, 0.1, "softmax")
    # L1: 1 / (1 + 1368 · 0.5^10) ≈ 0.43 on the salient patch. Softmax of values in [0, 1]: within a factor e of 1/N.
    assert w_l1[0, 0].item() == pytest.approx(1.0 / (1.0 + (n - 1) * 0.5**10), rel=1e-4)
    assert w_sm.max().item() / w_sm.min().item() <= math.e + 1e-4
    assert w_sm[0, 0].item() < 3.0 / n


def test_confidence_gate_matches_its_formula():
    p = torch.tensor([[0.2, 0.9, 0.4], [0.1, 0.1, 0.1]])
    e = torch.tensor([[0.0, 0.5, 1.0], [0.3, 0.3, 0.3]])
    g = confidence_gate(p, e, tau=0.5, k0=5.0, k1=50.0)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = [sig(0.4) * (5.0 + 50.0 * math.sqrt(1.0 / 6.0)), sig(-0.4) * 5.0]
    assert torch.allclose(g, torch.tensor(expected), atol=1e-5)


def test_neighbour_average_kernels_and_borders():
    grid = (5, 5)
    const = torch.full((1, 25, 3), 2.0)
    assert torch.allclose(neighbour_average(const, grid), const)  # borders average existing patches only
    delta = torch.zeros(1, 25, 1)
    delta[0, 12] = 1.0  # centre of the 5×5 grid
    out = neighbour_average(delta, grid, (1, 3, 5))
    assert out[0, 12, 0].item() == pytest.approx((1.0 + 1.0 / 9 + 1.0 / 25) / 3, abs=1e-6)
    assert torch.equal(neighbour_average(delta, grid, (1,)), delta)
    with pytest.raises(ValueError, match="method.kernels"):
        neighbour_average(delta, grid, (2,))


@pytest.mark.parametrize("q", [0.8, 0.95, 0.5])
def test_row_quantile_matches_torch_quantile(q):
    x = torch.randn(3, 7, 41, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(row_quantile(x, q), torch.quantile(x, q, dim=-1, keepdim=True), atol=1e-6)


def test_similarity_dropout_hides_the_self_match():
    keys = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    values = torch.tensor([[0.0, 1.0]] + [[1.0, 0.0]] * 4)  # key 0 anomalous, the rest normal
    query = keys[:1].clone()  # the query is key 0 itself (memory and training set coincide)
    logits_scale = 50.0
    with_self = retrieve(query, query * logits_scale, keys, keys, values, drop_q=None)
    dropped = retrieve(query, query * logits_scale, keys, keys, values, drop_q=0.8)
    assert with_self[0, 1] > 0.9  # retrieves itself
    assert dropped[0, 1].item() == pytest.approx(0.0, abs=1e-7)  # 80th percentile masks the self match
    assert torch.allclose(dropped.sum(-1), torch.ones(1))


def test_mask_pooled_keys_inside_and_outside_the_mask():
    grid = (2, 2)
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]], [[1.0, 1.0]] * 4])
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[0, :, :2, :] = True  # top row of patches of image 0 is anomalous; image 1 is normal
    keys, values = mask_pooled_keys(tokens, masks, grid)
    assert keys.shape == (3, 2)
    # Order: image 0 normal, image 0 anomalous, image 1 normal.
    assert torch.allclose(values, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(keys[0], F.normalize(torch.tensor([0.0, 3.0]), dim=0))
    assert torch.allclose(keys[1], F.normalize(torch.tensor([2.0, 0.0]), dim=0))
    assert torch.allclose(keys[2], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    assert mask_pooled_keys(tokens, None, grid)[0].shape == (0, 2)


def _regions_by_loop(mask: torch.Tensor, side: int, coverage: float) -> tuple[list, list]:
    """Per patch of a [H, W] 0/1 mask: (pure, coverage) labels 'n' / 'a' / '-' (neither), counted pixel by pixel.

    Bilinear shrinking by the patch size p reads the pixels at p/2 - 1 and p/2 of each patch (source coordinate
    (i + 0.5)·p - 0.5), so the pure rule's value is the mean of those 2 × 2 centre pixels.
    """
    p = mask.shape[0] // side
    pure, cov = [], []
    for i in range(side):
        for j in range(side):
            rows, cols = slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p)
            centre = mask[
                i * p + p // 2 - 1 : i * p + p // 2 + 1, j * p + p // 2 - 1 : j * p + p // 2 + 1
            ].mean()
            share = mask[rows, cols].mean()
            pure.append("a" if centre == 1 else "n" if centre == 0 else "-")
            cov.append("a" if share >= coverage else "n" if share == 0 else "-")
    return pure, cov


def _labels(regions: torch.Tensor) -> list:
    """[2, N] boolean {normal, anomalous} regions → 'n' / 'a' / '-' per patch (never both)."""
    normal, anomalous = regions[0].tolist(), regions[1].tolist()
    assert not any(a and n for a, n in zip(anomalous, normal))
    return ["a" if a else "n" if n else "-" for a, n in zip(anomalous, normal)]


def test_pure_and_coverage_regions_at_518_to_37():
    masks = torch.zeros(3, 1, 518, 518)
    masks[0, 0, :, :46] = 1.0  # patch column 3 (px 42..55) holds 4 defect px per row: centre (48, 49) outside
    masks[1, 0, :, :49] = 1.0  # column 3 half covered (7 of 14 px): centre pixel 48 in, 49 out
    yy, xx = torch.meshgrid(torch.arange(518.0), torch.arange(518.0), indexing="ij")
    masks[2, 0] = ((yy - 250.0) ** 2 + (xx - 270.0) ** 2 < 90.0**2).float()  # a disc
    pure = patch_regions(masks, (37, 37), "pure")
    cov = patch_regions(masks, (37, 37), "coverage", coverage=0.5)
    labels = [(_labels(pure[b]), _labels(cov[b])) for b in range(3)]
    for b in range(3):
        assert labels[b] == _regions_by_loop(masks[b, 0], 37, 0.5), b
    col3 = [r * 37 + 3 for r in range(37)]
    assert {labels[0][0][i] for i in col3} == {"n"} and {labels[0][1][i] for i in col3} == {"-"}
    assert {labels[1][0][i] for i in col3} == {"-"} and {labels[1][1][i] for i in col3} == {"a"}
    # The disc: the centre-pixel rule calls nearly every border patch normal or anomalous; coverage leaves each
    # partly covered patch (< 50 %) out, so the two memories differ on most of the border ring.
    pure_d, cov_d = labels[2]
    border = sum(lbl == "-" for lbl in cov_d)
    differ = sum(a != b for a, b in zip(pure_d, cov_d))
    assert sum(lbl == "-" for lbl in pure_d) <= 4 and border >= 20 and differ >= 0.8 * border
    # A higher coverage threshold moves half-covered patches out of the anomalous region.
    strict = patch_regions(masks, (37, 37), "coverage", coverage=0.75)
    assert {_labels(strict[1])[i] for i in col3} == {"-"}


def test_mask_pooled_keys_leave_out_patches_in_neither_region():
    # 4 × 4 pixels on a 2 × 2 grid: the top-right patch holds 1 defect pixel of 4 (coverage 0.25).
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1.0  # top-left patch fully inside
    masks[0, 0, 0, 2] = 1.0
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 4.0]]])
    keys, values = mask_pooled_keys(tokens, masks > 0.5, (2, 2), rule="coverage", coverage=0.5)
    # The partly covered patch (token [0, 1]) joins neither key; the normal key is the mean of the bottom row.
    assert torch.allclose(values, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(keys, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # At 2 px per patch the pure rule's 2 × 2 centre is the whole patch: it leaves it out too.
    keys, _ = mask_pooled_keys(tokens, masks > 0.5, (2, 2), rule="pure")
    assert torch.allclose(keys, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="memory_regions"):
        patch_regions(masks, (2, 2), "soft")
