"""ZSADModule + run orchestration on a tiny dummy method: checkpoints, stages, resume, DDP, predict."""

from __future__ import annotations

import json

import pytest
import torch

from zsad.config import compose
from zsad.module import CheckpointMismatch, ZSADModule


@pytest.fixture
def cfg_factory(tmp_path, dummy_method):
    synth = tmp_path / "synth"

    def make(*over: str):
        return compose(
            [],
            [
                "method.name=dummy",
                "protocol=synthetic",
                f"data.synthetic.root={synth}",
                f"out_dir={tmp_path / 'runs'}",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                "eval.gallery_per_category=1",
                "data.test_batch_size=5",
                *over,
            ],
        )

    return make


def test_checkpoint_holds_only_trainable_state_and_identity(cfg_factory):
    from zsad.run import train

    cfg = cfg_factory()
    out = train(cfg, test_after=False)
    ckpt = torch.load(out / "checkpoints" / "second.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"model.head.weight", "model.head.bias", "model.offset"}
    assert ckpt["zsad"]["identity"]["backbone"] == "conv" and ckpt["zsad"]["stage"] == "second"
    assert (out / "config.yaml").is_file()


def test_checkpoint_round_trip_equals(cfg_factory):
    from zsad.run import train

    cfg = cfg_factory()
    out = train(cfg, test_after=False)
    a = ZSADModule(cfg)
    a.load_trainable(out / "checkpoints" / "second.ckpt")
    b = ZSADModule(cfg)
    assert not torch.equal(a.model.head.weight, b.model.head.weight) or a.model.offset.item() != 0.0
    b.load_trainable(out / "checkpoints" / "second.ckpt")
    x = torch.randn(2, 3, 32, 32)
    from tests_support import batch_of

    batch = batch_of(x)
    assert torch.equal(a.model(x, batch).anomaly_map, b.model(x, batch).anomaly_map)


def test_checkpoint_refuses_other_backbone(cfg_factory):
    from zsad.run import train

    out = train(cfg_factory(), test_after=False)
    other = ZSADModule(cfg_factory("method.backbone.pretrained=/elsewhere.pt"))
    with pytest.raises(CheckpointMismatch, match="backbone"):
        other.load_trainable(out / "checkpoints" / "second.ckpt")


def test_stages_train_what_they_say(cfg_factory):
    m = ZSADModule(cfg_factory())
    m.set_stage("first")
    assert m.model.head.weight.requires_grad and not m.model.offset.requires_grad
    assert not any(p.requires_grad for p in m.model.backbone.parameters())
    m.set_stage("second")
    assert not m.model.head.weight.requires_grad and m.model.offset.requires_grad
    m.train()
    assert not m.model.backbone.training and m.model.head.training


def test_resume_continues_and_skips_finished_stages(cfg_factory):
    from zsad.run import train

    cfg = cfg_factory("trainer.max_epochs=1")
    out = train(cfg, test_after=False)
    first = torch.load(out / "checkpoints" / "first.ckpt", map_location="cpu", weights_only=False)
    # Interrupted run: the final checkpoint of stage 2 is gone, its last-epoch checkpoint remains.
    (out / "checkpoints" / "second.ckpt").unlink()
    longer = cfg_factory("trainer.max_epochs=2")
    train(longer, test_after=False)
    second = torch.load(out / "checkpoints" / "second.ckpt", map_location="cpu", weights_only=False)
    assert second["epoch"] == 2  # continued from epoch 1 to 2, not restarted
    # stage 1 was skipped: its checkpoint file is untouched
    again = torch.load(out / "checkpoints" / "first.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(again["state_dict"]["model.head.weight"], first["state_dict"]["model.head.weight"])


def test_train_then_test_writes_metrics(cfg_factory):
    from zsad.run import train

    out = train(cfg_factory())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dummy" and metrics["protocol"] == "synthetic"
    ds = metrics["datasets"]["synthetic_objects"]
    assert len(ds["categories"]) == 5
    assert 0.0 <= ds["mean"]["image_auroc"] <= 1.0
    assert metrics["timing"]["train_s"] > 0 and metrics["config"]["method"]["name"] == "dummy"


@pytest.mark.slow
def test_ddp_two_processes_match_one(cfg_factory):
    """Testing the same checkpoint with 2 gloo processes gives the metrics of 1 process."""
    from zsad.run import test, train

    cfg = cfg_factory()
    out = train(cfg, test_after=False)
    ckpt = out / "checkpoints" / "second.ckpt"
    # Batch size 1 on both sides: a conv's floats depend on the batch it runs in, and the synthetic maps have
    # large tie groups that a 1-ulp difference would reorder. With identical per-image maps the numbers must agree.
    one = test(cfg_factory(f"checkpoint={ckpt}", "run_name=one", "data.test_batch_size=1"))
    two = test(cfg_factory(f"checkpoint={ckpt}", "run_name=two", "trainer=ddp_cpu", "data.test_batch_size=1"))
    one_json = json.loads((out.parent / "one" / "metrics.json").read_text())
    two_json = json.loads((out.parent / "two" / "metrics.json").read_text())
    assert (
        one_json["datasets"]["synthetic_objects"]["n_images"]
        == two_json["datasets"]["synthetic_objects"]["n_images"]
    )
    for cat, vals in one_json["datasets"]["synthetic_objects"]["categories"].items():
        for k, v in vals.items():
            w = two_json["datasets"]["synthetic_objects"]["categories"][cat][k]
            assert (v is None and w is None) or abs(v - w) < 1e-6, (cat, k, v, w)
    assert one["datasets"] == two["datasets"]  # results come back from the spawned processes too


def test_predict_writes_overlays(cfg_factory, tmp_path):
    import numpy as np
    from PIL import Image

    from zsad.predict import predict
    from zsad.run import train

    out = train(cfg_factory(), test_after=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(imgs / f"part{i}.png")
    (imgs / ".DS_Store").write_text("x")
    written = predict(cfg_factory(f"checkpoint={out / 'checkpoints' / 'second.ckpt'}"), imgs, tmp_path / "ov")
    assert sorted(p.name for p in written) == [f"part{i}_heatmap.png" for i in range(3)]
    assert Image.open(written[0]).size == (100, 40)  # image | overlay at the image's own 50×40 resolution
    assert (tmp_path / "ov" / "scores.csv").read_text().count("\n") == 4


def test_resized_cache_gives_the_same_metrics(cfg_factory, tmp_path):
    from zsad.run import test, train

    out = train(cfg_factory(), test_after=False)
    ckpt = out / "checkpoints" / "second.ckpt"
    plain = test(cfg_factory(f"checkpoint={ckpt}", "run_name=plain"))
    cached = test(
        cfg_factory(
            f"checkpoint={ckpt}",
            "run_name=cached",
            "data.cache_resized=true",
            f"data.cache_dir={tmp_path / 'c'}",
        )
    )
    assert any((tmp_path / "c").iterdir())
    assert plain["datasets"] == cached["datasets"]


@pytest.mark.slow
def test_ddp_training_run_completes_and_its_metrics_reproduce(cfg_factory):
    """Train + test with 2 gloo processes; testing its checkpoint in 1 process gives the same metrics."""
    from zsad.run import test, train

    out = train(cfg_factory("trainer=ddp_cpu", "run_name=ddp", "data.test_batch_size=1"), resume=False)
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["timing"]["device"].endswith("x2")
    # batch size 1 on both sides: see test_ddp_two_processes_match_one
    ckpt = out / "checkpoints" / "second.ckpt"
    single = test(cfg_factory(f"checkpoint={ckpt}", "run_name=single", "data.test_batch_size=1"))
    for cat, vals in ddp["datasets"]["synthetic_objects"]["categories"].items():
        for k, v in vals.items():
            w = single["datasets"]["synthetic_objects"]["categories"][cat][k]
            assert (v is None and w is None) or abs(v - w) < 1e-6, (cat, k, v, w)


def test_target_equal_to_training_set_is_refused(cfg_factory):
    from zsad.config import ConfigError
    from zsad.run import train

    with pytest.raises(ConfigError, match="auxiliary training set"):
        train(cfg_factory("data.test=[{name: synthetic_textures}]"))


def test_clip_checkpoints_from_before_the_reference_defaults_load_with_the_old_switches():
    """Identities saved before issue 12 have no pos_interp / global_ln_post: they were bicubic + ln_post."""
    from zsad.module import check_identity

    old = {"kind": "clip", "name": "tiny", "pretrained": "none", "quick_gelu": True, "image_size": 56}
    ckpt = {"zsad": {"method": "anomalyclip", "identity": old}}
    with pytest.raises(
        CheckpointMismatch,
        match=r"\['global_ln_post', 'pos_interp'\].*pos_interp=bicubic method\.clip\.global_ln_post=true",
    ):
        check_identity(ckpt, "anomalyclip", {**old, "pos_interp": "bilinear", "global_ln_post": False})
    check_identity(ckpt, "anomalyclip", {**old, "pos_interp": "bicubic", "global_ln_post": True})
    text_only = {"kind": "clip", "name": "tiny", "pretrained": "none", "quick_gelu": True, "image_size": None}
    check_identity(
        {"zsad": {"method": "x", "identity": text_only}}, "x", text_only
    )  # no vision: nothing filled
