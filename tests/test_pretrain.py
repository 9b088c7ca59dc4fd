"""``zsad pretrain`` plumbing on a miniature recipe: real formats, manifest, reuse while the hash matches."""

from __future__ import annotations

import json

import pytest
import torch

from zsad.pretrain import cache as K
from zsad.pretrain.build import PretrainSpec, pretrain, spec_with
from zsad.pretrain.toy_clip import ClipRecipe
from zsad.pretrain.toy_dino import DinoRecipe

pytestmark = pytest.mark.slow  # four miniature pretrainings (~1 min on 2 idle cores)

MINI = PretrainSpec(
    per_category=2,
    clip=ClipRecipe(steps=2, batch_size=8, keep_tokens=(16,), full_frac=0.5, dense_batch=4),
    dino=DinoRecipe(steps=2, batch_size=4, n_local=1, n_prototypes=64),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return folder, pretrain(folder, MINI, show_progress=False)


def test_manifest_records_the_recipe_and_hashes(built):
    folder, manifest = built
    on_disk = json.loads((folder / K.MANIFEST).read_text())
    assert on_disk == manifest
    for model, path in K.toy_paths(folder).items():
        entry = manifest[model]
        assert entry["sha256"] == K.sha256(path)
        assert entry["steps"] == 2 and entry["seed"] == 0
        assert entry["recipe"]["world"]["version"] >= 1 and entry["recipe"]["world"]["seed"] == 0
        assert set(entry["final"]) and all(v == v for v in entry["final"].values())  # finite numbers
    assert (folder / "world.png").is_file()


def test_files_load_through_the_real_weight_paths(built):
    from zsad.backbones.clip import build_clip
    from zsad.backbones.dinov3 import build_dinov3

    folder, _ = built
    paths = K.toy_paths(folder)
    clip = build_clip("toy", str(paths["clip"]), image_size=112)
    saved = torch.load(paths["clip"], weights_only=True)
    assert "visual.conv1.weight" in saved and "token_embedding.weight" in saved  # open_clip keys
    torch.testing.assert_close(clip.visual.vit.conv1.weight, saved["visual.conv1.weight"])
    torch.testing.assert_close(clip.text.tower.token_embedding.weight, saved["token_embedding.weight"])
    dino = build_dinov3("tiny", str(paths["dino"]), image_size=112)
    saved = torch.load(paths["dino"], weights_only=True)
    assert "cls_token" in saved and "reg_token" in saved  # timm keys
    torch.testing.assert_close(dino.model.patch_embed.proj.weight, saved["patch_embed.proj.weight"])
    feats = dino(torch.randn(1, 3, 112, 112), taps=(1, 4))
    assert feats.patch_tokens[0].shape == (1, 49, 64)


def test_reused_while_current_rebuilt_when_not(built, tmp_path):
    folder, manifest = built
    paths = K.toy_paths(folder)
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = pretrain(folder, MINI, show_progress=False)
    assert again == manifest
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes
    # A changed recipe rebuilds only that model; a changed file (hash mismatch) is rebuilt too.
    other = spec_with(MINI, dino_steps=3)
    copy = tmp_path / "toy"
    copy.mkdir()
    for p in [*paths.values(), folder / K.MANIFEST]:
        (copy / p.name).write_bytes(p.read_bytes())
    rebuilt = pretrain(copy, other, show_progress=False)
    assert rebuilt["clip"]["sha256"] == manifest["clip"]["sha256"]
    assert rebuilt["dino"]["steps"] == 3
    K.toy_paths(copy)["clip"].write_bytes(b"tampered")
    assert not K.is_current(rebuilt["clip"], other.recipe("clip"), K.toy_paths(copy)["clip"])
    fixed = pretrain(copy, other, show_progress=False, only=("clip",))
    assert fixed["clip"]["sha256"] == K.sha256(K.toy_paths(copy)["clip"])


def test_training_is_deterministic(built, tmp_path):
    folder, manifest = built
    twin = pretrain(tmp_path, MINI, show_progress=False, only=("clip",))
    assert twin["clip"]["sha256"] == manifest["clip"]["sha256"]


def test_toy_paths_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(K.ENV_DIR, str(tmp_path))
    assert K.toy_paths()["clip"] == tmp_path / "toy_clip.pt"
    assert K.referenced([{"clip": {"pretrained": str(tmp_path / "toy_clip.pt")}}])
    assert not K.referenced([{"clip": {"pretrained": "none"}}])
