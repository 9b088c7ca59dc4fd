"""EntroAD on the tiny CLIP preset: memory build/cache/guard, stages, text-encoder calls, checkpoint, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from data_modules.datamodule import ZSADDataModule
from data_modules.dataset import ZSADDataset, collate
from data_modules.types import Sample
from zsad.config import EXPERIMENTS, compose
from zsad.methods.base import build_optimizer
from zsad.methods.entroad import EntroAD, EntroADConfig
from zsad.methods.entroad.memory import MemoryLeak, path_hash
from zsad.methods.entroad.routing import neighbour_average

SIZE = 56  # 4 × 4 patches of 14 px
TINY = {
    "image_size": SIZE,
    "clip": {"name": "tiny", "pretrained": "none"},
    "taps": [2, 3, 4],
    "dpam_start": 2,
    "memory_workers": 0,
    "memory_batch_size": 4,
}


def _cfg(**over):
    return OmegaConf.merge(OmegaConf.structured(EntroADConfig), TINY, over)


def _model(**over) -> EntroAD:
    torch.manual_seed(0)
    return EntroAD(_cfg(**over))


def _write_samples(root: Path, dataset: str, n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = root / dataset / f"{i}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(img)
        label, mask = i % 2, None
        if label:
            m = np.zeros((SIZE, SIZE), np.uint8)
            m[: SIZE // 2, : SIZE // 2 + 7 * i % 14] = 255  # a defect over the top-left patches
            mask = root / dataset / f"{i}_mask.png"
            Image.fromarray(m).save(mask)
        out.append(Sample(dataset, "cat", img, mask, label, "bad" if label else "good", "object"))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("entroad_data")
    return {
        "train": _write_samples(root, "aux", 6, 0),
        "target": _write_samples(root, "target", 3, 1),
        "root": root,
    }


def _aux(samples, model: EntroAD) -> ZSADDataModule:
    """The DataModule holding ``samples`` as the auxiliary set, with the model's preprocessing (no reader)."""
    dm = ZSADDataModule(None, [], model.input_size, model.mean, model.std, model.interpolation, num_workers=0)
    dm.train_samples = list(samples)
    return dm


def _batch(samples, with_masks=True):
    ds = ZSADDataset(
        samples,
        SIZE,
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
        "bicubic",
        with_masks,
    )
    return collate([ds[i] for i in range(len(ds))])


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model = _model()
    model.prepare(_aux(data["train"], model), cache, torch.device("cpu"))
    return model, cache


# --- memory -------------------------------------------------------------------------------------------------------


def test_memory_holds_training_keys_only(built, data):
    model, _ = built
    train = data["train"]
    mem = model.memory
    assert mem.image_keys.shape == (6, model.clip.visual.embed_dim)
    assert torch.equal(mem.image_values, F.one_hot(torch.tensor([s.label for s in train]), 2).float())
    # 3 normal images → 1 key each; 3 anomalous images → inside + outside the mask.
    assert mem.patch_keys.shape == (9, model.clip.visual.width)
    assert int(mem.patch_values[:, 1].sum()) == 3
    assert torch.allclose(mem.patch_keys.norm(dim=-1), torch.ones(9), atol=1e-5)
    # Image keys are the normalised global embeddings of the training images, not of any target image.
    with torch.no_grad():
        glob = lambda s: F.normalize(  # noqa: E731
            model.clip.visual(_batch(s).image, taps=(4,), dpam_start=2).global_embedding, dim=-1
        )
        train_emb, target_emb = glob(train), glob(data["target"])
    assert torch.allclose(mem.image_keys, train_emb, atol=1e-5)
    assert (mem.image_keys @ target_emb.t()).max() < 0.9999
    assert set(mem.source_hash.tolist()) == {path_hash(s.image_path) for s in train}
    assert not set(mem.source_hash.tolist()) & {path_hash(s.image_path) for s in data["target"]}


def test_evaluating_a_memory_sample_is_refused(built, data):
    model, _ = built
    model.eval()
    with torch.no_grad():
        out = model(_batch(data["target"]).image, _batch(data["target"]))  # targets are fine
        assert out.anomaly_map.shape == (3, SIZE, SIZE) and torch.isfinite(out.image_score).all()
        leaky = _batch([data["target"][0], data["train"][1]])
        with pytest.raises(MemoryLeak, match="must not overlap data.train"):
            model(leaky.image, leaky)


def test_a_copy_of_a_training_image_under_another_path_is_refused(built, data, tmp_path):
    model, _ = built
    model.eval()
    source = data["train"][1]
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    copy.write_bytes(Path(source.image_path).read_bytes())
    same_size = tmp_path / "elsewhere" / "same_size.png"  # same size, other bytes: not a copy
    blob = bytearray(copy.read_bytes())
    blob[-20] ^= 0xFF
    same_size.write_bytes(bytes(blob))
    model.memory.check_disjoint([str(same_size), str(data["target"][0].image_path), "/no/such/file.png"])
    leaky = _batch([data["target"][0], Sample("target", "cat", copy, None, 0, "good", "object")])
    with torch.no_grad(), pytest.raises(MemoryLeak, match="same path or same file content"):
        model(leaky.image, leaky)
    # The digests come from the files: every source's size and content is in the memory.
    sizes = {Path(s.image_path).stat().st_size for s in data["train"]}
    assert set(model.memory.source_size.tolist()) == sizes
    assert model.memory.source_content.shape == model.memory.source_hash.shape


def test_memory_cache_is_reused_and_invalidated(data, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    first = _model()
    calls_first = _count_calls(monkeypatch, first.clip.visual, "forward")
    first.prepare(_aux(data["train"], first), tmp_path, cpu)
    assert len(calls_first) == 2  # 6 images in batches of 4
    assert len(list(tmp_path.glob("entroad_memory_*.pt"))) == 1
    again = _model()
    calls = _count_calls(monkeypatch, again.clip.visual, "forward")
    again.prepare(_aux(data["train"], again), tmp_path, cpu)
    assert calls == []  # no encoder pass: the cached memory is reused
    assert torch.equal(again.memory.patch_keys, first.memory.patch_keys)
    # A changed auxiliary set rebuilds (a new file) and memorises exactly the new set.
    again.prepare(_aux(data["train"][:4], again), tmp_path, cpu)
    assert len(calls) == 1 and again.memory.image_keys.shape[0] == 4
    # Changed kernels or input size also change the key.
    for over in ({"kernels": [1, 3]}, {"image_size": 42}):
        other = _model(**over)
        calls_other = _count_calls(monkeypatch, other.clip.visual, "forward")
        other.prepare(_aux(data["train"], other), tmp_path, cpu)
        assert len(calls_other) == 2, over
    assert len(list(tmp_path.glob("entroad_memory_*.pt"))) == 4


def test_memory_comes_from_the_data_modules_batches(data, tmp_path, monkeypatch):
    """The memory pass reads the DataModule's auxiliary loader (with the memory's batch size and workers); its mask
    rule (data.mask_resize) is part of the cache key, the default leaving the key as it was."""
    model, cpu = _model(), torch.device("cpu")
    aux = _aux(data["train"], model)
    asked = []
    original = aux.auxiliary_dataloader
    monkeypatch.setattr(aux, "auxiliary_dataloader", lambda *a: asked.append(a) or original(*a))
    model.prepare(aux, tmp_path, cpu)
    assert asked == [(4, 0)] and model.memory.image_keys.shape[0] == len(data["train"])
    keys = {rule: model.memory_path(data["train"], tmp_path, cpu, rule)[1] for rule in ("float", "uint8")}
    assert keys["float"] != keys["uint8"]
    assert "mask_resize" not in model.memory_settings(cpu)
    assert model.memory_settings(cpu, "uint8")["mask_resize"] == "uint8"


def test_memory_travels_in_the_checkpoint(built, data):
    model, _ = built
    fresh = _model()
    assert not fresh.memory.built
    fresh.load_trainable_state_dict(model.trainable_state_dict())
    fresh.prepare(
        None, Path("/nonexistent"), torch.device("cpu")
    )  # test-only run: no auxiliary set, no rebuild
    assert torch.equal(fresh.memory.image_keys, model.memory.image_keys)
    batch = _batch(data["target"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(batch.image, batch), fresh(batch.image, batch)
    assert torch.allclose(a.anomaly_map, b.anomaly_map) and torch.allclose(a.image_score, b.image_score)


def test_empty_memory_and_empty_training_set_are_errors():
    model = _model()
    with pytest.raises(ValueError, match="data.train"):
        model.prepare(None, Path("/nonexistent"), torch.device("cpu"))
    with pytest.raises(ValueError, match="data.train"):
        model.prepare(_aux([], model), Path("/nonexistent"), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="memory is empty"):
        model.eval()(torch.zeros(1, 3, SIZE, SIZE), None)


# --- training -------------------------------------------------------------------------------------------------------


def _train_steps(model: EntroAD, stage: str, batch, steps: int = 5, lr: float = 5e-3) -> list[float]:
    model.set_stage(stage)
    model.train()
    optim = OmegaConf.merge(model.cfg.stages[stage].optim, {"lr": lr})
    opt, _ = build_optimizer([p for p in model.parameters() if p.requires_grad], optim, steps)
    losses = []
    for _ in range(steps):
        loss = model.loss(model(batch.image, batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_each_stage_trains_only_its_parameters(built, data):
    model, _ = built
    batch = _batch(data["train"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for stage, trained in (("retrieval", ("retrieval.",)), ("prompt", ("prompts.", "bias."))):
        model.set_stage(stage)
        model.train()
        model.zero_grad(set_to_none=True)
        model.loss(model(batch.image, batch), batch)["loss"].backward()
        for name, p in model.named_parameters():
            if name.startswith(trained):
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, (stage, name)
            else:
                assert p.grad is None, (stage, name)
        _train_steps(model, stage, batch, steps=1)
        for name, p in model.named_parameters():
            assert torch.equal(p, frozen[name]) != name.startswith(trained), (stage, name)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Both branches' contexts receive a gradient in the prompt stage.
    grad = model.prompts.ctx.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


def test_text_encoder_runs_once_per_step_for_all_images_and_branches(built, data, monkeypatch):
    model, _ = built
    batch = _batch(data["target"])  # B = 3
    enc = _count_calls(monkeypatch, model.clip.text, "encode_embeddings")
    vis = _count_calls(monkeypatch, model.clip.visual, "forward")
    model.set_stage("prompt")
    model.train()
    out = model(batch.image, batch)
    assert len(enc) == 1 and enc[0][0][0].shape[0] == 3 * 2 * 2  # B × branches × (normal, anomalous)
    assert out.loss_inputs["branch_probs"].shape == (3, 2, 2, 16)
    assert vis[-1][1]["attn_taps"] is True  # attention probabilities only where the entropy needs them
    model.set_stage("retrieval")
    model(batch.image, batch)
    assert len(enc) == 1 and vis[-1][1]["attn_taps"] is False  # stage 1 needs neither text nor attention


def test_extras_and_score(built, data):
    model, _ = built
    batch = _batch(data["target"])
    model.eval()
    with torch.no_grad():
        out = model(batch.image, batch)
    ex = out.extras
    assert ex["entropy_map"].shape == (3, 4, 4)
    assert float(ex["entropy_map"].min()) == 0.0 and float(ex["entropy_map"].max()) == pytest.approx(1.0)
    assert ex["routing_weights"].shape == (3, 2, 16)
    assert torch.allclose(ex["routing_weights"].sum(-1), torch.ones(3, 2), atol=1e-5)
    assert ex["gate"].shape == (3,) and (ex["gate"] > 0).all()
    k = max(1, round(SIZE * SIZE * 0.01))
    topk = out.anomaly_map.flatten(1).topk(k, dim=1).values.mean(1)
    assert torch.allclose(out.image_score, 0.3 * topk + 0.7 * ex["p_img"], atol=1e-6)


def test_z_is_projected_then_neighbour_averaged_then_normalised(built, data, monkeypatch):
    model, _ = built
    batch = _batch(data["target"])
    vis = model.clip.visual
    with torch.no_grad():
        f = vis(batch.image, taps=model.taps, dpam_start=2, pre_proj=True)
        z = model.patch_embeddings(f.pre_proj_tokens[-1], f.grid)
        projected = f.pre_proj_tokens[-1] @ vis.vit.proj
        want = F.normalize(neighbour_average(projected, f.grid, (1, 3, 5)), dim=-1)
        of_unit = F.normalize(neighbour_average(f.patch_tokens[-1], f.grid, (1, 3, 5)), dim=-1)
    torch.testing.assert_close(z, want)
    assert not torch.allclose(z, of_unit, atol=1e-4)  # averaging unit vectors is a different z
    calls = _count_calls(monkeypatch, model, "patch_embeddings")
    model.eval()
    with torch.no_grad():
        model(batch.image, batch)
    assert len(calls) == 1  # the branch maps and the routed tokens use this z


def test_retrieval_and_z_stay_float32_under_autocast(built, data):
    model, _ = built
    batch = _batch(data["target"])
    model.eval()
    with torch.no_grad():
        f = model.clip.visual(batch.image, taps=model.taps, dpam_start=2, pre_proj=True)
        glob, pre = f.global_embedding, f.pre_proj_tokens[-1]
        ref = model.retrieve(glob, pre, f.grid), model.patch_embeddings(pre, f.grid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.retrieve(glob, pre, f.grid), model.patch_embeddings(pre, f.grid)
            out = model(batch.image, batch)
    for a, b in zip((*ref[0], ref[1]), (*got[0], got[1])):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b)
    assert out.loss_inputs["branch_probs"].dtype == torch.float32
    assert out.anomaly_map.dtype == torch.float32 and out.extras["entropy_map"].dtype == torch.float32


# --- configs ----------------------------------------------------------------------------------------------------------


def test_default_config_matches_the_spec():
    cfg = compose([EXPERIMENTS / "methods" / "entroad.yaml"])
    m = cfg.method
    assert (m.image_size, m.batch_size, m.dpam_start, list(m.taps)) == (518, 8, 2, [6, 12, 18, 24])
    assert (m.clip.name, m.clip.pretrained) == ("ViT-L-14-336-quickgelu", "openai")
    assert list(m.stages) == ["retrieval", "prompt"]
    assert (m.stages.retrieval.epochs, m.stages.prompt.epochs, m.stages.prompt.optim.lr) == (1, 5, 4e-4)
    assert (m.route_temperature, m.gate_tau, m.gate_k0, m.gate_k1) == (0.1, 0.5, 5.0, 50.0)
    assert (m.stages.retrieval.optim.lr, list(m.stages.retrieval.optim.betas)) == (4e-4, [0.5, 0.999])
    assert (m.patch_dropout_q, m.image_dropout_q, m.image_temperature, m.temperature) == (
        0.8,
        0.95,
        0.07,
        0.07,
    )
    assert (list(m.branch_weights), m.score_map_weight, m.topk_frac, m.smoothing_sigma) == (
        [0.7, 0.3],
        0.3,
        0.01,
        4.0,
    )
    assert (m.entropy, m.route_norm, m.n_ctx, m.deep_depth, m.deep_len, list(m.kernels)) == (
        "row_entropy", "l1", 12, 9, 4, [1, 3, 5]
    )  # fmt: skip
    assert (m.gate, m.sim_dropout, m.entropy_split, m.confidence_fusion, m.single_branch) == (
        True, True, False, False, False
    )  # fmt: skip
    assert (m.split_temperature, m.memory_regions) == (0.1, "pure")


ABLATIONS = sorted((EXPERIMENTS / "ablations").glob("entroad_*.yaml"))


def test_every_ablation_changes_something(data):
    assert len(ABLATIONS) >= 10
    base = OmegaConf.to_container(compose([EXPERIMENTS / "methods" / "entroad.yaml"]).method)
    for path in ABLATIONS:
        method = OmegaConf.to_container(compose([EXPERIMENTS / "methods" / "entroad.yaml", path]).method)
        assert method != base, path.name
