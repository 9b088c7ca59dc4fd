"""The method registry is the one place that knows methods by name: its presets compose for every method, and no
module of ``zsad/`` or ``data_modules/`` compares a method name or keys a table by one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zsad.config import EXPERIMENTS, compose
from zsad.pretrain.cache import toy_overrides
from zsad.registry import REGISTRY, method_schema, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_FILE = "zsad/registry.py"
# (file, name): a string equal to a method name that is not the method. MPA's and MPAMA's first stage is "mpa".
ALLOWED = {("zsad/methods/mpama/mpa.py", "mpa"), ("zsad/methods/mpama/mpama.py", "mpa")}


def name_dispatch(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant equal to one of ``names`` that is compared (``==``, ``in``, a
    ``match`` case) or is a dict key."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            # `x in ("a", "b")`: the members of a literal container are compared too
            for o in list(operands):
                if isinstance(o, (ast.Tuple, ast.List, ast.Set)):
                    operands.extend(o.elts)
        elif isinstance(node, ast.Dict):
            operands = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found += [
            (o.lineno, o.value)
            for o in operands
            if isinstance(o, ast.Constant) and isinstance(o.value, str) and o.value in names
        ]
    return found


def test_no_method_name_is_dispatched_on_outside_the_registry() -> None:
    files = [p for pkg in ("zsad", "data_modules") for p in sorted((ROOT / pkg).rglob("*.py"))]
    found = sorted(
        (rel, line, name)
        for p in files
        if (rel := p.relative_to(ROOT).as_posix()) != REGISTRY_FILE
        for line, name in name_dispatch(p.read_text(), set(REGISTRY))
        if (rel, name) not in ALLOWED
    )
    assert found == [], "method names compared outside zsad/registry.py (read the entry instead):\n" + (
        "\n".join(f"  {rel}:{line}: {name!r}" for rel, line, name in found)
    )


def test_the_checker_sees_name_dispatch() -> None:
    """Planted comparisons and tables are found (the check is not vacuous); a config default is not."""
    src = (
        'name: str = "mpa"\n'
        'if method == "ava_dino": pass\n'
        'if m in ("x", "entroad"): pass\n'
        'SIZES = {"winclip": 1}\n'
        'match m:\n    case "mpama": pass\n'
    )
    assert name_dispatch(src, set(REGISTRY)) == [
        (2, "ava_dino"),
        (3, "entroad"),
        (4, "winclip"),
        (6, "mpama"),
    ]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_entry_names_its_config_and_method_yaml(name: str) -> None:
    e = REGISTRY[name]
    assert e.name == name and method_schema(name)().name == name  # the config class's own default
    assert OmegaConf.load(EXPERIMENTS / "methods" / f"{name}.yaml").method.name == name
    for ablation in e.throughput_ablations:
        assert (EXPERIMENTS / "ablations" / f"{name}_{ablation}.yaml").is_file()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_tiny_toy_and_random_presets_compose(name: str, tmp_path: Path) -> None:
    e = REGISTRY[name]
    layers = [EXPERIMENTS / "methods" / f"{name}.yaml"]
    assert e.backbones, f"{name}: no backbone declared"
    tiny = OmegaConf.to_container(compose(layers, tiny_overrides(name)).method, resolve=True)
    toy = OmegaConf.to_container(compose(layers, toy_overrides(name, str(tmp_path))).method, resolve=True)
    rand = OmegaConf.to_container(compose(layers, e.random_overrides()).method, resolve=True)
    paper = OmegaConf.to_container(compose(layers).method, resolve=True)
    files = {"clip": str(tmp_path / "toy_clip.pt"), "dino": str(tmp_path / "toy_dinov3.pth")}

    def node(cfg: dict, key: str) -> dict:
        for part in key.split(".")[1:]:
            cfg = cfg[part]
        return cfg

    for b in e.backbones:
        assert node(tiny, b.key) == {**node(tiny, b.key), "name": "tiny", "pretrained": "none"}
        assert node(toy, b.key)["name"] == b.toy_preset and node(toy, b.key)["pretrained"] == files[b.toy]
        assert node(rand, b.key) == {**node(paper, b.key), "pretrained": "none"}  # paper size, random weights
    for override in e.tiny:  # the other tiny settings hold in both presets
        key = override.split("=", 1)[0]
        want = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        for cfg in (tiny, toy):
            assert OmegaConf.select(OmegaConf.create({"method": cfg}), key) == want, (name, override)


def test_presets_are_the_documented_ones() -> None:
    """Pinned: AVA-DINO's toy DINOv3 keeps the tiny architecture, its text tower takes the toy CLIP's."""
    assert toy_overrides("ava_dino", "/F") == [
        "method.vision.name=tiny",
        "method.text.name=toy",
        "method.taps=[1,2,3,4]",
        "method.vision.pretrained=/F/toy_dinov3.pth",
        "method.text.pretrained=/F/toy_clip.pt",
    ]
    assert tiny_overrides("mpa") == [
        "method.clip.name=tiny",
        "method.clip.pretrained=none",
        "method.taps=[1,2,3,4]",
        "method.dpam_start=1",
    ]
    assert toy_overrides("winclip", "/F") == ["method.clip.name=toy", "method.clip.pretrained=/F/toy_clip.pt"]
