"""The bench grid runner: expansion, reuse/force/resume, failures, ablations, and the shipped bench presets.

Training is replaced by a fake ``zsad.run.train`` that writes a metrics.json (no model is trained here); the
configs are composed for real, with a toy method registered for the test.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import zsad.run
from zsad import config as C
from zsad import registry
from zsad.bench import grid
from zsad.config import ConfigError, MethodConfig
from zsad.results.leaderboard import write_leaderboard
from zsad.results.schema import METRIC_KEYS

BENCH_DIR = Path(__file__).resolve().parent.parent / "experiments" / "bench"


@dataclass
class ToyConfig(MethodConfig):
    knob: float = 1.0
    fail: bool = False


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A registered toy method, a toy protocol, a fake train() and a two-method × two-seed spec."""
    module = types.ModuleType("zsad_bench_toy")
    module.ToyConfig = ToyConfig
    module.Toy = object
    monkeypatch.setitem(sys.modules, "zsad_bench_toy", module)
    monkeypatch.setitem(
        registry.REGISTRY, "toy", registry.MethodEntry("toy", "zsad_bench_toy", "ToyConfig", "Toy", "Toy")
    )
    exp = tmp_path / "experiments"
    (exp / "protocols").mkdir(parents=True)
    (exp / "protocols" / "toy.yaml").write_text(
        "protocol: toy\ndata:\n  train: {name: toyset}\n  test: [{name: toyset}]\n"
    )
    monkeypatch.setattr(C, "EXPERIMENTS", exp)
    (tmp_path / "toy.yaml").write_text("method: {name: toy, stages: {main: {epochs: 1}}}\n")
    calls: list[tuple[str, bool]] = []

    def fake_train(cfg, test_after: bool = True, resume: bool = True) -> Path:  # noqa: ANN001
        out = Path(cfg.out_dir) / C.run_name(cfg)
        calls.append((out.name, resume))
        C.save(cfg, out / "config.yaml")
        if cfg.method.fail:
            raise RuntimeError("toy failure")
        v = min(1.0, 0.1 * float(cfg.method.knob) + 0.01 * int(cfg.seed))
        values = dict.fromkeys(METRIC_KEYS, v)
        doc = {
            "method": cfg.method.name,
            "variant": cfg.variant,
            "protocol": cfg.protocol,
            "train_on": "toyset",
            "seed": int(cfg.seed),
            "backbone": {"kind": "toy", "name": "toy", "pretrained": "none"},
            "datasets": {
                "toyset": {
                    "categories": {"c1": values},
                    "mean": values,
                    "n_categories_in_mean": dict.fromkeys(METRIC_KEYS, 1),
                    "n_images": 4,
                }
            },
            "timing": {"train_s": 1.0, "test_s": 0.1, "images_per_s": 40.0, "device": "cpu"},
            "versions": {"git": "abc"},
            "config": OmegaConf.to_container(cfg),
        }
        (out / "metrics.json").write_text(json.dumps(doc))
        return out

    monkeypatch.setattr(zsad.run, "train", fake_train)
    spec = tmp_path / "bench.yaml"
    spec.write_text(
        f"""
name: toy
title: Toy bench
out: {tmp_path / "results"}
runs_dir: {tmp_path / "runs"}
protocols: [toy]
seeds: [0, 1]
overrides: [logger=none]
methods:
  - {{name: toy, config: {tmp_path / "toy.yaml"}}}
  - {{name: toy_hi, config: {tmp_path / "toy.yaml"}, overrides: [method.knob=2.0]}}
"""
    )
    return {"spec": spec, "calls": calls, "root": tmp_path}


def _statuses(root: Path) -> dict[str, str]:
    doc = json.loads((root / "results" / "runs.json").read_text())
    return {f"{r['label']}-s{r['seed']}": r["status"] for r in doc["runs"]}


def test_grid_runs_then_reuses_then_forces(toy: dict) -> None:
    written = grid.run_bench(toy["spec"])
    names = ["toy-toy-s0", "toy-toy-s1", "toy_hi-toy-s0", "toy_hi-toy-s1"]
    assert toy["calls"] == [(n, True) for n in names]
    md = written["md"].read_text()
    assert "| toy | 0, 1 |" in md and "| toy_hi | 0, 1 |" in md
    # toy_hi (knob 2) scores 0.2 + 0.01·seed: mean 20.5 ± 0.7 over the two seeds, and it is the best row
    assert "**20.5 ± 0.7**" in md and "| toy | 0, 1 | 10.5 ± 0.7 |" in md
    assert set(_statuses(toy["root"]).values()) == {"ran"}

    toy["calls"].clear()
    grid.run_bench(toy["spec"])
    assert toy["calls"] == []
    assert set(_statuses(toy["root"]).values()) == {"reused"}

    grid.run_bench(toy["spec"], force=True)
    assert toy["calls"] == [(n, False) for n in names]


def test_changed_config_reruns_but_runtime_keys_do_not(toy: dict) -> None:
    grid.run_bench(toy["spec"])
    toy["calls"].clear()
    grid.run_bench(toy["spec"], overrides=["method.knob=3.0"])
    assert len(toy["calls"]) == 4 and all(resume is False for _, resume in toy["calls"])
    assert set(_statuses(toy["root"]).values()) == {"rerun (config changed)"}
    toy["calls"].clear()
    grid.run_bench(toy["spec"], overrides=["method.knob=3.0", "logger=csv", "data.num_workers=3"])
    assert toy["calls"] == []
    # a key added to the schema after a run was made (absent from its saved config) does not make it stale
    saved = toy["root"] / "runs" / "toy-toy-s0" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(saved))
    del cfg["eval"]["gallery_per_category"]
    saved.write_text(OmegaConf.to_yaml(cfg))
    grid.run_bench(toy["spec"], overrides=["method.knob=3.0"])
    assert toy["calls"] == []


def test_interrupted_run_resumes(toy: dict) -> None:
    grid.run_bench(toy["spec"])
    (toy["root"] / "runs" / "toy_hi-toy-s1" / "metrics.json").unlink()  # as if killed before the test stage
    toy["calls"].clear()
    grid.run_bench(toy["spec"])
    assert toy["calls"] == [("toy_hi-toy-s1", True)]


def test_failing_run_is_recorded_and_the_others_run(toy: dict) -> None:
    spec = toy["spec"].read_text().replace("[method.knob=2.0]", "[method.fail=true]")
    toy["spec"].write_text(spec)
    with pytest.raises(grid.BenchFailed) as info:
        grid.run_bench(toy["spec"])
    assert info.value.code and "2 of 4 runs failed" in str(info.value)
    assert len(toy["calls"]) == 4
    status = _statuses(toy["root"])
    assert status == {"toy-s0": "ran", "toy-s1": "ran", "toy_hi-s0": "failed", "toy_hi-s1": "failed"}
    assert "RuntimeError: toy failure" in (toy["root"] / "runs" / "toy_hi-toy-s0" / "error.txt").read_text()
    md = (toy["root"] / "results" / "leaderboard.md").read_text()
    assert "| toy | 0, 1 |" in md and "## Failed runs" in md and "toy failure" in md


def test_config_errors_stop_the_grid_before_any_training(toy: dict) -> None:
    with pytest.raises(ConfigError, match="nope"):
        grid.run_bench(toy["spec"], overrides=["method.nope=1"])
    assert toy["calls"] == []
    with pytest.raises(ConfigError, match="protocols: no experiments/protocols/zzz.yaml"):
        grid.run_bench(toy["spec"], overrides=["bench.protocols=[zzz]"])


def test_spec_overrides_and_base(toy: dict) -> None:
    spec = grid.load_spec(toy["spec"], ["bench.seeds=[7]"])
    assert spec.seeds == [7] and [m.name for m in spec.methods] == ["toy", "toy_hi"]
    child = toy["root"] / "child.yaml"
    child.write_text("base: bench.yaml\nname: child\nseeds: [3, 4, 5]\n")
    spec = grid.load_spec(child)
    assert spec.name == "child" and spec.seeds == [3, 4, 5] and spec.protocols == ["toy"]
    runs = grid.expand(spec)
    assert [r.name for r in runs][:3] == ["toy-toy-s3", "toy-toy-s4", "toy-toy-s5"]
    with pytest.raises(ConfigError, match=r"unknown spec key\(s\) \[.sedes.\]"):
        grid.load_spec(toy["spec"], ["bench.sedes=[1]"])


def test_ablations_add_rows_after_their_method(toy: dict) -> None:
    abl = toy["root"] / "ablations"
    abl.mkdir()
    (abl / "toy_big.yaml").write_text("method: {knob: 5.0}\n")
    spec = toy["spec"]
    spec.write_text(spec.read_text() + f"ablations: {abl}\n")
    written = grid.run_bench(spec, overrides=["bench.seeds=[0]"])
    _, rows = _rows(written["md"].read_text())
    assert rows == ["toy", "toy_big", "toy_hi"]
    cfg = OmegaConf.load(toy["root"] / "runs" / "toy_big-toy-s0" / "config.yaml")
    assert cfg.method.knob == 5.0 and cfg.variant == "big"  # metrics.json names the ablation
    # without the grid's labels the leaderboard names the row from method + variant alike
    files = sorted((toy["root"] / "runs").glob("*/metrics.json"))
    md = write_leaderboard(files, toy["root"] / "plain", "plain", plots=False)["md"].read_text()
    assert "| toy_big | 0 |" in md

    # an override that undoes the ablation's own setting is refused
    with pytest.raises(ConfigError, match="toy_big.yaml: sets method.knob=5.0"):
        grid.run_bench(spec, overrides=["method.knob=1.0"])
    (abl / "zzz_other.yaml").write_text("method: {knob: 1.0}\n")
    with pytest.raises(ConfigError, match="zzz_other.yaml: an ablation file name starts with its method"):
        grid.run_bench(spec)


def _rows(md: str) -> tuple[str, list[str]]:
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| method | seeds"))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return lines[i], rows


def test_ablation_files_belong_to_the_longest_method_name(tmp_path: Path) -> None:
    for name in ("mpama_top1", "mpa_levels1", "entroad_no_gate"):
        (tmp_path / f"{name}.yaml").write_text("method: {}\n")
    found = grid.ablation_files(tmp_path, ["mpa", "mpama"])
    assert {k: [p.stem for p in v] for k, v in found.items()} == {
        "mpa": ["mpa_levels1"],
        "mpama": ["mpama_top1"],
    }


def test_ablation_file_that_names_its_method_belongs_to_it(tmp_path: Path) -> None:
    (tmp_path / "mpa_wide.yaml").write_text("method: {name: mpama}\n")  # the file's own method.name wins
    (tmp_path / "wider.yaml").write_text("method: {name: mpa}\n")
    found = grid.ablation_files(tmp_path, ["mpa", "mpama"])
    assert {k: [p.stem for p in v] for k, v in found.items()} == {"mpa": ["wider"], "mpama": ["mpa_wide"]}
    (tmp_path / "x.yaml").write_text("method: {name: nope}\n")
    with pytest.raises(ConfigError, match="x.yaml: an ablation file name starts with its method"):
        grid.ablation_files(tmp_path, ["mpa"])


def test_leaderboard_metric_keys_match_the_metrics_package() -> None:
    from zsad.metrics import METRIC_KEYS as METRICS_KEYS

    assert tuple(METRIC_KEYS) == tuple(METRICS_KEYS)


@pytest.mark.parametrize("path", sorted(BENCH_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_bench_presets_parse_and_compose(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZSAD_DATA", str(tmp_path))
    spec = grid.load_spec(path)
    runs = grid.expand(spec)
    assert runs, f"{path} expands to no run"
    grid.compose_all(runs)
    for run in runs:
        assert run.cfg.method.name in registry.REGISTRY
        assert run.cfg.seed == run.seed and run.run_dir.name == run.name
    labels = {r.label for r in runs}
    assert {m.name for m in spec.methods} <= labels


def test_default_bench_is_the_cpu_demo_of_all_methods() -> None:
    from zsad.pretrain.cache import toy_paths

    spec = grid.load_spec(BENCH_DIR / "default.yaml")
    runs = grid.expand(spec)
    grid.compose_all(runs)
    assert {r.cfg.method.name for r in runs} == set(registry.REGISTRY)
    toy = {str(p) for p in toy_paths().values()}
    random_rows = set()
    for r in runs:
        assert r.cfg.trainer.accelerator == "cpu"
        pretrained = [v for k, v in _leaves(OmegaConf.to_container(r.cfg.method)) if k.endswith("pretrained")]
        assert pretrained and set(pretrained) <= toy | {"none"}, r.name  # nothing to download
        if set(pretrained) == {"none"}:
            random_rows.add(r.label)
    assert random_rows == {"anomalyclip_random"}  # the one random-weight control; every other row is toy


def _leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}")]
    return [(prefix, node)]


def test_tiny_entry_takes_the_registry_presets_before_its_own_overrides(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        "name: t\nprotocols: [synthetic]\nseeds: [0]\nmethods:\n"
        "  - {name: mpa, config: experiments/methods/mpa.yaml, tiny: true, overrides: [method.dpam_start=2]}\n"
    )
    (entry,) = grid.load_spec(spec_file).methods
    assert list(entry.overrides) == [*registry.tiny_overrides("mpa"), "method.dpam_start=2"]
    (run,) = grid.expand(grid.load_spec(spec_file))
    grid.compose_all([run])
    assert run.cfg.method.clip.name == "tiny" and run.cfg.method.dpam_start == 2  # own override wins
