"""One :class:`MethodEntry` per method: every per-method fact the runner, bench, throughput bench, converter and
tests need. Nothing else in ``zsad/`` or ``data_modules/`` dispatches on a method's name (``tests/test_registry.py``
checks it). Plain data, no torch: a method's modules are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from zsad.errors import ConfigError


@dataclass(frozen=True)
class Backbone:
    """One backbone node of a method's config: ``<key>.name`` is its preset, ``<key>.pretrained`` its weights."""

    key: str  # e.g. "method.clip"
    toy: str  # the toy weight file it loads (a key of zsad.pretrain.cache.toy_paths: "clip" | "dino")
    # the architecture preset of that file (the toy CLIP has its own, "toy"; the toy DINOv3 the tiny one)
    toy_preset: str


def _clip(key: str) -> Backbone:
    return Backbone(key, toy="clip", toy_preset="toy")


def _dino(key: str) -> Backbone:
    return Backbone(key, toy="dino", toy_preset="tiny")


@dataclass(frozen=True)
class MethodEntry:
    """A method: where its classes live, how to shrink it, and what the benches need to know about it."""

    name: str  # method.name (the config class's default)
    module: str  # module holding the two classes
    config: str  # the config dataclass (a zsad.config.MethodConfig)
    model: str  # the model class (a zsad.methods.base.ZSADMethod)
    display: str  # how people write it (papers, tables)
    backbones: tuple[Backbone, ...] = ()
    # the tiny presets' other settings (taps, DPAM depth); the toy presets share them
    tiny: tuple[str, ...] = ()
    converter: str | None = None  # module converting the official checkpoint (zsad.convert), if there is one
    # the throughput bench (zsad.bench.throughput)
    throughput: bool = True  # one of its default rows
    # more default rows: <name>:<ablation> (experiments/ablations/<name>_<ablation>.yaml)
    throughput_ablations: tuple[str, ...] = ()
    # CPU input side of the tiny preset: the smallest multiple of the patch with a 4×4 grid
    cpu_size: int = 56
    targets: tuple[tuple[str, float], ...] = ()  # issue 9's targets on one H100: (report key, minimum)
    # scores against a memory of auxiliary images (the throughput bench fills a random one)
    memory: bool = False

    def tiny_overrides(self) -> list[str]:
        """The tiny random-weight presets: every backbone ``name=tiny, pretrained=none``, then ``tiny``."""
        return [
            *(o for b in self.backbones for o in (f"{b.key}.name=tiny", f"{b.key}.pretrained=none")),
            *self.tiny,
        ]

    def random_overrides(self) -> list[str]:
        """The paper-size backbones with random weights (``pretrained=none``)."""
        return [f"{b.key}.pretrained=none" for b in self.backbones]

    def toy_overrides(self, paths: dict) -> list[str]:
        """The toy presets: every backbone's toy preset, then ``tiny``, then each backbone's file from ``paths``."""
        return [
            *(f"{b.key}.name={b.toy_preset}" for b in self.backbones),
            *self.tiny,
            *(f"{b.key}.pretrained={paths[b.toy]}" for b in self.backbones),
        ]


# The tiny presets have 4 blocks: taps 1-4 (the paper's 6/12/18/24 of 24 blocks, scaled).
_TAPS = "method.taps=[1,2,3,4]"


def _on_clip(*classes: str, tiny: tuple[str, ...] = (_TAPS, "method.dpam_start=1"), **facts) -> MethodEntry:  # noqa: ANN003
    """A method on one CLIP (``method.clip``); its tiny preset taps blocks 1-4 and runs DPAM from block 1."""
    return MethodEntry(*classes, backbones=(_clip("method.clip"),), tiny=tiny, **facts)


# In the throughput bench's default row order.
REGISTRY: dict[str, MethodEntry] = {
    e.name: e
    for e in (
        _on_clip(
            "anomalyclip",
            "zsad.methods.anomalyclip",
            "AnomalyCLIPConfig",
            "AnomalyCLIP",
            "AnomalyCLIP",
            converter="zsad.convert.anomalyclip",
        ),
        _on_clip("mpa", "zsad.methods.mpama", "MPAConfig", "MPA", "MPA"),
        _on_clip(
            "mpama",
            "zsad.methods.mpama",
            "MPAMAConfig",
            "MPAMA",
            "MPA-MA",
            targets=(("infer_img_s", 300.0), ("train_img_s", 100.0)),
        ),
        _on_clip(
            "entroad",
            "zsad.methods.entroad",
            "EntroADConfig",
            "EntroAD",
            "EntroAD",
            targets=(("infer_img_s", 150.0),),
            memory=True,
        ),
        MethodEntry(
            "ava_dino",
            "zsad.methods.ava_dino",
            "AvaDinoConfig",
            "AvaDino",
            "AVA-DINO",
            backbones=(_dino("method.vision"), _clip("method.text")),
            tiny=(_TAPS,),
            converter="zsad.convert.ava_dino",
            # DINOv3 weights stored in bf16 (DESIGN.md's 279 → 344 img/s row)
            throughput_ablations=("vision_bf16",),
            cpu_size=64,  # DINOv3's patch is 16
            targets=(("infer_img_s", 300.0), ("train_img_s", 100.0)),
        ),
        # training-free: no training step to time
        _on_clip(
            "winclip",
            "zsad.methods.winclip",
            "WinCLIPConfig",
            "WinCLIP",
            "WinCLIP",
            tiny=(),
            throughput=False,
        ),
    )
}


def entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _resolve(name: str, attr: str) -> type:
    e = entry(name)
    return getattr(importlib.import_module(e.module), getattr(e, attr))


def method_schema(name: str) -> type:
    """The method's config dataclass."""
    return _resolve(name, "config")


def build_method(cfg):  # noqa: ANN001, ANN201 — cfg is the method's DictConfig
    """Instantiate the method model from its config node (``cfg.method``)."""
    return _resolve(cfg.name, "model")(cfg)


def tiny_overrides(name: str) -> list[str]:
    """Overrides that swap a method's backbones for the tiny random-weight presets (tests, CPU demo, CI)."""
    return REGISTRY[name].tiny_overrides()
