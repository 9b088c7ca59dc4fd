"""``zsad pretrain``: render the world, train the toy CLIP and the toy DINOv3, write files + manifest.

The Python API is :func:`pretrain` (build, or reuse what is current) and :func:`ensure_toy_weights` (the same under
a folder lock, quietly reusing). Both return the manifest.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_modules import pretrain_world as W
from zsad.pretrain import cache as K
from zsad.pretrain.toy_clip import ClipRecipe, train_clip
from zsad.pretrain.toy_dino import DinoRecipe, train_dino
from zsad.pretrain.world import WorldTensors, attrs

log = logging.getLogger("zsad.pretrain")
MODELS = ("clip", "dino")


@dataclass(frozen=True)
class PretrainSpec:
    """The whole recipe of the toy weights: world + both models (the manifest records all of it).

    Attributes:
        seed: seeds the world, the initialisations, the views and the captions.
        per_category: world items per category (14 categories).
        world_size: side of a world image in pixels.
        clip, dino: the two models' recipes.
    """

    seed: int = 0
    per_category: int = 80
    world_size: int = 128
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    dino: DinoRecipe = field(default_factory=DinoRecipe)

    def world(self) -> dict[str, Any]:
        return {
            "generator": "data_modules.pretrain_world",
            "version": W.WORLD_VERSION,
            "seed": self.seed,
            "per_category": self.per_category,
            "size": self.world_size,
            "categories": list(W.CATEGORIES),
            "defects": list(W.DEFECTS),
        }

    def recipe(self, model: str) -> dict[str, Any]:
        """What decides one model's weights: the world and its own recipe (JSON-comparable)."""
        from zsad.pretrain import toy_clip, toy_dino

        own = toy_clip.recipe_dict(self.clip) if model == "clip" else toy_dino.recipe_dict(self.dino)
        return json.loads(json.dumps({"world": self.world(), "model": own}))


def _stale(spec: PretrainSpec, folder: Path, force: bool) -> list[str]:
    manifest = K.read_manifest(folder)
    paths = K.toy_paths(folder)
    return [m for m in MODELS if force or not K.is_current(manifest.get(m), spec.recipe(m), paths[m])]


def pretrain(
    folder: str | Path | None = None,
    spec: PretrainSpec | None = None,
    force: bool = False,
    show_progress: bool = True,
    only: tuple[str, ...] = MODELS,
) -> dict[str, Any]:
    """Build the toy weights that are not current (or all with ``force``) and return the manifest.

    Args:
        folder: cache folder (default ``$ZSAD_TOY_DIR`` or ``<project>/.cache/toy``).
        spec: world and recipes (default: :class:`PretrainSpec`).
        force: rebuild even when current.
        show_progress: progress bars for the world and for each model's steps.
        only: models to consider (``clip``, ``dino``).
    """
    from tqdm.auto import tqdm

    spec = spec or PretrainSpec()
    root = K.cache_dir(folder)
    root.mkdir(parents=True, exist_ok=True)
    todo = [m for m in _stale(spec, root, force) if m in only]
    manifest = K.read_manifest(root)
    if not todo:
        log.info("toy weights in %s are current (sha256 and recipe match); nothing to build", root)
        return manifest
    t0 = time.perf_counter()
    from zsad.pretrain.world import load_world

    world = load_world(spec.seed, spec.per_category, spec.world_size, workers=2, show_progress=show_progress)
    world_s = time.perf_counter() - t0
    _save_sheet(root, world)
    trainers = {"clip": (train_clip, spec.clip, "toy CLIP"), "dino": (train_dino, spec.dino, "toy DINOv3")}
    for model in todo:
        fn, recipe, label = trainers[model]
        t1 = time.perf_counter()
        with tqdm(
            total=recipe.steps, desc=f"pretrain {label}", unit="step", disable=not show_progress
        ) as bar:

            def progress(
                step: int, losses: dict[str, float], bar: tqdm = bar, total: int = recipe.steps
            ) -> None:
                bar.update(1)
                if step % 10 == 0 or step == total:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})

            state, final = fn(world, recipe, spec.seed, progress)
        path = K.toy_paths(root)[model]
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never a half-written weight file under the real name
        manifest[model] = {
            "file": path.name,
            "sha256": K.sha256(path),
            "format": "open_clip state dict" if model == "clip" else "timm state dict (DINOv3 Eva)",
            "recipe": spec.recipe(model),
            "seed": spec.seed,
            "steps": recipe.steps,
            "final": final,
            "seconds": round(time.perf_counter() - t1, 1),
            "world_seconds": round(world_s, 1),
            "threads": torch.get_num_threads(),
        }
        manifest["versions"] = _versions()
        (root / K.MANIFEST).write_text(json.dumps(manifest, indent=1))
        log.info("toy %s: %s in %.0f s, final %s", model, path, manifest[model]["seconds"], final)
    return manifest


def ensure_toy_weights(folder: str | Path | None = None, show_progress: bool = True) -> dict[str, Path]:
    """The toy weight files, built first if missing or stale (under a lock: concurrent callers build once)."""
    root = K.cache_dir(folder)
    with K.locked(root):
        pretrain(root, show_progress=show_progress)
    return K.toy_paths(root)


def _save_sheet(root: Path, world: WorldTensors, per_category: int = 6) -> None:
    """world.png: the first items of every category, masks outlined in red."""
    from PIL import Image

    items = []
    for cat in W.CATEGORIES:
        for i in [i for i, it in enumerate(world.items) if it.category == cat][:per_category]:
            img = world.images[i].permute(1, 2, 0).numpy()
            items.append(W.WorldItem(img, world.masks[i].numpy(), img, *attrs(world.items[i])))
    Image.fromarray(W.contact_sheet(items, per_category)).save(root / "world.png")


def _versions() -> dict[str, str]:
    import open_clip
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
    }


def spec_with(
    spec: PretrainSpec | None = None,
    clip_steps: int | None = None,
    dino_steps: int | None = None,
    dino_objective: str | None = None,
    per_category: int | None = None,
    seed: int | None = None,
) -> PretrainSpec:
    """A spec with some fields replaced (the CLI's options)."""
    spec = spec or PretrainSpec()
    if clip_steps is not None:
        spec = replace(spec, clip=replace(spec.clip, steps=clip_steps))
    if dino_steps is not None:
        spec = replace(spec, dino=replace(spec.dino, steps=dino_steps))
    if dino_objective is not None:
        spec = replace(spec, dino=replace(spec.dino, objective=dino_objective))
    if per_category is not None:
        spec = replace(spec, per_category=per_category)
    if seed is not None:
        spec = replace(spec, seed=seed)
    return spec


__all__ = ["PretrainSpec", "ensure_toy_weights", "pretrain", "spec_with", "asdict"]
