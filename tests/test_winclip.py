"""WinCLIP's equations, each computed independently: windows, window embeddings, scores, harmonic map, score rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_modules.types import Batch
from zsad.config import compose
from zsad.maps import gaussian_blur, upsample
from zsad.methods.winclip import harmonic_map, window_index
from zsad.registry import build_method


def _model(image_size: int = 56, **over: object):
    extra = [f"method.{k}={v}" for k, v in over.items()]
    cfg = compose(
        ["experiments/methods/winclip.yaml"],
        ["method.clip.name=tiny", "method.clip.pretrained=none", f"method.image_size={image_size}", *extra],
    )
    torch.manual_seed(0)
    return build_method(cfg.method).eval()


def _batch(images: torch.Tensor, name: str = "widget") -> Batch:
    b = images.shape[0]
    return Batch(
        images,
        None,
        torch.zeros(b, dtype=torch.long),
        ["c"] * b,
        [name] * b,
        ["d"] * b,
        [f"{i}" for i in range(b)],
    )


def test_window_index_is_every_k_by_k_block():
    idx = window_index((3, 4), 2)
    want = []
    for r in range(2):
        for c in range(3):
            want.append([r * 4 + c, r * 4 + c + 1, (r + 1) * 4 + c, (r + 1) * 4 + c + 1])
    assert idx.tolist() == want
    with pytest.raises(ValueError, match="does not fit"):
        window_index((3, 4), 4)


def test_harmonic_map_hand_values():
    # 1×3 grid, windows of 2: w0 = {0, 1} with score 0.5, w1 = {1, 2} with score 0.25.
    idx = window_index((1, 3), 1)  # sanity: k=1 windows are the patches themselves
    assert idx.flatten().tolist() == [0, 1, 2]
    idx = torch.tensor([[0, 1], [1, 2]])
    got = harmonic_map(torch.tensor([[0.5, 0.25]]), idx, 3)
    # patch 1: 2 / (1/0.5 + 1/0.25) = 2 / 6
    torch.testing.assert_close(got, torch.tensor([[0.5, 2 / 6, 0.25]]))


def test_whole_image_embedding_is_clip_encode_image():
    model = _model(image_size=224)  # the tiny preset's native grid: no positional resizing
    images = torch.randn(2, 3, 224, 224)
    visual = model.clip.visual
    tokens = visual._embed(images, visual._grid_of(images))
    got = model.encode_windows(tokens, None)[:, 0]
    want = F.normalize(visual.vit(images), dim=-1)  # open_clip's forward: ln_post(CLS) @ proj
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_window_embedding_equals_masked_attention_over_the_whole_sequence():
    """A window's embedding = the CLS output when every token may only attend to CLS + the window's tokens."""
    model = _model()
    images = torch.randn(1, 3, 56, 56)
    visual = model.clip.visual
    tokens = visual._embed(images, visual._grid_of(images))
    index = window_index((4, 4), 3)
    got = model.encode_windows(tokens, index)[0]
    for w, members in enumerate(index.tolist()):
        keep = torch.zeros(17, dtype=torch.bool)
        keep[0] = True
        keep[[1 + m for m in members]] = True
        mask = torch.full((17, 17), float("-inf"))
        mask[:, keep] = 0.0
        x = visual.vit.transformer(tokens, attn_mask=mask)
        want = F.normalize(visual.vit.ln_post(x[:, 0]) @ visual.vit.proj, dim=-1)[0]
        torch.testing.assert_close(got[w], want, rtol=1e-4, atol=1e-5)


def test_forward_map_and_scores_from_a_plain_loop():
    model = _model(smoothing_sigma=1.5)
    images = torch.randn(2, 3, 56, 56)
    out = model(images, _batch(images))
    text = model.text_cache(["widget"], model.clip.text, torch.device("cpu"))[0]  # [2, D] unit rows
    visual = model.clip.visual
    tokens = visual._embed(images, visual._grid_of(images))

    def prob(e: torch.Tensor) -> torch.Tensor:  # softmax(cos / T) of the anomalous class
        cos = F.normalize(e, dim=-1) @ text.t()
        return torch.softmax(cos / 0.01, dim=-1)[..., 1]

    maps = []
    for k in (2, 3):
        idx = window_index((4, 4), k)
        s = prob(model.encode_windows(tokens, idx))  # [B, W]
        m = torch.zeros(2, 16)
        for p in range(16):
            holders = [w for w in range(idx.shape[0]) if p in idx[w].tolist()]
            m[:, p] = len(holders) / sum(1 / s[:, w] for w in holders)
        maps.append(m)
    want_map = gaussian_blur(upsample(torch.stack(maps).mean(0).view(2, 4, 4), (56, 56)), 1.5)
    torch.testing.assert_close(out.anomaly_map, want_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        out.image_score, prob(model.encode_windows(tokens, None))[:, 0], rtol=1e-4, atol=1e-6
    )

    both = _model(smoothing_sigma=1.5, score_rule="global_max")(images, _batch(images))
    want = (out.image_score + want_map.flatten(1).amax(1)) / 2
    torch.testing.assert_close(both.image_score, want, rtol=1e-4, atol=1e-6)


def test_training_free():
    model = _model()
    assert model.stages() == []
    assert model.trainable_candidates() == []
    with pytest.raises(RuntimeError, match="training-free"):
        model.loss(None, None)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="training-free"):
        _model(**{"stages": "{main: {epochs: 1}}"})
