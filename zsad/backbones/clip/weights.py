"""CLIP's side of weight resolution: which ``pretrained`` values are open_clip tags, where a tag's file lies (the
Hugging Face or open_clip cache, else a download), and how a full CLIP state dict splits into the two towers.

The none | tag | file decision, file reading and the error wording are :mod:`zsad.backbones.weights`' (shared with
DINOv3).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor

from zsad.backbones.errors import WeightsError
from zsad.backbones.weights import (
    WeightSource,
    first_line,
    hf_offline,
    read_state_dict,
    resolve_source,
    tag_unavailable,
)

log = logging.getLogger(__name__)

# Keys of a full CLIP state dict that belong to neither tower (attn_mask: a buffer TorchScript archives keep).
_SHARED_KEYS = {"logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size", "attn_mask"}


def resolve(
    name: str, pretrained: str, *, presets: set[str], config_key: str, cache_dir: str | None
) -> tuple[WeightSource, dict[str, Any], Path | None]:
    """(source, the tag's open_clip config — ``{}`` unless a tag —, the weight file or ``None`` for ``none``)."""
    own = name in presets  # zsad's own architectures have no published tags
    source = resolve_source(
        pretrained,
        name=name,
        config_key=config_key,
        family="open_clip",
        is_tag=lambda s: not own and bool(open_clip.get_pretrained_cfg(name, s)),
        known_tags=lambda: [] if own else open_clip.list_pretrained_tags_by_model(name),
    )
    if source.kind == "none":
        return source, {}, None
    if source.kind == "file":
        return source, {}, source.path
    tag_cfg = open_clip.get_pretrained_cfg(name, source.value)
    return source, tag_cfg, _resolve_tag(name, source.value, tag_cfg, config_key, cache_dir)


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> Path | None:
    """The tag's weight file if it already lies in the Hugging Face or open_clip URL cache (never touches the net)."""
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            # open_clip's convention: 'org/repo/' means the default weight file, 'org/repo/file' that file; a
            # .safetensors twin is preferred when cached.
            repo_id, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS_NAME
            names = [filename]
            if filename == HF_WEIGHTS_NAME:
                names.insert(0, HF_SAFE_WEIGHTS_NAME)
            elif filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for fname in names:
                found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = tag_cfg.get("url", "")
    if url:
        folder = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        candidate = folder / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _resolve_tag(
    name: str, tag: str, tag_cfg: dict[str, Any], config_key: str, cache_dir: str | None
) -> Path:
    cached = _cached_tag_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    if hf_offline():
        raise tag_unavailable(
            config_key, tag, name, "offline: HF_HUB_OFFLINE is set and no cached copy was found"
        )
    log.info("downloading CLIP weights %s/%s", name, tag)
    try:
        target = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # network, hub and filesystem errors all mean the same thing to the user
        raise tag_unavailable(config_key, tag, name, f"offline? {first_line(e)}") from e
    if not target or not Path(target).is_file():
        raise tag_unavailable(config_key, tag, name, "the download gave no file")
    return Path(target)


def _split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(vision, text) state dicts in the keys of open_clip's VisionTransformer / TextTransformer."""
    vision = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    text = {}
    for k, v in state.items():
        if k.startswith("visual.") or k in _SHARED_KEYS:
            continue
        text[k[len("text.") :] if k.startswith("text.") else k] = v
    return vision, text


def load_weights(
    path: Path, vit: VisionTransformer | None, txt: TextTransformer | None, name: str, config_key: str
) -> None:
    """Load an open_clip or OpenAI checkpoint into the towers that were built (strict: every key must fit)."""
    vision_sd, text_sd = _split_state_dict(read_state_dict(path, config_key))
    for tower, sd, what in ((vit, vision_sd, "vision"), (txt, text_sd, "text")):
        if tower is None:
            continue
        try:
            tower.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise WeightsError(
                f"{config_key}: '{path}' does not fit the {what} tower of {name}: {detail[:500]}"
            ) from e
