"""AnomalyCLIP-style learnable prompt sets on the tiny CLIP text tower."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from zsad.backbones.clip import CLIPText, build_clip
from zsad.prompts import PromptLearner


@pytest.fixture(scope="module")
def text() -> CLIPText:
    torch.manual_seed(0)
    return build_clip("tiny", vision=False).text  # 3 text layers, width 64, joint dim 32


def _learner(text: CLIPText, **kwargs) -> PromptLearner:
    torch.manual_seed(1)
    return PromptLearner(text, **kwargs)


def test_shapes_without_and_with_bias(text):
    learner = _learner(text, n_sets=3)
    assert learner.ctx.shape == (3, 2, 12, text.width)
    feats = learner(text)
    assert feats.shape == (3, 2, text.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, 2))
    biased = learner(text, bias=torch.randn(5, 3, 2, text.width))
    assert biased.shape == (5, 3, 2, text.embed_dim)
    with pytest.raises(ValueError, match=r"\[B, 3, 2, 64\]"):
        learner(text, bias=torch.randn(5, 2, text.width))


def test_single_set_accepts_three_dim_bias(text):
    learner = _learner(text)
    assert learner(text).shape == (1, 2, text.embed_dim)
    bias = torch.randn(4, 2, text.width)
    torch.testing.assert_close(learner(text, bias=bias), learner(text, bias=bias.unsqueeze(1)))


def test_one_text_encoder_call_per_forward(text):
    learner = _learner(text, n_sets=2)
    with mock.patch.object(text, "encode_embeddings", wraps=text.encode_embeddings) as spy:
        learner(text)
        assert spy.call_count == 1
        assert spy.call_args.args[0].shape[0] == 2 * 2
        learner(text, bias=torch.zeros(6, 2, 2, text.width))
        assert spy.call_count == 2
        assert spy.call_args.args[0].shape[0] == 6 * 2 * 2


def test_bias_changes_only_the_matching_prompt(text):
    learner = _learner(text, n_sets=2)
    with torch.no_grad():
        plain = learner(text)
        zero = learner(text, bias=torch.zeros(3, 2, 2, text.width))
        bias = torch.zeros(3, 2, 2, text.width)
        bias[1, 0, 1] = torch.randn(text.width)  # image 1, set 0, anomalous prompt
        moved = learner(text, bias=bias)
    torch.testing.assert_close(zero, plain.expand(3, -1, -1, -1), atol=1e-6, rtol=1e-5)
    changed = (moved - zero).abs().amax(dim=-1) > 1e-4  # [B, S, 2]
    expected = torch.zeros(3, 2, 2, dtype=torch.bool)
    expected[1, 0, 1] = True
    assert torch.equal(changed, expected)


def test_deep_prompts_clipped_to_text_depth(text):
    assert text.n_layers == 3
    assert _learner(text).deep.shape == (2, 4, text.width)  # depth 9 → 3 layers → 2 deep tensors
    assert _learner(text, depth=2, n_deep=3).deep.shape == (1, 3, text.width)
    assert _learner(text, depth=1).deep is None
    with pytest.raises(ValueError, match="n_deep"):
        PromptLearner(text, n_ctx=2, n_deep=4)


def test_deep_prompts_change_the_features(text):
    learner = _learner(text)
    with torch.no_grad():
        before = learner(text)
        learner.deep.add_(torch.randn_like(learner.deep))
        after = learner(text)
    assert not torch.allclose(before, after, atol=1e-4)


def test_gradients_reach_context_and_deep_tokens(text):
    learner = _learner(text, n_sets=2)
    bias = torch.zeros(2, 2, 2, text.width, requires_grad=True)
    learner(text, bias=bias)[..., 0].sum().backward()
    for p in (learner.ctx, learner.deep, bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in text.parameters())


@torch.no_grad()
def test_context_of_real_words_equals_plain_encoding(text):
    """With the context set to the embeddings of 12 real words and no deep tokens, a prompt is that sentence."""
    learner = _learner(text, depth=1)
    words = "a photo of the small metal part on a dark wooden table"
    assert len(words.split()) == 12
    sentences = [f"{words} object.", f"{words} damaged object."]
    tokens = text.tokenize(sentences)
    assert torch.equal(tokens.argmax(-1), learner.eot_index)  # every word is one BPE token
    learner.ctx.copy_(text.token_embedding(tokens)[:, 1:13].unsqueeze(0))
    torch.testing.assert_close(learner(text)[0], text.encode(tokens), atol=1e-5, rtol=1e-4)


def test_state_dict_holds_only_learnable_tensors(text):
    learner = _learner(text, n_sets=2)
    assert set(learner.state_dict()) == {"ctx", "deep"}
    other = PromptLearner(text, n_sets=2)
    other.load_state_dict(learner.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(text), learner(text))


def test_templates_are_the_object_agnostic_pair(text):
    """After the 12 context slots come exactly the words of "object." and "damaged object." (then EOT)."""
    learner = _learner(text)
    for i, words in enumerate(["object.", "damaged object."]):
        plain = text.tokenize([words])[0]
        n_words = int(plain.argmax()) - 1  # between SOS and EOT
        assert int(learner.eot_index[i]) == 1 + 12 + n_words
        assert torch.equal(learner.tokens[i, 13 : 13 + n_words + 1], plain[1 : 1 + n_words + 1])


def test_context_and_deep_tokens_start_as_normal_0_002():
    torch.manual_seed(0)
    wide = build_clip("tiny", vision=False).text
    learner = PromptLearner(wide, n_sets=8)  # 8·2·12·64 context values, 2·4·64 deep values
    for p, tol in ((learner.ctx, 0.001), (learner.deep, 0.003)):
        assert abs(float(p.detach().std()) - 0.02) < tol and abs(float(p.detach().mean())) < tol


@torch.no_grad()
def test_deep_prompts_follow_anomalyclip_semantics(text):
    """Independent re-computation with the tower's own open_clip blocks: layer 0 reads SOS + context + words;
    before layer j ≥ 1 the positions 1..n_deep are replaced by deep[j - 1]; EOT → ln_final → projection → unit."""
    learner = _learner(text, n_sets=2, depth=3, n_deep=4)
    assert learner.deep.shape == (2, 4, text.width)  # depth 3 → layers 1 and 2 get their own tokens
    feats = learner(text)  # [2, 2, D]
    tower = text.tower
    embeds = torch.cat(
        [learner.prefix.expand(2, -1, -1, -1), learner.ctx, learner.suffix.expand(2, -1, -1, -1)], dim=2
    ).flatten(0, 1)
    x = embeds + tower.positional_embedding
    for j, block in enumerate(tower.transformer.resblocks):
        if 1 <= j <= learner.deep.shape[0]:
            x = x.clone()
            x[:, 1:5] = learner.deep[j - 1]
        x = block(x, attn_mask=tower.attn_mask)
    eot = learner.eot_index.repeat(2)
    ref = tower.ln_final(x)[torch.arange(4), eot] @ tower.text_projection
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(feats.flatten(0, 1), ref, atol=1e-5, rtol=1e-4)
    # the first n_deep context vectors still matter: layer 0 reads them (random moves: LayerNorm hides constants)
    learner.ctx[:, :, :4] += torch.randn(2, 2, 4, text.width, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(learner(text), feats, atol=1e-4)


def test_deep_fp16_rounds_each_prompt_copy_forward_and_backward(text):
    """AnomalyCLIP's ``expand(P, …).half()``: the forward sees the deep tokens rounded to fp16; the gradient of each
    prompt's copy is rounded to fp16 and the P copies are summed in fp32. Recomputed with a per-prompt leaf."""
    plain = _learner(text, depth=3, n_deep=4)
    rounded = _learner(text, depth=3, n_deep=4, deep_fp16=True)
    with torch.no_grad():  # magnitudes where fp16 rounding is visible
        for learner in (plain, rounded):
            learner.deep.copy_(
                torch.randn(learner.deep.shape, generator=torch.Generator().manual_seed(2)) * 0.3
            )
    n_prompts = 2
    weights = torch.randn(n_prompts, text.embed_dim, generator=torch.Generator().manual_seed(3))
    out = rounded(text)[0]
    (out * weights).sum().backward()
    # Reference: one fp32 leaf per prompt holding the fp16-rounded values.
    copies = rounded.deep.detach().half().float().expand(n_prompts, -1, -1, -1).clone().requires_grad_(True)
    embeds = torch.cat([rounded.prefix, rounded.ctx[0].detach(), rounded.suffix], dim=1)
    ref = text.encode_embeddings(embeds, rounded.eot_index, deep_prompts=copies)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    (ref * weights).sum().backward()
    want = copies.grad.half().float().sum(0)
    assert torch.equal(rounded.deep.grad, want)
    # Without the switch: unrounded forward, and the gradient is the plain fp32 sum (differs from the rounded one).
    assert not torch.equal(plain(text)[0], out)
    assert not torch.equal(copies.grad.sum(0), want)
