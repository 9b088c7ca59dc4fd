"""Official checkpoints → zsad checkpoints: explicit name mapping, bitwise round trips, clear key errors, the CLI."""

from __future__ import annotations

import json

import parity_vectors as pv
import pytest
import torch

from zsad.cli import main
from zsad.config import compose
from zsad.convert import CONVERTERS, ConversionError, anomalyclip, default_layers
from zsad.registry import tiny_overrides


@pytest.fixture(scope="module")
def faithful_cfg():
    return compose(default_layers("anomalyclip"))


@pytest.fixture(scope="module")
def official_vectors() -> dict[str, torch.Tensor]:
    """The official prompt learner of the AnomalyCLIP parity vectors (official names, float32)."""
    return anomalyclip.read_official(pv.method_folder("anomalyclip") / "trainable.pt")


def test_registry_lists_both_methods_with_public_code():
    assert CONVERTERS == {"anomalyclip": "zsad.convert.anomalyclip", "ava_dino": "zsad.convert.ava_dino"}
    assert [p.name for p in default_layers("anomalyclip")] == [
        "anomalyclip.yaml",
        "anomalyclip_faithful.yaml",
    ]


def test_vectors_trainable_round_trips_bitwise(official_vectors, faithful_cfg):
    zsad_state = anomalyclip.to_zsad(official_vectors, faithful_cfg)
    assert set(zsad_state) == {"prompts.ctx", "prompts.deep"}
    assert zsad_state["prompts.ctx"].shape == (1, 2, 12, 768) and zsad_state["prompts.deep"].shape == (
        8,
        4,
        768,
    )
    # Index 0 of zsad's context is the normal prompt (official ctx_pos), index 1 the anomalous one (ctx_neg).
    assert torch.equal(zsad_state["prompts.ctx"][0, 0], official_vectors["ctx_pos"][0, 0])
    assert torch.equal(zsad_state["prompts.ctx"][0, 1], official_vectors["ctx_neg"][0, 0])
    for i in range(8):
        assert torch.equal(zsad_state["prompts.deep"][i], official_vectors[f"compound_prompts_text.{i}"])
    back = anomalyclip.to_official(zsad_state, faithful_cfg)
    assert set(back) == set(official_vectors)
    for key, value in official_vectors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value), key
        assert back[key].view(torch.int32).equal(value.view(torch.int32)), (
            key
        )  # bit patterns, -0.0 and NaN too


def _official_file(official, tmp_path, extra=None):  # noqa: ANN001, ANN202
    """Write a state dict as the official train.py does: {"prompt_learner": state_dict} with its unused entries."""
    width = official["ctx_pos"].shape[-1]
    state = dict(official)
    for i in range(sum(k.startswith("compound_prompts_text.") for k in official)):
        state[f"compound_prompt_projections.{i}.weight"] = torch.zeros(896, width)
        state[f"compound_prompt_projections.{i}.bias"] = torch.zeros(896)
    for side in ("pos", "neg"):
        state[f"token_prefix_{side}"] = torch.zeros(1, 1, 1, width)
        state[f"token_suffix_{side}"] = torch.zeros(1, 1, 64, width)
        state[f"tokenized_prompts_{side}"] = torch.zeros(1, 1, 77, dtype=torch.int32)
    state.update(extra or {})
    path = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": state}, path)
    return path


def test_wrapped_official_file_drops_only_the_listed_entries(official_vectors, faithful_cfg, tmp_path):
    read = anomalyclip.read_official(_official_file(official_vectors, tmp_path))
    assert "compound_prompt_projections.0.weight" in read and "token_prefix_pos" in read
    state = anomalyclip.to_zsad(read, faithful_cfg)
    direct = anomalyclip.to_zsad(official_vectors, faithful_cfg)
    assert all(torch.equal(state[k], direct[k]) for k in direct)


def test_unknown_and_missing_keys_are_named(official_vectors, faithful_cfg):
    extra = {**official_vectors, "ctx_mid": torch.zeros(1), "compound_prompts_text.8": torch.zeros(4, 768)}
    with pytest.raises(ConversionError, match=r"unknown keys \['compound_prompts_text.8', 'ctx_mid'\]"):
        anomalyclip.to_zsad(extra, faithful_cfg)
    missing = {k: v for k, v in official_vectors.items() if k not in ("ctx_neg", "compound_prompts_text.3")}
    with pytest.raises(ConversionError, match=r"missing keys \['ctx_neg', 'compound_prompts_text.3'\]"):
        anomalyclip.to_zsad(missing, faithful_cfg)
    short = {**official_vectors, "ctx_pos": official_vectors["ctx_pos"][:, :, :8]}
    with pytest.raises(ConversionError, match=r"ctx_pos.*n_ctx=12.*method\.n_ctx"):
        anomalyclip.to_zsad(short, faithful_cfg)
    wide = {**official_vectors, "compound_prompts_text.2": torch.zeros(5, 768)}
    with pytest.raises(
        ConversionError, match=r"deep_len=4.*method\.deep_len.*compound_prompts_text\.2 \[5, 768\]"
    ):
        anomalyclip.to_zsad(wide, faithful_cfg)
    with pytest.raises(ConversionError, match=r"missing keys \['prompts.deep'\]"):
        anomalyclip.to_official({"prompts.ctx": torch.zeros(1, 2, 12, 768)}, faithful_cfg)


def test_unreadable_or_foreign_files_are_errors(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        anomalyclip.read_official(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read"):
        anomalyclip.read_official(tmp_path / "junk.pth")
    torch.save({"model": {"x": 1}}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="prompt_learner"):
        anomalyclip.read_official(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------------------- CLI

# The tiny preset: 3 text layers, so the official depth that fits is 3 (2 deep prompt layers), width 64.
TINY = [*tiny_overrides("anomalyclip"), "method.deep_depth=3", "method.image_size=56"]


def _tiny_official() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(1, 1, 12, 64, generator=g) * 0.02 for k in ("ctx_pos", "ctx_neg")}
    state.update({f"compound_prompts_text.{i}": torch.randn(4, 64, generator=g) * 0.02 for i in range(2)})
    return state


@pytest.mark.slow
def test_cli_convert_writes_a_checkpoint_that_zsad_loads_and_tests(tmp_path, capsys):
    from zsad.cli import _compose
    from zsad.module import ZSADModule

    official = _tiny_official()
    src = _official_file(official, tmp_path)
    out = tmp_path / "converted.ckpt"
    assert main(["convert", "anomalyclip", str(src), str(out), *TINY]) == 0
    assert str(out) in capsys.readouterr().out
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["zsad"]["method"] == "anomalyclip" and ckpt["zsad"]["stage"] == "main"
    assert (
        ckpt["zsad"]["config"]["variant"] == "faithful"
        and ckpt["zsad"]["config"]["method"]["map_reduce"] == "sum"
    )
    assert ckpt["zsad"]["identity"]["name"] == "tiny" and ckpt["zsad"]["identity"]["image_size"] == 56
    assert set(ckpt["state_dict"]) == {"model.prompts.ctx", "model.prompts.deep"}  # no frozen backbone inside

    cfg = _compose([f"checkpoint={out}"])  # the checkpoint's own config, as `zsad test checkpoint=…` reads it
    module = ZSADModule.from_checkpoint(cfg)
    prompts = module.model.prompts
    assert torch.equal(prompts.ctx[0, 0], official["ctx_pos"][0, 0])
    assert torch.equal(prompts.ctx[0, 1], official["ctx_neg"][0, 0])
    assert torch.equal(
        prompts.deep, torch.stack([official["compound_prompts_text.0"], official["compound_prompts_text.1"]])
    )
    back = anomalyclip.to_official(module.model.trainable_state_dict(), cfg)
    assert all(torch.equal(back[k], official[k]) for k in official)

    # zsad test evaluates it with zsad's data and metrics.
    synth = tmp_path / "synth"
    code = main([
        "test", f"checkpoint={out}", "protocol=synthetic", f"data.synthetic.root={synth}", "data.synthetic.size=56",
        "data.synthetic.n_test=4", "data.synthetic.n_train=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "logger=none", "eval.gallery_per_category=0",
        f"out_dir={tmp_path / 'runs'}", "run_name=converted",
    ])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "runs" / "converted" / "metrics.json").read_text())
    assert metrics["variant"] == "faithful" and metrics["datasets"]["synthetic_objects"]["n_images"] == 20


def test_cli_convert_reports_key_errors_and_unknown_methods(tmp_path, capsys):
    src = _official_file({**_tiny_official(), "bogus": torch.zeros(1)}, tmp_path)
    assert main(["convert", "anomalyclip", str(src), str(tmp_path / "x.ckpt"), *TINY]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
    assert main(["convert", "mpama", str(src), str(tmp_path / "x.ckpt")]) == 2
    assert "no converter for method 'mpama'" in capsys.readouterr().err
    # A depth the tiny text tower cannot hold: the official tensors do not fit the built model.
    with_deeper = {**_tiny_official(), "compound_prompts_text.2": torch.zeros(4, 64)}
    src = _official_file(with_deeper, tmp_path)
    assert (
        main(
            ["convert", "anomalyclip", str(src), str(tmp_path / "x.ckpt"), *TINY[:-2], "method.deep_depth=4"]
        )
        == 2
    )
    assert "prompts.deep" in capsys.readouterr().err
