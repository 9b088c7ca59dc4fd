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


def _tiny_qkvb(seed: int = 1) -> torch.nn.Module:
    """The tiny preset with q/v biases, random weights and random non-zero q/v biases (the reference model)."""
    import timm

    preset = dict(TINY_PRESET)
    arch = preset.pop("base") + "_qkvb"
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, **preset).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.q_bias.normal_(0.0, 0.5)
            blk.attn.v_bias.normal_(0.0, 0.5)
    return m


def _meta_state(model: torch.nn.Module, periods: torch.Tensor, k_bias: float = 0.7) -> dict:
    """``model``'s weights in Meta's DINOv3 format, written by hand (Meta names, fused masked qkv bias).

    The k third of every ``qkv.bias`` is non-zero (``k_bias``) and masked out by ``bias_mask``, as in Meta's
    ``LinearKMaskedBias``; periods are stored in bf16 as in Meta's released files.
    """
    meta = {}
    for k, v in model.state_dict().items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        meta[k] = v.clone()
    for i, blk in enumerate(model.blocks):
        q, v = blk.attn.q_bias.detach(), blk.attn.v_bias.detach()
        meta[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.full_like(q, k_bias), v])
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)]
        )
    meta["mask_token"] = torch.randn(1, model.embed_dim)
    meta["rope_embed.periods"] = periods.to(torch.bfloat16)
    return meta


def _checkpoint_periods(model: torch.nn.Module) -> torch.Tensor:
    # Meta's released files store the periods rounded to bf16: they differ from timm's float32 recomputation.
    periods = model.rope.periods.detach().to(torch.bfloat16)
    assert not torch.equal(periods.float(), model.rope.periods)
    return periods


def _reference(model: torch.nn.Module, periods: torch.Tensor, x: torch.Tensor, tap: int) -> torch.Tensor:
    """Tap ``tap`` (1-based) of ``model`` with ``periods`` written into its RoPE by hand."""
    with torch.no_grad():
        saved = model.rope.periods.clone()
        model.rope.periods.copy_(periods.float())
        t, rope = model._pos_embed(model.patch_embed(x))
        for blk in model.blocks[:tap]:
            t = blk(t, rope=rope)
        model.rope.periods.copy_(saved)
        return model.norm(t)


def test_meta_checkpoint_honours_periods_and_qv_biases(tmp_path, capsys):
    """A Meta file with bf16 RoPE periods and non-zero q/v biases reproduces the hand-set reference exactly."""
    ref = _tiny_qkvb()
    periods = _checkpoint_periods(ref)
    path = tmp_path / "dinov3_tiny_meta.pth"
    torch.save(_meta_state(ref, periods), path)
    loaded = build_dinov3("tiny", str(path))
    assert (
        "q_bias" not in capsys.readouterr().out
    )  # timm's filter used to print 24 of these and drop the biases
    x = _images(64, 96)
    feats = loaded(x, taps=(2, 4))
    for i, tap in enumerate((2, 4)):
        want = _reference(ref, periods, x, tap)
        assert torch.equal(feats.cls_tokens[i], want[:, 0])
        assert torch.equal(feats.patch_tokens[i], want[:, 5:])
    # Both must matter, else this test could not fail: timm's own periods, or biases dropped, give other tokens.
    with torch.no_grad():
        assert not torch.equal(_reference(ref, ref.rope.periods, x, 4)[:, 5:], feats.patch_tokens[1])
        for blk in ref.blocks:
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
    assert not torch.allclose(_reference(ref, periods, x, 4)[:, 5:], feats.patch_tokens[1], atol=1e-3)


def test_checkpoint_periods_survive_casts_and_moves(tmp_path):
    ref = _tiny_qkvb()
    periods = _checkpoint_periods(ref)
    path = tmp_path / "meta.pth"
    torch.save(_meta_state(ref, periods), path)
    loaded = build_dinov3("tiny", str(path))
    assert torch.equal(loaded.model.rope.periods, periods.float())
    loaded.to(torch.bfloat16)  # timm recomputes the periods from its temperature on a downcast
    assert torch.equal(loaded.model.rope.periods.float(), periods.float())
    loaded.to(torch.float32)
    assert torch.equal(loaded.model.rope.periods, periods.float())


def test_meta_mask_is_applied_like_linear_k_masked_bias(tmp_path):
    """The effective bias is qkv.bias * bias_mask: a mask that switches q entries off switches them off."""
    ref = _tiny_qkvb()
    periods = ref.rope.periods.to(torch.bfloat16)
    meta = _meta_state(ref, periods)
    width = ref.embed_dim
    meta["blocks.1.attn.qkv.bias_mask"][: width // 2] = 0.0
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    loaded = build_dinov3("tiny", str(path))
    q = loaded.model.blocks[1].attn.q_bias
    assert torch.equal(q[: width // 2], torch.zeros(width // 2))
    assert torch.equal(q[width // 2 :], ref.blocks[1].attn.q_bias[width // 2 :])
    assert torch.equal(loaded.model.blocks[1].attn.v_bias, ref.blocks[1].attn.v_bias)


def test_meta_file_without_mask_and_zero_k_bias_loads(tmp_path):
    ref = _tiny_qkvb()
    meta = _meta_state(ref, ref.rope.periods, k_bias=0.0)
    meta = {k: v for k, v in meta.items() if not k.endswith("bias_mask")}
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    x = _images(64, 64)
    got = build_dinov3("tiny", str(path))(x, taps=(3,)).patch_tokens[0]
    assert torch.equal(got, _reference(ref, ref.rope.periods.to(torch.bfloat16), x, 3)[:, 5:])


@pytest.mark.parametrize(
    "case", ["unmasked_k_bias", "mask_keeps_k", "unknown_key", "orphan_mask", "bad_periods"]
)
def test_meta_file_that_cannot_be_honoured_names_the_key(tmp_path, case):
    ref = _tiny_qkvb()
    meta = _meta_state(ref, ref.rope.periods)
    key = {
        "unmasked_k_bias": "blocks.2.attn.qkv.bias",
        "mask_keeps_k": "blocks.0.attn.qkv.bias",
        "unknown_key": "blocks.0.attn.extra_scale",
        "orphan_mask": "blocks.9.attn.qkv.bias_mask",
        "bad_periods": "rope_embed.periods",
    }[case]
    if case == "unmasked_k_bias":
        del meta["blocks.2.attn.qkv.bias_mask"]  # a plain Linear bias: the k third (0.7) would act
    elif case == "mask_keeps_k":
        meta["blocks.0.attn.qkv.bias_mask"][:] = 1.0
    elif case == "unknown_key":
        meta[key] = torch.ones(3)
    elif case == "orphan_mask":
        meta[key] = torch.ones(192)
    else:
        meta[key] = torch.ones(7)
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")) as info:
        build_dinov3("tiny", str(path))
    assert "method.vision.pretrained" in str(info.value)


def test_timm_file_with_qv_biases_loads_into_the_qkvb_variant(tmp_path):
    ref = _tiny_qkvb()
    path = tmp_path / "timm_qkvb.pth"
    torch.save(ref.state_dict(), path)
    x = _images(64, 64)
    got = build_dinov3("tiny", str(path))(x, taps=(4,)).patch_tokens[0]
    assert torch.equal(got, _reference(ref, ref.rope.periods, x, 4)[:, 5:])


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


def test_both_backbones_implement_the_protocol(tiny):
    """CLIPVision and DINOv3Backbone are ``Backbone``s: identity, preprocessing, patch size, forward(images, taps)."""
    from zsad.backbones.base import CLIP_MEAN, IMAGENET_MEAN, Backbone, VisionFeatures
    from zsad.backbones.clip import build_clip

    clip = build_clip("tiny", image_size=56, text=False).visual
    for bb, mean, interp, size in ((tiny, IMAGENET_MEAN, "bilinear", 64), (clip, CLIP_MEAN, "bicubic", 56)):
        assert isinstance(bb, Backbone)
        assert bb.mean == mean and bb.interpolation == interp and bb.identity()["pretrained"] == "none"
        feats = bb(_images(size, size), (1, 4))
        assert isinstance(feats, VisionFeatures) and len(feats.patch_tokens) == 2
        assert feats.grid == (size // bb.patch_size, size // bb.patch_size)


def test_clip_and_dinov3_resolve_weights_alike(tmp_path):
    """One resolution of ``pretrained`` (none | tag | file): the same errors, naming the key, for both families."""
    from zsad.backbones.clip import build_clip

    for build in (build_dinov3, build_clip):
        with pytest.raises(WeightsError, match=r"^my\.key: weight file not found: '.*absent\.pth'"):
            build("tiny", str(tmp_path / "absent.pth"), config_key="my.key")
        with pytest.raises(
            WeightsError, match=r"^my\.key: 'laion' is neither a known \w+ tag for tiny \(the tiny"
        ):
            build("tiny", "laion", config_key="my.key")
        assert build("tiny", "None").identity()  # 'none' in any case is random weights
