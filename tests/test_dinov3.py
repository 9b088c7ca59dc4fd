"""DINOv3 backbone: taps, prefix split, input sizes, weight resolution (tiny preset, random weights)."""

from __future__ import annotations

import pytest
import torch

from zsad.backbones.dinov3 import TINY_PRESET, build_dinov3
from zsad.backbones.errors import WeightsError

TAPS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_dinov3("tiny")


def _images(h: int, w: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 96), (64, 96)])
def test_tap_shapes_and_prefix_split(tiny, h, w):
    feats = tiny(_images(h, w), taps=TAPS)
    c, gh, gw = TINY_PRESET["embed_dim"], h // 16, w // 16
    assert feats.grid == (gh, gw)
    assert len(feats.patch_tokens) == len(feats.cls_tokens) == len(feats.register_tokens) == len(TAPS)
    for p, cls, reg in zip(feats.patch_tokens, feats.cls_tokens, feats.register_tokens):
        assert p.shape == (2, gh * gw, c)
        assert cls.shape == (2, c)
        assert reg.shape == (2, 4, c)


def test_tokens_are_block_outputs_through_final_norm(tiny):
    """Re-run the blocks by hand: tap l = final_norm(block_l(...)); 1 CLS, then 4 registers, then patches."""
    m = tiny.model
    x = _images(64, 64)
    with torch.no_grad():
        t, rope = m._pos_embed(m.patch_embed(x))
        outs = []
        for blk in m.blocks:
            t = blk(t, rope=rope)
            outs.append(m.norm(t))
    feats = tiny(x, taps=(2, 4))
    for i, tap in enumerate((2, 4)):
        ref = outs[tap - 1]
        torch.testing.assert_close(feats.cls_tokens[i], ref[:, 0])
        torch.testing.assert_close(feats.register_tokens[i], ref[:, 1:5])
        torch.testing.assert_close(feats.patch_tokens[i], ref[:, 5:])


def test_different_taps_differ_and_order_follows_taps(tiny):
    x = _images(64, 64)
    feats = tiny(x, taps=TAPS)
    for a in range(len(TAPS)):
        for b in range(a + 1, len(TAPS)):
            assert not torch.allclose(feats.patch_tokens[a], feats.patch_tokens[b], atol=1e-3)
    rev = tiny(x, taps=(4, 1))
    torch.testing.assert_close(rev.patch_tokens[0], feats.patch_tokens[3])
    torch.testing.assert_close(rev.patch_tokens[1], feats.patch_tokens[0])


def test_input_not_multiple_of_16_raises(tiny):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(_images(72, 64), taps=TAPS)


def test_bad_taps_raise(tiny):
    with pytest.raises(ValueError, match="1..4"):
        tiny(_images(64, 64), taps=(0, 2))
    with pytest.raises(ValueError, match="1..4"):
        tiny(_images(64, 64), taps=(5,))


def test_frozen_eval_no_grad_and_fused(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.training
    assert tiny.fused_attn
    x = _images(64, 64).requires_grad_(True)
    feats = tiny(x, taps=(4,))
    assert not feats.patch_tokens[0].requires_grad
    assert tiny.width == 64 and tiny.patch_size == 16 and tiny.num_registers == 4
    assert tiny.mean == (0.485, 0.456, 0.406) and tiny.std == (0.229, 0.224, 0.225)
    assert tiny.identity() == {"kind": "dinov3", "name": "tiny", "pretrained": "none", "width": 64}


def test_saved_weights_reload_by_path_exactly(tiny, tmp_path):
    path = tmp_path / "tiny_timm.pth"
    torch.save(tiny.model.state_dict(), path)
    x = _images(64, 96)
    torch.manual_seed(123)  # a different random init: equality below must come from the file
    other = build_dinov3("tiny")
    assert not torch.equal(other(x, taps=TAPS).patch_tokens[-1], tiny(x, taps=TAPS).patch_tokens[-1])
    loaded = build_dinov3("tiny", str(path))
    a, b = loaded(x, taps=TAPS), tiny(x, taps=TAPS)
    for pa, pb in zip(a.patch_tokens + a.cls_tokens, b.patch_tokens + b.cls_tokens):
        assert torch.equal(pa, pb)
    assert loaded.identity()["pretrained"] == str(path)


def test_meta_checkpoint_loads_through_timm_filter(tiny, tmp_path):
    """A state dict in Meta's DINOv3 naming (storage_tokens, ls1.gamma, masked qkv bias …) loads and matches."""
    meta = {}
    for k, v in tiny.model.state_dict().items():
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        meta[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            meta[k.replace("weight", "bias")] = torch.zeros(v.shape[0])
            meta[k.replace("weight", "bias_mask")] = torch.ones(v.shape[0])
    meta["mask_token"] = torch.zeros(1, 64)
    meta["rope_embed.periods"] = torch.ones(4)
    path = tmp_path / "dinov3_tiny_meta.pth"
    torch.save(meta, path)
    loaded = build_dinov3("tiny", str(path))
    x = _images(64, 64)
    assert torch.equal(loaded(x, taps=TAPS).patch_tokens[2], tiny(x, taps=TAPS).patch_tokens[2])


def test_missing_or_wrong_file_names_the_key(tmp_path):
    with pytest.raises(WeightsError, match="method.vision.pretrained"):
        build_dinov3("tiny", str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="method.vision.pretrained"):
        build_dinov3("tiny", str(bad))
    with pytest.raises(WeightsError, match="my.key"):
        build_dinov3("tiny", str(tmp_path / "absent.pth"), config_key="my.key")


def test_unknown_tag_and_tiny_tag_are_weights_errors():
    with pytest.raises(WeightsError, match="known tags"):
        build_dinov3("vit_small_patch16_dinov3", "nonsense")
    with pytest.raises(WeightsError, match="tiny preset"):
        build_dinov3("tiny", "lvd1689m")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="method.vision.name"):
        build_dinov3("vit_large_patch14_clip_224")


@pytest.mark.slow
def test_tag_offline_is_one_clear_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError, match="method.vision.pretrained") as info:
        build_dinov3("vit_small_patch16_dinov3", "lvd1689m")
    assert "offline" in str(info.value)
