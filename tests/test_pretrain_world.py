"""The pretraining world: disjoint from the benchmark, deterministic, exact masks, captions that say what is shown."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules import pretrain_world as W
from data_modules import synthetic
from zsad.prompts.ensemble import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES


def test_categories_disjoint_from_the_benchmark():
    bench = set(synthetic.TEXTURES) | set(synthetic.OBJECTS)
    bench |= {c.replace("_", " ") for c in bench}
    assert len(W.CATEGORIES) >= 10
    assert len(W.TEXTURES) >= 5 and len(W.OBJECTS) >= 5
    assert not bench & set(W.CATEGORIES)
    # No seed sequence in common: the world's keys start with WORLD_TAG and have four entries, the benchmark's
    # start with its seed and have five.
    assert W.WORLD_TAG > 2**16


def test_items_are_deterministic_and_independent():
    a = W.render_item(3, "gear", 5, 64)
    b = W.render_item(3, "gear", 5, 64)
    c = W.render_item(3, "gear", 6, 64)
    d = W.render_item(4, "gear", 5, 64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert (a.colour, a.background, a.size, a.defect) == (b.colour, b.background, b.size, b.defect)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, d.image)


@pytest.mark.parametrize("category", ["marble", "brick", "button", "key", "leaf"])
def test_mask_is_exactly_the_changed_pixels(category):
    found = 0
    for i in range(12):
        it = W.render_item(0, category, i, 64)
        changed = (it.image != it.clean).any(axis=2)
        np.testing.assert_array_equal(changed, it.mask)
        assert (it.defect is None) == (not it.mask.any())
        found += it.defect is not None
    assert 0 < found < 12  # both normal and defective items


def test_textures_never_miss_a_part():
    assert "missing" not in W.defects_of("cork")
    assert "missing" in W.defects_of("cup")
    with pytest.raises(ValueError, match="unknown world category"):
        W.defects_of("carpet")


def test_caption_composition():
    vocab = W.CaptionVocab(NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES)
    normal_words = {s.replace("{}", "").strip() for s in NORMAL_STATES} - {""}
    anomal_words = {s.replace("{}", "").strip() for s in ANOMALOUS_STATES}
    item = next(it for it in (W.render_item(0, "coin", i, 32) for i in range(20)) if it.defect)
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = W.caption(item, rng, vocab)
        assert item.category in text or "object" in text
        assert any(w in text for w in anomal_words)
        assert not any(f" {w} " in f" {text} " for w in normal_words if w not in anomal_words)
    said_defect = any(W.DEFECT_PHRASES[item.defect] in W.caption(item, rng, vocab) for _ in range(20))
    assert said_defect
    for _ in range(50):  # the same item described as a crop without its defect
        text = W.caption(item, rng, vocab, defect=None)
        assert not any(w in text for w in anomal_words)
        assert not any(p in text for p in W.DEFECT_PHRASES.values())
    bg_said = [f"on a {item.background} background" in W.caption(item, rng, vocab) for _ in range(50)]
    assert any(bg_said) and not all(bg_said)  # attributes are sometimes left out


def test_views_follow_their_crop():
    from zsad.pretrain.world import crop_params, load_world, sample_views

    world = load_world(0, 2, 64, workers=1, show_progress=False)
    idx = torch.arange(len(world))
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(len(idx), 2, 3)
    gen = torch.Generator().manual_seed(0)
    v = sample_views(world, idx, 64, gen, theta=identity)
    torch.testing.assert_close(v.images, world.images.float() / 255, atol=1e-5, rtol=0)
    assert v.has_defect.tolist() == world.masks.flatten(1).any(1).tolist()
    # A crop of the top-left quarter sees a defect only if the mask has pixels there.
    quarter = crop_params(len(idx), gen, (0.5, 0.5), turns=False)
    quarter[:, 0, 0], quarter[:, 0, 2], quarter[:, 1, 2] = 0.5, -0.5, -0.5  # no flip, top-left
    v = sample_views(world, idx, 32, gen, theta=quarter, min_defect=0)
    want = world.masks[:, :32, :32].flatten(1).any(1)
    assert (v.has_defect <= want).all()
    twins = sample_views(world, idx, 32, gen, theta=quarter, clean=True)
    assert not twins.has_defect.any()
