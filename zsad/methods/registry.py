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
