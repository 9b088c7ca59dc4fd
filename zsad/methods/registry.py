"""Name → (config schema, model class) for every method. Modules are imported on first use."""

from __future__ import annotations

import importlib

# name: (module, config class, model class)
METHODS: dict[str, tuple[str, str, str]] = {
    "ava_dino": ("zsad.methods.ava_dino", "AvaDinoConfig", "AvaDino"),
    "anomalyclip": ("zsad.methods.anomalyclip", "AnomalyCLIPConfig", "AnomalyCLIP"),
    "mpa": ("zsad.methods.mpama", "MPAConfig", "MPA"),
    "mpama": ("zsad.methods.mpama", "MPAMAConfig", "MPAMA"),
    "entroad": ("zsad.methods.entroad", "EntroADConfig", "EntroAD"),
    "winclip": ("zsad.methods.winclip", "WinCLIPConfig", "WinCLIP"),
}


def _resolve(name: str, which: int) -> type:
    from zsad.config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    module = importlib.import_module(METHODS[name][0])
    return getattr(module, METHODS[name][which])


def method_schema(name: str) -> type:
    """The method's config dataclass."""
    return _resolve(name, 1)


def build_method(cfg):  # noqa: ANN001, ANN201 — cfg is the method's DictConfig
    """Instantiate the method model from its config node (``cfg.method``)."""
    return _resolve(cfg.name, 2)(cfg)


# The tiny presets have 4 blocks: taps 1-4 (the paper's 6/12/18/24 of 24 blocks, scaled).
_TINY_CLIP = ["method.clip.name=tiny", "method.clip.pretrained=none", "method.taps=[1,2,3,4]"]
TINY_OVERRIDES: dict[str, list[str]] = {
    "ava_dino": [
        "method.vision.name=tiny",
        "method.vision.pretrained=none",
        "method.text.name=tiny",
        "method.text.pretrained=none",
        "method.taps=[1,2,3,4]",
    ],
    "anomalyclip": [*_TINY_CLIP, "method.dpam_start=1"],
    "mpa": [*_TINY_CLIP, "method.dpam_start=1"],
    "mpama": [*_TINY_CLIP, "method.dpam_start=1"],
    "entroad": [*_TINY_CLIP, "method.dpam_start=1"],
    "winclip": ["method.clip.name=tiny", "method.clip.pretrained=none"],
}


def tiny_overrides(name: str) -> list[str]:
    """Overrides that swap a method's backbones for the tiny random-weight presets (tests, CPU demo, CI)."""
    return list(TINY_OVERRIDES[name])


def toy_overrides(name: str, folder: str | None = None) -> list[str]:
    """Overrides that load a method's backbones from the toy weights of ``zsad pretrain`` (the default bench).

    The toy CLIP has its own architecture preset (``toy``: the tiny recipe at a native 112² input); the toy DINOv3
    has the tiny preset's. Both come in through ``pretrained=FILE``, exactly as real weights do. The files need not
    exist yet: ``zsad bench`` builds them before the first run that names them (``zsad pretrain`` builds them
    explicitly).

    Args:
        name: method name.
        folder: toy-weight folder (default: ``zsad.pretrain.cache.cache_dir()``).
    """
    from zsad.pretrain.cache import toy_paths

    paths = toy_paths(folder)
    clip = f"method.clip.pretrained={paths['clip']}"
    if name == "ava_dino":
        return [
            *_swap(TINY_OVERRIDES[name], "method.text.name=tiny", "method.text.name=toy"),
            f"method.vision.pretrained={paths['dino']}",
            f"method.text.pretrained={paths['clip']}",
        ]
    if name not in TINY_OVERRIDES:
        raise KeyError(f"no toy preset for method {name!r}; known: {sorted(TINY_OVERRIDES)}")
    return [*_swap(TINY_OVERRIDES[name], "method.clip.name=tiny", "method.clip.name=toy"), clip]


def _swap(items: list[str], old: str, new: str) -> list[str]:
    """``items`` with ``old`` replaced by ``new`` and every ``*.pretrained=none`` dropped (the caller sets files)."""
    return [new if i == old else i for i in items if not i.endswith(".pretrained=none")]
