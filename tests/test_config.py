"""Config composition: layers, overrides, group files, and errors that name the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from zsad.config import ConfigError, compose, save


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_layers_and_overrides_merge_in_order(tmp_path, dummy_method):
    a = _write(tmp_path, "a.yaml", "method: {name: dummy, width: 4}\nseed: 3\n")
    b = _write(tmp_path, "b.yaml", "method: {width: 6}\n")
    cfg = compose([a, b], ["seed=7", "method.stages.first.epochs=5"])
    assert cfg.method.width == 6 and cfg.seed == 7
    assert cfg.method.stages.first.epochs == 5
    assert cfg.method.stages.second.optim.name == "adamw"  # schema default kept
    assert cfg.trainer.precision == "32-true"


def test_unknown_key_is_an_error_naming_it(tmp_path, dummy_method):
    a = _write(tmp_path, "a.yaml", "method: {name: dummy}\n")
    with pytest.raises(ConfigError, match="method.widht"):
        compose([a], ["method.widht=3"])
    with pytest.raises(ConfigError, match="trainer.max_epoch"):
        compose([a], ["trainer.max_epoch=3"])


def test_wrong_type_is_an_error_naming_it(tmp_path, dummy_method):
    a = _write(tmp_path, "a.yaml", "method: {name: dummy}\n")
    with pytest.raises(ConfigError, match="method.width"):
        compose([a], ["method.width=wide"])
    bad = _write(tmp_path, "bad.yaml", "method: {name: dummy}\ndata: {test_batch_size: many}\n")
    with pytest.raises(ConfigError, match="data.test_batch_size"):
        compose([bad])


def test_unknown_method_and_missing_method(tmp_path):
    with pytest.raises(ConfigError, match="method.name"):
        compose([], ["method.name=nope"])
    with pytest.raises(ConfigError, match="method.name is not set"):
        compose([], ["seed=1"])


def test_missing_file_and_bad_override(tmp_path, dummy_method):
    with pytest.raises(ConfigError, match="not found"):
        compose([tmp_path / "absent.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        from zsad.config import read_layers

        read_layers([], ["novalue"])


def test_group_selection_loads_experiment_file(dummy_method):
    cfg = compose([], ["method.name=dummy", "trainer=ddp_cpu"])
    assert cfg.trainer.strategy == "ddp_spawn" and cfg.trainer.devices == 2


def test_resolved_config_round_trips(tmp_path, dummy_method):
    cfg = compose([], ["method.name=dummy", "seed=5", "run_name=x${seed}"])
    path = save(cfg, tmp_path / "run" / "config.yaml")
    back = OmegaConf.load(path)
    assert back.run_name == "x5" and back.method.width == cfg.method.width
    again = compose([path])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize(
    ("value", "want"), [("true", True), ("false", False), ("warn", "warn"), ("WARN", "warn")]
)
def test_trainer_deterministic_reaches_lightning(tmp_path, monkeypatch, dummy_method, value, want):
    """true | false | warn; ``warn`` → Lightning's ``"warn"``: deterministic algorithms in warn-only mode."""
    from zsad.config import trainer_deterministic
    from zsad.run import make_trainer

    a = _write(tmp_path, "a.yaml", "method: {name: dummy}\ntrainer: {accelerator: cpu}\n")
    cfg = compose([a], [f"trainer.deterministic={value}"])
    assert trainer_deterministic(cfg.trainer.deterministic) == want
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # Lightning sets it; restored after the test
    try:
        make_trainer(cfg, tmp_path)
        assert torch.are_deterministic_algorithms_enabled() is (want is not False)
        assert torch.is_deterministic_algorithms_warn_only_enabled() is (want == "warn")
    finally:
        torch.use_deterministic_algorithms(False)


def test_trainer_deterministic_other_values_name_the_key(tmp_path, dummy_method):
    a = _write(tmp_path, "a.yaml", "method: {name: dummy}\n")
    for bad in ("maybe", "1"):
        with pytest.raises(ConfigError, match="trainer.deterministic"):
            compose([a], [f"trainer.deterministic={bad}"])


def test_gpu_trainer_files_do_not_ask_for_strict_determinism():
    """`true` raises at the first backward on CUDA (bilinear-upsample backward): non-CPU layers use false or warn."""
    from zsad.config import EXPERIMENTS, trainer_deterministic

    layers = sorted((EXPERIMENTS / "trainer").glob("*.yaml"))
    assert {"gpu.yaml", "ddp.yaml"} <= {p.name for p in layers}
    for path in layers:
        cfg = compose([EXPERIMENTS / "methods" / "ava_dino.yaml", path])
        if cfg.trainer.accelerator != "cpu":
            assert trainer_deterministic(cfg.trainer.deterministic) in (False, "warn"), path.name


# Every option field with a fixed set of values, per method: (method, key, a bad value, the allowed values).
OPTION_FIELDS = [
    ("anomalyclip", "method.score_rule", "median", "global | max | mean_topk"),
    ("anomalyclip", "method.map_reduce", "max", "mean | sum"),
    ("anomalyclip", "method.clip.pos_interp", "nearest", "bilinear | bicubic"),
    ("anomalyclip", "method.stages.main.optim.name", "sgd", "adam | adamw"),
    ("mpa", "method.bridge", "mean", "max | none | score_max"),
    ("mpama", "method.moe_placement", "before", "slot | after"),
    ("mpama", "method.frozen_dispatch", "sparse", "gather | dense"),
    ("entroad", "method.score_rule", "global", "max | mean_topk"),
    ("entroad", "method.entropy", "bogus", "row_entropy | entropy_rate | two_level | none"),
    ("entroad", "method.route_norm", "l2", "l1 | softmax"),
    ("entroad", "method.memory_regions", "soft", "pure | coverage"),
    ("ava_dino", "method.routing", "topk", "text | uniform"),
    ("ava_dino", "method.score_rule", "global", "max | mean_topk"),
    ("winclip", "method.score_rule", "median", "global | global_max | max | mean_topk"),
    ("winclip", "data.class_name", "raw", "cleaned | reference_path"),
    ("winclip", "data.mask_resize", "nearest", "float | uint8"),
    ("winclip", "logger", "tensorboard", "csv | wandb | none"),
]


@pytest.mark.parametrize(
    ("method", "key", "bad", "allowed"), OPTION_FIELDS, ids=[f"{m}-{k}" for m, k, *_ in OPTION_FIELDS]
)
def test_bad_option_value_is_a_config_error_naming_key_and_choices(method, key, bad, allowed):
    """Option fields are Literal types: a bad value stops at compose time (override or YAML layer alike)."""
    from zsad.config import EXPERIMENTS

    with pytest.raises(ConfigError) as exc:
        compose([EXPERIMENTS / "methods" / f"{method}.yaml"], [f"{key}={bad}"])
    assert str(exc.value) == f"{key}={bad}: expected one of {allowed}"
    good = allowed.split(" | ")[-1]
    assert (
        OmegaConf.select(compose([EXPERIMENTS / "methods" / f"{method}.yaml"], [f"{key}={good}"]), key)
        == good
    )


def test_method_yamls_only_select_the_method():
    """The paper defaults live in the dataclasses: a method YAML holds nothing but ``method.name``."""
    from zsad.config import EXPERIMENTS
    from zsad.registry import REGISTRY

    for name in REGISTRY:
        assert OmegaConf.to_container(OmegaConf.load(EXPERIMENTS / "methods" / f"{name}.yaml")) == {
            "method": {"name": name}
        }
