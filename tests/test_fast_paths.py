"""Fast paths give the plain paths' outputs: head-averaged attention, EntroAD on it, compiled vision, resize cache.

Covered elsewhere, not repeated here: fused (SDPA) attention against materialised softmax (test_clip_backbone
``test_attention_taps``: tokens with ``attn_taps`` equal the SDPA-only path, probabilities equal torch's MHA
weights) and AVA-DINO's cached text features against fresh encodes (test_ava_dino
``test_text_features_computed_once_per_class_name``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import dataset as dataset_module
from data_modules.datamodule import DatasetSpec, ZSADDataModule
from data_modules.dataset import ResizedCache, ZSADDataset, collate
from data_modules.readers import read
from zsad.backbones.clip import build_clip
from zsad.bench.instruments import compiled_vision
from zsad.bench.throughput import build_model, fake_batch, fill_random_memory

TAPS = (2, 4)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("tiny", "none", image_size=56)


def _images(size: int = 56, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- head-averaged attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 4])  # one head at a time, a chunk that does not divide 4 heads, all
@torch.no_grad()
def test_head_mean_attention_equals_mean_of_full(clip, chunk, monkeypatch):
    vis = clip.visual
    monkeypatch.setattr(vis, "head_chunk", chunk)
    images = _images()
    full = vis(images, taps=TAPS, dpam_start=2, attn_taps=True)
    mean = vis(images, taps=TAPS, dpam_start=2, attn_taps=True, attn_reduce="mean_heads")
    n = 1 + 4 * 4
    assert vis.heads == 4 and [tuple(a.shape) for a in mean.attentions] == [(2, n, n)] * len(TAPS)
    for a_full, a_mean in zip(full.attentions, mean.attentions):
        assert a_mean.dtype == torch.float32
        torch.testing.assert_close(a_mean, a_full.mean(1), atol=1e-6, rtol=1e-5)
    # the chunked attention output feeds the next blocks: every tapped token and the global embedding agree
    for a, b in zip(full.patch_tokens, mean.patch_tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.global_embedding, mean.global_embedding, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_head_mean_under_bf16_autocast_is_float32_and_close(clip):
    vis = clip.visual
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = vis(images, taps=TAPS, dpam_start=2, attn_taps=True)
        mean = vis(images, taps=TAPS, dpam_start=2, attn_taps=True, attn_reduce="mean_heads")
    for a_full, a_mean in zip(full.attentions, mean.attentions):
        assert a_mean.dtype == torch.float32
        torch.testing.assert_close(a_mean, a_full.mean(1), atol=1e-6, rtol=1e-5)


def test_bad_attn_reduce_is_a_clear_error(clip):
    with pytest.raises(ValueError, match="attn_reduce"):
        clip.visual(_images(), taps=TAPS, dpam_start=2, attn_taps=True, attn_reduce="max")


@torch.no_grad()
def test_entroad_on_head_mean_equals_entroad_on_full_attention(monkeypatch):
    """EntroAD asks for the head mean; forcing the full per-head tensor gives the same outputs."""
    model, _ = build_model("entroad", tiny=True, image_size=56)
    fill_random_memory(model, 8)
    model.eval()
    data = fake_batch(56, 2, torch.device("cpu"))
    vis = model.clip.visual
    seen: list[str] = []
    eager = type(vis).forward

    def spy(self, images, **kw):  # noqa: ANN001, ANN202
        seen.append(kw.get("attn_reduce", "none"))
        return eager(self, images, **kw)

    monkeypatch.setattr(type(vis), "forward", spy)
    fast = model(data.image, data)
    assert seen == ["mean_heads"]

    def full_attention(self, images, **kw):  # noqa: ANN001, ANN202
        return eager(self, images, **{**kw, "attn_reduce": "none"})

    monkeypatch.setattr(type(vis), "forward", full_attention)
    plain = model(data.image, data)
    torch.testing.assert_close(fast.anomaly_map, plain.anomaly_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.image_score, plain.image_score, atol=1e-5, rtol=1e-5)


# --- torch.compile of the vision forward ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["anomalyclip", "ava_dino"])
@torch.no_grad()
def test_compiled_vision_equals_eager(method):
    """Dynamo captures the vision forward and AOT-traces it (``aot_eager``); inductor's C++ code generation is
    not run here (tens of seconds per graph on a shared CPU) — ``make bench-gpu --compile`` runs it on the GPU."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def counting(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    model, _ = build_model(method, tiny=True, image_size=112 if method == "anomalyclip" else 64)
    model.eval()
    data = fake_batch(model.input_size, 2, torch.device("cpu"))
    eager = model(data.image, data)
    with compiled_vision(model, counting) as vision:
        assert "forward" in vars(vision)
        compiled = model(data.image, data)
    assert graphs, "the vision forward was not captured by dynamo"
    assert "forward" not in vars(vision)  # eager again after the block
    torch.testing.assert_close(compiled.anomaly_map, eager.anomaly_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.image_score, eager.image_score, atol=1e-5, rtol=1e-5)


# --- pre-resized cache ----------------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def mvtec_like(tmp_path: Path) -> Path:
    """Two categories with normal and defective images of odd sizes (so resizing really happens)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for cat in ("a", "b"):
        for i in range(2):
            _png(root / cat / "test" / "good" / f"{i}.png", rng.integers(0, 255, (37, 45, 3), dtype=np.uint8))
        _png(root / cat / "test" / "crack" / "0.png", rng.integers(0, 255, (37, 45, 3), dtype=np.uint8))
        mask = np.zeros((37, 45), np.uint8)
        mask[5:20, 10:30] = 255
        _png(root / cat / "ground_truth" / "crack" / "0_mask.png", mask)
    return root


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.mark.parametrize("with_masks", [True, False])
def test_cached_items_equal_uncached(mvtec_like, tmp_path, with_masks):
    samples = read("folder", mvtec_like)
    plain = ZSADDataset(samples, 24, MEAN, STD, "bicubic", with_masks)
    cached = ZSADDataset(samples, 24, MEAN, STD, "bicubic", with_masks, cache_dir=tmp_path / "cache")
    assert cached.cache is not None and cached.cache.ready
    for i in range(len(samples)):
        a, b = plain[i], cached[i]
        assert torch.equal(a["image"], b["image"])
        if with_masks:
            assert a["mask"].dtype == b["mask"].dtype == torch.bool and torch.equal(a["mask"], b["mask"])
        else:
            assert a["mask"] is None and b["mask"] is None
        assert {k: v for k, v in a.items() if k not in ("image", "mask")} == {
            k: v for k, v in b.items() if k not in ("image", "mask")
        }
    if with_masks:  # the comparison covers a real defect mask, not only all-zero ones
        assert any(plain[i]["mask"].any() for i in range(len(samples)))


def test_cache_is_reused_and_invalidated(mvtec_like, tmp_path, monkeypatch):
    samples = read("folder", mvtec_like)
    first = ZSADDataset(samples, 24, MEAN, STD, "bicubic", True, cache_dir=tmp_path / "cache")
    expected = first[0]["image"]

    def no_decode(*_a, **_k):  # noqa: ANN202
        raise AssertionError("decoded although the cache exists")

    with monkeypatch.context() as m:
        m.setattr(dataset_module, "load_image", no_decode)
        again = ZSADDataset(samples, 24, MEAN, STD, "bicubic", True, cache_dir=tmp_path / "cache")
        assert torch.equal(again[0]["image"], expected)
    # another size, another resampling or a changed file each give a new cache folder
    ZSADDataset(samples, 28, MEAN, STD, "bicubic", True, cache_dir=tmp_path / "cache")
    ZSADDataset(samples, 24, MEAN, STD, "bilinear", True, cache_dir=tmp_path / "cache")
    changed = samples[0].image_path
    _png(Path(changed), np.zeros((37, 45, 3), np.uint8))
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = ZSADDataset(samples, 24, MEAN, STD, "bicubic", True, cache_dir=tmp_path / "cache")
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 4 and not any(".tmp" in f for f in folders)
    assert torch.equal(fresh[0]["image"], ZSADDataset(samples, 24, MEAN, STD, "bicubic", True)[0]["image"])
    assert not torch.equal(fresh[0]["image"], expected)


def test_cache_memmaps_are_not_pickled(mvtec_like, tmp_path):
    import pickle

    samples = read("folder", mvtec_like)
    ds = ZSADDataset(samples, 24, MEAN, STD, "bicubic", True, cache_dir=tmp_path / "cache")
    ds[0]  # opens the memmaps in this process
    assert ds.cache._images is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache._images is None  # a worker maps the file itself
    assert torch.equal(clone[1]["image"], ds[1]["image"])


def test_missing_cache_is_a_clear_error(mvtec_like, tmp_path):
    cache = ResizedCache(read("folder", mvtec_like), 24, "bicubic", True, tmp_path / "never_built")
    with pytest.raises(FileNotFoundError, match="never_built"):
        cache.image(0)


def test_datamodule_with_cache_gives_the_same_batches(mvtec_like, tmp_path):
    kw = dict(train=None, test=[DatasetSpec("folder", str(mvtec_like))], image_size=28, mean=MEAN, std=STD)
    plain = list(ZSADDataModule(**kw, test_batch_size=2).test_dataloader()[0])
    cached_dm = ZSADDataModule(**kw, test_batch_size=2, num_workers=1, cache_dir=tmp_path / "c")
    cached = list(cached_dm.test_dataloader()[0])
    assert len(plain) == len(cached) == 4
    for a, b in zip(plain, cached):
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.path == b.path
    assert collate([ZSADDataset(read("folder", mvtec_like), 28, MEAN, STD)[0]]).image.shape == (1, 3, 28, 28)


# --- EntroAD two-level entropy without a host sync ------------------------------------------------------------


def test_two_level_entropy_without_module_count_sync_equals_explicit_partition():
    from zsad.methods.entroad.entropy import _EPS, _symmetrise, kmeans_modules, two_level_entropy

    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 12, 12, generator=g).pow(4)
    p = p / p.sum(-1, keepdim=True)
    w, d = _symmetrise(p)
    for k in (3, 8, 30):  # 30 > N: k-means is clamped to N modules, some possibly empty
        modules = kmeans_modules(w / d.unsqueeze(-1).clamp_min(_EPS), k, 5)
        torch.testing.assert_close(two_level_entropy(p, k, 5), two_level_entropy(p, modules=modules))
