"""EntroAD's retrieval memory: built once from the auxiliary (training) set, cached on disk, carried in checkpoints.

Spec ``entroad.md`` § Stage 1 (as MRAD): image keys are the normalised global embeddings with one-hot
{normal, anomalous} values; patch keys are, per image, the mean of the neighbour-averaged tap-24 ``ln_post`` tokens
inside the ground-truth mask (value anomalous) and outside it (value normal), normalised.

**The memory only ever comes from the training set.** ``Memory`` records a 63-bit hash of every source image path;
the method refuses to evaluate an image whose path is among them (a target sample can never be in the memory, and a
test set that overlaps the auxiliary set is caught).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.types import Batch, Sample
from zsad.methods.entroad.routing import neighbour_average

CACHE_VERSION = 2
_BUFFERS = ("image_keys", "image_values", "patch_keys", "patch_values", "source_hash")


class MemoryLeak(RuntimeError):
    """A sample being evaluated is one the memory was built from."""


def path_hash(path: str | Path) -> int:
    """Stable signed 63-bit hash of a path string (fits an int64 buffer; Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.sha1(str(path).encode()).digest()[:8], "big") >> 1


@dataclass
class MemoryTensors:
    """The memory's content: keys are L2-normalised, values one-hot {normal, anomalous}."""

    image_keys: Tensor  # [Mi, D]
    image_values: Tensor  # [Mi, 2]
    patch_keys: Tensor  # [Mp, W]
    patch_values: Tensor  # [Mp, 2]
    source_hash: Tensor  # [Mi] int64, path_hash of each source image


class Memory(nn.Module):
    """Persistent buffers holding the memory, so a checkpoint carries it to a test-only run.

    The buffers start empty; loading a state dict resizes them to the stored shapes.
    """

    def __init__(self, image_dim: int, patch_dim: int) -> None:
        super().__init__()
        self.register_buffer("image_keys", torch.zeros(0, image_dim))
        self.register_buffer("image_values", torch.zeros(0, 2))
        self.register_buffer("patch_keys", torch.zeros(0, patch_dim))
        self.register_buffer("patch_values", torch.zeros(0, 2))
        self.register_buffer("source_hash", torch.zeros(0, dtype=torch.long))
        self._sources: set[int] | None = None

    @property
    def built(self) -> bool:
        return self.image_keys.shape[0] > 0 and self.patch_keys.shape[0] > 0

    def set(self, mem: MemoryTensors) -> None:
        """Replace the content (kept on the buffers' device and dtype)."""
        for name in _BUFFERS:
            old = getattr(self, name)
            setattr(self, name, getattr(mem, name).to(device=old.device, dtype=old.dtype))
        self._sources = None

    def tensors(self) -> MemoryTensors:
        return MemoryTensors(*(getattr(self, n).detach().cpu() for n in _BUFFERS))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The memory's size depends on the auxiliary set: adopt the stored shapes before the default copy.
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                old = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=old.device, dtype=old.dtype))
        self._sources = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_disjoint(self, paths: Iterable[str]) -> None:
        """Raise ``MemoryLeak`` if any of ``paths`` is a source image of the memory (no device sync)."""
        if self._sources is None:
            self._sources = set(self.source_hash.tolist())
        leaked = [p for p in paths if path_hash(p) in self._sources]
        if leaked:
            raise MemoryLeak(
                f"EntroAD memory was built from the auxiliary training set, which contains the evaluated image(s) "
                f"{leaked[:3]}: a target set must not overlap data.train"
            )


def cache_key(samples: list[Sample], identity: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hex digest over the auxiliary samples (dataset, sorted paths, labels, masks), backbone identity and settings."""
    rows = sorted((s.dataset, str(s.image_path), str(s.mask_path or ""), int(s.label)) for s in samples)
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "datasets": sorted({s.dataset for s in samples}),
            "samples": rows,
            "identity": identity,
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


REGION_RULES = ("pure", "threshold")
_PURE_EPS = 1e-4


def patch_regions(masks: Tensor, grid: tuple[int, int], rule: str = "pure", threshold: float = 0.5) -> Tensor:
    """Boolean {normal, anomalous} patch regions [B, 2, N] of pixel masks [B, 1, H, W].

    The mask is binarised at ``threshold`` and resized bilinearly to the patch grid. ``pure`` (MRAD [C]): a patch is
    anomalous where the resized mask is 1 and normal where it is 0, so patches on a defect border belong to neither
    region; ``threshold``: anomalous where the resized mask exceeds ``threshold``, normal elsewhere.
    """
    if rule not in REGION_RULES:
        raise ValueError(
            f"method.memory_regions: unknown rule {rule!r}; expected one of {', '.join(REGION_RULES)}"
        )
    binary = (masks.float() > threshold).float()
    m = F.interpolate(binary, size=grid, mode="bilinear", align_corners=False).flatten(1)
    if rule == "pure":
        return torch.stack([m < _PURE_EPS, m > 1.0 - _PURE_EPS], 1)
    inside = m > threshold
    return torch.stack([~inside, inside], 1)


def mask_pooled_keys(
    tokens: Tensor,
    masks: Tensor | None,
    grid: tuple[int, int],
    threshold: float = 0.5,
    rule: str = "pure",
) -> tuple[Tensor, Tensor]:
    """Per image, the normalised mean token inside the mask (anomalous) and outside it (normal).

    Args:
        tokens: [B, N, W] neighbour-averaged tokens.
        masks: [B, 1, H, W] ground truth (bool/float). ``None`` (image-only set) gives no patch keys.
        grid: (gh, gw).
        threshold: pixel binarisation threshold (and the patch threshold of the ``threshold`` rule).
        rule: which patches count as inside / outside (:func:`patch_regions`).

    Returns:
        keys [K, W] and one-hot values [K, 2] for every non-empty region (batched, no per-image loop; the
        boolean selection syncs once per memory batch, which is built once, offline).
    """
    if masks is None:
        return tokens.new_zeros(0, tokens.shape[-1]), tokens.new_zeros(0, 2)
    regions = patch_regions(masks, grid, rule, threshold).to(tokens.dtype)  # [B, 2, N]: {normal, anomalous}
    counts = regions.sum(-1)  # [B, 2]
    means = (regions @ tokens) / counts.clamp_min(1).unsqueeze(-1)  # [B, 2, W]
    keep = counts > 0
    keys = F.normalize(means[keep].float(), dim=-1)
    values = F.one_hot(torch.nonzero(keep)[:, 1], 2).float()
    return keys, values


Encoder = Callable[[Tensor], tuple[Tensor, Tensor, tuple[int, int]]]


@torch.no_grad()
def collect_memory(
    batches: Iterable[Batch],
    encode: Encoder,
    kernels: tuple[int, ...],
    threshold: float,
    device: torch.device,
    rule: str = "pure",
) -> MemoryTensors:
    """One no-grad pass over the auxiliary batches.

    Args:
        batches: the auxiliary set as ``Batch`` es (image normalised at the method's input size, mask).
        encode: images → (global embedding [B, D], tap-24 pre-projection tokens [B, N, W], grid).
        kernels: neighbour-averaging kernels.
        threshold: pixel mask threshold (:func:`mask_pooled_keys`).
        device: where the encoder runs.
        rule: patch region rule (:func:`patch_regions`).
    """
    img_k, img_v, pat_k, pat_v, hashes = [], [], [], [], []
    for batch in batches:
        glob, tokens, grid = encode(batch.image.to(device, non_blocking=True))
        img_k.append(F.normalize(glob.float(), dim=-1))
        img_v.append(F.one_hot(batch.label.to(device).long(), 2).float())
        mask = None if batch.mask is None else batch.mask.to(device)
        k, v = mask_pooled_keys(neighbour_average(tokens.float(), grid, kernels), mask, grid, threshold, rule)
        pat_k.append(k)
        pat_v.append(v)
        hashes.extend(path_hash(p) for p in batch.path)
    if not img_k:
        raise ValueError(
            "EntroAD memory: the auxiliary set (data.train) is empty; the memory needs its samples"
        )
    mem = MemoryTensors(
        torch.cat(img_k).cpu(),
        torch.cat(img_v).cpu(),
        torch.cat(pat_k).cpu(),
        torch.cat(pat_v).cpu(),
        torch.tensor(hashes, dtype=torch.long),
    )
    if mem.patch_keys.shape[0] == 0:
        raise ValueError(
            "EntroAD memory: the auxiliary set has no masks, so no patch keys; train on a set with masks"
        )
    return mem


def load_cached(path: Path, key: str) -> MemoryTensors | None:
    """The cached memory at ``path`` if it exists and was built for ``key``; else ``None``."""
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("key") != key:
        return None
    return MemoryTensors(*(blob[n] for n in _BUFFERS))


def save_cached(path: Path, key: str, mem: MemoryTensors) -> None:
    """Write atomically (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, **{n: getattr(mem, n) for n in _BUFFERS}}, tmp)
    tmp.replace(path)
