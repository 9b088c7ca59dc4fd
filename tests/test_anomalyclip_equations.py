"""Every equation of ``specs/clip_substrate.md`` that AnomalyCLIP's head, prompts and losses implement, computed
independently (hand values, loops, open_clip's own blocks, scipy) on the tiny preset and compared with zsad.

The backbone's own equations (DPAM V-V path, positional-embedding resize, taps, ``ln_post``) are pinned against a
naive reference in ``tests/test_clip_backbone.py``; here the backbone's outputs are inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from clip_reference import (
    SIZE,
    TAPS,
    T,
    ref_ce,
    ref_dice,
    ref_focal,
    ref_prompt_features,
    ref_seg_loss,
    ref_test_map,
    ref_two_class_softmax,
    tiny_batch,
    tiny_cfg,
    unit,
)

from zsad.losses import dice_loss, focal_loss, segmentation_loss
from zsad.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from zsad.prompts import PromptLearner


def tiny_model(**kw) -> AnomalyCLIP:
    torch.manual_seed(0)
    model = AnomalyCLIP(tiny_cfg(AnomalyCLIPConfig, **kw))
    with (
        torch.no_grad()
    ):  # prompts far from their N(0, 0.02) start, so that every term is visibly non-trivial
        model.prompts.ctx.normal_(0, 0.5)
        model.prompts.deep.normal_(0, 0.5)
    return model


def ref_forward(model: AnomalyCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-tap probabilities [B, L, 1, 2, 4, 4] and global logits [B, 2] from the backbone's outputs."""
    with torch.no_grad():
        feats = model.clip.visual(images, taps=TAPS, dpam_start=2)
        pair = ref_prompt_features(model.clip.text.tower, model.prompts.ctx, model.prompts.deep)[0]
    probs = torch.stack(
        [
            ref_two_class_softmax(z.double(), pair.double()).transpose(1, 2).reshape(-1, 2, 4, 4)
            for z in feats.patch_tokens
        ],
        1,
    )[:, :, None]
    g = unit(feats.global_embedding.double())
    logits = torch.stack([(g * pair[c].double()).sum(-1) for c in range(2)], -1) / T
    return probs.float(), logits.float()


# --- learnable prompts ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    from zsad.backbones.clip import build_clip

    return build_clip("tiny", vision=False).text


def _learner(text, **kw) -> PromptLearner:
    torch.manual_seed(3)
    learner = PromptLearner(text, **kw)
    with torch.no_grad():
        learner.ctx.normal_(0, 0.5)
        if learner.deep is not None:
            learner.deep.normal_(0, 0.5)
    return learner


@torch.no_grad()
def test_prompt_features_are_sos_context_words_eot_with_deep_tokens_replacing_positions(text):
    """[SOS] V1..V12 object. / [SOS] W1..W12 damaged object.; deep tokens replace positions 1..4 before text
    layers 1..depth−1 (shared by every set); EOT → ln_final → projection → L2."""
    learner = _learner(text, n_sets=2)
    assert learner.deep.shape == (2, 4, text.width)  # depth 9 clipped to the 3 tiny text layers
    want = ref_prompt_features(text.tower, learner.ctx, learner.deep)
    torch.testing.assert_close(learner(text), want, atol=2e-5, rtol=1e-4)
    # without deep tokens the context vectors are read at layer 0 only through the embeddings
    flat = _learner(text, n_sets=1, n_deep=0)
    torch.testing.assert_close(
        flat(text), ref_prompt_features(text.tower, flat.ctx, None), atol=2e-5, rtol=1e-4
    )


@torch.no_grad()
def test_per_image_bias_is_added_to_every_context_token(text):
    learner = _learner(text, n_sets=2)
    bias = torch.randn(3, 2, 2, text.width, generator=torch.Generator().manual_seed(4))
    want = ref_prompt_features(text.tower, learner.ctx, learner.deep, bias=bias)
    torch.testing.assert_close(learner(text, bias=bias), want, atol=2e-5, rtol=1e-4)


def test_context_and_deep_tokens_are_initialised_normal_0_02(text):
    torch.manual_seed(0)
    learner = PromptLearner(text, n_sets=8)  # 8·2·12·64 context values
    for p in (learner.ctx.detach(), learner.deep.detach()):
        assert abs(float(p.mean())) < 2e-3 and abs(float(p.std()) - 0.02) < 1.5e-3


# --- maps, global logits, scores -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,reduce", [(0.0, "mean"), (4.0, "mean"), (4.0, "sum")])
def test_maps_are_softmax_of_cosines_over_t_and_the_test_map_is_their_reduction_smoothed(sigma, reduce):
    model = tiny_model(smoothing_sigma=sigma, map_reduce=reduce).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
    probs, logits = ref_forward(model, batch.image)
    torch.testing.assert_close(out.loss_inputs["probs"], probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss_inputs["logits"], logits, atol=1e-4, rtol=1e-4)
    want = ref_test_map(probs, sigma, reduce)
    assert out.anomaly_map.dtype == torch.float32 and out.anomaly_map.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(out.anomaly_map, want, atol=1e-5, rtol=1e-4)
    # image score (AnomalyCLIP): the global embedding's anomalous probability
    e = torch.exp(logits.double())
    torch.testing.assert_close(out.image_score, (e[:, 1] / e.sum(1)).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", ["max", "mean_topk"])
def test_map_score_rules(rule):
    model = tiny_model(score_rule=rule, topk_frac=0.05, smoothing_sigma=1.0).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
    for m, s in zip(out.anomaly_map.numpy(), out.image_score.tolist()):
        values = np.sort(m.ravel())[::-1]
        want = (
            values[0] if rule == "max" else values[: round(0.05 * SIZE * SIZE)].mean()
        )  # 157 of 3136 pixels
        assert s == pytest.approx(float(want), abs=1e-6)


# --- losses -----------------------------------------------------------------------------------------------------------


def test_focal_loss_hand_values():
    """γ = 2 on probabilities; the one-hot is clamped to [1e-5, 1 − 1e-5] and 1e-5 is added to p_t."""
    probs = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.3, 0.7]], dtype=torch.float64).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0.0, 1.0, 1.0]]], dtype=torch.float64)
    s = 1e-5
    pts = [
        0.9 * (1 - s) + 0.1 * s + s,
        1.0 * s
        + 0.0 * (1 - s)
        + s,  # a saturated wrong pixel stays finite thanks to the clamp and the smooth
        0.3 * s + 0.7 * (1 - s) + s,
    ]
    want = sum(-((1 - p) ** 2) * math.log(p) for p in pts) / 3
    assert float(focal_loss(probs, target)) == pytest.approx(want, rel=1e-12)
    assert float(ref_focal(probs, target)) == pytest.approx(want, rel=1e-12)


def test_dice_loss_hand_values():
    prob = torch.tensor([[[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    d0 = (2 * (0.8 + 0.6) + 1) / (2.0 + 2.0 + 1)
    d1 = (0 + 1) / (2.0 + 0.0 + 1)
    assert float(dice_loss(prob, target)) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-12)
    assert float(ref_dice(prob, target)) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-12)


@pytest.mark.parametrize("both", [True, False])
def test_segmentation_terms_are_focal_plus_both_dice(both):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 5, 6, generator=g, dtype=torch.float64)
    probs = torch.stack([1 - a, a], 1)
    gt = (torch.rand(2, 5, 6, generator=g) > 0.6).double()
    want = ref_focal(probs, gt) + ref_dice(a, gt) + (ref_dice(1 - a, 1 - gt) if both else 0.0)
    assert float(segmentation_loss(probs, gt, both_dice=both)) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("both", [True, False])
def test_loss_is_lambda_times_the_sum_over_taps_plus_the_image_ce(both):
    """λ · Σ_l [Focal(S^l, G) + Dice(S_a^l, G) (+ Dice(S_n^l, 1 − G))] + CE(⟨g, t⟩/T, y), λ = 2.5 here."""
    model = tiny_model(seg_weight=2.5, both_dice=both).train()
    batch = tiny_batch()
    terms = model.loss(model(batch.image, batch), batch)
    probs, logits = ref_forward(model, batch.image)
    seg = ref_seg_loss(probs, batch.gt, both_dice=both)
    ce = ref_ce(logits, batch.label)
    assert float(terms["seg"]) == pytest.approx(float(seg), rel=2e-5)
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=2e-5)
    assert float(terms["loss"].detach()) == pytest.approx(2.5 * float(seg) + float(ce), rel=2e-5)


def test_only_the_prompts_train():
    model = tiny_model().train()
    batch = tiny_batch()
    model.loss(model(batch.image, batch), batch)["loss"].backward()
    assert model.prompts.ctx.grad.abs().sum() > 0 and model.prompts.deep.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.clip.parameters())


def test_head_runs_in_float32_under_bf16_autocast():
    """Cosines / 0.07 in bf16 would move probabilities by ~1e-2: under autocast the head gives the float32 numbers
    of the (bf16) features it is fed."""
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.image, batch)
        feats = model.clip.visual(batch.image, taps=TAPS, dpam_start=2)
        text = model.prompts(model.clip.text)
    with torch.no_grad():
        want = model.level_probs([t.float() for t in feats.patch_tokens], (4, 4), text.float())
        logits = model.global_logits(feats.global_embedding.float(), text[0].float())
    torch.testing.assert_close(out.loss_inputs["probs"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss_inputs["logits"], logits, atol=1e-5, rtol=0)
