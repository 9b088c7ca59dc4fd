"""The throughput harness on CPU (tiny presets): a valid table, instruments that measure what they claim, no
hooks left behind. Speed itself is never asserted (no timed tests)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from zsad.bench import instruments as ins
from zsad.bench import throughput as tp


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _no_global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks


def test_harness_writes_a_valid_table_on_cpu(tmp_path):
    out = tmp_path / "res" / "throughput"
    rc = tp.main(["--cpu", "--methods", "anomalyclip,ava_dino", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["gpu"] is False and report["bf16"] is False and "no GPU" in report["device"]
    assert report["commit"] == report["versions"]["git"] and report["versions"]["torch"].startswith("2.")
    assert [r["method"] for r in report["methods"]] == ["anomalyclip", "ava_dino"]
    for r in report["methods"]:
        assert "error" not in r
        for key in ("infer_img_s", "train_img_s", "gflops_per_img", "backbone_gflops_per_img"):
            assert r[key] > 0, key
        assert 0 < r["backbone_frac"] <= 1
        assert r["backbone_gflops_per_img"] < r["gflops_per_img"]  # the heads cost something too
        assert r["infer_batch"] == r["train_batch"] == 2
        assert r["image_size"] == tp.REGISTRY[r["method"]].cpu_size
        assert r["mfu_forward"] is None and r["infer_peak_gb"] is None  # no card, no MFU or GPU memory
        assert list(r["train"]) == ["main"] and r["train"]["main"]["img_s"] == r["train_img_s"]
    ld = report["loading"]
    assert ld["images"] == 4 and ld["img_s"] > 0 and ld["cached_img_s"] > 0
    mt = report["metrics"]
    assert mt["n"] == 8 and mt["evaluate_s"] > 0 and mt["evaluate_visa_s"] > mt["evaluate_s"]
    md = out.with_suffix(".md").read_text()
    assert "No GPU was present" in md
    assert "| anomalyclip | 56² | 2 |" in md and "| ava_dino | 64² | 2 |" in md
    assert "target (issue 9)" not in md  # targets are judged only for paper-size GPU rows


def test_multi_stage_methods_time_every_stage_and_leave_no_hooks():
    s = tp.Settings(
        device="cpu",
        tiny=True,
        image_size=56,
        infer_batch=2,
        train_batch=2,
        steps=1,
        warmup=1,
        bf16=False,
        memory_images=8,
    )
    model, _ = tp.build_model("entroad", tiny=True, image_size=56)
    tp.fill_random_memory(model, 8)
    row = tp.measure_model(model, "entroad", s, train_batch=2)
    assert list(row["train"]) == ["retrieval", "prompt"]
    assert row["train_img_s"] == min(x["img_s"] for x in row["train"].values())
    assert _no_hooks(model) and _no_global_hooks()


class _Toy(nn.Module):
    """A frozen two-layer encoder, a trainable head, and a helper that calls the encoder's layers directly."""

    frozen_modules = ("enc",)

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))

    def helper(self, x: torch.Tensor) -> torch.Tensor:  # like CLIPText.encode_embeddings: inner modules only
        return self.head(self.enc[1](self.enc[0](x)))


def test_frozen_call_hooks_see_outermost_calls_only_and_are_always_removed():
    toy = _Toy()
    calls = []
    with ins.frozen_call_hooks(toy, lambda: calls.append("in"), lambda: calls.append("out")):
        toy(torch.randn(3, 8))
        assert calls == ["in", "out"]  # one outermost call, not one per layer
        toy.helper(torch.randn(3, 8))
        assert calls == ["in", "out"] * 3  # a helper's inner calls are each outermost
    assert _no_hooks(toy)
    with pytest.raises(RuntimeError):
        with ins.frozen_call_hooks(toy, lambda: None, lambda: None):
            toy(torch.randn(3, 5))  # wrong width: the forward raises inside the hooks
    assert _no_hooks(toy)


def test_backbone_flops_are_counted_inside_the_frozen_modules():
    toy = _Toy()

    class Data:
        image = torch.randn(3, 8)

    class Wrapper(nn.Module):  # the harness calls model(images, batch)
        frozen_modules = ("toy_enc",)

        def __init__(self) -> None:
            super().__init__()
            self.toy_enc = toy.enc
            self.head = toy.head

        def forward(self, x: torch.Tensor, _batch: object) -> torch.Tensor:
            return self.head(self.toy_enc(x))

    total, inside = ins.count_flops(Wrapper(), Data, bf16=False)
    assert inside == 2 * 3 * (8 * 16 + 16 * 4)  # multiply-adds of the two frozen linears, batch 3
    assert total == inside + 2 * 3 * 4 * 2
    assert _no_global_hooks()


def test_backoff_halves_the_batch_on_out_of_memory_only():
    tried = []

    def fn(batch: int) -> dict:
        tried.append(batch)
        if batch > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"img_s": 1.0}

    assert ins.with_backoff(fn, 32, torch.device("cuda")) == {"batch": 8, "img_s": 1.0}
    assert tried == [32, 16, 8]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU an OOM is not retried
        ins.with_backoff(fn, 32, torch.device("cpu"))

    def broken(batch: int) -> dict:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ins.with_backoff(broken, 32, torch.device("cuda"))


def test_channels_last_patch_embed_is_restored():
    model, _ = tp.build_model("anomalyclip", tiny=True, image_size=56)
    conv = ins.patch_conv(model)
    assert conv is model.clip.visual.vit.conv1
    with ins.channels_last_patch_embed(model):
        assert (
            conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        )
    assert conv.weight.is_contiguous()


def test_targets_are_judged_on_gpu_reports():
    row = {"method": "mpama", "infer_img_s": 320.0, "train_img_s": 90.0, "mfu_backbone": 0.55}
    report = {"methods": [row], "metrics": {"evaluate_visa_s": 12.0}}
    got = {t["what"]: t["ok"] for t in tp.check_targets(report)}
    assert got == {
        "mpama infer_img_s": True,
        "mpama train_img_s": False,
        "mpama mfu_backbone": True,
        "metrics, VisA-sized": False,
    }


def test_unknown_method_is_rejected():
    with pytest.raises(SystemExit):
        tp.main(["--cpu", "--methods", "nope"])


def test_random_memory_lets_entroad_run_without_a_build():
    """The GPU tests and the harness give EntroAD a random memory; it must be a working one."""
    from tests_support import batch_of

    from zsad.bench.throughput import fill_random_memory
    from zsad.config import EXPERIMENTS, compose
    from zsad.registry import build_method, tiny_overrides

    cfg = compose(
        [EXPERIMENTS / "methods" / "entroad.yaml"], [*tiny_overrides("entroad"), "method.image_size=112"]
    )
    model = build_method(cfg.method)
    fill_random_memory(model, 8)
    x = torch.randn(2, 3, 112, 112)
    out = model.eval()(x, batch_of(x, class_name="bottle"))
    assert out.anomaly_map.shape == (2, 112, 112) and torch.isfinite(out.image_score).all()


def test_ablation_rows_are_measured_and_unknown_rows_rejected(tmp_path):
    from zsad.bench import throughput

    throughput.main(
        [
            "--cpu",
            "--methods",
            "ava_dino:vision_bf16",
            "--skip-loading",
            "--skip-metrics",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    report = json.loads((tmp_path / "t.json").read_text())
    (row,) = report["methods"]
    assert row["method"] == "ava_dino:vision_bf16" and row["infer_img_s"] > 0
    with pytest.raises(SystemExit):
        throughput.main(["--cpu", "--methods", "ava_dino:no_such_ablation", "--out", str(tmp_path / "u")])
