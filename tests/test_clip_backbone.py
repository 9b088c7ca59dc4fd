"""The frozen CLIP substrate: DPAM V-V path, taps, attention, text encoder, weight resolution (tiny preset)."""

from __future__ import annotations

from copy import deepcopy
from unittest import mock

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from zsad.backbones.clip import (
    PRESETS,
    TINY_CONFIG,
    CLIPBackbone,
    CLIPText,
    CLIPVision,
    WeightsError,
    _decide_quick_gelu,
    build_clip,
)
from zsad.backbones.errors import WeightsError as SharedWeightsError

NATIVE = TINY_CONFIG["vision_cfg"]["image_size"]  # 224: the tiny preset's positional grid is 16×16
TAPS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def reference() -> open_clip.CLIP:
    """open_clip's own CLIP at the tiny preset with fixed random weights."""
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def weights_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_open_clip.pt"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def backbone(weights_file) -> CLIPBackbone:
    return build_clip("tiny", str(weights_file), image_size=70)


def _images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------------- vision: shapes


@pytest.mark.parametrize(("size", "grid"), [(518, (37, 37)), (224, (16, 16))])
def test_tap_shapes(backbone, size, grid):
    vis = backbone.visual
    feats = vis(_images(size, batch=1), taps=TAPS, dpam_start=2, pre_proj=True)
    n = grid[0] * grid[1]
    assert feats.grid == grid
    assert [tuple(t.shape) for t in feats.patch_tokens] == [(1, n, vis.embed_dim)] * len(TAPS)
    assert [tuple(t.shape) for t in feats.pre_proj_tokens] == [(1, n, vis.width)] * len(TAPS)
    assert feats.global_embedding.shape == (1, vis.embed_dim)
    assert feats.attentions is None
    for tokens in feats.patch_tokens:
        torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(1, n))


def test_paper_grid_at_518(backbone):
    vis = build_clip("tiny", vision=True, text=False).visual  # default image size 518
    assert vis.image_size == 518 and vis.patch_size == 14 and vis.grid == (37, 37)
    assert vis.pos_embed((37, 37), torch.device("cpu"), torch.float32).shape == (1 + 37 * 37, vis.width)


def test_bad_input_size_and_taps_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        backbone.visual(_images(60), taps=TAPS, dpam_start=2)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        backbone.visual(_images(56), taps=(6, 12), dpam_start=2)
    with pytest.raises(ValueError, match="dpam_start"):
        backbone.visual(_images(56), taps=TAPS, dpam_start=None, vv_mlp=lambda i, b, x: None)


def test_taps_differ(backbone):
    feats = backbone.visual(_images(70), taps=TAPS, dpam_start=2)
    tokens = feats.patch_tokens
    for a in range(len(tokens)):
        for b in range(a + 1, len(tokens)):
            assert not torch.allclose(tokens[a], tokens[b], atol=1e-3), (
                f"taps {TAPS[a]} and {TAPS[b]} are identical"
            )


# ---------------------------------------------------------------------------------------- vision: correctness


def _naive_embed(visual, images):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)


def _naive_vv_attention(block, h):
    """softmax(V Vᵀ/√d) V per head from the packed in-projection, then the out-projection."""
    attn = block.attn
    width = h.shape[-1]
    wv, bv = attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :]
    v = h @ wv.T + bv
    d = width // attn.num_heads
    heads = []
    for i in range(attn.num_heads):
        vh = v[..., i * d : (i + 1) * d]
        heads.append(torch.softmax(vh @ vh.transpose(-1, -2) / d**0.5, dim=-1) @ vh)
    return attn.out_proj(torch.cat(heads, dim=-1))


@torch.no_grad()
def test_vv_path_matches_naive_reference(backbone, reference):
    visual = reference.visual
    images = _images(NATIVE)
    dpam_start = 2
    x_ori = _naive_embed(visual, images)
    x_vv = None
    expected = {}
    for i, block in enumerate(visual.transformer.resblocks, start=1):
        if i >= dpam_start:
            x_vv = (x_ori if x_vv is None else x_vv) + _naive_vv_attention(block, block.ln_1(x_ori))
        x_ori = block(x_ori)  # open_clip's own block forward
        expected[i] = x_vv if i >= dpam_start else x_ori
    feats = backbone.visual(images, taps=TAPS, dpam_start=dpam_start, pre_proj=True)
    for t, got, got_pre in zip(TAPS, feats.patch_tokens, feats.pre_proj_tokens):
        pre = visual.ln_post(expected[t][:, 1:])
        torch.testing.assert_close(got_pre, pre, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got, F.normalize(pre @ visual.proj, dim=-1), atol=1e-5, rtol=1e-4)
    # As AnomalyCLIP and MRAD: the original path's CLS straight into proj, no ln_post.
    torch.testing.assert_close(feats.global_embedding, x_ori[:, 0] @ visual.proj)


@torch.no_grad()
def test_plain_clip_matches_open_clip_encode_image(backbone, reference, weights_file):
    images = _images(NATIVE)
    feats = backbone.visual(images, taps=TAPS, dpam_start=None)
    # open_clip's encode_image applies ln_post to the CLS: the global_ln_post switch reproduces it, the default
    # (the reference codes' x_ori[CLS] @ proj) does not.
    with_ln = build_clip("tiny", str(weights_file), text=False, image_size=70, global_ln_post=True).visual
    got = with_ln(images, taps=TAPS, dpam_start=None).global_embedding
    torch.testing.assert_close(got, reference.encode_image(images), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(feats.global_embedding, reference.encode_image(images), atol=1e-3)
    # Plain CLIP taps read the original path: the last tap is the final block's tokens through ln_post + proj.
    x = reference.visual.transformer(_naive_embed(reference.visual, images))
    last = F.normalize(reference.visual.ln_post(x[:, 1:]) @ reference.visual.proj, dim=-1)
    torch.testing.assert_close(feats.patch_tokens[-1], last, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_dpam_does_not_change_global_embedding(backbone):
    images = _images(70)
    plain = backbone.visual(images, taps=TAPS, dpam_start=None)
    dual = backbone.visual(images, taps=TAPS, dpam_start=2)
    torch.testing.assert_close(plain.global_embedding, dual.global_embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        plain.patch_tokens[0], dual.patch_tokens[0], atol=1e-5, rtol=1e-4
    )  # before DPAM
    assert not torch.allclose(plain.patch_tokens[-1], dual.patch_tokens[-1], atol=1e-3)


@torch.no_grad()
def test_attention_taps(backbone, reference):
    images = _images(NATIVE)
    vis = backbone.visual
    plain = vis(images, taps=(2, 4), dpam_start=2)
    feats = vis(images, taps=(2, 4), dpam_start=2, attn_taps=True)
    n = 1 + 16 * 16
    assert [tuple(a.shape) for a in feats.attentions] == [(2, vis.heads, n, n)] * 2
    for a in feats.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, vis.heads, n))
    for got, want in zip(feats.patch_tokens, plain.patch_tokens):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats.global_embedding, plain.global_embedding, atol=1e-5, rtol=1e-4)
    # The probabilities are the original path's q-k attention: compare with torch's own MHA weights.
    x = _naive_embed(reference.visual, images)
    blocks = reference.visual.transformer.resblocks
    x = blocks[0](x)
    h = blocks[1].ln_1(x)
    _, weights = blocks[1].attn(h, h, h, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(feats.attentions[0], weights, atol=1e-5, rtol=1e-4)


def test_attention_probabilities_are_float32_under_autocast():
    from zsad.backbones.clip import _attention_probs

    g = torch.Generator().manual_seed(0)
    q = (4 * torch.randn(1, 2, 9, 16, generator=g)).bfloat16()
    k = (4 * torch.randn(1, 2, 9, 16, generator=g)).bfloat16()
    want = torch.softmax((q.double() / 4.0) @ k.double().transpose(-2, -1), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _attention_probs(q, k)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_pos_embed_resize_is_bilinear_by_default(weights_file):
    """The reference codes: F.interpolate(mode='bilinear') of the native grid, align_corners False, no antialias."""
    default = build_clip("tiny", str(weights_file), text=False, image_size=70).visual
    bicubic = build_clip("tiny", str(weights_file), text=False, image_size=70, pos_interp="bicubic").visual
    pos = default.vit.positional_embedding.detach()
    g0 = default.native_grid
    grid = (5, 5)
    # Hand computation of bilinear, align_corners=False: source coordinate (i + 0.5)·s/d − 0.5, clamped at 0.
    src = pos[1:].reshape(*g0, -1)

    def coords(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp_min(0)
        lo = x.floor().long().clamp_max(n_in - 1)
        return lo, (lo + 1).clamp_max(n_in - 1), x - lo

    y0, y1, wy = coords(grid[0], g0[0])
    x0, x1, wx = coords(grid[1], g0[1])
    s = src.double()
    top = s[y0][:, x0] * (1 - wx)[None, :, None] + s[y0][:, x1] * wx[None, :, None]
    bot = s[y1][:, x0] * (1 - wx)[None, :, None] + s[y1][:, x1] * wx[None, :, None]
    want = top * (1 - wy)[:, None, None] + bot * wy[:, None, None]
    got = default.pos_embed(grid, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(got[0], pos[0])  # the CLS row is kept
    torch.testing.assert_close(got[1:].double(), want.reshape(grid[0] * grid[1], -1), atol=1e-6, rtol=1e-6)
    other = bicubic.pos_embed(grid, torch.device("cpu"), torch.float32)
    assert not torch.allclose(other[1:], got[1:], atol=1e-4)
    assert build_clip("tiny", text=False, image_size=70).identity()["pos_interp"] == "bilinear"


def test_vision_switches_are_validated_and_part_of_the_identity():
    with pytest.raises(ValueError, match=r"method\.clip\.pos_interp.*'nearest'"):
        build_clip("tiny", text=False, pos_interp="nearest")
    with pytest.raises(ValueError, match=r"method\.clip\.global_ln_post"):
        build_clip("tiny", text=False, global_ln_post="yes")
    base = build_clip("tiny", text=False, image_size=70).identity()
    assert base["pos_interp"] == "bilinear" and base["global_ln_post"] is False
    assert build_clip("tiny", text=False, image_size=70, pos_interp="bicubic").identity() != base
    assert build_clip("tiny", text=False, image_size=70, global_ln_post=True).identity() != base
    # A text tower has no positional grid to resize.
    assert "pos_interp" not in build_clip("tiny", vision=False).identity()


def test_pos_embed_interpolated_once_per_size(weights_file):
    vis = build_clip("tiny", str(weights_file), text=False, image_size=70).visual
    with mock.patch("torch.nn.functional.interpolate", wraps=F.interpolate) as spy:
        vis(_images(70), taps=TAPS, dpam_start=2)
        vis(_images(70, seed=3), taps=TAPS, dpam_start=2)
        assert spy.call_count == 1
        vis(_images(NATIVE, batch=1), taps=TAPS, dpam_start=2)  # native grid: the parameter itself
        assert spy.call_count == 1
    torch.testing.assert_close(
        vis.pos_embed(vis.native_grid, torch.device("cpu"), torch.float32), vis.vit.positional_embedding
    )


# --------------------------------------------------------------------------------- vision: gradients, frozen


def test_vv_mlp_gradients_and_frozen_weights(backbone):
    vis = backbone.visual
    adapter = nn.Linear(vis.width, vis.width)
    seen = []

    def vv_mlp(idx, block, x):
        seen.append(idx)
        if idx != 3:
            return None
        delta = adapter(block.ln_2(x))
        return torch.cat([torch.zeros_like(delta[:, :1]), delta[:, 1:]], dim=1)  # CLS untouched

    images = _images(56)
    base = vis(images, taps=TAPS, dpam_start=2)
    feats = vis(images, taps=TAPS, dpam_start=2, vv_mlp=vv_mlp)
    assert seen == [2, 3, 4]
    sum(t.sum() for t in feats.patch_tokens).backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not feats.global_embedding.requires_grad
    # The delta enters at block 3: taps 1-2 unchanged, taps 3-4 changed, the original path untouched.
    for t in (0, 1):
        torch.testing.assert_close(feats.patch_tokens[t].detach(), base.patch_tokens[t])
    for t in (2, 3):
        assert not torch.allclose(feats.patch_tokens[t].detach(), base.patch_tokens[t], atol=1e-4)
    torch.testing.assert_close(feats.global_embedding, base.global_embedding)


def test_towers_stay_frozen_in_eval_mode(backbone):
    parent = nn.Module()
    parent.backbone = backbone
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.head.training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())


# ------------------------------------------------------------------------------------------------------ text


@torch.no_grad()
def test_text_encode_matches_open_clip(backbone, reference):
    text = backbone.text
    tokens = text.tokenize(["a photo of a damaged screw.", "flawless object", "x"])
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    got = text.encode(tokens)
    torch.testing.assert_close(got, reference.encode_text(tokens, normalize=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, text.encode_embeddings(text.token_embedding(tokens), tokens.argmax(-1)))


@torch.no_grad()
def test_deep_prompts_match_naive_reference(backbone, reference):
    text = backbone.text
    tokens = text.tokenize(["x x x x x x object.", "x x x x x x damaged object."])
    embeds = text.token_embedding(tokens)
    torch.manual_seed(5)
    deep = torch.randn(2, 3, text.width) * 0.5  # K=2 layers (1 and 2), 3 tokens each
    got = text.encode_embeddings(embeds, tokens.argmax(-1), deep_prompts=deep)
    x = embeds + reference.positional_embedding
    for j, block in enumerate(reference.transformer.resblocks):
        if 1 <= j <= deep.shape[0]:
            x = x.clone()
            x[:, 1:4] = deep[j - 1]
        x = block(x, attn_mask=reference.attn_mask)  # open_clip's block with its causal mask
    want = F.normalize(
        reference.ln_final(x)[torch.arange(2), tokens.argmax(-1)] @ reference.text_projection, dim=-1
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    per_prompt = text.encode_embeddings(embeds, tokens.argmax(-1), deep_prompts=deep.expand(2, -1, -1, -1))
    torch.testing.assert_close(per_prompt, got)
    assert not torch.allclose(got, text.encode(tokens), atol=1e-4)
    with pytest.raises(ValueError, match="K < 3"):
        text.encode_embeddings(embeds, tokens.argmax(-1), deep_prompts=torch.zeros(3, 3, text.width))


def test_text_gradients_flow_to_embeddings_only(backbone):
    text = backbone.text
    tokens = text.tokenize(["x x x object."])
    embeds = text.token_embedding(tokens).detach().requires_grad_(True)
    deep = torch.zeros(1, 2, text.width, requires_grad=True)
    text.encode_embeddings(embeds, tokens.argmax(-1), deep_prompts=deep).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert deep.grad is not None and deep.grad.abs().sum() > 0
    assert all(p.grad is None for p in text.parameters())


# ----------------------------------------------------------------------------------------- weights, building


@torch.no_grad()
def test_weights_by_path_reproduce_outputs(backbone, reference, weights_file, tmp_path):
    direct = CLIPVision(deepcopy(reference.visual), image_size=70)
    images = _images(70)
    a = backbone.visual(images, taps=TAPS, dpam_start=2)
    b = direct(images, taps=TAPS, dpam_start=2)
    for x, y in zip(a.patch_tokens, b.patch_tokens):
        assert torch.equal(x, y)
    assert torch.equal(a.global_embedding, b.global_embedding)
    ref_state = reference.state_dict()
    for key, value in backbone.text.tower.state_dict().items():
        assert torch.equal(value, ref_state[key]), key  # open_clip's CLIP keeps the text tower at top level
    tokens = backbone.text.tokenize(["a photo of a cable."])
    # Wrapped checkpoints (training scripts save {'state_dict': {'module.' + key: …}}) load the same weights.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, wrapped)
    again = build_clip("tiny", str(wrapped), image_size=70)
    assert torch.equal(again.visual(images, taps=TAPS, dpam_start=2).patch_tokens[-1], a.patch_tokens[-1])
    assert torch.equal(again.text.encode(tokens), backbone.text.encode(tokens))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_torchscript_archive_loads(reference, tmp_path):
    """OpenAI's original release is a TorchScript archive of the whole model."""
    path = tmp_path / "scripted.pt"
    torch.jit.script(deepcopy(reference)).save(str(path))
    bb = build_clip("tiny", str(path))
    ref_state = reference.state_dict()
    for key, value in bb.visual.vit.state_dict().items():
        assert torch.equal(value, ref_state["visual." + key]), key
    for key, value in bb.text.tower.state_dict().items():
        assert torch.equal(value, ref_state[key]), key


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_random_towers_are_open_clips_own(name):
    """The towers are open_clip's public classes with the arguments of its own builder: seeded, build_clip's random
    weights are open_clip.CLIP's key for key (vision, then text, in open_clip's order), and so is the module tree."""
    torch.manual_seed(0)
    ref = open_clip.CLIP(**PRESETS[name])
    torch.manual_seed(0)
    bb = build_clip(name)
    ref_state = ref.state_dict()
    for key, value in bb.visual.vit.state_dict().items():
        assert torch.equal(value, ref_state["visual." + key]), key
    for key, value in bb.text.tower.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert repr(bb.visual.vit) == repr(ref.visual)
    assert repr(bb.text.tower.transformer) == repr(ref.transformer)


def test_weight_errors_name_the_config_key(tmp_path, reference):
    assert WeightsError is SharedWeightsError
    with pytest.raises(WeightsError, match=r"method\.clip\.pretrained.*not found"):
        build_clip("tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match=r"method\.text\.pretrained"):
        build_clip("tiny", str(tmp_path / "missing.pt"), config_key="method.text.pretrained")
    with pytest.raises(WeightsError, match="neither a known open_clip tag"):
        build_clip("tiny", "laion2b")
    state = reference.state_dict()
    state["visual.proj"] = torch.zeros(64, 16)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="does not fit the vision tower"):
        build_clip("tiny", str(bad))
    build_clip("tiny", str(bad), vision=False)  # the text tower alone still fits


def test_openai_tag_offline_fails_fast(monkeypatch, tmp_path):
    # An empty cache folder and HF_HUB_OFFLINE: the error comes from the cache lookup, before any network use.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"method\.clip\.pretrained: could not load tag 'openai'.*local"):
        build_clip("ViT-L-14-336-quickgelu", "openai", cache_dir=str(tmp_path))


def test_quick_gelu_decision():
    gelu_cfg = open_clip.get_model_config("ViT-L-14-336")
    quick_cfg = open_clip.get_model_config("ViT-L-14-336-quickgelu")
    tag = open_clip.get_pretrained_cfg("ViT-L-14-336", "openai")
    with pytest.warns(UserWarning, match="forcing QuickGELU"):
        assert _decide_quick_gelu("ViT-L-14-336", gelu_cfg, tag, "openai", None) is True
    assert _decide_quick_gelu("ViT-L-14-336-quickgelu", quick_cfg, tag, "openai", None) is True
    assert _decide_quick_gelu("ViT-L-14-336", gelu_cfg, {}, "none", None) is False
    with pytest.warns(UserWarning, match="will not match"):
        assert _decide_quick_gelu("ViT-L-14-336", gelu_cfg, tag, "openai", False) is False


def test_only_requested_towers_are_built():
    text_only = build_clip("tiny", vision=False)
    assert text_only.visual is None and isinstance(text_only.text, CLIPText)
    assert not any(name.startswith("visual") for name, _ in text_only.named_parameters())
    vision_only = build_clip("tiny", text=False, image_size=56)
    assert vision_only.text is None and vision_only.visual.grid == (4, 4)
    ident = vision_only.identity()
    assert ident["name"] == "tiny" and ident["pretrained"] == "none" and ident["image_size"] == 56
    assert ident != build_clip("tiny", text=False, image_size=70).identity()
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_clip("ViT-Q-99")


@pytest.mark.slow
def test_vit_l_14_336_quickgelu_builds_with_quickgelu():
    bb = build_clip("ViT-L-14-336-quickgelu", "none")
    vis, text = bb.visual, bb.text
    assert (vis.width, vis.n_blocks, vis.heads, vis.embed_dim, vis.patch_size) == (1024, 24, 16, 768, 14)
    assert vis.native_grid == (24, 24) and vis.grid == (37, 37)
    assert (text.width, text.n_layers, text.embed_dim) == (768, 12, 768)
    for block in list(vis.blocks) + list(text.blocks):
        assert isinstance(block.mlp.gelu, QuickGELU)
    assert bb.identity()["quick_gelu"] is True
    assert not any(p.requires_grad for p in bb.parameters())
