"""Official checkpoints → zsad checkpoints (``zsad convert METHOD OFFICIAL_FILE OUT [key=value …]``).

A method with public code has a converter module listed in :data:`CONVERTERS`. Each one offers the same three
functions, with every name mapped explicitly:

* ``read_official(path) -> dict[str, Tensor]``: the official checkpoint file's trainable tensors, under the official
  names (whatever wrapper the official training script saves them in is removed).
* ``to_zsad(official, cfg) -> dict[str, Tensor]``: those tensors under the zsad method's trainable state-dict
  names (``ZSADMethod.trainable_state_dict()``, no ``model.`` prefix). Official keys the zsad model has no use for
  are dropped only from an explicit list; any other unknown key, and any missing key, is a :class:`ConversionError`
  naming them.
* ``to_official(zsad_state, cfg) -> dict``: the inverse (round trips; writing official files for the official code).

``cfg`` is the composed run config (its ``method`` node is what the mapping reads; :func:`method_node` accepts the
method node itself too).

:func:`convert` composes the config (the method YAML, then ``experiments/ablations/<method>_faithful.yaml`` — the
reference behaviour the official weights were trained with — then any extra layers and overrides), builds the
method through the registry (so that its backbone resolves and its identity is known), loads the converted tensors
strictly and writes a **zsad checkpoint** in the format ``ZSADModule`` saves (config + trainable weights + backbone
identity), which ``zsad test checkpoint=OUT data=…`` evaluates.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from zsad.config import EXPERIMENTS, ConfigError, compose
from zsad.registry import REGISTRY

# method name → module with read_official / to_zsad / to_official (the registry entries' converter)
CONVERTERS: dict[str, str] = {name: e.converter for name, e in REGISTRY.items() if e.converter}


class ConversionError(ValueError):
    """An official checkpoint that does not fit: unknown or missing keys, wrong shapes, unreadable file."""


def converter(method: str) -> ModuleType:
    """The converter module of ``method``; an unknown method is a ConfigError listing the known ones."""
    if method not in CONVERTERS:
        raise ConfigError(
            f"zsad convert: no converter for method {method!r}; known: {', '.join(sorted(CONVERTERS))}"
        )
    return importlib.import_module(CONVERTERS[method])


def method_node(cfg: Any) -> Any:  # noqa: ANN401 - DictConfig or a dataclass-like node
    """The ``method`` node of a run config, or ``cfg`` itself when it already is one."""
    if isinstance(cfg, DictConfig) and "method" in cfg and OmegaConf.select(cfg, "method.name") is not None:
        return cfg.method
    return cfg


def default_layers(method: str) -> list[Path]:
    """The config an official checkpoint is converted with: the method YAML, then its faithful layer."""
    return [EXPERIMENTS / "methods" / f"{method}.yaml", EXPERIMENTS / "ablations" / f"{method}_faithful.yaml"]


def compose_for(method: str, layers: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Compose :func:`default_layers` + ``layers`` + ``overrides``; the method name may not be changed."""
    cfg = compose([*default_layers(method), *layers], list(overrides))
    if cfg.method.name != method:
        raise ConfigError(
            f"method.name: converting a {method!r} checkpoint, but the config says {cfg.method.name!r}"
        )
    return cfg


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_keys(official: dict[str, Tensor], expected: Sequence[str], dropped: Any, what: str) -> None:  # noqa: ANN401
    """Raise a ConversionError naming every missing key and every key that is neither expected nor ``dropped``.

    Args:
        official: the official state dict.
        expected: the keys the mapping reads.
        dropped: a predicate ``dropped(key) -> bool`` for official keys that are known and deliberately not used.
        what: the checkpoint's description for the message.
    """
    missing = [k for k in expected if k not in official]
    unknown = sorted(k for k in official if k not in set(expected) and not dropped(k))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unknown:
            parts.append(f"unknown keys {unknown}")
        raise ConversionError(f"{what}: " + "; ".join(parts))


def convert(
    method: str,
    official_path: str | Path,
    out_path: str | Path,
    overrides: Sequence[str] = (),
    layers: Sequence[str | Path] = (),
) -> Path:
    """Convert an official checkpoint of ``method`` into a zsad checkpoint at ``out_path``.

    Args:
        method: a key of :data:`CONVERTERS`.
        official_path: the official checkpoint file.
        out_path: where the zsad checkpoint is written (parent folders are created).
        overrides: ``key=value`` overrides after the faithful config (e.g. ``method.clip.pretrained=FILE``).
        layers: extra YAML layers between the faithful config and the overrides.

    Returns:
        ``out_path``.

    Raises:
        ConversionError: the official file does not fit the configured model.
        ConfigError: a bad config key or value.
    """
    import lightning as L

    from zsad.module import ZSADModule

    mod = converter(method)
    official_path, out_path = Path(official_path), Path(out_path)
    cfg = compose_for(method, layers, overrides)
    official = mod.read_official(official_path)
    state = mod.to_zsad(official, cfg)
    # Seeded as ZSADModule.from_checkpoint seeds: with pretrained=none the random backbone is the same again.
    L.seed_everything(int(cfg.seed), workers=True)
    module = ZSADModule(cfg)
    model = module.model
    try:
        model.load_trainable_state_dict(state)
    except RuntimeError as e:  # missing/unexpected names or a size mismatch, reported by load_state_dict
        raise ConversionError(f"{official_path}: the converted tensors do not fit {method}: {e}") from e
    for key, value in model.trainable_state_dict().items():
        if not torch.equal(value.cpu(), state[key].to(value.dtype).cpu()):
            raise ConversionError(f"{official_path}: {key} changed while loading (dtype or device cast)")
    # An official checkpoint is the end of training: the last stage is the one it evaluates in.
    module.set_stage(model.stages()[-1].name)
    ckpt: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)},
        "pytorch-lightning_version": L.__version__,
        "epoch": 0,
        "global_step": 0,
        "converted_from": {"method": method, "file": str(official_path), "sha256": sha256(official_path)},
    }
    module.on_save_checkpoint(ckpt)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out_path)
    return out_path


__all__ = [
    "CONVERTERS",
    "ConversionError",
    "check_keys",
    "compose_for",
    "convert",
    "converter",
    "default_layers",
    "method_node",
]
