"""Where the toy weights live and whether they are current (no torch import: the registry and the bench read it).

The cache folder (``$ZSAD_TOY_DIR``, default ``<project>/.cache/toy``) holds::

    toy_clip.pt        open_clip state dict of the toy CLIP     (method.clip.name=toy, pretrained=FILE)
    toy_dinov3.pth     timm state dict of the toy DINOv3 ViT    (method.vision.name=tiny, pretrained=FILE)
    manifest.json      seed, world generator + version, recipes, steps, final losses, seconds, sha256 of each file
    world.png          a contact sheet of the pretraining world

A model is *current* when the manifest's recipe for it equals the wanted one and its file's sha256 equals the
manifest's: then it is reused, otherwise rebuilt (only that model, unless the world changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_DIR = "ZSAD_TOY_DIR"
FILES = {"clip": "toy_clip.pt", "dino": "toy_dinov3.pth"}
MANIFEST = "manifest.json"


def cache_dir(folder: str | Path | None = None) -> Path:
    """The toy-weight folder: ``folder``, else ``$ZSAD_TOY_DIR``, else ``<project>/.cache/toy``."""
    if folder is not None:
        return Path(folder).expanduser().resolve()
    env = os.environ.get(ENV_DIR, "").strip()
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / ".cache" / "toy"


def toy_paths(folder: str | Path | None = None) -> dict[str, Path]:
    """``{"clip": …, "dino": …}`` weight files of the cache folder (they may not exist yet)."""
    root = cache_dir(folder)
    return {k: root / v for k, v in FILES.items()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | Path | None = None) -> dict[str, Any]:
    path = cache_dir(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_current(section: dict[str, Any] | None, wanted: dict[str, Any], path: Path) -> bool:
    """Whether a manifest section describes ``path`` built with the ``wanted`` recipe (world included)."""
    if not section or not path.is_file():
        return False
    if section.get("recipe") != wanted:
        return False
    return section.get("sha256") == sha256(path)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder: parallel test workers or benches build the weights once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def referenced(values: list[Any], folder: str | Path | None = None) -> bool:
    """Whether any string in (nested) ``values`` names one of the toy weight files."""
    paths = {str(p) for p in toy_paths(folder).values()}

    def walk(v: Any) -> bool:
        if isinstance(v, dict):
            return any(walk(x) for x in v.values())
        if isinstance(v, list | tuple):
            return any(walk(x) for x in v)
        return isinstance(v, str) and v in paths

    return walk(values)


def toy_overrides(name: str, folder: str | Path | None = None) -> list[str]:
    """Overrides that load a method's backbones from the toy weights of ``zsad pretrain`` (the default bench).

    The registry entry says which backbone loads which toy file (the toy CLIP has its own architecture preset,
    ``toy``: the tiny recipe at a native 112² input; the toy DINOv3 the tiny preset's); this fills in the paths. Both
    come in through ``pretrained=FILE``, exactly as real weights do. The files need not exist yet: ``zsad bench``
    builds them before the first run that names them (``zsad pretrain`` builds them explicitly).

    Args:
        name: method name.
        folder: toy-weight folder (default: :func:`cache_dir`).
    """
    from zsad.registry import entry

    return entry(name).toy_overrides(toy_paths(folder))
