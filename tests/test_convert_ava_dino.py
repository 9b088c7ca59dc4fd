"""Official AVA-DINO checkpoints ↔ zsad trainable state (zsad/convert/ava_dino.py), on the parity vectors' trainables.

The official trainables are re-created from ``recipe.json`` / ``keys.txt`` of the AVA-DINO parity folder (SHA-checked),
so the names, shapes and values are exactly those of ``AVADino(c_in=1024).state_dict()``.
"""

from __future__ import annotations

import pytest
import torch

from tests.parity_vectors import method_folder, read_keys, recreate
from zsad.config import EXPERIMENTS, compose
from zsad.convert import ConversionError
from zsad.convert.ava_dino import (
    DROPPED,
    official_checkpoint,
    read_official,
    to_official,
    to_zsad,
)
from zsad.methods.ava_dino import AvaDinoHeads


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return recreate(method_folder("ava_dino"), "trainable")


@pytest.fixture(scope="module")
def cfg():
    return compose(
        [EXPERIMENTS / "methods" / "ava_dino.yaml", EXPERIMENTS / "ablations" / "ava_dino_faithful.yaml"]
    )


def _heads(cfg) -> AvaDinoHeads:
    m = cfg.method
    return AvaDinoHeads(
        1024, 768, int(m.hidden), len(m.taps), float(m.tau), str(m.routing), True, False, False
    )


def test_every_official_key_is_mapped_or_explicitly_dropped(official, cfg) -> None:
    keys = [r.key for r in read_keys(method_folder("ava_dino"), "trainable")]
    assert sorted(official) == keys
    state = to_zsad(official, cfg)
    assert len(state) == len(official) - len(DROPPED) and set(DROPPED) <= set(official)
    heads = _heads(cfg)
    # the names are exactly AvaDino's trainable names (``heads.`` + the heads' state dict), nothing missing
    assert set(state) == {f"heads.{k}" for k in heads.state_dict()}
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items()}, strict=True)


def test_mapping_is_semantic_not_just_a_bijection(official, cfg) -> None:
    """Spot checks by hand: tap t / branch pairs land on zsad's per-tap (normal, anomalous) pairs."""
    state = to_zsad(official, cfg)
    pairs = {
        "patch_token_adapter_anomaly.2.fc1.0.weight": "heads.patch_adapters.2.1.down.weight",
        "cls_token_adapter_normal.3.fc2.0.weight": "heads.cls_adapters.3.0.up.weight",
        "prompt_adapter.1.fc1.0.weight": "heads.prompt_adapters.1.down.weight",
        "text_projection.weight": "heads.text_proj.weight",
    }
    for o, z in pairs.items():
        assert torch.equal(state[z], official[o])


def test_round_trip_through_the_official_file_format(official, cfg, tmp_path) -> None:
    path = tmp_path / "epoch_9.pth"
    back = to_official(to_zsad(official, cfg), cfg, unused=official)
    torch.save(official_checkpoint(back, epoch=9), path)
    read = read_official(path)
    assert list(read) == sorted(official) or sorted(read) == sorted(official)
    for k, v in official.items():
        assert torch.equal(read[k], v), k
    # a flat AVADino.state_dict() file reads the same
    torch.save(official, tmp_path / "flat.pth")
    assert all(torch.equal(read_official(tmp_path / "flat.pth")[k], v) for k, v in official.items())


def test_without_the_official_dict_fc2_comes_back_as_zeros(official, cfg) -> None:
    back = to_official(to_zsad(official, cfg), cfg)
    assert sorted(back) == sorted(official)
    for k, v in official.items():
        if k in DROPPED:
            assert torch.equal(back[k], torch.zeros_like(v))
        else:
            assert torch.equal(back[k], v), k


def test_unknown_and_missing_keys_are_named(official, cfg, tmp_path) -> None:
    extra = dict(official, **{"routing_temperature": torch.tensor(0.1)})
    with pytest.raises(ConversionError, match="unknown keys.*routing_temperature"):
        to_zsad(extra, cfg)
    short = {k: v for k, v in official.items() if k != "cls_token_adapter_anomaly.1.fc2.0.weight"}
    with pytest.raises(ConversionError, match=r"missing keys.*cls_token_adapter_anomaly\.1\.fc2\.0\.weight"):
        to_zsad(short, cfg)
    state = to_zsad(official, cfg)
    with pytest.raises(ConversionError, match="unknown keys.*heads.log_tau"):
        to_official(dict(state, **{"heads.log_tau": torch.tensor(0.0)}), cfg)
    with pytest.raises(ConversionError, match=r"missing keys.*heads\.text_proj\.weight"):
        to_official({k: v for k, v in state.items() if k != "heads.text_proj.weight"}, cfg)
    wrapper = official_checkpoint(official)
    wrapper["optimizer"] = {}
    torch.save(wrapper, tmp_path / "w.pth")
    with pytest.raises(ConversionError, match="unknown.*optimizer"):
        read_official(tmp_path / "w.pth")
    with pytest.raises(ConversionError, match="not found"):
        read_official(tmp_path / "absent.pth")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.shared_adapters=true", "method.shared_adapters"),
        ("method.taps=[3,6,9,12]", "method.taps"),
        ("method.cls_adapt=false", "method.cls_adapt"),
        ("method.learn_tau=true", "method.learn_tau"),
        ("method.hidden=512", "method.hidden"),
    ],
)
def test_a_config_of_another_structure_is_refused_by_key(official, override, key) -> None:
    cfg = compose([EXPERIMENTS / "methods" / "ava_dino.yaml"], [override])
    with pytest.raises(ConversionError, match=key):
        to_zsad(official, cfg)
