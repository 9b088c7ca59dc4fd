"""One resolution of a backbone's ``pretrained`` value for every backbone: ``none`` | a tag | a local file.

``resolve_source`` decides which of the three a value is (the same rule and the same ``WeightsError`` messages for
CLIP and DINOv3, each naming the config key); ``read_state_dict`` reads a local file (safetensors, a wrapped or
plain state dict, or a TorchScript archive). How a *tag* becomes weights is each family's own (open_clip's cache,
timm's hub download); ``tag_unavailable`` words the error when it cannot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from zsad.backbones.errors import WeightsError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_SUFFIX_LIST = "/".join(WEIGHT_SUFFIXES)
# Training checkpoints nest the state dict under one of these (checked in this order, each once).
_WRAPPERS = ("model_ema", "model", "module", "state_dict", "teacher")


@dataclass(frozen=True)
class WeightSource:
    """What ``pretrained`` names: ``kind`` none | tag | file; ``value`` as configured (stripped); ``path`` (file)."""

    kind: Literal["none", "tag", "file"]
    value: str
    path: Path | None = None


def looks_like_path(source: str) -> bool:
    """A value written as a path (a separator or a weight-file suffix) is never taken for a tag."""
    return "/" in source or "\\" in source or Path(source).suffix in WEIGHT_SUFFIXES


def resolve_source(
    pretrained: str,
    *,
    name: str,
    config_key: str,
    family: str,
    is_tag: Callable[[str], bool],
    known_tags: Callable[[], list[str]],
) -> WeightSource:
    """Classify ``pretrained`` for the backbone ``name`` of ``family`` (``open_clip``, ``timm``).

    ``none`` (any case) is random weights; a value that is not written as a path and that ``is_tag`` accepts is a
    tag; an existing file is a file. Anything else is a ``WeightsError`` naming ``config_key``.
    """
    source = str(pretrained).strip()
    if source.lower() == "none":
        return WeightSource("none", source)
    if not looks_like_path(source) and is_tag(source):
        return WeightSource("tag", source)
    path = Path(source).expanduser()
    if path.is_file():
        return WeightSource("file", source, path)
    if looks_like_path(source) or path.exists():
        raise WeightsError(
            f"{config_key}: weight file not found: '{source}'; set it to an existing {_SUFFIX_LIST} file, "
            f"a {family} tag, or 'none'"
        )
    tags = known_tags()
    known = f"known tags: {tags}" if tags else f"the {name} preset has no published weights"
    raise WeightsError(
        f"{config_key}: {source!r} is neither a known {family} tag for {name} ({known}) nor an existing file; "
        f"set it to a tag, a local {_SUFFIX_LIST} path, or 'none'"
    )


def tag_unavailable(config_key: str, tag: str, name: str, why: str) -> WeightsError:
    """The error for a known tag whose weights are neither cached nor downloadable (``why``: offline, the cause)."""
    return WeightsError(
        f"{config_key}: could not load tag '{tag}' for {name} ({why}) — set {config_key} to a local "
        f"{_SUFFIX_LIST} path (or 'none' for random weights)"
    )


def hf_offline() -> bool:
    """Whether Hugging Face Hub downloads are off (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def read_state_dict(path: Path, config_key: str) -> dict[str, Tensor]:
    """The tensors of a weight file: safetensors, a (wrapped) state dict or a TorchScript archive.

    A state dict nested in a training checkpoint (``model_ema``, ``model``, ``module``, ``state_dict``,
    ``teacher``) is unwrapped; DDP's ``module.`` prefix is stripped; non-tensor entries are dropped.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as e:
                if "torchscript" not in str(e).lower():
                    raise
                # OpenAI's original CLIP release (ViT-L-14-336px.pt) is a TorchScript archive.
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise WeightsError(f"{config_key}: cannot read weights '{path}': {first_line(e)}") from e
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    tensors = (
        {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not tensors:
        raise WeightsError(
            f"{config_key}: '{path}' holds no state dict of tensors (got {type(obj).__name__})"
        )
    return tensors


def few(keys: list[str], n: int = 5) -> str:
    """At most ``n`` of ``keys`` for an error message."""
    keys = list(keys)
    more = f" … (+{len(keys) - n})" if len(keys) > n else ""
    return f"{keys[:n]}{more}"
