"""The dense state term of the toy CLIP's pretraining supervises exactly what the methods read.

* ``vv_forward`` (the pretraining's differentiable V-V forward) equals ``CLIPVision(images, taps,
  dpam_start=1).patch_tokens`` — the toy presets' taps — on the same open_clip weights;
* ``patch_labels`` says anomalous / normal / ignored per patch from the defect's coverage;
* ``dense_loss`` is the balanced cross-entropy of the state logits, recomputed here from the tokens and prompts —
  per patch (V-V tokens) and per view (global embedding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zsad.backbones.clip import CLIPVision
from zsad.pretrain import toy_clip
from zsad.pretrain.toy_clip import ClipRecipe, build_toy_clip, patch_labels, vv_forward


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_toy_clip().eval()
    # non-trivial LayerNorm and layer-scale-free blocks: perturb the norms so that a wrong order shows
    with torch.no_grad():
        for n, p in m.visual.named_parameters():
            if "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_vv_tokens_equal_what_clipvision_gives_the_methods(model):
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, glob = vv_forward(model, images)
        ref = CLIPVision(model.visual, image_size=112)(images, (1, 2, 3, 4), dpam_start=1).patch_tokens
        want_glob = toy_clip.encode_image(model, images)
    # the global embedding is the one the contrastive loss trains
    torch.testing.assert_close(glob, want_glob, atol=1e-5, rtol=1e-5)
    assert len(mine) == len(ref) == 4
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and not the plain path (the V-V path is what is supervised)
    with torch.no_grad():
        plain = CLIPVision(model.visual, image_size=112)(images, (4,), dpam_start=None).patch_tokens[0]
    assert (mine[-1] - plain).abs().max() > 1e-2


def test_vv_tokens_carry_gradients():
    fresh = build_toy_clip()  # (CLIPVision freezes the tower it wraps: a model of its own)
    vv_forward(fresh, torch.randn(1, 3, 112, 112))[0][-1].sum().backward()
    assert fresh.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_patch_labels_from_coverage():
    masks = torch.zeros(1, 28, 28)
    masks[0, :14, :14] = 1.0  # patch 0 fully covered
    masks[0, :2, 14:28] = 1.0  # patch 1: 28/196 = 14 % covered → ignored at 25 %
    masks[0, 14:28, 14:21] = 1.0  # patch 3: 50 % covered
    labels = patch_labels(masks, 14, 0.25)
    assert labels.tolist() == [[1, -1, 0, 1]]
    assert patch_labels(masks, 14, 0.6).tolist() == [[1, -1, 0, -1]]


def test_dense_loss_is_the_balanced_state_cross_entropy(model, monkeypatch):
    """Recompute the loss from the tokens and the prompts with the views and labels fixed."""
    from zsad.pretrain.world import Views, load_world

    world = load_world(0, 1, size=112, workers=1, show_progress=False)
    n = 4
    masks = torch.zeros(n, 112, 112)
    masks[0, :28, :28] = 1.0  # 4 anomalous patches in view 0
    views = Views(
        torch.rand(n, 3, 112, 112),
        masks,
        torch.arange(n) % len(world),
        torch.tensor([True, False, True, True]),
    )
    monkeypatch.setattr(toy_clip, "sample_views", lambda *a, **k: views)
    recipe = ClipRecipe(dense_batch=n)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    with torch.no_grad():
        got, got_image = toy_clip.dense_loss(model, world, recipe, gen, rng)
        texts, row = toy_clip.state_prompts(world, np.random.default_rng(0))
        txt = toy_clip.encode_text(model, toy_clip.tokenize(texts))
        tokens, glob = vv_forward(model, toy_clip._normalise(views.images))
    labels = patch_labels(masks, 14, recipe.dense_min_cover)
    want = 0.0
    for t in tokens:
        per_block = []
        for label in (1, 0):
            losses = []
            for b in range(n):
                r = row[world.items[int(views.index[b])].category]
                logits = model.logit_scale.exp() * t[b] @ txt[[r, r + 1]].t()  # [N, 2]
                for j in torch.nonzero(labels[b] == label).flatten().tolist():
                    losses.append(float(F.cross_entropy(logits[j : j + 1], torch.tensor([label]))))
            per_block.append(np.mean(losses))
        want += 0.5 * (per_block[0] + per_block[1]) / len(tokens)
    assert float(got) == pytest.approx(want, rel=1e-4)
    # image term: the views' global embeddings, labelled by whether the view shows its defect, balanced
    per_state = []
    for label in (1, 0):
        losses = []
        for b in torch.nonzero(views.has_defect.long() == label).flatten().tolist():
            r = row[world.items[int(views.index[b])].category]
            logits = model.logit_scale.exp() * glob[b : b + 1] @ txt[[r, r + 1]].t()  # [1, 2]
            losses.append(float(F.cross_entropy(logits, torch.tensor([label]))))
        per_state.append(np.mean(losses))
    assert float(got_image) == pytest.approx(0.5 * (per_state[0] + per_state[1]), rel=1e-4)
