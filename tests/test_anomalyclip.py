"""AnomalyCLIP on the tiny CLIP preset: pooling levels, maps, loss, text-feature caching, a learning step, config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_modules.types import Batch
from zsad.config import EXPERIMENTS, compose
from zsad.losses import segmentation_loss
from zsad.maps import upsample
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


def test_forward_shapes_map_and_global_score():
    model = tiny_model().eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
        feats = model.clip.visual(batch.image, taps=(2, 3, 4), dpam_start=2)
        text = model.prompts(model.clip.text)[0]  # [2, D]
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.anomaly_map.dtype == torch.float32
    # per tap: 2-class softmax of cosine / 0.07, test map = mean over taps of (S_a + 1 − S_n)/2 at full size
    maps = []
    for z in feats.patch_tokens:
        s = torch.softmax(z @ text.t() / 0.07, dim=-1)  # [B, N, 2]
        s = upsample(s.transpose(1, 2).reshape(2, 2, 4, 4), SIZE)
        maps.append((s[:, 1] + 1 - s[:, 0]) / 2)
    assert torch.allclose(out.anomaly_map, torch.stack(maps).mean(0), atol=1e-5)
    g = feats.global_embedding / feats.global_embedding.norm(dim=-1, keepdim=True)
    expected = torch.softmax(g @ text.t() / 0.07, dim=-1)[:, 1]
    assert torch.allclose(out.image_score, expected, atol=1e-5)


def test_max_score_rule_reads_the_smoothed_map():
    model = tiny_model(score_rule="max", smoothing_sigma=2.0).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(batch.image, batch)
    assert torch.equal(out.image_score, out.anomaly_map.flatten(1).amax(1))


def test_loss_is_sum_over_taps_plus_image_ce():
    model = tiny_model().train()
    batch = tiny_batch()
    out = model(batch.image, batch)
    terms = model.loss(out, batch)
    probs = out.loss_inputs["probs"]  # [B, L, P=1, 2, 4, 4]
    assert probs.shape == (2, 3, 1, 2, 4, 4)
    seg = sum(segmentation_loss(upsample(probs[:, t, 0], SIZE), batch.gt) for t in range(3))
    ce = torch.nn.functional.cross_entropy(out.loss_inputs["logits"], batch.label)
    assert torch.allclose(terms["seg"], seg, atol=1e-5)
    assert torch.allclose(terms["loss"], seg + ce, atol=1e-5)


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


def adam_steps_lower_loss(model, batch, steps: int = 6, lr: float = 1e-2) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps + 1):
        loss = model.loss(model(batch.image, batch), batch)["loss"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def test_training_steps_lower_the_loss():
    model = tiny_model()
    model.set_stage("main")
    assert all(not p.requires_grad for p in model.clip.parameters())
    before, after = adam_steps_lower_loss(model, tiny_batch())
    assert after < before - 1e-3


def test_trainable_state_excludes_the_backbone():
    model = tiny_model()
    keys = set(model.trainable_state_dict())
    assert keys == {"prompts.ctx", "prompts.deep"}
    assert model.identity()["name"] == "tiny" and model.identity()["image_size"] == SIZE


def test_bad_score_rule_is_rejected():
    with pytest.raises(ValueError, match="method.score_rule"):
        tiny_model(score_rule="median")


def test_method_yaml_composes_to_the_paper_config():
    cfg = compose([EXPERIMENTS / "methods" / "anomalyclip.yaml"])
    m = cfg.method
    assert m.clip.name == "ViT-L-14-336-quickgelu" and m.clip.pretrained == "openai"
    assert list(m.taps) == [6, 12, 18, 24] and m.dpam_start == 6 and m.image_size == 518
    assert m.stages.main.epochs == 15 and m.stages.main.optim.lr == 1e-3
    assert OmegaConf.to_container(m) == OmegaConf.to_container(OmegaConf.structured(AnomalyCLIPConfig()))


def test_head_stays_float32_under_bf16_autocast():
    model = tiny_model(smoothing_sigma=1.0).train()
    batch = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.image, batch)
        terms = model.loss(out, batch)
    assert out.anomaly_map.dtype == torch.float32 and out.image_score.dtype == torch.float32
    assert out.loss_inputs["probs"].dtype == torch.float32 and terms["loss"].dtype == torch.float32


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


def test_test_map_is_scipy_gaussian_sigma_4_of_the_raw_map():
    from scipy.ndimage import gaussian_filter

    batch = tiny_batch()
    with torch.no_grad():
        raw = tiny_model().eval()(batch.image, batch).anomaly_map
        smooth = tiny_model(smoothing_sigma=4.0).eval()(batch.image, batch).anomaly_map
    ref = np.stack([gaussian_filter(m, sigma=4) for m in raw.numpy()])
    assert smooth.dtype == torch.float32 and np.abs(smooth.numpy() - ref).max() < 1e-5
