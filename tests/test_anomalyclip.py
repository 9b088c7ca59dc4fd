"""AnomalyCLIP on the tiny CLIP preset: pooling, text-feature caching, trainable state, config checks.

The equations (prompts, maps, losses, scores) are pinned in ``tests/test_anomalyclip_equations.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import EXPERIMENTS, compose
from zsad.methods.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, pool_level

SIZE = 56  # 4 × 4 patches of 14 px
TINY = dict(image_size=SIZE, taps=[2, 3, 4], dpam_start=2, smoothing_sigma=0.0)


def tiny_model(**kw) -> AnomalyCLIP:
    cfg = OmegaConf.structured(AnomalyCLIPConfig(**{**TINY, **kw}))
    cfg.clip.name, cfg.clip.pretrained = "tiny", "none"
    torch.manual_seed(0)
    return AnomalyCLIP(cfg)


def tiny_batch(b: int = 2, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(b, 1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, 8:30, 12:40] = True
    label = torch.tensor([1] + [0] * (b - 1))
    return Batch(images, mask, label, ["c"] * b, ["object"] * b, ["d"] * b, [f"p{i}" for i in range(b)])


class CountTextCalls:
    """Counts calls of the text tower's encoder (the one entry point the prompt learner uses)."""

    def __init__(self, model: AnomalyCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        text = model.clip.text
        original = text.encode_embeddings

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(text, "encode_embeddings", counted)


def test_pool_level_matches_hand_computation():
    fmap = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = pool_level(fmap, 3).numpy()
    x = fmap.numpy()
    ref = np.zeros_like(x)
    for i, j in itertools.product(range(4), range(5)):
        ys = range(max(0, i - 1), min(4, i + 2))
        xs = range(max(0, j - 1), min(5, j + 2))
        cells = [
            x[:, :, a, c] for a in ys for c in xs
        ]  # padding not counted: 4 at corners, 6 at edges, 9 inside
        ref[:, :, i, j] = sum(cells) / len(cells)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(out - ref).max() < 1e-12
    # kernel 1 only renormalises
    assert torch.allclose(pool_level(fmap, 1), fmap / fmap.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="odd"):
        pool_level(fmap, 2)


def test_loss_without_masks_is_a_clear_error():
    model = tiny_model().train()
    batch = tiny_batch()
    out = model(batch.image, batch)
    no_mask = Batch(
        batch.image, None, batch.label, batch.category, batch.class_name, batch.dataset, batch.path
    )
    with pytest.raises(ValueError, match="pixel masks"):
        model.loss(out, no_mask)


def test_text_encoded_once_per_step_not_per_image(monkeypatch):
    model = tiny_model().train()
    counter = CountTextCalls(model, monkeypatch)
    batch = tiny_batch(b=3)
    model.loss(model(batch.image, batch), batch)["loss"].backward()
    assert counter.calls == 1
    assert model.prompts.ctx.grad is not None and model.prompts.ctx.grad.abs().sum() > 0


def test_eval_text_cache_is_used_and_invalidated_by_training(monkeypatch):
    model = tiny_model()
    counter = CountTextCalls(model, monkeypatch)
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        first = model(batch.image, batch)
        second = model(batch.image, batch)
    assert counter.calls == 1
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    with torch.no_grad():
        model.prompts.ctx.add_(0.5)  # what an optimiser step would do between test runs
    model.train()
    model(batch.image, batch)
    assert counter.calls == 2
    model.eval()
    with torch.no_grad():
        third = model(batch.image, batch)
    assert counter.calls == 3 and not torch.equal(third.anomaly_map, first.anomaly_map)


def test_loading_weights_invalidates_the_cache(monkeypatch):
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        before = model(batch.image, batch)
    state = {k: v + 0.3 if k == "prompts.ctx" else v for k, v in model.trainable_state_dict().items()}
    model.load_trainable_state_dict(state)
    with torch.no_grad():
        after = model(batch.image, batch)
    assert not torch.equal(before.anomaly_map, after.anomaly_map)


def test_trainable_state_excludes_the_backbone():
    model = tiny_model()
    keys = set(model.trainable_state_dict())
    assert keys == {"prompts.ctx", "prompts.deep"}
    assert model.identity()["name"] == "tiny" and model.identity()["image_size"] == SIZE


def test_method_yaml_composes_to_the_paper_config():
    cfg = compose([EXPERIMENTS / "methods" / "anomalyclip.yaml"])
    m = cfg.method
    assert m.clip.name == "ViT-L-14-336-quickgelu" and m.clip.pretrained == "openai"
    assert list(m.taps) == [6, 12, 18, 24] and m.dpam_start == 6 and m.image_size == 518
    assert (m.n_ctx, m.deep_depth, m.deep_len, m.temperature, m.smoothing_sigma) == (12, 9, 4, 0.07, 4.0)
    assert (m.score_rule, m.both_dice, m.seg_weight, m.batch_size) == ("global", True, 1.0, 8)
    main = m.stages.main
    assert (main.epochs, main.optim.name, main.optim.lr, list(main.optim.betas)) == (
        15,
        "adam",
        1e-3,
        [0.5, 0.999],
    )


def test_seg_weight_scales_only_the_segmentation_terms():
    batch = tiny_batch()
    plain, weighted = tiny_model().train(), tiny_model(seg_weight=4.0).train()
    torch.manual_seed(3)
    t1 = plain.loss(plain(batch.image, batch), batch)
    t4 = weighted.loss(weighted(batch.image, batch), batch)
    assert torch.allclose(t1["seg"], t4["seg"]) and torch.allclose(t1["ce"], t4["ce"])
    assert torch.allclose(t4["loss"], 4.0 * t4["seg"] + t4["ce"], atol=1e-5)
    with pytest.raises(ValueError, match="method.seg_weight"):
        tiny_model(seg_weight=-1.0)
